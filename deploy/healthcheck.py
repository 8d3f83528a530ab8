"""Container health check of the web process (compose): GET /api/v1/health on this container, exit 0 on 200.

Standard library only, so it costs no Django start-up. The Host header is `localhost`, which
ALLOWED_HOSTS must list (deploy/compose.yaml and the Kubernetes ConfigMap do); the health path is exempt
from the HTTPS redirect (ALKEMY_HTTPS), so plain HTTP inside the container is answered.
"""

import os
import sys
import urllib.request

port = os.environ.get("BIND", "0.0.0.0:8000").rpartition(":")[2] or "8000"
request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/health", headers={"Host": "localhost"})
try:
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 (fixed local URL)
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # any failure is unhealthy
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
