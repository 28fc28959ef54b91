"""A throwaway PostgreSQL server for the tests that share one Optuna study between workers.

Debian's ``postgresql`` package provides the server (``.ci/run`` installs it; without it the tests that
need it are skipped). The server runs from a temporary data directory on a free port
of 127.0.0.1 (as the ``postgres`` user when the tests run as root: PostgreSQL refuses to run as
root), with trust authentication and without fsync, and stops when the test session ends.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _binaries() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl`` (Debian keeps them in /usr/lib/postgresql/<version>/bin)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:PORT``, a server for this test session."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")
    bin_dir = _binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not installed (apt-get install postgresql)")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    # a folder the postgres user can reach (pytest's own are private to this user)
    root = Path(tempfile.mkdtemp(prefix="bnn_adapt_postgres_", dir="/tmp" if as_postgres else None))
    if as_postgres:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run([*as_postgres, *map(str, args)], capture_output=True, text=True, timeout=120)

    made = run(bin_dir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
    if made.returncode != 0:
        pytest.fail(f"initdb failed: {made.stderr.strip()[-300:]}")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=100"
    started = run(bin_dir / "pg_ctl", "-D", data, "-o", options, "-l", root / "server.log", "-w", "start")
    if started.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").is_file() else started.stderr
        pytest.fail(f"PostgreSQL did not start: {log.strip()[-500:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on the session's server: its URL."""
    import psycopg  # noqa: PLC0415

    name = f"study_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"
