"""Real servers the tests start on loopback (moto's S3, redis-server): a free port, a readiness probe, and a
stop that never leaves the process behind."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(
    argv: list[str],
    *,
    ready: Callable[[], object],
    timeout: float,
    not_yet: tuple[type[BaseException], ...] = (OSError,),
) -> Iterator[subprocess.Popen]:
    """Start `argv`, call `ready` until it stops raising `not_yet` (or the server died or
    `timeout` passed: then its last error), and stop the server on the way out, killing it if it lingers."""
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready()
                break
            except not_yet:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        yield server
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
