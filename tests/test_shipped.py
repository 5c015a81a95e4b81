"""The shipped public model: exported with its README and loss curve, installed only into a
workspace whose inputs it was trained from, verified by its weights hash."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest_model import build_federation

from flexolmo.model.artifacts import public_model
from flexolmo.model.config import get_profile
from flexolmo.base.errors import IntegrityError
from flexolmo.model.layout import shared_weights_hash
from flexolmo.model.moe import load_model
from flexolmo.base.sources import add_records
from flexolmo.model.train import train_public


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("ship")
    ws = build_federation(root / "a", sources=("public", "news"))
    train_public(ws, "tiny", progress=False)
    out = public_model.export(ws, root / "assets" / "public-model", "flexolmo train public --profile tiny")
    return ws, out, root


def test_export_writes_model_card_readme_and_loss_curve(shipped):
    ws, out, _ = shipped
    for f in ("model.safetensors", "config.json", "card.json", "README.md", "loss.png"):
        assert (out / f).exists(), f
    readme = (out / "README.md").read_text()
    assert "`flexolmo train public --profile tiny`" in readme and public_model.read(ws).weights in readme


def test_installs_into_a_workspace_with_the_same_inputs(shipped):
    ws, out, root = shipped
    other = build_federation(root / "b", sources=("public", "news"))  # same data, same tokenizer
    assert public_model.status(other, get_profile("tiny")) is not None
    assert public_model.install_shipped(other, get_profile("tiny"), shipped=out) is None
    assert public_model.status(other, get_profile("tiny")) is None
    assert shared_weights_hash(load_model(public_model.folder(other))) == public_model.read(ws).weights


def test_refused_when_the_inputs_differ_or_the_weights_are_damaged(shipped, tmp_path):
    ws, out, root = shipped
    other = build_federation(root / "c", sources=("public", "news"))
    add_records(other, "public", [{"doc_id": "x", "text": "A different public source."}], owner="o", domain="d",
                licence="CC0", origin="test", replace=True)
    why = public_model.install_shipped(other, get_profile("tiny"), shipped=out)
    assert why is not None and "source" in why and not public_model.folder(other).exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    raw = bytearray((damaged / "model.safetensors").read_bytes())
    raw[-4:] = b"\x00\x01\x02\x03"
    (damaged / "model.safetensors").write_bytes(bytes(raw))
    fresh = build_federation(root / "d", sources=("public", "news"))
    with pytest.raises(IntegrityError, match="weights hash"):
        public_model.install_shipped(fresh, get_profile("tiny"), shipped=damaged)
    assert not public_model.folder(fresh).exists()  # nothing half-installed


def test_the_shipped_model_is_where_the_demo_looks_for_it():
    """`make demo` installs assets/public-model/ (the repository's); a wrong path trains one instead."""
    card = public_model.SHIPPED / "card.json"
    assert card.is_file(), f"{public_model.SHIPPED} holds no shipped public model"
    assert public_model.SHIPPED.parent.parent == Path(__file__).resolve().parents[1]
