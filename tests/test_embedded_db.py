"""The embedded PostgreSQL: one server per data dir, shared by processes that start together."""

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import json, sys, time
from alkemy.embedded_db import ensure_server, ensure_database
start_at = float(sys.argv[2])
while time.time() < start_at:
    time.sleep(0.001)
server = ensure_server(sys.argv[1])
ensure_database(server, "race")
import psycopg
with psycopg.connect(dbname="race", user=server.user, host=str(server.socket_dir), port=server.port) as conn:
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    version = conn.execute("SHOW server_version").fetchone()[0]
print(json.dumps({"server_pid": server.pid, "backend": backend, "version": version}))
sys.stdout.flush()
time.sleep(float(sys.argv[3]))
"""


def postmasters_for(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(attrs=["name", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["name"] == "postgres" and str(pgdata) in cmdline:
            found.append(proc)
    return found


@pytest.mark.slow
def test_two_processes_starting_together_share_one_server(tmp_path):
    pgdata = tmp_path / "pgdata"
    start_at = time.time() + 1.5
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(pgdata), str(start_at), hold],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for hold in ("2.0", "0.5")
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))

    assert results[0]["server_pid"] == results[1]["server_pid"]
    assert results[0]["backend"] != results[1]["backend"]
    assert results[0]["version"].startswith("18")

    # The last holder stopped the server on exit: nothing is left running for this data dir.
    deadline = time.time() + 15
    while postmasters_for(pgdata) and time.time() < deadline:
        time.sleep(0.2)
    assert postmasters_for(pgdata) == []


@pytest.mark.slow
def test_killed_holder_does_not_keep_the_server_alive(tmp_path):
    pgdata = tmp_path / "pgdata"
    victim = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(pgdata), "0", "60"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    first = json.loads(victim.stdout.readline())
    victim.kill()
    victim.wait()
    # The server is still up (its holder died without cleaning up); the next process adopts it...
    survivor = subprocess.run(
        [sys.executable, "-c", CHILD, str(pgdata), "0", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert survivor.returncode == 0, survivor.stderr
    assert json.loads(survivor.stdout.strip().splitlines()[-1])["server_pid"] == first["server_pid"]
    # ...and, being the last live holder, stops it when it exits.
    deadline = time.time() + 15
    while postmasters_for(pgdata) and time.time() < deadline:
        time.sleep(0.2)
    assert postmasters_for(pgdata) == []


@pytest.mark.slow
def test_a_holder_killed_while_another_runs_does_not_keep_the_server_alive(tmp_path):
    """The qcluster case: a worker dies (kill -9) while the test process still holds the server; when
    the test process exits, it is the last live holder and stops the server."""
    pgdata = tmp_path / "pgdata"
    holder = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(pgdata), "0", "8"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    first = json.loads(holder.stdout.readline())
    victim = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(pgdata), "0", "60"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert json.loads(victim.stdout.readline())["server_pid"] == first["server_pid"]
    victim.kill()
    victim.wait()
    assert holder.wait(timeout=120) == 0
    deadline = time.time() + 15
    while postmasters_for(pgdata) and time.time() < deadline:
        time.sleep(0.2)
    assert postmasters_for(pgdata) == []
