"""The base of every immutable set of options a caller passes per call (a trace's, a generation's).

    opts = TraceOptions.parse(max_docs=5)            # bad values raise InputError naming the field
    opts.replace(counterfactual=False)               # a validated copy (None values ignored)
    service_defaults.merged(request_options)         # the fields the request *set* win

A value is a frozen pydantic model: validated on construction, usable as a FastAPI body, and
it remembers which fields its caller set (`model_fields_set`), which is what `merged` reads:
per-request options override only what they name, and everything else comes from the
service's settings.
"""

from __future__ import annotations

from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import InputError


class Options(BaseModel):
    """Frozen, validated options; subclasses declare the fields with their limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    WHAT: ClassVar[str] = "options"  # how errors name them: "invalid trace options: ..."

    @classmethod
    def parse(cls, **values) -> Self:
        """Build from keyword values; a bad value raises InputError naming the option and the rule."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise InputError(explain(e, cls.WHAT)) from None

    def replace(self, **changes) -> Self:
        """A copy with `changes` applied (None values ignored), validated; the fields set so far
        stay set."""
        changes = {k: v for k, v in changes.items() if v is not None}
        out = self.parse(**{**self.model_dump(), **changes})
        object.__setattr__(out, "__pydantic_fields_set__", set(self.model_fields_set) | set(changes))
        return out

    def merged(self, over: Self | None) -> Self:
        """These options (a service's settings) with the fields `over` set (a request's) on top."""
        if over is None:
            return self
        return self.replace(**{k: getattr(over, k) for k in over.model_fields_set})

    def as_dict(self) -> dict:
        return self.model_dump()


def explain(e: ValidationError, what: str = "options") -> str:
    """One readable line per problem: 'max_docs: Input should be less than or equal to 100 (got 500)'."""
    lines = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "options"
        got = f" (got {err['input']!r})" if "input" in err and err["type"] not in ("value_error",) else ""
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}{got}")
    return f"invalid {what}: " + "; ".join(lines)
