"""Shared test fixtures. Tests mirror the packages: tests/tpa_core, tests/kernels, tests/store, tests/retrieval, tests/app."""

from __future__ import annotations

import pytest


@pytest.fixture
def data_dir(tmp_path):
    """A fresh, private data directory for one test."""
    path = tmp_path / "data"
    path.mkdir()
    return path
