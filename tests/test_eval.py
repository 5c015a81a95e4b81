"""`flexolmo eval` end to end on the tiny profile: every row computes, the JSON, the report
and the plots are written, a second run reuses what it trained, the CLI prints the object."""

from __future__ import annotations

import json
import math
import random

import pytest

from conftest_model import WORDS

from flexolmo.evaluation.report import write_report
from flexolmo.evaluation.run import run_eval
from flexolmo.base.sources import add_records
from flexolmo.base.tokenizer import train_tokenizer
from flexolmo.model.train import train_public
from flexolmo.base.workspace import Workspace

REQUIRED_ROWS = {"public", "soup", "btm", "dense", "flexolmo", "flexolmo_tuned", "no_bias", "random_init", "embedder_init"}


def _docs(source: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS[source]) for _ in range(rng.randint(4, 10))) for _ in range(rng.randint(3, 7))]
        sep = "\n    " if source == "code" else " "
        out.append({"doc_id": f"{source}-{i}", "text": sep.join(lines) + "."})
    return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("eval") / "ws").ensure()
    corpora = {s: _docs(s, 300, k) for k, s in enumerate(("public", "news", "code"))}
    for s, docs in corpora.items():
        add_records(ws, s, docs, owner=f"{s}-owner", domain=s, licence="CC0", origin="test")
    train_tokenizer(ws, vocab_size=400, texts=[d["text"] for docs in corpora.values() for d in docs])
    train_public(ws, "tiny", progress=False)
    logs: list[str] = []
    res = run_eval(ws, "tiny", tokens_per_domain=512, task_lines=5, tune_steps=10, progress=False, log=logs.append)
    return ws, res, logs


def test_every_row_computes_on_every_domain(evaluated):
    _, res, _ = evaluated
    assert res["domains"][0] == "public" and set(res["domains"]) == {"public", "news", "code"}
    assert REQUIRED_ROWS | {"expert:news", "expert:code"} <= set(res["rows"])
    for row, per_domain in res["rows"].items():
        assert set(per_domain) == set(res["domains"]), row
        assert all(1 < v < 1e6 and math.isfinite(v) for v in per_domain.values()), row
        assert all(0 < b < 50 for b in res["bpb"][row].values()), row
    # the merged variants have routing; the public expert share is a fraction
    for row in ("flexolmo", "flexolmo_tuned", "no_bias", "random_init", "embedder_init"):
        assert all(0 <= f <= 1 for f in res["public_in_topk"][row].values())
        for d, share in res["routing_share"][row].items():
            assert abs(sum(share.values()) - 1) < 1e-3 and set(share) == {"public", "news", "code"}
    # the owners' own models are better on their own domain than the public model
    assert res["rows"]["expert:code"]["code"] < res["rows"]["public"]["code"]
    # opt-out: each owner removed in turn, every domain measured
    assert set(res["optout"]) == {"news", "code"}
    assert all(set(v) == set(res["domains"]) for v in res["optout"].values())
    assert res["task"]["lines"] == 5 and "flexolmo" in res["task"]["rows"]
    assert res["meta"]["command"] == "flexolmo eval --profile tiny --tokens-per-domain 512 --task-lines 5 (router tuning: 10 steps)"


def test_report_json_and_plots_are_written(evaluated, tmp_path):
    _, res, _ = evaluated
    paths = write_report(res, tmp_path / "docs")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(res))
    md = paths["markdown"].read_text()
    assert "| flexolmo |" in md and "## Opt-out" in md and "## Reading" in md and "FlexOlmo beats the public model" in md
    assert set(res["loss_curves"]) >= {"public", "expert:news", "expert:code", "dense"}
    # the owners' routing check, read from their cards: fractions, and the bias stayed negative
    assert set(res["owner_routing"]) == {"news", "code"}
    for r in res["owner_routing"].values():
        assert 0 <= r["public_text_to_public_expert"] <= 1 and 0 <= r["own_text_to_own_expert"] <= 1
        assert r["bias_per_layer"] and all(b <= 0 for b in r["bias_per_layer"])
    assert "## The owners' own models: routing at the end of training" in md and "| news |" in md
    for png in ("ppl-change.png", "optout.png", "routing.png", "loss-curves.png"):
        assert (paths["folder"] / png).stat().st_size > 1000


def test_second_run_reuses_the_trained_models(evaluated):
    ws, res, _ = evaluated
    dense = ws.root / "eval" / "tiny" / "dense" / "model.safetensors"
    pkg = ws.root / "eval" / "tiny" / "no_bias" / "experts" / "news" / "expert.safetensors"
    before = (dense.stat().st_mtime_ns, pkg.stat().st_mtime_ns)
    logs: list[str] = []
    again = run_eval(ws, "tiny", rows=["dense", "no_bias"], tokens_per_domain=512, progress=False, log=logs.append)
    assert (dense.stat().st_mtime_ns, pkg.stat().st_mtime_ns) == before
    assert not any("training expert" in m for m in logs)
    assert again["rows"]["dense"] == res["rows"]["dense"] and again["rows"]["no_bias"] == res["rows"]["no_bias"]


def test_cli_eval_json(evaluated):
    from typer.testing import CliRunner

    from cli.main import app

    ws, res, _ = evaluated
    r = CliRunner().invoke(app, ["-w", str(ws.root), "eval", "--profile", "tiny", "--rows", "public,flexolmo",
                                 "--tokens-per-domain", "512", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert set(out["rows"]) == {"public", "flexolmo"} and out["rows"]["public"] == res["rows"]["public"]
    bad = CliRunner().invoke(app, ["-w", str(ws.root), "eval", "--rows", "nonsense"])
    assert bad.exit_code == 1 and "unknown row" in bad.output


def test_task_lines_stop_the_context_before_the_newline(evaluated):
    from flexolmo.evaluation.task import task_lines
    from flexolmo.base.sources import load_documents

    ws, _, _ = evaluated
    texts = load_documents(ws, "code", split="validation", columns=["text"]).column("text").to_pylist()
    pairs = task_lines(ws, "code", 5)
    assert pairs
    for before, line in pairs:
        assert not before.endswith("\n") and len(line.strip()) >= 8
        assert any(t.startswith(before + "\n" + line) for t in texts)


def test_bytes_per_domain_measures_the_same_text_whatever_the_tokens(evaluated):
    from flexolmo.base.errors import InputError
    from flexolmo.evaluation.metrics import token_byte_lengths, validation_set
    from flexolmo.base.tokenizer import load_raw_tokenizer

    ws, _, _ = evaluated
    longest = int(token_byte_lengths(load_raw_tokenizer(ws)).max())
    domains = ["public", "news", "code"]
    whole = validation_set(ws, domains, seq_len=16, max_tokens=10**9).target_bytes
    budget = min(whole.values()) // 2
    val = validation_set(ws, domains, seq_len=16, max_tokens=10**9, max_bytes=budget)
    for d, b in val.target_bytes.items():  # whole windows of 16 tokens within the first `budget` bytes
        assert budget - 17 * longest < b <= budget, (d, b, budget)
    assert validation_set(ws, domains, 16, max_tokens=10**9, max_bytes=budget).target_bytes == val.target_bytes
    # the tiny profile's windows are 64 tokens; a budget past the end takes every whole window
    res = run_eval(ws, "tiny", rows=["public"], bytes_per_domain=10**6, progress=False, log=lambda m: None)
    assert "--bytes-per-domain 1000000" in res["meta"]["command"]
    assert res["meta"]["bytes_per_domain"] == validation_set(ws, domains, 64, max_tokens=10**9).target_bytes
    assert "their bytes of text" in write_report(res, ws.root / "report")["markdown"].read_text()
    with pytest.raises(InputError, match="bytes-per-domain"):
        run_eval(ws, "tiny", rows=["public"], bytes_per_domain=5, progress=False, log=lambda m: None)
