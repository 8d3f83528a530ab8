"""No process outlives its command (issue #14): after a pytest run whose worker was killed with -9, and after
Ctrl-C in `manage.py demo`, nothing of ours is left running for that data directory: no embedded PostgreSQL,
no web server, no qcluster sentinel or worker.

Both run as real subprocesses with their own ALKEMY_DATA_DIR; "ours" is every process whose command line
names that directory (the postmaster: `postgres -D <dir>/pgdata`) or whose environment carries it (the web
server and every cluster process inherit ALKEMY_DATA_DIR).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def processes_of(data_dir: Path) -> list[psutil.Process]:
    marker = str(data_dir)
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if any(marker in part for part in proc.info["cmdline"] or []) or proc.environ().get(
                "ALKEMY_DATA_DIR"
            ) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(procs: list[psutil.Process]) -> list[str]:
    described = []
    for proc in procs:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            described.append(f"{proc.pid} (gone)")
    return described


def assert_all_gone(data_dir: Path, within: float) -> float:
    """Wait until nothing of `data_dir` runs; kills what is left (so a failure leaks nothing) and fails."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if not processes_of(data_dir):
            return time.monotonic() - started
        time.sleep(0.25)
    left = processes_of(data_dir)
    report = describe(left)
    holders = data_dir / "pgdata" / ".handle_pids.json"
    if holders.exists():  # who the embedded server still thought was using it
        report.append(f"holders: {holders.read_text()}")
    for proc in left:  # these were started by this test
        with contextlib.suppress(psutil.Error):
            proc.kill()
    raise AssertionError(f"still running {within:.0f}s later:\n" + "\n".join(report))


def environment(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ALKEMY_", "PYTEST_"))}
    env.pop("DATABASE_URL", None)
    env.pop("Q_CLUSTER_NAME", None)
    return {**env, "ALKEMY_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra}


# --- (1) a pytest run that kills one of its workers with -9 --------------------------------------------------

INNER_TEST = '''
import json
import os
import signal
from pathlib import Path

import psutil
import pytest
from django.conf import settings

from tests.qcluster import Cluster, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def holders() -> set[int]:
    path = Path(settings.DATABASES["default"]["PGDATA"]) / ".handle_pids.json"
    return set(json.loads(path.read_text() or "[]")) if path.exists() else set()


def test_a_worker_killed_with_minus_9():
    cluster = Cluster("default").start()
    try:
        family = lambda: {p.pid for p in psutil.Process(cluster.process.pid).children(recursive=True)}
        # a cluster process that opened the database: it is one of the embedded server's holders
        victim = wait_for(lambda: min(holders() & family(), default=None), timeout=120, what="a worker holding the db")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE,
                 timeout=10, what="the worker to die")
        assert victim in holders()  # it died without leaving the holder list
    finally:
        cluster.stop()
'''


def test_a_pytest_run_leaves_no_database_or_worker_behind_after_a_worker_was_killed(tmp_path):
    data_dir = tmp_path / "data"
    inner = tmp_path / "test_inner_kill.py"
    inner.write_text(INNER_TEST)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
         "--rootdir", str(ROOT), str(inner),
         # its own temp root: pytest would otherwise chmod /tmp/pytest-of-<user> to 0700 under the database's
         # feet (the embedded server runs as another user when the tests run as root)
         "--basetemp", str(tmp_path / "inner-tmp")],
        cwd=ROOT, env=environment(data_dir), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    try:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "1 passed" in run.stdout
    finally:
        assert_all_gone(data_dir, within=20)


# --- (2) Ctrl-C in `manage.py demo` -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ctrl_c_in_the_demo_stops_the_web_server_every_cluster_and_the_database(tmp_path):
    data_dir = tmp_path / "data"
    addr = f"127.0.0.1:{free_port()}"
    demo = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--addr", addr, "--no-generation"],
        cwd=ROOT, env=environment(data_dir, DEBUG="1", Q_WORKERS="1", Q_WEBHOOK_WORKERS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, which the terminal's Ctrl-C goes to
    )  # fmt: skip
    log: list[str] = []
    serving = threading.Event()

    def read() -> None:
        for line in demo.stdout:
            log.append(line)
            if line.startswith("Serving at"):
                serving.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 400
        while not serving.wait(0.5) and demo.poll() is None and time.monotonic() < deadline:
            pass
        assert serving.is_set(), "".join(log[-60:])
        # The whole tree is up: web server, the three clusters (sentinel + workers each), the database.
        def tree() -> list[psutil.Process]:
            return psutil.Process(demo.pid).children(recursive=True)

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            commands = [" ".join(p.cmdline()) for p in tree() if p.is_running()]
            if sum("runserver" in c for c in commands) >= 1 and sum("qcluster" in c for c in commands) >= 9:
                break  # 3 sentinels, each with a monitor, a pusher and at least one worker ...
            time.sleep(0.5)
        started = {p.pid for p in processes_of(data_dir)}
        assert any("postgres" in " ".join(p.cmdline()) for p in processes_of(data_dir))
        assert len(started) >= 5, describe(processes_of(data_dir))

        # A CPU worker busy with a long task when Ctrl-C comes (django-q waits for it): the demo must not
        # leave it, nor the command it runs, behind.
        busy = tmp_path / "busy"
        enqueue = (
            "from django_q.tasks import async_task; "
            f"async_task('subprocess.run', ['sh', '-c', 'touch {busy}; exec sleep 300'])"
        )
        subprocess.run([sys.executable, "manage.py", "shell", "-c", enqueue], cwd=ROOT, check=True, timeout=120,
                       env=environment(data_dir, DEBUG="1"), capture_output=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while not busy.exists() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert busy.exists(), "".join(log[-40:])

        os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: SIGINT to the terminal's foreground process group
        assert demo.wait(60) == 0, "".join(log[-40:])
    finally:
        if demo.poll() is None:  # never leave it running, even when the test fails
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
        assert_all_gone(data_dir, within=20)
