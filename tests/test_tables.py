"""Output a person can read anywhere (cli/tables.py): tables fitted to 80 columns without cutting a
name short, whole in a log, and every listing command's rows as JSON and CSV for scripts."""

from __future__ import annotations

import csv
import io
import json

import pytest
import typer.main
from rich.console import Console
from typer.testing import CliRunner

from cli import tables as T
from cli.index_cmds import CATALOG_COLUMNS
from cli.main import app
from cli.sources import LIST_COLUMNS
from flexolmo.base import sources

LONG = "regional_newspapers_archive"  # a long source name: shown whole or not at all, never "re…"
OWNER = "The Regional Newspapers Cooperative of the North"


def _render(rows, cols, width: int | None, title: str = "t") -> str:
    out = io.StringIO()
    console = Console(file=out, width=width or 80, force_terminal=width is not None, color_system=None)
    T.show(console, rows, cols, title)
    return out.getvalue()


def _catalog_rows() -> list[dict]:
    return [dict(source=LONG, owner=OWNER, domain="news and current affairs", visibility="snippets", available=True,
                 indexed=True, remote=None, stale=False, n_docs=123_456, n_tokens=98_765_432, bytes=456_789_012,
                 bytes_per_token=4.6, build_seconds=812.3, tokens_per_second=121_587.0, takedowns=3),
            dict(source="code", owner="Open Source Foundation", domain="code", visibility="full", available=False,
                 indexed=False, remote=None, stale=False, n_docs=None, n_tokens=None, bytes=None,
                 bytes_per_token=None, build_seconds=None, tokens_per_second=None, takedowns=0)]


def test_a_table_fits_80_columns_and_never_cuts_a_name(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    text = _render(_catalog_rows(), CATALOG_COLUMNS, 80, "source catalog")
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    assert "…" not in text and LONG in text and "not built" in text and "98,765,432" in text
    # the least useful columns went, and the table says which
    assert "left out at 80 columns: B/token, build s, tokens/s, owner, domain, takedowns, visibility" in " ".join(" ".join(lines).split())
    for kept in ("source", "on", "docs", "tokens", "MB", "state"):
        assert f" {kept} " in lines[2], lines[2]
    # wider, more columns come back; narrower, fewer, still nothing cut
    wide = _render(_catalog_rows(), CATALOG_COLUMNS, 240, "source catalog")
    assert "left out" not in wide and "B/token" in wide and OWNER in wide
    narrow = _render(_catalog_rows(), CATALOG_COLUMNS, 50, "source catalog")
    assert max(len(ln) for ln in narrow.splitlines()) <= 50 and LONG in narrow and "…" not in narrow


def test_in_a_log_the_table_is_whole(monkeypatch):
    """Not a terminal and no $COLUMNS: every column, every value on one line, however wide."""
    monkeypatch.delenv("COLUMNS", raising=False)
    text = _render(_catalog_rows(), CATALOG_COLUMNS, None, "source catalog")
    assert "left out" not in text and "…" not in text
    row = next(ln for ln in text.splitlines() if LONG in ln)
    assert OWNER in row and "news and current affairs" in row and "121,587" in row and "812.3" in row
    assert len(row) > 80


def test_a_fitted_table_keeps_the_columns_that_matter():
    cells = {c.key: [c.text(r) for r in _catalog_rows()] for c in CATALOG_COLUMNS}
    for width in range(30, 220, 7):
        kept, dropped = T.fit(CATALOG_COLUMNS, cells, width)
        assert {c.key for c in kept} >= {c.key for c in CATALOG_COLUMNS if c.priority == 0}
        assert set(map(id, kept)) | set(map(id, dropped)) == set(map(id, CATALOG_COLUMNS))
        need = [T._min_width(c, cells[c.key]) for c in kept]
        assert not dropped or T.total_width(need) <= width or all(c.priority == 0 for c in kept)
        # a column is left out only when it would not fit beside the more useful ones kept
        for c in dropped:
            more_useful = [k for k in kept if k.priority <= c.priority]
            assert T.total_width([T._min_width(k, cells[k.key]) for k in more_useful + [c]]) > width


def _listing_commands() -> dict[str, object]:
    """Every command that lists rows: named list, or a plural listing (takedowns), or query."""
    out = {}

    def walk(cmd, path):
        for name, sub in getattr(cmd, "commands", {}).items():
            if name in ("list", "takedowns", "query"):
                out[" ".join(path + [name])] = sub
            walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return out


def test_every_listing_command_has_json_and_csv():
    found = _listing_commands()
    assert {"sources list", "index list", "index takedowns", "keys list", "traces list", "query"} <= set(found)
    for name, cmd in found.items():
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert {"--json", "--csv"} <= opts, name


@pytest.fixture
def small_ws(ws, write_jsonl):
    docs = [{"text": f"Note {i}: the harvest of year {1900 + i} was good."} for i in range(30)]
    sources.add_source(ws, LONG, write_jsonl("a.jsonl", docs), owner=OWNER, domain="notes", licence="CC0")
    sources.add_source(ws, "code", write_jsonl("b.jsonl", docs), owner="Open Source Foundation", domain="code",
                       licence="MIT")
    sources.set_policy(ws, "code", max_verbatim=9)
    return ws


@pytest.mark.parametrize("argv", [["sources", "list"], ["index", "list"], ["index", "takedowns"],
                                  ["keys", "list"]])
def test_listing_commands_print_json_csv_and_a_table(small_ws, argv):
    base = ["--workspace", str(small_ws.root)]
    runner = CliRunner()
    r = runner.invoke(app, base + ["keys", "create", "--owner", OWNER, "--scope", "owner", "--label", "ops"])
    assert r.exit_code == 0, r.output
    js = runner.invoke(app, base + argv + ["--json"])
    assert js.exit_code == 0, js.output
    rows = json.loads(js.stdout)
    cs = runner.invoke(app, base + argv + ["--csv"])
    assert cs.exit_code == 0, cs.output
    parsed = list(csv.DictReader(io.StringIO(cs.stdout)))
    assert len(parsed) == len(rows)
    if rows:  # the same records, every field
        assert list(parsed[0]) == list(rows[0])
        assert all(str(v) == parsed[0][k] or v in (None, True, False) for k, v in rows[0].items()
                   if not isinstance(v, (dict, list)))
    table = runner.invoke(app, base + argv, env={"COLUMNS": "80"})
    assert table.exit_code == 0
    assert max(len(ln) for ln in table.stdout.splitlines()) <= 80 and "…" not in table.stdout
    if argv[0] in ("sources", "index") and argv[1] == "list":
        assert LONG in table.stdout and "code" in table.stdout
    both = runner.invoke(app, base + argv + ["--json", "--csv"])
    assert both.exit_code == 1 and "not both" in both.output


def test_sources_list_csv_holds_the_policy(small_ws):
    r = CliRunner().invoke(app, ["--workspace", str(small_ws.root), "sources", "list", "--csv"])
    rows = {row["name"]: row for row in csv.DictReader(io.StringIO(r.stdout))}
    assert rows["code"]["max_verbatim"] == "9" and rows[LONG]["max_verbatim"] == ""
    assert rows[LONG]["owner"] == OWNER and rows["code"]["active"] == "true"
    # the fitted table at 80 columns: the name whole, the total row, what was left out said
    r = CliRunner().invoke(app, ["--workspace", str(small_ws.root), "sources", "list"], env={"COLUMNS": "80"})
    assert LONG in r.stdout and "total" in r.stdout and "left out at 80 columns" in r.stdout
    assert set(c.key for c in LIST_COLUMNS) >= {"name", "on", "max_verbatim"}
