"""Settings of the gunicorn that `bench/load.py` starts: production settings plus two bench-only things.

- `bench.load_app.QueryCountMiddleware`: every response says how many SQL queries it took
  (`X-Bench-Queries`) and which worker process served it (`X-Bench-Pid`).
- `/bench/floor`: the framework's floor, a trivial API-key-authenticated DRF view, served beside the API.
"""

from alkemy.settings import *  # noqa: F403
from alkemy.settings import MIDDLEWARE

MIDDLEWARE = ["bench.load_app.QueryCountMiddleware", *MIDDLEWARE]
ROOT_URLCONF = "bench.load_app"
