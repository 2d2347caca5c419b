"""A real, throwaway PostgreSQL server for the tests (the ledger's, the hub service's).

Debian's PostgreSQL (``/usr/lib/postgresql/<version>/bin``) and the psycopg driver; skipped
without them, or failed under ``JUPYTER_ACP_REQUIRE_POSTGRES=1`` (CI). Import the fixtures into a
test module by their function names (pytest finds them by their ``name``)::

    from pg import pg_cluster_fixture, pg_database_fixture, postgres_fixture  # noqa: F401

* ``postgres``: a cluster of the test's own, started (a test may ``stop``/``start`` it);
* ``pg_url``: a new, empty database (its SQLAlchemy URL) in a cluster the test module shares
  (initdb takes seconds; a database, milliseconds).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import acp_require

from jupyter_acp.usage import UsageLedger


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (run as the ``postgres`` account when we are
    root: the server refuses to run as root)."""

    _databases = itertools.count(1)

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="acp-pg-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = self.url_of("postgres")
        if os.getuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "acp", "--no-sync")

    def url_of(self, database: str) -> str:
        """The SQLAlchemy URL of one of the cluster's databases (user ``acp``, no password)."""
        return f"postgresql+psycopg://acp@127.0.0.1:{self.port}/{database}"

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), *args]
        if os.getuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-w", "-l", str(self.dir / "log"), "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        """Down at once, like a crash (``-m immediate``)."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"acp_test_{next(self._databases)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="acp", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # (a name of ours: nothing to quote)
        return self.url_of(name)

    def remove(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def require_postgres() -> Path:
    """The server's binaries' directory; skips (or fails, in CI) when something is missing."""
    bindir = postgres_bindir()
    try:
        import psycopg  # noqa: F401
        driver = True
    except ImportError:
        driver = False
    has_account = os.getuid() != 0 or _has_user("postgres")
    acp_require("JUPYTER_ACP_REQUIRE_POSTGRES", bool(bindir and driver and has_account),
                "a PostgreSQL server (Debian's postgresql) and the psycopg driver are needed")
    assert bindir is not None
    return bindir


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    server = Postgres(require_postgres())
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(name="postgres")
def postgres_fixture() -> Iterator[Postgres]:
    """A started cluster of the test's own."""
    with running_postgres() as server:
        yield server


@pytest.fixture(name="pg_cluster", scope="module")
def pg_cluster_fixture() -> Iterator[Postgres]:
    """A started cluster the test module shares (make a database per test: ``pg_url``)."""
    with running_postgres() as server:
        yield server


@pytest.fixture(name="pg_url")
def pg_database_fixture(pg_cluster: Postgres) -> str:
    """The URL of a new, empty database of the module's cluster."""
    return pg_cluster.create_database()


@pytest.fixture(name="db_url", params=["sqlite", "postgresql"])
def db_url_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger database: a SQLite file, or a database of the module's PostgreSQL cluster
    (each test that takes it runs on both)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger' / 'usage.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(name="ledgers")
def ledgers_fixture(tmp_path: Path) -> Iterator[Callable[..., UsageLedger]]:
    """``make(url, **traits)`` → a connected (so migrated) ledger with a spool of its own: one
    "server" of the ledger; closed after the test."""
    made: list[UsageLedger] = []

    def make(url: str, **traits: Any) -> UsageLedger:
        ledger = UsageLedger(db_url=url, spool_path=str(tmp_path / "spool" / f"{len(made)}.spool"),
                             **traits)
        made.append(ledger)
        ledger.engine  # noqa: B018 (connects: migrates)
        return ledger

    yield make
    for ledger in made:
        ledger.close()
