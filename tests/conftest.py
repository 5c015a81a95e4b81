"""Shared fixtures: a fresh workspace in tmp_path, and a helper to write tiny corpora."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

from flexolmo.base.workspace import Workspace


@pytest.fixture(scope="session", autouse=True)
def _quiet_transformers() -> None:
    """No progress bars or load reports from transformers in test output."""
    from flexolmo.base.hflog import quiet_transformers

    quiet_transformers()


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    def write(name: str, records: list[dict]) -> Path:
        path = tmp_path / "input" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    return write
