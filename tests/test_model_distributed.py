"""`train public` and `train expert` under a 2-process torchrun (gloo on CPU), tiny profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest_model import build_federation  # noqa: E402

from flexolmo.model.merge import load_merged, merge  # noqa: E402
from flexolmo.model.layout import shared_weights_hash  # noqa: E402
from flexolmo.model.moe import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(ws_root: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "cli.main", "-w", str(ws_root), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_two_process_torchrun(tmp_path):
    ws = build_federation(tmp_path, sources=("public", "news"))
    r = _torchrun(ws.root, "train", "public", "--profile", "tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(ws.root, "train", "expert", "--source", "news", "--profile", "tiny")
    assert r.returncode == 0, r.stderr[-3000:]
    pub_dir = ws.models_dir / "public"
    for f in ("config.json", "model.safetensors", "router_bias.safetensors", "experts.json", "card.json"):
        assert (pub_dir / f).exists(), f
    card = json.loads((ws.experts_dir / "news" / "card.json").read_text())
    assert card["world_size"] == 2 and card["tokens"] == 2 * card["steps"] * 4 * 32
    assert card["inputs"]["public_model"] == shared_weights_hash(load_model(pub_dir))
    assert sorted(os.listdir(ws.experts_dir / "news")) == ["card.json", "domain_classifier.safetensors", "expert.safetensors"]
    merge(ws, ["news"])
    assert load_merged(ws).config.num_experts == 2
    assert not (ws.root / "runs" / "public").exists()
