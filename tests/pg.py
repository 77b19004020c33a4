"""A real, throwaway PostgreSQL for tests: Debian's binaries (`make system-deps` installs
the `postgresql` package), a cluster created with initdb in a temp dir, started with
pg_ctl on a free port of 127.0.0.1 with password (SCRAM) authentication, and removed
afterwards. One cluster per test process (pytest-xdist worker); one database per test.

PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user the
package creates, and its commands run through `runuser`.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from octaskly import testing

USER = "octaskly"
SYSTEM_USER = "postgres"


def bindir() -> Path:
    """The newest installed PostgreSQL's bin directory ($OCTASKLY_TEST_PG_BINDIR first)."""
    chosen = os.environ.get("OCTASKLY_TEST_PG_BINDIR")
    if chosen:
        return Path(chosen)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: `make system-deps` installs Debian's postgresql "
            "package (or set OCTASKLY_TEST_PG_BINDIR to a directory holding initdb)"
        )
    return Path(found[-1]).parent


class Cluster:
    """A running throwaway cluster; `url(db)` for a database in it."""

    def __init__(self, *, durable: bool = False) -> None:
        self.bin = bindir()
        self.durable = durable
        self.port = testing.free_port()
        self.password = secrets.token_hex(16)
        self.dir = Path(tempfile.mkdtemp(prefix="octaskly-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as_root = os.geteuid() == 0
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Cluster:
        if self._as_root:
            owner = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.dir.chmod(0o700)
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_root:
            os.chown(pwfile, pwd.getpwnam(SYSTEM_USER).pw_uid, -1)
        pwfile.chmod(0o600)
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
            "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8",
            "--locale=C.UTF-8", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.dir}'",
            "max_connections": "200",
            "shared_buffers": "32MB",
            "log_min_messages": "warning",
        }
        if not self.durable:  # tests do not pull the plug on PostgreSQL itself
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        with (self.data / "postgresql.conf").open("a") as conf:
            for key, value in settings.items():
                conf.write(f"{key} = {value}\n")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self._started = True
        return self

    def stop(self) -> None:
        if self._started:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self._started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- databases ----------------------------------------------------------------------
    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        auth = f"{USER}:{urllib.parse.quote(self.password)}" if password else USER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._run(
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
            "-p", str(self.port), "-U", USER, "-d", database, "-c", sql,
            env={"PGPASSWORD": self.password},
        )  # fmt: skip

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t_{secrets.token_hex(6)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = urllib.parse.urlsplit(url).path.lstrip("/")
        with contextlib.suppress(subprocess.CalledProcessError):
            self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _run(self, tool: str, *args: str, env: dict[str, str] | None = None) -> str:
        command = [str(self.bin / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", SYSTEM_USER, "--", *command]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=self.dir,
            timeout=120,
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise subprocess.CalledProcessError(
                done.returncode, command, done.stdout, f"{done.stderr}\n{log}"
            )
        return done.stdout


@contextlib.contextmanager
def cluster(*, durable: bool = False) -> Iterator[Cluster]:
    """A started cluster, stopped and removed on exit."""
    c = Cluster(durable=durable)
    try:
        yield c.start()
    finally:
        c.stop()


# -- the store under test -------------------------------------------------------------------
STORE = os.environ.get("OCTASKLY_TEST_STORE", "sqlite")
"""`postgresql`: the suites that run against either store (`make test` runs the core,
reliability and security ones a second time this way) give every dispatcher a database
in this process's throwaway cluster instead of its SQLite file."""
if STORE not in ("sqlite", "postgresql"):
    raise RuntimeError(f"OCTASKLY_TEST_STORE must be sqlite or postgresql, not {STORE!r}")

_shared: Cluster | None = None
_databases: dict[str, str] = {}
_lock = threading.Lock()


def shared() -> Cluster:
    """This process's cluster (started on first use, removed at exit)."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = Cluster().start()
            atexit.register(_shared.stop)
        return _shared


def database_for(key: str) -> str:
    """The URL of the database that stands for `key` (a data dir, a db path): made on
    first use, the same one after (a restarted dispatcher finds its data)."""
    cluster = shared()
    with _lock:
        url = _databases.get(key)
        if url is None:
            url = _databases[key] = cluster.create_database()
        return url


def fetch(url: str, sql: str) -> list[tuple[object, ...]]:
    """Rows of one query (for synchronous test code)."""
    import asyncio

    import asyncpg

    async def go() -> list[tuple[object, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()
