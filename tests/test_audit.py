"""The extraction audit (tracing/audit.py) on tiny models: every row runs (public, owner's
2-expert, merged, merged with a DP expert, merged with the expert off), both similarity
ways are reported, the longest verbatim runs come from the source's index, and the result
is written under the workspace; the CLI prints it and refuses bad input."""

from __future__ import annotations

import json

import pytest
from conftest_model import build_federation
from typer.testing import CliRunner

from cli.main import app
from tracing.audit import AuditConfig, edit_similarity, extraction_audit, latest, sample_prompts
from flexolmo.base.errors import InputError
from flexolmo.model.merge import merge
from flexolmo.model.privacy import DPConfig
from flexolmo.model.train import train_expert, train_public
from index.build import build_source

ROWS = ("public", "owner_2expert", "merged", "merged_dp_expert", "merged_expert_off")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    ws = build_federation(root, sources=("public", "news", "code"), n_docs=40)
    train_public(ws, "tiny", progress=False)
    for s in ("news", "code"):
        train_expert(ws, s, "tiny", progress=False)
    train_expert(ws, "news", "tiny", dp=DPConfig(epsilon=8.0, delta=1e-6), packages_dir=root / "dp", progress=False)
    merge(ws, ["news", "code"])
    build_source(ws, "news")
    return {"ws": ws, "dp": root / "dp" / "news"}


def test_edit_similarity():
    assert edit_similarity("abc", "abc") == 1.0 and edit_similarity("", "") == 1.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("abcd", "") == 0.0
    # the published way (prefix in both texts) inflates similarity
    p = "x" * 100
    assert edit_similarity(p + "abcd", p + "wxyz") > 0.9 > edit_similarity("abcd", "wxyz")


def test_audit_runs_every_row_and_reports_both_ways(fed):
    ws = fed["ws"]
    cfg = AuditConfig(docs=3, samples=2, prefix_len=8, continuation_len=8, seed=1)
    r = extraction_audit(ws, "news", dp_package=fed["dp"], cfg=cfg)
    assert r["n_prompts"] == 3 and list(r["rows"]) == list(ROWS)
    for name, row in r["rows"].items():
        assert "skipped" not in row, (name, row)
        for way in ("continuation", "with_prefix"):
            assert 0 <= row[f"rate_{way}"] <= 1 and 0 <= row[f"mean_best_similarity_{way}"] <= 1
        # a prefix shared by both texts can only raise similarity
        assert row["mean_best_similarity_with_prefix"] >= row["mean_best_similarity_continuation"]
        assert 0 <= row["longest_verbatim_run"]["max"] <= 8
    assert latest(ws, "news") == json.loads((ws.root / "audits" / "news.json").read_text())
    assert latest(ws, "news")["rows"]["merged"] == r["rows"]["merged"]
    # the same seed gives the same prefixes and the same figures
    assert sample_prompts(ws, "news", cfg) == sample_prompts(ws, "news", cfg)
    again = extraction_audit(ws, "news", dp_package=fed["dp"], cfg=cfg, write=False)
    assert {k: {x: v for x, v in row.items() if x != "seconds"} for k, row in again["rows"].items()} == \
           {k: {x: v for x, v in row.items() if x != "seconds"} for k, row in r["rows"].items()}


def test_missing_rows_say_why(fed):
    ws = fed["ws"]
    r = extraction_audit(ws, "code", cfg=AuditConfig(docs=2, samples=2, prefix_len=8, continuation_len=8), write=False)
    assert "no DP package given" in r["rows"]["merged_dp_expert"]["skipped"]
    assert "rate_continuation" in r["rows"]["merged"]
    assert "no index" in r["longest_run_index"] and "longest_verbatim_run" not in r["rows"]["merged"]


def test_cli_and_bad_input(fed):
    ws = fed["ws"]
    run = CliRunner().invoke(app, ["--workspace", str(ws.root), "audit", "extraction", "--source", "news",
                                   "--docs", "2", "--samples", "2", "--prefix-len", "8", "--continuation-len", "8", "--json"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    assert set(out["rows"]) == set(ROWS) and "rate_with_prefix" in out["rows"]["public"]
    for args, msg in ((["--docs", "0"], "docs must be at least 1"), (["--dp-package", str(ws.root)], "no expert package"),
                      (["--source", "nope"], "unknown source")):
        base = ["--workspace", str(ws.root), "audit", "extraction"] + ([] if "--source" in args else ["--source", "news"])
        r = CliRunner().invoke(app, base + args)
        assert r.exit_code == 1 and msg in r.output, r.output
    from tracing.audit import _row_models

    with pytest.raises(InputError, match="is not a DP package"):  # news's DP package offered for code
        dict(_row_models(ws, "code", fed["dp"]))["merged_dp_expert"]()


def test_contribution_report_shows_the_latest_audit(fed):
    from tracing.provenance import queries
    from tracing.trace import Tracer

    ws = fed["ws"]
    extraction_audit(ws, "news", cfg=AuditConfig(docs=2, samples=2, prefix_len=8, continuation_len=8, seed=2))
    tracer = Tracer.open(ws)
    tracer.trace("President congress nation economy policy tax vote law union state budget report.")
    c = queries.contribution(ws, "news")
    want = latest(ws, "news")
    assert c.audit["created_at"] == want["created_at"] and c.audit["n_prompts"] == 2
    assert c.audit["rows"]["merged"]["rate_continuation"] == want["rows"]["merged"]["rate_continuation"]
    assert queries.contribution(ws, "code").audit is None  # never audited
