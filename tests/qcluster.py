"""Real `manage.py qcluster` processes against the test database, for end-to-end job tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


class Cluster:
    def __init__(self, name: str, **env: str) -> None:
        self.name = name
        self.env = {
            **os.environ,
            "Q_CLUSTER_NAME": name,
            "ALKEMY_DB_NAME": connection.settings_dict["NAME"],  # the test database
            "ALKEMY_DATA_DIR": str(settings.ALKEMY_DATA_DIR),
            "ALKEMY_MEDIA_ROOT": str(settings.MEDIA_ROOT),
            "ALKEMY_MODELS_DIR": str(settings.ALKEMY_MODELS_DIR),
            "ALKEMY_FACE_EMBEDDER": settings.ALKEMY_FACE_EMBEDDER,
            "Q_WORKERS": "1",
            "Q_GPU_WORKERS": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.process: subprocess.Popen | None = None
        self.log: list[str] = []

    def start(self, timeout: float = 60) -> Cluster:
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: kill -9 takes the workers too
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any("running" in line.lower() and "cluster" in line.lower() for line in self.log):
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"qcluster {self.name} did not start:\n" + "".join(self.log[-40:]))

    def _read(self) -> None:
        for line in self.process.stdout:
            self.log.append(line)

    def kill(self) -> None:
        """kill -9 the whole cluster (sentinel and workers), as a crashed machine would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def wait_for(predicate, timeout: float = 90, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
