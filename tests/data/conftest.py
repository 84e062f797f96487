"""Fixtures for the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from datahelpers import make_prepared


@pytest.fixture
def prepared(tmp_path: Path):
    """Factory fixture: prepared(name, text, shard_tokens=..., domain=...) -> data dir."""

    def make(name: str, text: str, **kw) -> Path:
        return make_prepared(tmp_path, name, text, **kw)

    return make
