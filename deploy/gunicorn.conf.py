"""gunicorn settings for the web process: `gunicorn -c deploy/gunicorn.conf.py alkemy.wsgi`."""

import os

# One BLAS/OpenMP thread per request thread: face analysis (numpy's OpenBLAS in the dlib descriptor) would
# otherwise start a thread per core in every request thread of every worker, and on a busy server those
# spin against each other (search by photo: 5.3 req/s with 4 clients on 2 cores; bench/README.md "Load").
# Concurrency comes from the workers and threads below. Set before the workers import numpy.
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

bind = os.environ.get("BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "3"))
threads = int(os.environ.get("WEB_THREADS", "4"))
timeout = 120  # reference uploads run face analysis inline
accesslog = "-"
# SIGTERM: finish the requests in flight for up to this long (compose's stop_grace_period and the
# Kubernetes terminationGracePeriodSeconds leave room for it)
graceful_timeout = 30


def child_exit(server, worker):
    """Prometheus multi-process mode (PROMETHEUS_MULTIPROC_DIR): drop a dead worker's live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
