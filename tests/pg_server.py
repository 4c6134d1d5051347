"""A real PostgreSQL for tests: Debian's postgresql 15, initdb + pg_ctl in a temp dir, on a free
127.0.0.1 port, trust authentication on loopback only; stopped (pg_ctl stop) after the session.

initdb refuses to run as root, so when the tests run as root the server runs as the `postgres`
user (runuser), in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT_S = 120  # a busy shared machine; pg_ctl -w waits for the server to accept connections


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class PgServer:
    """One server; `new_database()` hands each test (or backend fixture) a database of its own."""

    def __init__(self, folder: Path, port: int, *, durable: bool = False):
        self.folder, self.port, self.durable = folder, port, durable
        self.data = folder / "data"
        self.user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        proc = subprocess.run([*_as_server_user(), *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} exited {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def start(self) -> PgServer:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        # loopback only: no Unix socket dir outside ours, trust only from 127.0.0.1
        (self.data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
        # tests: no fsync at all (a test database is thrown away). durable (benchmarks): crash-safe
        # files, commits not waited for on disk: what SQLite's WAL with synchronous=NORMAL gives
        speed = "-c synchronous_commit=off" if self.durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.folder}"
                f" -c max_connections=200 {speed}")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "server.log"), "-o", opts,
                  "-w", "-t", str(START_TIMEOUT_S), "start")
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)

    def uri(self, db: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def new_database(self, prefix: str = "t") -> str:
        """A fresh empty database; its URI."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.uri(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)


def start_pg_server(*, durable: bool = False) -> PgServer:
    if not (PG_BIN / "initdb").exists():
        raise RuntimeError(f"no PostgreSQL at {PG_BIN} (install Debian's postgresql package: `make sysdeps`)")
    folder = Path(tempfile.mkdtemp(prefix="orch-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    server = PgServer(folder, _free_port(), durable=durable)
    try:
        return server.start()
    except BaseException:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise


@pytest.fixture(scope="session")
def pg_server():
    server = start_pg_server()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture
def pg_uri(pg_server) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return pg_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_uri(request, tmp_path) -> str:
    """Each backend in turn: a SQLite store directory, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "store")
    return request.getfixturevalue("pg_server").new_database()
