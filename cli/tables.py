"""Tables a person can read anywhere, and the same rows for scripts (`--json`, `--csv`).

A listing command describes its columns once (`Col`: the row's key, a header, how to show a
value, and a priority) and calls `emit`:

    emit(records, COLUMNS, title="sources", as_json=as_json, as_csv=as_csv)

On a terminal the table fits its width: the columns that matter least (the highest
`priority`) are left out first, and said so under the table, until the rest fit; a
column that may wrap (`wrap=True`: free text) wraps; no value is ever cut short ("so…").
Printed to a log or a pipe (not a terminal, no $COLUMNS) the table is as wide as its
content, with every column. `--json` prints the records, `--csv` the same records as CSV
(nested values as JSON text), both with every field whatever the width.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .common import print_json

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the rows as JSON (every field).")]
CsvOpt = Annotated[bool, typer.Option("--csv", help="Print the rows as CSV (every field; nested values as JSON).")]

BORDER = 3  # characters a column adds to a boxed table: a space each side and a rule
EDGE = 1  # the table's closing rule
WRAP_MIN = 12  # a wrapping column is never made narrower than this (or its content)


@dataclass(frozen=True)
class Col:
    """A column of a listing: `key` in the row, `header` shown, `show` the cell's text.

    :param priority: 0 is always shown; when the width is short, columns of the highest
        priority go first (then the rightmost of equal priority)
    :param wrap: free text that may wrap onto more lines; other values are never wrapped or cut
    :param value: a value computed from the row (e.g. a state from two fields) instead of row[key]
    """

    key: str
    header: str | None = None
    priority: int = 0
    show: Callable[[Any], str] | None = None
    right: bool = False
    wrap: bool = False
    value: Callable[[dict], Any] | None = None  # the value from the whole row (default: row[key])

    @property
    def title(self) -> str:
        return self.header or self.key

    def text(self, row: dict) -> str:
        v = self.value(row) if self.value is not None else row.get(self.key)
        return self.show(v) if self.show is not None else one_line(v)


def one_line(v: Any, limit: int = 200) -> str:
    """A stored value for display: control characters escaped (no forged lines), long text clipped."""
    s = "" if v is None else str(v)
    s = s if s.isprintable() else repr(s)[1:-1]
    return s if len(s) <= limit else s[:limit] + f"... (+{len(s) - limit:,} characters)"


def num(fmt: str = "{:,}") -> Callable[[Any], str]:
    """A number's cell (empty when there is none)."""
    return lambda v: "" if v is None else fmt.format(v)


def _natural(c: Col, cells: list[str]) -> int:
    return max([len(c.title)] + [len(t) for t in cells])


def _min_width(c: Col, cells: list[str]) -> int:
    """The narrowest a column gets: its widest value and header, or for wrapping text, its
    longest header word and WRAP_MIN (rich wraps the rest)."""
    if not c.wrap:
        return _natural(c, cells)
    word = max((len(w) for w in c.title.split()), default=0)
    return min(_natural(c, cells), max(word, WRAP_MIN))


def total_width(widths: Iterable[int]) -> int:
    """The characters a boxed table of columns this wide takes."""
    widths = list(widths)
    return sum(widths) + BORDER * len(widths) + EDGE


def fit(cols: list[Col], cells: dict[str, list[str]], width: int | None) -> tuple[list[Col], list[Col]]:
    """The columns shown at `width` (None: all), in their order, and those left out, least useful
    first. Every priority-0 column is shown; then, most useful first (lowest priority, then
    leftmost), each column that still fits."""
    if width is None:
        return list(cols), []
    need = {c.key: _min_width(c, cells[c.key]) for c in cols}
    kept = [c for c in cols if c.priority == 0]
    for c in sorted((c for c in cols if c.priority > 0), key=lambda c: (c.priority, cols.index(c))):
        if total_width(need[k.key] for k in kept + [c]) <= width:
            kept.append(c)
    dropped = sorted((c for c in cols if c not in kept), key=lambda c: (-c.priority, -cols.index(c)))
    return sorted(kept, key=cols.index), dropped


def table(rows: Iterable[dict], cols: list[Col], title: str | None = None, width: int | None = None,
          totals: dict | None = None) -> Table:
    """A rich table of `rows` fitted to `width` (None: every column at its full width, unwrapped).

    :param totals: a last row (after a rule), e.g. sums, keyed as the rows are
    """
    rows = list(rows)
    everything = rows + ([totals] if totals else [])
    cells = {c.key: [c.text(r) for r in everything] for c in cols}
    kept, dropped = fit(cols, cells, width)
    caption = None
    if dropped:
        caption = (f"left out at {width} columns: {', '.join(c.title for c in dropped)} "
                   "(a wider terminal, --json or --csv shows them)")
    t = Table(title=title, caption=caption, caption_justify="left")
    for c in kept:
        least = _min_width(c, cells[c.key]) if width is not None else _natural(c, cells[c.key])
        t.add_column(c.title, justify="right" if c.right else "left", no_wrap=not c.wrap, overflow="fold",
                     min_width=least)
    for i, r in enumerate(rows):
        t.add_row(*[Text(cells[c.key][i]) for c in kept])
    if totals:
        t.add_section()
        t.add_row(*[Text(cells[c.key][-1]) for c in kept])
    t.width_needed = total_width(_natural(c, cells[c.key]) for c in kept)
    return t


def width_for(console: Console) -> int | None:
    """The width a table fits: the terminal's (or $COLUMNS); None in a log or a pipe."""
    return console.width if console.is_terminal or os.environ.get("COLUMNS") else None


def show(console: Console, rows: Iterable[dict], cols: list[Col], title: str | None = None,
         totals: dict | None = None) -> None:
    """Print the table of `rows` fitted to where it goes (see the module's docstring)."""
    width = width_for(console)
    t = table(rows, cols, title, width, totals)
    if width is None:  # a log: as wide as the content, never folded to the console's default 80
        wide = Console(file=console.file, width=max(t.width_needed, len(title or "")), highlight=False)
        wide.print(t, crop=False)
    else:
        console.print(t, highlight=False)


def to_csv(records: list[dict]) -> str:
    """The records as CSV: a column per key (in order of first appearance), nested values as JSON."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(list(keys))
    for r in records:
        w.writerow([_csv_cell(r.get(k)) for k in keys])
    return out.getvalue()


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str, ensure_ascii=False, sort_keys=True)
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def emit(console: Console, records: list[dict], cols: list[Col], *, title: str | None = None,
         as_json: bool = False, as_csv: bool = False, totals: dict | None = None) -> None:
    """A listing's output: JSON, CSV, or the fitted table."""
    if as_json and as_csv:
        from flexolmo.base.errors import InputError

        raise InputError("give --json or --csv, not both")
    if as_json:
        print_json(records)
    elif as_csv:
        sys.stdout.write(to_csv(records))
    else:
        show(console, records, cols, title, totals)


def columns_of(names: list[str], rows: list[dict], keep: int = 1) -> list[Col]:
    """Columns for rows whose shape is known only at run time (a query, a listing level): the
    first `keep` always shown, the others left out from the right when narrow; long text wraps."""
    def long_text(n: str) -> bool:
        vals = [r.get(n) for r in rows if isinstance(r.get(n), str)]
        return bool(vals) and max(len(v) for v in vals) > 24
    return [Col(n, priority=0 if i < keep else i, wrap=long_text(n)) for i, n in enumerate(names)]
