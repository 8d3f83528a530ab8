"""Schema conformance: schemathesis generates valid and invalid requests for every operation of
/api/v1/schema and checks each answer against the schema (status documented, body and headers as
documented, no 5xx, invalid input refused).

Not checked: `positive_data_acceptance`, because some schema-valid requests are refused for their
content, which a schema cannot describe (a PNG without a face is 422 `no_face`, a file that is not
a LoRA 422 `invalid_lora`, a webhook host that does not resolve 422 `unsafe_webhook_url`).
Examples are derandomized, so a run is repeatable; failures print a curl command to reproduce.
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")

from django.core import signals  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.db import close_old_connections  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

pytestmark = pytest.mark.django_db

schema = schemathesis.openapi.from_wsgi("/api/v1/schema?format=json", get_wsgi_application())


@pytest.fixture
def same_connection_for_requests():
    """Keep the test's database connection (and transaction) open across in-process WSGI requests."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@schema.parametrize()
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_answers_as_its_schema_says(case, studio_a, same_connection_for_requests):
    case.call_and_validate(
        headers={"Authorization": f"Api-Key {studio_a.key}"}, excluded_checks=[positive_data_acceptance]
    )


# --- the same operations with a viewer key and with no key at all (issue #14) -----------------------------
# Bounded: only the fuzzing phase, a few examples per operation (no coverage phase, whose deterministic cases
# are not bounded by max_examples). These answers are mostly refusals (403 for a viewer's writes, 401 without
# a key), so a few requests per operation show whether each is a documented status with the error envelope.

refusals_schema = schemathesis.openapi.from_wsgi(
    "/api/v1/schema?format=json",
    get_wsgi_application(),
    config=schemathesis.config.SchemathesisConfig.from_dict(
        {"phases": {"coverage": {"enabled": False}, "examples": {"enabled": False}}}
    ),
)


@pytest.fixture
def viewer_key(studio_a) -> str:
    from alkemy.tenancy.models import Role
    from alkemy.tenancy.services import api_key_create

    return api_key_create(tenant=studio_a.tenant, name="viewer", role=Role.VIEWER)[1]


@refusals_schema.parametrize()
@settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_answers_a_viewer_key_as_its_schema_says(case, viewer_key, same_connection_for_requests):
    headers = {"Authorization": f"Api-Key {viewer_key}"}
    case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])


@refusals_schema.parametrize()
@settings(max_examples=1, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_api_answers_no_key_as_its_schema_says(case, studio_a, same_connection_for_requests):
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
