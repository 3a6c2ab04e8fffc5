"""Fixtures of the store's tests: a database on SQLite and on a real PostgreSQL server, a tiny random model.

The PostgreSQL server is the suite's (`postgres_server` in tests/conftest.py); every test gets a database of its
own, and the PostgreSQL variants are skipped with a notice where no server can be started.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database: a SQLite file, or a new database on the suite's PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite'}"
    return request.getfixturevalue("postgres_server").create_database()


@pytest.fixture
def engine(db_url):
    from app.database import make_engine

    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def blobs_dir(tmp_path) -> Path:
    return tmp_path / "blobs"


@pytest.fixture(scope="session")
def tiny_config():
    """A tiny contextual TPA config (every factor kind present: ak, bk, av, bv)."""
    from tpa_core.config import TPAConfig

    return TPAConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, head_dim=8, k_rank=2, v_rank=2,
                     mlp_hidden=64, q_rank=2, max_position_embeddings=4096)


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    import torch

    from tpa_core.model import TPAModel

    torch.manual_seed(1234)
    model = TPAModel(tiny_config).eval()
    model.attention_backend = "torch"
    return model
