"""bench/gpu_check.sh on the CPU (--device cpu, the tiny profile), as the tests can run it: it
builds its own federation with the CLI, trains, merges, traces and prints its figures."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {"FLEXOLMO": f"{sys.executable} -m cli.main", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
           "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _figure(out: str, label: str) -> float:
    m = re.search(rf"^{re.escape(label)}\s+([0-9.]+)", out, re.M)
    assert m, f"no {label!r} line in:\n{out}"
    return float(m.group(1))


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path):
    ws = tmp_path / "ws"
    r = _run("--device", "cpu", "--workspace", str(ws))
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "tiny profile; cpu in float32" in out and re.search(r"done in [0-9.]+ s", out)
    card = json.loads((ws / "models" / "public" / "card.json").read_text())
    assert card["tokens_per_s"] > 0 and _figure(out, "train public, tokens/s") == pytest.approx(card["tokens_per_s"])  # the card's
    for s in ("news", "code"):
        assert _figure(out, f"train expert {s}, tokens/s") > 0 and (ws / "experts" / s / "card.json").exists()
    assert (ws / "models" / "merged" / "config.json").exists()
    assert _figure(out, "trace, ms (in-process)") > 0 and _figure(out, "trace command, s (wall)") > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_check_refuses_cuda_without_a_gpu_before_building_anything(tmp_path):
    r = _run("--device", "cuda", "--workspace", str(tmp_path / "ws"), timeout=120)
    assert r.returncode == 1 and "no CUDA GPU is visible" in r.stderr and "--device cpu" in r.stderr
    assert not (tmp_path / "ws" / "sources").exists()
    r = _run("--device", "tpu", timeout=120)
    assert r.returncode == 2 and "not a device" in r.stderr
