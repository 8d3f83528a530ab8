"""gunicorn settings for the web process: `gunicorn -c deploy/gunicorn.conf.py alkemy.wsgi`."""

import os

bind = os.environ.get("BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "3"))
threads = int(os.environ.get("WEB_THREADS", "4"))
timeout = 120  # reference uploads run face analysis inline
accesslog = "-"
# SIGTERM: finish the requests in flight for up to this long (compose's stop_grace_period and the
# Kubernetes terminationGracePeriodSeconds leave room for it)
graceful_timeout = 30
