"""Old formats in one place: a workspace written as an older flexolmo wrote it (cards without
`inputs`, a catalog without the columns added since, the single-file DuckDB provenance store)
is upgraded by `flexolmo migrate` and on open, idempotently, losing nothing."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from cli.main import app
from flexolmo.base import catalog, migrate, source_schema, sources
from flexolmo.base.artifacts.token_cache import TokenCacheCard
from flexolmo.base.artifacts.tokenizer import TokenizerCard
from flexolmo.base.workspace import Workspace
from flexolmo.model.artifacts.expert_package import ExpertPackageCard
from flexolmo.model.artifacts.merged_model import MergedModelCard
from flexolmo.model.artifacts.public_model import PublicModelCard
from flexolmo.model.config import get_profile
from index.manifest import IndexManifest
from tracing.provenance import queries, store

H = {c: c * 64 for c in "abcdef"}  # stand-in sha256 digests: cards are read, not their files
NOW = dt.datetime(2026, 1, 2, 3, 4, 5)

# the catalog as it was created before max_verbatim, key_id and comment
OLD_CATALOG = """
CREATE TABLE sources (
    name VARCHAR PRIMARY KEY, owner VARCHAR NOT NULL, domain VARCHAR NOT NULL, licence VARCHAR NOT NULL,
    visibility VARCHAR NOT NULL CHECK (visibility IN ('full', 'snippets', 'counts')),
    active BOOLEAN NOT NULL DEFAULT TRUE, expires DATE, origin VARCHAR NOT NULL, content_hash VARCHAR NOT NULL,
    n_docs_train BIGINT NOT NULL, n_docs_valid BIGINT NOT NULL, n_chars_train BIGINT NOT NULL,
    n_chars_valid BIGINT NOT NULL, n_synthetic BIGINT NOT NULL DEFAULT 0, created_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL, updated_by VARCHAR NOT NULL);
CREATE TABLE policy_log (source VARCHAR NOT NULL, changed_at TIMESTAMP NOT NULL, changed_by VARCHAR NOT NULL,
    field VARCHAR NOT NULL, old_value VARCHAR, new_value VARCHAR);
"""


def _old_profile() -> dict:
    """The profile as the older cards recorded it: no router recipe fields."""
    p = get_profile("tiny").to_dict()
    for part in ("public", "expert"):
        for k in ("router_bias_init", "router_z_loss", "router_init"):
            p[part].pop(k)
    return p


def _write(path: Path, obj: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / ("manifest.json" if "indexes" in path.parts else "card.json")).write_text(json.dumps(obj, indent=2))


def old_cards(ws: Workspace) -> dict[str, dict]:
    """Every kind of card as the writers before `inputs` wrote it; returns path -> card."""
    stats = dict(steps=3, tokens=384, final_loss=5.5, losses=[[1, 6.0], [3, 5.5]], seconds=1.5, tokens_per_s=256.0,
                 resumed_from=None, world_size=1, throughput="cpu", n_params=1000)
    cards = {
        "tokenizer": {"kind": "byte-level BPE (HF tokenizers)", "vocab_size": 512, "eos_token": "<|endoftext|>",
                      "eos_id": 0, "pad_token": "<|pad|>", "pad_id": 1, "trained_on": "public",
                      "source_content_hash": H["a"], "n_texts": 40, "n_bow_ids": 200,
                      "bow_rule": "decoded token starts with whitespace", "sha256": H["b"], "seconds": 0.5},
        "sources/news/tokens-train-bbbbbbbbbbbbbbbb": {"source": "news", "split": "train", "n_docs": 9,
                                                       "n_tokens": 900, "tokenizer_sha256": H["b"]},
        "models/public": {"kind": "public", "source": "public", "profile": "tiny", "config": _old_profile(), **stats,
                          "router_init": "domain_unit", "tokenizer_sha256": H["b"], "shared_weights_sha256": H["c"],
                          "created_at": "2025-01-01T00:00:00"},
        "experts/news": {"kind": "expert", "format": 1, "source": "news", "owner": "times", "domain": "news",
                         "profile": "tiny", "config": _old_profile(), "n_trainable": 100, **stats,
                         "public_hash": H["c"], "tokenizer_sha256": H["b"], "router_init": "domain_unit",
                         "privacy": {"dp": False}, "created_at": "2025-01-02T00:00:00", "created_by": "alice",
                         "files": {"expert.safetensors": H["d"]}},
        "models/merged": {"kind": "merged", "experts": [{"index": 0, "source": "public"},
                                                        {"index": 1, "source": "news", "package_sha256": H["d"]}],
                          "top_k": 2, "public_hash": H["c"], "n_params": 2000, "router_bias": "router_bias.safetensors",
                          "created_at": "2025-01-03T00:00:00"},
        "indexes/news": {"engine": "infini-gram", "version": 4, "token_dtype": "u16", "build_id": "b1",
                         "source": "news", "split": "train", "n_docs": 9, "n_tokens": 900, "n_shards": 1,
                         "shards": [{"shard": 0, "n_docs": 9, "n_tokens": 900, "ds_tokens": 909, "ptr_size": 2}],
                         "eos_id": 0, "tokenizer_hash": H["b"], "content_hash": H["e"],
                         "built_at": "2025-01-04T00:00:00", "files": {"tokenized.0": {"bytes": 1818, "sha256": H["f"]}}},
    }
    for rel, card in cards.items():
        _write(ws.root / rel, card)
    return cards


CARD_CLASSES = {"tokenizer": TokenizerCard, "sources/news/tokens-train-bbbbbbbbbbbbbbbb": TokenCacheCard,
                "models/public": PublicModelCard, "experts/news": ExpertPackageCard, "models/merged": MergedModelCard,
                "indexes/news": IndexManifest}


def old_catalog(ws: Workspace) -> None:
    ws.ensure()
    con = duckdb.connect(str(ws.catalog_path))
    con.execute(OLD_CATALOG)
    con.execute("INSERT INTO sources VALUES ('news', 'times', 'news', 'CC-BY', 'snippets', TRUE, DATE '2030-01-01', "
                "'/data/news', ?, 9, 1, 900, 100, 0, ?, ?, 'alice')", [H["e"], NOW, NOW])
    con.execute("INSERT INTO policy_log VALUES ('news', ?, 'alice', 'visibility', 'full', 'snippets')", [NOW])
    con.close()


def old_store(ws: Workspace) -> None:
    """The single-file store: JSON columns, a primary key, and none of the columns added since."""
    ws.traces_path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(ws.traces_path))
    ddl = store.SCHEMA.replace("timings_ms        VARCHAR", "timings_ms        JSON")
    ddl = ddl.replace("trace_id          VARCHAR NOT NULL,", "trace_id          VARCHAR PRIMARY KEY,")
    lines = [ln for ln in ddl.splitlines() if not ln.strip().startswith(("top_expert_by", "top_by_", "owner"))]
    ddl = "\n".join(lines).replace("settings          VARCHAR,            -- JSON text",
                                   "settings          VARCHAR             -- JSON text")
    lines = ddl.splitlines()
    ddl = "\n".join(ln.replace("BOOLEAN,", "BOOLEAN") if ln.strip().startswith("agreement") else ln for ln in lines)
    assert "top_by_routing" not in ddl
    con.execute(ddl)
    con.execute("INSERT INTO traces VALUES ('t1', ?, 'Q', 'the harvest was good', 5, false, 'm', ['news'], [], 1, "
                "'{\"total\": 3}', '{}')", [NOW])
    con.execute("INSERT INTO spans VALUES ('t1', 0, 0, 1, 3, 4, 11, 'harvest', 2, 4, -9.5, 1, 'news', true)")
    con.execute("INSERT INTO span_sources VALUES ('t1', 0, 'news', 4)")
    con.execute("INSERT INTO span_documents VALUES ('t1', 0, 0, 'news', 'd7', 'T', 12, false, 'the harvest', 3.5, "
                "0.4, 'high', NULL)")
    con.execute("INSERT INTO span_experts VALUES ('t1', 0, 1, 'news', 0.75, 1.25, true)")
    con.close()


def old_workspace(tmp_path: Path) -> tuple[Workspace, dict]:
    ws = Workspace(tmp_path / "old")
    cards = old_cards(ws)
    old_catalog(ws)
    old_store(ws)
    return ws, cards


def _holds(new, old) -> bool:
    """`new` holds everything `old` does (fields with defaults may be added, none lost or changed)."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and _holds(new[k], v) for k, v in old.items())
    if isinstance(old, list):
        return isinstance(new, list) and len(new) == len(old) and all(map(_holds, new, old))
    return new == old


def _files(ws: Workspace) -> dict[str, bytes]:
    return {str(p.relative_to(ws.root)): p.read_bytes() for p in sorted(ws.root.rglob("*"))
            if p.is_file() and "parts" not in p.parts}


def _columns(con, table: str) -> list[tuple]:
    return con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                       "ORDER BY ordinal_position", [table]).fetchall()


def test_migrate_upgrades_every_old_format_in_place_losing_nothing(tmp_path):
    ws, cards = old_workspace(tmp_path)
    run = lambda *a: CliRunner().invoke(app, ["--workspace", str(ws.root), "migrate", *a])  # noqa: E731
    before = _files(ws)

    # --check says what would change and changes nothing
    r = run("--check")
    assert r.exit_code == 1, r.output
    for rel in cards:
        assert rel in r.output
    assert "sources.max_verbatim" in r.output and "policy_log.key_id" in r.output and "provenance.duckdb" in r.output
    assert _files(ws) == before

    r = run("--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["applied"] and not report["problems"] and report["changed"] == len(cards) + 4

    # cards: this format on disk, every older field kept (unchanged, or in previous_fields)
    for rel, old in cards.items():
        cls = CARD_CLASSES[rel]
        raw = json.loads((ws.root / rel / cls.FILE).read_text())
        assert "inputs" in raw and raw["format"] == 2 and raw["upgraded_from"] == 1, rel
        kept = raw["previous_fields"] or {}
        for k, v in old.items():
            assert (k in raw and _holds(raw[k], v)) or kept.get(k) == v, (rel, k)
        cls.read(ws.root / rel)  # reads as it is
    assert MergedModelCard.read(ws.root / "models/merged").inputs["expert:news"] == H["d"]
    assert IndexManifest.read(ws.root / "indexes/news").inputs["tokenizer"] == H["b"]

    # catalog: the columns of a new catalog, the rows as they were, none set where unknown
    fresh = Workspace(tmp_path / "fresh")
    with catalog.connect(fresh) as new, catalog.connect(ws, read_only=True) as con:
        for table in source_schema.TABLES:
            assert _columns(con, table) == _columns(new, table)
    src = sources.get_source(ws, "news")
    assert (src.owner, src.visibility, src.expires, src.n_docs_train, src.max_verbatim) == (
        "times", "snippets", dt.date(2030, 1, 1), 9, None)
    log = sources.policy_log(ws, "news")
    assert [(e["field"], e["old_value"], e["new_value"], e["key_id"], e["comment"]) for e in log] == [
        ("visibility", "full", "snippets", None, None)]

    # store: imported into parts, every row; the columns added since are NULL; the file is gone
    assert not ws.traces_path.exists()
    q = lambda sql: [list(r) for r in queries.query(ws, sql, limit=None).rows]  # noqa: E731
    assert q("SELECT trace_id, prompt, response, sources_searched, timings_ms FROM traces") == [
        ["t1", "Q", "the harvest was good", ["news"], '{"total": 3}']]
    assert q("SELECT text, count, top_expert_source, top_by_routing FROM spans") == [["harvest", 4, "news", None]]
    assert q("SELECT doc_id, snippet, bucket FROM span_documents") == [["d7", "the harvest", "high"]]
    assert q("SELECT routing_share, counterfactual FROM span_experts") == [[0.75, 1.25]]

    # idempotent: a second run changes nothing, byte for byte
    after = _files(ws)
    r = run()
    assert r.exit_code == 0 and "nothing to upgrade" in r.output
    assert _files(ws) == after
    assert run("--check").exit_code == 0


def test_readers_upgrade_on_open(tmp_path):
    """Without `migrate`: a card reads upgraded (in memory, the file untouched); the catalog gains
    its columns at the first open, read-only included; the store is imported by its first reader."""
    ws, cards = old_workspace(tmp_path)
    raw = (ws.root / "experts/news/card.json").read_bytes()
    card = ExpertPackageCard.read(ws.root / "experts/news")
    assert card.upgraded_from == 1 and card.public_model == H["c"] and card.previous_fields["kind"] == "expert"
    assert (ws.root / "experts/news/card.json").read_bytes() == raw
    assert sources.list_sources(ws)[0].max_verbatim is None  # a read-only open
    with duckdb.connect(str(ws.catalog_path), read_only=True) as con:
        assert ("max_verbatim", "INTEGER") in _columns(con, "sources")
        assert ("comment", "VARCHAR") in _columns(con, "policy_log")
    sources.set_policy(ws, "news", max_verbatim=6, comment="after the upgrade")
    assert sources.get_source(ws, "news").max_verbatim == 6
    assert [list(r) for r in queries.query(ws, "SELECT count(*) FROM spans", limit=None).rows] == [[1]]
    assert not ws.traces_path.exists()
    r = CliRunner().invoke(app, ["--workspace", str(ws.root), "migrate", "--json"])
    assert json.loads(r.output)["changed"] == len(cards)  # what remains: the card files


def test_a_card_that_cannot_be_upgraded_is_reported_and_the_rest_still_done(tmp_path):
    ws, cards = old_workspace(tmp_path)
    bad = {k: v for k, v in cards["experts/news"].items() if k != "public_hash"}
    _write(ws.root / "experts/news", bad)
    r = CliRunner().invoke(app, ["--workspace", str(ws.root), "migrate"])
    assert r.exit_code == 1
    assert "cannot upgrade" in r.output and "flexolmo train expert --source news" in r.output
    assert json.loads((ws.root / "experts/news/card.json").read_text()) == bad  # left as it was
    assert "inputs" in json.loads((ws.root / "models/merged/card.json").read_text())  # the rest upgraded
    assert not ws.traces_path.exists()


def test_every_card_class_has_its_upgrade_registered():
    from flexolmo.base.artifacts.card import Card

    def subclasses(c):
        return {c} | {s for d in c.__subclasses__() for s in subclasses(d)}

    kinds = {c for c in subclasses(Card) if c is not Card and c.__module__.split(".")[0] in ("flexolmo", "index")}
    assert kinds and all(migrate.card_upgrader(c) is not None for c in kinds), kinds
    assert {s.name for s in migrate.steps()} >= {"catalog", "cards: base", "cards: model", "cards: index",
                                                 "provenance store"}


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_damaged_card_is_a_problem_not_a_crash(tmp_path, text):
    ws = Workspace(tmp_path / "w")
    (ws.tokenizer_dir).mkdir(parents=True)
    (ws.tokenizer_dir / "card.json").write_text(text)
    report = migrate.run(ws, apply=True)
    assert "flexolmo tokenizer train --force" in report.problems["cards: base"][0]
