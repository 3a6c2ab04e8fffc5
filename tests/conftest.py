"""Shared test fixtures. Tests mirror the packages: tests/tpa_core (its store in tests/tpa_core/store),
tests/kernels, tests/retrieval, tests/app.

The PostgreSQL server is Debian's (`postgresql` package, installed by `.ci/system-deps.sh`): the suite runs
`initdb` and `pg_ctl` itself on a private port and socket folder in a temp folder (as the `postgres` user when
we are root), once per session; every test that needs it creates a database of its own. Where no server can be
started, the PostgreSQL tests are skipped with a notice that says why.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


@pytest.fixture
def data_dir(tmp_path):
    """A fresh, private data directory for one test."""
    path = tmp_path / "data"
    path.mkdir()
    return path


_PG_SKIP_REASON: list[str] = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway PostgreSQL cluster; `url(db)` gives SQLAlchemy URLs over its private unix socket."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = bins[-1] if bins else shutil.which("initdb")
        if not initdb:
            raise RuntimeError("no PostgreSQL server binaries (apt-get install postgresql)")
        self.bin = Path(initdb).parent
        self.root = Path(tempfile.mkdtemp(prefix="tpa-rag-pg-"))
        self.data, self.sock, self.port = self.root / "data", self.root / "sock", _free_port()
        self.sock.mkdir()
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.sock} -c listen_addresses='' -c fsync=off -c max_connections=60"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self.as_user, str(self.bin / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[-500:]}")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.sock}&port={self.port}"

    def create_database(self) -> str:
        import sqlalchemy

        name = f"t_{uuid.uuid4().hex[:12]}"
        engine = sqlalchemy.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the session, or a skip with the reason none could be started."""
    if _PG_SKIP_REASON:
        pytest.skip(_PG_SKIP_REASON[0])
    try:
        server = PostgresServer()
    except (RuntimeError, OSError, KeyError, LookupError, subprocess.TimeoutExpired) as exc:
        _PG_SKIP_REASON.append(f"PostgreSQL tests skipped: no server could be started ({exc})")
        pytest.skip(_PG_SKIP_REASON[0])
    yield server
    server.stop()
