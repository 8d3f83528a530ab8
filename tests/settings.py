"""The project's settings for the test suite, with a test-only SECRET_KEY when the environment has none.

`alkemy.settings` refuses to start without SECRET_KEY unless DEBUG=1, and the tests must run from a
fresh clone with nothing set (`make test`, `.venv/bin/pytest`, CI). pyproject.toml points pytest-django
here. The key goes into os.environ, not only into settings, so the real `manage.py qcluster` processes
the tests start (tests/qcluster.py passes on os.environ, DJANGO_SETTINGS_MODULE included) hash API keys
and encrypt secrets exactly like the test process.
"""

import os

os.environ.setdefault("SECRET_KEY", "alkemy-test-suite-only-not-a-secret")
# The suite sends thousands of requests a minute with one key: the rate limits still count every request
# but never refuse one (tests/test_rate_limits.py sets the limits it tests).
os.environ.setdefault("ALKEMY_RATE_LIMIT_PER_KEY", "1000000")
os.environ.setdefault("ALKEMY_RATE_LIMIT_PER_TENANT", "1000000")

from alkemy.settings import *  # noqa: E402, F403
