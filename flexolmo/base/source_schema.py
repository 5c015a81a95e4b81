"""The source record and its policy, defined once.

Everything that holds a source's fields is written from this module or checked against it
by a test (tests/test_sources.py):

    the catalog's `sources` and `policy_log` tables   DDL written from SOURCE_COLUMNS, POLICY_LOG_COLUMNS
                                                     (flexolmo/base/catalog.py); missing columns of an
                                                     older catalog are added from the same lists
    the `Source` record                              flexolmo/base/sources.py (field names and types: test)
    the API's `SourceOut` and `PolicyUpdate`          api/schemas.py, built from `source_model` and `PolicyChange`
    the owner-node protocol's visibility             index/protocol.py (`Visibility`, `VISIBILITY_ORDER`)
    the CLI's `sources set` options                  cli/sources.py (names and help from POLICY_HELP: test)

A policy is the four fields an owner may change (`POLICY_FIELDS`). "None" has one spelling:
`expires` None is no expiry date and `max_verbatim` None is no limit (JSON null; on the
command line the words `never` and `none`). A change names only the fields it sets, so
`max_verbatim=None` lifts the limit and leaving the field out keeps it. Other spellings of
"no limit" (0, a negative number, "off", a `clear_*` flag) are refused with a message that
names the one to use.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from flexolmo.base.errors import InputError

Visibility = Literal["full", "snippets", "counts"]
VISIBILITIES: tuple[str, ...] = get_args(Visibility)
VISIBILITY_ORDER: tuple[str, ...] = ("counts", "snippets", "full")  # least to most text
MAX_VERBATIM_MAX = 1_000_000  # tokens: far above any span; a larger number is a typo
NO_LIMIT_WORD = "none"  # the command line's word for max_verbatim None
NO_EXPIRY_WORD = "never"  # the command line's word for expires None

assert set(VISIBILITY_ORDER) == set(VISIBILITIES)


@dataclass(frozen=True)
class Column:
    """One column of a catalog table and the Python type of its value."""

    name: str
    sql: str  # DuckDB type
    py: Any  # the Python type of the value (None allowed when `nullable`)
    nullable: bool = False
    default: str | None = None  # SQL default expression
    extra: str = ""  # PRIMARY KEY, CHECK (...)
    doc: str = ""  # the SQL comment

    def ddl(self) -> str:
        parts = [f"{self.name:<15} {self.sql}"]
        parts += [] if self.nullable else ["NOT NULL"]
        parts += [f"DEFAULT {self.default}"] if self.default is not None else []
        parts += [self.extra] if self.extra else []
        return " ".join(parts)

    def add_column_sql(self, table: str) -> str:
        """The ALTER that adds this column to an older table (nullable or with its default:
        the rows already there get NULL or the default)."""
        default = f" DEFAULT {self.default}" if self.default is not None else ""
        return f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {self.name} {self.sql}{default}"


_VIS_SQL = ", ".join(f"'{v}'" for v in VISIBILITIES)

# Column order is the order of the table's columns, older catalogs' added columns last.
SOURCE_COLUMNS: tuple[Column, ...] = (
    Column("name", "VARCHAR", str, extra="PRIMARY KEY"),
    Column("owner", "VARCHAR", str),
    Column("domain", "VARCHAR", str),
    Column("licence", "VARCHAR", str),
    Column("visibility", "VARCHAR", Visibility, extra=f"CHECK (visibility IN ({_VIS_SQL}))",
           doc="what traces may show: " + " | ".join(VISIBILITIES)),
    Column("active", "BOOLEAN", bool, default="TRUE"),
    Column("expires", "DATE", dt.date, nullable=True, doc="licence expiry: after this day the source is off"),
    Column("origin", "VARCHAR", str, doc="where the documents came from (path, sample, remote:<url>)"),
    Column("content_hash", "VARCHAR", str, doc="sha256 over (doc_id, text) in doc_id order"),
    Column("n_docs_train", "BIGINT", int),
    Column("n_docs_valid", "BIGINT", int),
    Column("n_chars_train", "BIGINT", int),
    Column("n_chars_valid", "BIGINT", int),
    Column("n_synthetic", "BIGINT", int, default="0", doc="documents generated, not collected"),
    Column("created_at", "TIMESTAMP", dt.datetime),
    Column("updated_at", "TIMESTAMP", dt.datetime),
    Column("updated_by", "VARCHAR", str),
    Column("max_verbatim", "INTEGER", int, nullable=True,
           doc="the verbatim guard (tracing/guard.py): generation never emits a longer run of tokens found "
               "in the source; NULL: no limit"),
)

POLICY_FIELDS: tuple[str, ...] = ("active", "visibility", "expires", "max_verbatim")

POLICY_LOG_COLUMNS: tuple[Column, ...] = (
    Column("source", "VARCHAR", str),
    Column("changed_at", "TIMESTAMP", dt.datetime),
    Column("changed_by", "VARCHAR", str, doc="who: the OS user, or the service key's owner"),
    Column("field", "VARCHAR", str, doc=" | ".join(POLICY_FIELDS)),
    Column("old_value", "VARCHAR", str, nullable=True, doc="NULL: none (no expiry, no limit)"),
    Column("new_value", "VARCHAR", str, nullable=True),
    Column("key_id", "VARCHAR", str, nullable=True, doc="the service key the change was made with"),
    Column("comment", "VARCHAR", str, nullable=True, doc="the caller's note (the request's `by` or `comment`)"),
)


def ddl(table: str, columns: tuple[Column, ...]) -> str:
    """`CREATE TABLE IF NOT EXISTS` of a table, with each column's comment."""
    lines = []
    for i, c in enumerate(columns):
        comma = "," if i < len(columns) - 1 else ""
        lines.append(f"    {c.ddl()}{comma}" + (f"  -- {c.doc}" if c.doc else ""))
    return f"CREATE TABLE IF NOT EXISTS {table} (\n" + "\n".join(lines) + "\n);\n"


TABLES: dict[str, tuple[Column, ...]] = {"sources": SOURCE_COLUMNS, "policy_log": POLICY_LOG_COLUMNS}
SCHEMA = "".join(ddl(t, cols) for t, cols in TABLES.items())


def column(name: str, table: str = "sources") -> Column:
    return next(c for c in TABLES[table] if c.name == name)


def py_type(c: Column) -> Any:
    return c.py | None if c.nullable else c.py


# -- the policy -------------------------------------------------------------------------------

POLICY_HELP: dict[str, str] = {
    "active": "Switch the source on or off: an inactive source is neither searched nor routed.",
    "visibility": "What traces may show: " + " | ".join(VISIBILITIES) + ".",
    "expires": f"Licence expiry, YYYY-MM-DD; after it the source is off ('{NO_EXPIRY_WORD}' on the command line, "
               "null in JSON: no expiry).",
    "max_verbatim": "Generation never emits more than N consecutive tokens found in this source (the verbatim "
                    f"guard; '{NO_LIMIT_WORD}' on the command line, null in JSON: no limit).",
}

MaxVerbatim = Annotated[int, Field(ge=1, le=MAX_VERBATIM_MAX)]


class PolicyChange(BaseModel):
    """A change of a source's policy: the fields set are changed, the others kept. None
    (JSON null) sets "none": no expiry date, no verbatim limit."""

    model_config = ConfigDict(extra="forbid")

    active: bool | None = Field(None, description=POLICY_HELP["active"])
    visibility: Visibility | None = Field(None, description=POLICY_HELP["visibility"])
    expires: dt.date | None = Field(None, description=POLICY_HELP["expires"])
    max_verbatim: MaxVerbatim | None = Field(None, description=POLICY_HELP["max_verbatim"])

    @field_validator("max_verbatim", mode="before")
    @classmethod
    def _one_spelling_of_no_limit(cls, v):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"--max-verbatim must be a whole number of tokens >= 1, got {v!r}; None (null in JSON, "
                             f"'{NO_LIMIT_WORD}' on the command line) means no limit")
        return v

    @field_validator("expires", mode="before")
    @classmethod
    def _one_spelling_of_no_expiry(cls, v):
        if isinstance(v, str):
            try:
                return dt.date.fromisoformat(v.strip())
            except ValueError:
                raise ValueError(f"--expires {v!r} is not a date: write it as YYYY-MM-DD; None (null in JSON, "
                                 f"'{NO_EXPIRY_WORD}' on the command line) means no expiry") from None
        return v

    @field_validator("active", "visibility", mode="before")
    @classmethod
    def _not_none(cls, v):
        if v is None:
            raise ValueError("active and visibility may not be None (null): leave the field out to keep it")
        return v

    def changes(self) -> dict[str, Any]:
        """The fields this change sets, by name (None: none)."""
        return {k: getattr(self, k) for k in POLICY_FIELDS if k in self.model_fields_set}


def policy_change(**fields) -> PolicyChange:
    """A `PolicyChange` of keyword arguments (InputError names a bad or unknown field)."""
    unknown = sorted(set(fields) - set(POLICY_FIELDS))
    if unknown:
        raise InputError(f"{', '.join(unknown)} is not a policy field (the fields: {', '.join(POLICY_FIELDS)}; "
                         "None sets 'none': max_verbatim=None lifts the limit, expires=None the expiry date)")
    try:
        return PolicyChange.model_validate(fields)
    except ValidationError as e:
        raise InputError("; ".join(_message(err) for err in e.errors())) from None


def _message(err: dict) -> str:
    if err["type"] == "value_error":  # ours: the message names the field
        return err["msg"].removeprefix("Value error, ")
    field = "-".join(str(x) for x in err["loc"]).replace("_", "-")
    return f"--{field}: {err['msg']}"


def parse_cli_value(field: str, text: str | None) -> Any:
    """A policy value as typed on the command line: `never` / `none` are None, the rest as JSON would be."""
    if text is None:
        return None
    word = {"expires": NO_EXPIRY_WORD, "max_verbatim": NO_LIMIT_WORD}[field]
    t = text.strip()
    if t.lower() == word:
        return None
    if field == "max_verbatim":
        try:
            return int(t)
        except ValueError:
            raise InputError(f"--max-verbatim {text!r} is not a whole number of tokens; give N >= 1, or "
                             f"'{NO_LIMIT_WORD}' for no limit") from None
    return t


# -- the source's public shape -----------------------------------------------------------------

SHOWN_FIELDS: tuple[str, ...] = ("name", "owner", "domain", "licence", "visibility", "active", "expires",
                                 "max_verbatim", "n_docs_train", "n_docs_valid", "n_synthetic", "updated_at",
                                 "updated_by")


def source_model(name: str, fields: tuple[str, ...] = SHOWN_FIELDS, doc: str = "") -> type[BaseModel]:
    """A pydantic model of these source columns (types from SOURCE_COLUMNS), plus `available`
    (active and not expired: searched and routed)."""
    spec: dict[str, Any] = {f: (py_type(column(f)), Field(description=column(f).doc or None)) for f in fields}
    spec["available"] = (bool, Field(description="active and not expired: searched and routed"))
    return create_model(name, __doc__=doc or None, **spec)
