"""Registering sources: JSONL and Parquet input, the split, and every kind of bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cli.main import app
from flexolmo.base import sources
from flexolmo.base.errors import ConflictError, InputError, NotFoundError

OWNER = dict(owner="alice", domain="notes", licence="CC0")


def docs(n: int) -> list[dict]:
    return [{"text": f"Note {i}: the harvest of year {1900 + i} was good.", "year": 1900 + i} for i in range(n)]


def workspace_snapshot(ws) -> dict:
    """Every file under the workspace (but the catalog's own bytes) plus every catalog row."""
    files = sorted(str(p.relative_to(ws.root)) for p in ws.root.rglob("*") if p.is_file()) if ws.root.exists() else []
    rows = [s.to_dict() for s in sources.list_sources(ws)]
    return {"files": [f for f in files if not f.startswith("catalog.duckdb")], "rows": rows}


def test_register_jsonl_keeps_metadata_and_ids(ws, write_jsonl):
    path = write_jsonl("notes.jsonl", docs(50) + [{"doc_id": "special", "text": "Named.", "title": "T"}])
    src = sources.add_source(ws, "notes", path, **OWNER)
    assert src.n_docs_train + src.n_docs_valid == 51
    table = sources.load_documents(ws, "notes")
    rows = {r["doc_id"]: r for r in table.to_pylist()}
    assert rows["notes.jsonl:1"]["text"].startswith("Note 0:")
    assert json.loads(rows["notes.jsonl:1"]["metadata"]) == {"year": 1900}
    assert rows["special"]["title"] == "T"
    assert src.n_chars_train + src.n_chars_valid == sum(len(r["text"]) for r in rows.values())


def test_register_parquet_folder(ws, tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    for part in range(2):
        pq.write_table(pa.table({"id": [f"p{part}-{i}" for i in range(10)],
                                 "text": [f"Row {i} of part {part}." for i in range(10)],
                                 "lang": ["en"] * 10}), folder / f"part{part}.parquet")
    src = sources.add_source(ws, "rows", folder, **OWNER)
    assert src.n_docs_train + src.n_docs_valid == 20
    ids = sources.load_documents(ws, "rows").column("doc_id").to_pylist()
    assert ids == sorted(f"p{p}-{i}" for p in range(2) for i in range(10))


def test_split_is_deterministic_and_about_two_percent():
    ids = [f"doc-{i}" for i in range(20_000)]
    first = [sources.split_of(i) for i in ids]
    assert first == [sources.split_of(i) for i in ids]
    share = first.count("validation") / len(ids)
    assert 0.015 < share < 0.025
    # independent of input order and of the other documents
    assert sources.split_of("doc-7") == first[7]


def test_split_survives_re_registration(ws, write_jsonl, tmp_path):
    path = write_jsonl("a.jsonl", docs(300))
    sources.add_source(ws, "first", path, **OWNER)
    sources.add_source(ws, "second", path, **OWNER)
    a = sources.load_documents(ws, "first").to_pylist()
    b = sources.load_documents(ws, "second").to_pylist()
    assert [(r["doc_id"], r["split"]) for r in a] == [(r["doc_id"], r["split"]) for r in b]
    assert {r["split"] for r in a} == {"train", "validation"}


BAD_INPUTS = {
    "missing path": (None, "no such file or folder"),
    "no text column": ([{"body": "x"}], "no 'text' field"),
    "empty document": ([{"text": "fine"}, {"text": "   "}], "empty document"),
    "invalid json": ('{"text": "ok"}\n{"text": broken}\n', "not valid JSON"),
    "invalid utf8": (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', "not valid UTF-8"),
    "text not string": ([{"text": 5}], "not a string"),
    "duplicate doc_id": ([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], "repeats"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_changes_nothing(ws, write_jsonl, tmp_path, case):
    sources.add_source(ws, "existing", write_jsonl("ok.jsonl", docs(5)), **OWNER)
    before = workspace_snapshot(ws)
    content, message = BAD_INPUTS[case]
    path = tmp_path / "input" / "bad.jsonl"
    if isinstance(content, list):
        path = write_jsonl("bad.jsonl", content)
    elif isinstance(content, (str, bytes)):
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    else:
        path = tmp_path / "does-not-exist.jsonl"
    with pytest.raises(InputError, match=message) as err:
        sources.add_source(ws, "newsrc", path, **OWNER)
    if case in ("invalid json", "invalid utf8", "empty document"):
        assert "bad.jsonl:2" in str(err.value)  # names the file and the line
    assert workspace_snapshot(ws) == before
    assert not any(p.name.startswith(".tmp") for p in ws.sources_dir.iterdir())


def test_parquet_without_text_column(ws, tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(InputError, match="no 'text' column"):
        sources.add_source(ws, "x", path, **OWNER)
    assert sources.list_sources(ws) == []


def test_duplicate_and_unsafe_names(ws, write_jsonl):
    path = write_jsonl("a.jsonl", docs(3))
    sources.add_source(ws, "notes", path, **OWNER)
    with pytest.raises(ConflictError, match="already exists"):
        sources.add_source(ws, "notes", path, **OWNER)
    for bad in ("Notes", "../etc", "1abc", "my-notes", "", "x" * 41, "timetable"):
        with pytest.raises(InputError):
            sources.add_source(ws, bad, path, **OWNER)
    assert [s.name for s in sources.list_sources(ws)] == ["notes"]


def test_policy_changes_are_logged(ws, write_jsonl):
    sources.add_source(ws, "notes", write_jsonl("a.jsonl", docs(3)), **OWNER)
    src = sources.set_policy(ws, "notes", active=False, visibility="counts", expires="2020-01-01", by="bob")
    assert (src.active, src.visibility, str(src.expires)) == (False, "counts", "2020-01-01")
    log = sources.policy_log(ws, "notes")
    assert {(e["field"], e["new_value"], e["changed_by"]) for e in log} == {
        ("active", "False", "bob"), ("visibility", "counts", "bob"), ("expires", "2020-01-01", "bob")}
    src = sources.set_policy(ws, "notes", active=True)
    assert src.active and not src.available()  # expired
    assert sources.available_sources(ws) == []
    with pytest.raises(InputError, match="YYYY-MM-DD"):
        sources.set_policy(ws, "notes", expires="next tuesday")
    with pytest.raises(InputError, match="visibility"):
        sources.set_policy(ws, "notes", visibility="secret")
    with pytest.raises(NotFoundError):
        sources.set_policy(ws, "nope", active=True)


def test_cli_add_list_show_and_errors(ws, write_jsonl, tmp_path):
    runner = CliRunner()
    path = write_jsonl("a.jsonl", docs(20))
    base = ["--workspace", str(ws.root)]
    r = runner.invoke(app, base + ["sources", "add", "notes", "--path", str(path), "--owner", "alice",
                                   "--domain", "notes", "--licence", "CC0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, base + ["sources", "list", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)[0]["name"] == "notes"
    r = runner.invoke(app, base + ["sources", "add", "notes", "--path", str(path), "--owner", "a",
                                   "--domain", "d", "--licence", "l"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(app, base + ["sources", "add", "other", "--path", str(tmp_path / "nope"), "--owner", "a",
                                   "--domain", "d", "--licence", "l"])
    assert r.exit_code == 1 and "no such file" in r.output
    r = runner.invoke(app, base + ["sources", "set", "notes", "--inactive", "--by", "carol"])
    assert r.exit_code == 0
    r = runner.invoke(app, base + ["sources", "show", "notes", "--json"])
    shown = json.loads(r.output)
    assert shown["active"] is False and shown["policy_log"][0]["changed_by"] == "carol"


def test_workspace_from_environment(tmp_path, monkeypatch):
    from flexolmo.base.workspace import Workspace

    monkeypatch.setenv("FLEXOLMO_HOME", str(tmp_path / "envws"))
    assert Workspace.resolve().root == tmp_path / "envws"
    assert Workspace.resolve(tmp_path / "explicit").root == tmp_path / "explicit"
    monkeypatch.delenv("FLEXOLMO_HOME")
    monkeypatch.chdir(tmp_path)
    assert Workspace.resolve().root == tmp_path / "flexolmo-work"


def test_replace_dir_swaps_atomically(tmp_path):
    from flexolmo.base.workspace import atomic_dir

    final = tmp_path / "thing"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    inode = final.stat().st_ino
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "2" and final.stat().st_ino != inode
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]  # no leftovers
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "v").write_text("3")
            raise RuntimeError("interrupted")
    assert (final / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["thing"]


def test_by_is_validated_stored_as_data_and_shown_literally(ws, write_jsonl):
    from flexolmo.base import catalog

    sources.add_source(ws, "notes", write_jsonl("n.jsonl", docs(5)), **OWNER)
    for bad, why in (("x" * 1_000_000, "limit is 100"), ("alice\n2026-01-01 mallory: active True -> False", "control"),
                     ("\ud800", "lone surrogate"), ("", "empty")):
        with pytest.raises(InputError, match=why):
            sources.set_policy(ws, "notes", active=False, by=bad)
    assert sources.policy_log(ws, "notes") == []  # nothing half-written
    markup = "[/bold][red]root[/red] [link=http://x]y[/link]"
    sources.set_policy(ws, "notes", visibility="snippets", by=markup)
    assert sources.policy_log(ws, "notes")[-1]["changed_by"] == markup  # stored as given
    # a row written before validation existed: long and multi-line; shown clipped, on one line
    with catalog.connect(ws) as con:
        for by in ("a" * 500_000, "mallory\nforged line"):
            con.execute("INSERT INTO policy_log (source, changed_at, changed_by, field, old_value, new_value) "
                        "VALUES ('notes', now()::TIMESTAMP, ?, 'active', 'True', 'False')", [by])
    r = CliRunner().invoke(app, ["--workspace", str(ws.root), "sources", "show", "notes"])
    assert r.exit_code == 0, r.output
    assert markup in r.output  # literally, brackets and all
    assert "mallory\\nforged line" in r.output and "\nforged line" not in r.output  # escaped, on one line
    assert "(+499,800 characters)" in r.output  # clipped
    r = CliRunner().invoke(app, ["--workspace", str(ws.root), "sources", "set", "notes", "--inactive", "--by", "[/x]\nforged"])
    assert r.exit_code == 1 and "control" in r.output


# ---------------------------------------------------------------------------------------
# the source schema and policy: one definition (flexolmo/base/source_schema.py)


def test_every_copy_of_the_source_schema_agrees_with_its_definition(ws, write_jsonl):
    import dataclasses
    import typing

    import typer.main

    from api.schemas import PolicyUpdate, SourceOut
    from flexolmo.base import catalog, source_schema as S
    from index import protocol

    # the catalog's tables are the definition's columns, in order, with their types
    sources.add_source(ws, "notes", write_jsonl("a.jsonl", docs(3)), **OWNER)
    with catalog.connect(ws, read_only=True) as con:
        for table, cols in S.TABLES.items():
            got = con.execute("SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                              "WHERE table_name = ? ORDER BY ordinal_position", [table]).fetchall()
            assert got == [(c.name, c.sql, "YES" if c.nullable else "NO") for c in cols], table
    # the Source record: the same fields with the same types
    hints = typing.get_type_hints(sources.Source)
    assert [f.name for f in dataclasses.fields(sources.Source)] == [c.name for c in S.SOURCE_COLUMNS]
    assert all(hints[c.name] == S.py_type(c) for c in S.SOURCE_COLUMNS)
    # the API: SourceOut's types are the columns'; PolicyUpdate is the policy change plus a note
    for name, f in SourceOut.model_fields.items():
        assert name == "available" or f.annotation == S.py_type(S.column(name)), name
    assert issubclass(PolicyUpdate, S.PolicyChange) and set(PolicyUpdate.model_fields) == set(S.POLICY_FIELDS) | {"comment"}
    # the protocol's visibility is the schema's
    assert typing.get_args(protocol.Identity.model_fields["visibility"].annotation) == S.VISIBILITIES
    # the CLI's `sources set` options: one per policy field, with the definition's help
    cmd = typer.main.get_command(app).commands["sources"].commands["set"]
    opts = {p.name: p for p in cmd.params if p.param_type_name == "option"}
    assert set(opts) == set(S.POLICY_FIELDS) | {"by"}
    assert all(opts[f].help == S.POLICY_HELP[f] for f in S.POLICY_FIELDS)


def test_no_limit_has_one_spelling(ws, write_jsonl):
    """None (JSON null, `none` / `never` on the command line) is "none"; 0, 'off', a negative number
    and the old clear_* flags are refused with a message naming the spelling to use."""
    sources.add_source(ws, "notes", write_jsonl("a.jsonl", docs(3)), **OWNER)
    src = sources.set_policy(ws, "notes", max_verbatim=8, expires="2099-01-01")
    assert (src.max_verbatim, str(src.expires)) == (8, "2099-01-01")
    assert sources.set_policy(ws, "notes", active=False).max_verbatim == 8  # a field left out is kept
    for bad in (0, -1, "off", "none", 2.5, True):
        with pytest.raises(InputError, match=r"max-verbatim must be a whole number .*None \(null in JSON, 'none'"):
            sources.set_policy(ws, "notes", max_verbatim=bad)
    with pytest.raises(InputError, match=r"expires 'never' is not a date.*None \(null in JSON, 'never'"):
        sources.set_policy(ws, "notes", expires="never")
    for flag in ("clear_max_verbatim", "clear_expiry"):
        with pytest.raises(InputError, match=r"not a policy field .*max_verbatim=None lifts the limit"):
            sources.set_policy(ws, "notes", **{flag: True})
    assert sources.get_source(ws, "notes").max_verbatim == 8  # nothing refused was applied
    src = sources.set_policy(ws, "notes", max_verbatim=None, expires=None)
    assert src.max_verbatim is None and src.expires is None
    assert [(e["field"], e["new_value"]) for e in sources.policy_log(ws, "notes")][-2:] == [
        ("expires", None), ("max_verbatim", None)]
    # the command line: N or `none`, a date or `never`; 0 and the old --no-max-verbatim are refused
    base = ["--workspace", str(ws.root), "sources", "set", "notes"]
    r = CliRunner().invoke(app, base + ["--max-verbatim", "5", "--expires", "2098-02-02"])
    assert r.exit_code == 0 and "max_verbatim=5" in r.output and "expires=2098-02-02" in r.output
    r = CliRunner().invoke(app, base + ["--max-verbatim", "0"])
    assert r.exit_code == 1 and "'none' on the command line" in r.output
    r = CliRunner().invoke(app, base + ["--no-max-verbatim"])
    assert r.exit_code == 2 and "No such option" in r.output
    r = CliRunner().invoke(app, base + ["--max-verbatim", "none", "--expires", "never"])
    assert r.exit_code == 0 and "max_verbatim=none" in r.output and "expires=never" in r.output
    assert sources.get_source(ws, "notes").max_verbatim is None
