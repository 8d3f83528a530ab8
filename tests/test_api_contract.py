"""The API contract: unreadable input refused with 400, every error status documented, a schema typed clients trust.

The last test generates a TypeScript client from /api/v1/schema with the tools the frontend uses
(openapi-typescript 7, openapi-fetch; versions pinned in tests/contract/package-lock.json and
installed with `npm ci` under $ALKEMY_DATA_DIR) and type-checks tests/contract/client.ts with
`tsc --strict`, so the schema cannot drift from what callers rely on.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import path
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.test import APIClient

from alkemy.api.base import TenantViewSet
from characters.models import Character
from characters.services import character_create
from tests.test_api_plumbing import assert_error

pytestmark = pytest.mark.django_db

CONTRACT_DIR = Path(__file__).parent / "contract"


@pytest.fixture
def schema() -> dict:
    response = APIClient().get("/api/v1/schema?format=json")
    assert response.status_code == 200
    return json.loads(response.content)


def operation_for(spec: dict, method: str, url: str) -> dict:
    """The schema operation that serves `METHOD url` (ids in the url match `{param}` templates)."""
    for template, operations in spec["paths"].items():
        pattern = "^" + re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, url.split("?")[0]):
            return operations[method.lower()]
    raise AssertionError(f"{method} {url} is not in the schema")


def assert_documented(spec: dict, method: str, url: str, response) -> None:
    """The status the API answered is one the schema lists for that operation, with the error envelope."""
    documented = operation_for(spec, method, url)["responses"]
    status = str(response.status_code)
    assert status in documented, f"{method} {url} answered {status}; the schema lists {sorted(documented)}"
    if response.status_code >= 400:
        content_schema = documented[status]["content"]["application/json"]["schema"]
        assert content_schema == {"$ref": "#/components/schemas/ErrorResponse"}


# --- 21: invalid query values and bodies are refused, and documented -----------------------------


@pytest.mark.parametrize(
    ("url", "field"),
    [
        ("/api/v1/characters?archived=-148167", "archived"),
        ("/api/v1/characters?page_size=junk", "page_size"),
        ("/api/v1/characters?page_size=0", "page_size"),
        ("/api/v1/characters?page_size=201", "page_size"),
        ("/api/v1/characters?page=abc", "page"),
        ("/api/v1/characters?ordering=password", "ordering"),
        ("/api/v1/generations?status=exploded", "status"),
        ("/api/v1/generations?character=abc", "character"),
    ],
)
def test_invalid_query_value_is_400_naming_the_parameter(api_a, schema, url, field):
    response = api_a.get(url)
    error = assert_error(response, 400, "validation_error")
    assert error["details"]["field"] == field
    assert_documented(schema, "GET", url, response)


def test_unreadable_dry_run_is_400_not_a_real_submission(api_a, studio_a, schema):
    from generation.models import GenerationJob

    character = character_create(tenant=studio_a.tenant, name="Kai")
    response = api_a.post(
        "/api/v1/generations?dry_run=maybe", {"character": character.pk, "prompt": "x"}, format="json"
    )
    assert assert_error(response, 400, "validation_error")["details"]["field"] == "dry_run"
    assert_documented(schema, "POST", "/api/v1/generations", response)
    assert not GenerationJob.objects.unscoped().exists()


def test_valid_query_values_still_filter(studio_a, api_a):
    character_create(tenant=studio_a.tenant, name="Active")
    archived = character_create(tenant=studio_a.tenant, name="Gone")
    archived.is_archived = True
    archived.save(update_fields=["is_archived"])
    assert [c["name"] for c in api_a.get("/api/v1/characters?archived=true").json()["results"]] == ["Gone"]
    assert [c["name"] for c in api_a.get("/api/v1/characters?archived=0").json()["results"]] == ["Active"]
    assert api_a.get("/api/v1/characters?archived=").json()["count"] == 2
    names = [c["name"] for c in api_a.get("/api/v1/characters?ordering=-name&page_size=200&page=1").json()["results"]]
    assert names == ["Gone", "Active"]


def test_tags_as_a_string_are_refused_in_json_and_forms_are_not_accepted(api_a, schema):
    as_string = api_a.post("/api/v1/characters", {"name": "Kai", "tags": "lead"}, format="json")
    assert assert_error(as_string, 400, "validation_error")["details"]["field"] == "tags"
    as_form = api_a.post("/api/v1/characters", {"name": "Kai", "tags": "lead"}, format="multipart")
    assert_error(as_form, 415, "unsupported_media_type")
    for response in (as_string, as_form):
        assert_documented(schema, "POST", "/api/v1/characters", response)


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/api/v1/characters", {"name": "Kai", "archived": 0}, "archived"),
        ("/api/v1/characters", {"name": "Kai", "archived": "yes"}, "archived"),
        ("/api/v1/characters", {"name": 0}, "name"),
        ("/api/v1/characters", {"name": "Kai", "tags": [0]}, "tags"),
        ("/api/v1/generations", {"character": "1", "prompt": "x"}, "character"),
        ("/api/v1/generations", {"character": 1, "prompt": 5}, "prompt"),
        ("/api/v1/generations", {"character": 1, "prompt": "x", "width": "64"}, "width"),
        ("/api/v1/generations", {"character": 1, "prompt": "x", "guidance": "3.5"}, "guidance"),
        ("/api/v1/webhooks", {"url": "https://hooks.example.com/a", "is_active": 1}, "is_active"),
    ],
)
def test_json_values_of_the_wrong_type_are_400_not_coerced(api_a, url, body, field):
    response = api_a.post(url, body, format="json")
    assert assert_error(response, 400, "validation_error")["details"]["field"] == field


def test_errors_of_the_review_are_documented_where_they_happen(studio_a, api_a, schema):
    kai = character_create(tenant=studio_a.tenant, name="Kai", slug="kai")
    oversized = json.dumps({"name": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)})
    checks = [
        ("GET", "/api/v1/characters/999999", APIClient().get("/api/v1/characters/999999")),  # 401
        ("GET", "/api/v1/characters/999999", api_a.get("/api/v1/characters/999999")),  # 404
        ("POST", "/api/v1/characters", api_a.post("/api/v1/characters", {"name": "K", "slug": "kai"}, format="json")),
        ("GET", f"/api/v1/characters/{kai.pk}/similar", api_a.get(f"/api/v1/characters/{kai.pk}/similar")),  # 422
        ("GET", f"/api/v1/characters/{kai.pk}/similar", api_a.get(f"/api/v1/characters/{kai.pk}/similar?limit=0")),
        ("POST", "/api/v1/generations", api_a.post("/api/v1/generations", {"prompt": "x"}, format="json")),  # 400
        ("GET", "/api/v1/generations", api_a.get("/api/v1/generations?page=99")),  # 404 no such page
        ("POST", "/api/v1/characters", api_a.post("/api/v1/characters", oversized, content_type="application/json")),
    ]
    statuses = []
    for method, url, response in checks:
        assert response.status_code >= 400
        assert_documented(schema, method, url, response)
        statuses.append(response.status_code)
    assert statuses == [401, 404, 409, 422, 400, 400, 404, 413]


# --- 21: the schema ------------------------------------------------------------------------------


def test_schema_generates_without_warnings(tmp_path):
    # A warning means a guessed type or an unstable component name (e.g. `Status751Enum`) in the client.
    call_command("spectacular", "--fail-on-warn", "--validate", "--file", str(tmp_path / "schema.yaml"))


def test_error_envelope_is_a_component(schema):
    components = schema["components"]["schemas"]
    assert components["ErrorResponse"]["required"] == ["error"]
    assert components["ErrorResponse"]["properties"]["error"] == {"$ref": "#/components/schemas/Error"}
    assert set(components["Error"]["required"]) == {"code", "message", "details"}


def test_every_operation_documents_its_errors(schema):
    for url, operations in schema["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            errors = {status for status in responses if status.startswith(("4", "5"))}
            if url == "/api/v1/health":
                assert errors == {"503"}
                continue
            assert {"401", "403"} <= errors, (method, url)
            if "{" in url:
                assert "404" in errors, (method, url)
            if "requestBody" in operation or any(p["in"] == "query" for p in operation.get("parameters", [])):
                assert "400" in errors, (method, url)
            if "requestBody" in operation:
                assert {"413", "415", "422"} <= errors, (method, url)
            for status in errors - {"503"}:
                assert responses[status]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"
                }


def test_defaulted_request_fields_are_optional_and_carry_no_default(schema):
    components = schema["components"]["schemas"]
    for component, fields in {
        "FaceSearchRequestRequest": ["limit"],
        "GenerationCreateRequest": ["negative_prompt", "num_images", "method", "width", "height"],
    }.items():
        for field in fields:
            assert field not in components[component]["required"], (component, field)
            assert "default" not in json.dumps(components[component]["properties"][field]), (component, field)
            assert "Default:" in components[component]["properties"][field]["description"]
    for name, component in components.items():
        if name.endswith("Request"):
            assert '"default"' not in json.dumps(component), name


def test_query_parameters_are_documented_with_their_bounds(schema):
    parameters = {p["name"]: p for p in schema["paths"]["/api/v1/characters"]["get"]["parameters"]}
    assert parameters["page_size"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 200}
    assert parameters["archived"]["schema"]["type"] == "boolean"
    assert re.fullmatch(parameters["ordering"]["schema"]["pattern"], "-created_at,name")
    assert not re.fullmatch(parameters["ordering"]["schema"]["pattern"], "password")
    assert re.fullmatch(parameters["ordering"]["schema"]["pattern"], "")  # empty: the default order
    # Views that do not search or sort do not pretend to.
    references = schema["paths"]["/api/v1/characters/{character_pk}/references"]["get"]
    assert {p["name"] for p in references["parameters"]} == {"character_pk"}


class LaterThingSerializer(serializers.ModelSerializer):
    count = serializers.IntegerField(default=3)

    class Meta:
        model = Character
        fields = ["id", "name", "count"]


class LaterThingViewSet(TenantViewSet):
    """Stands in for an endpoint added later by someone who never heard of this test."""

    serializer_class = LaterThingSerializer

    @extend_schema(responses={201: LaterThingSerializer, 429: OpenApiTypes.OBJECT})
    def create(self, request):
        return Response(status=201)

    def retrieve(self, request, pk=None):
        return Response({})


def test_views_added_later_get_their_errors_documented_without_annotations():
    create_view = LaterThingViewSet.as_view({"post": "create"})
    detail_view = LaterThingViewSet.as_view({"get": "retrieve"})
    spec = SchemaGenerator(
        patterns=[path("api/v1/later", create_view), path("api/v1/later/<int:pk>", detail_view)]
    ).get_schema(request=None, public=True)
    create = spec["paths"]["/api/v1/later"]["post"]
    assert set(create["responses"]) == {"201", "400", "401", "403", "404", "409", "413", "415", "422", "429"}
    for status in set(create["responses"]) - {"201"}:
        assert create["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    assert set(spec["paths"]["/api/v1/later/{id}"]["get"]["responses"]) == {"200", "401", "403", "404", "429"}
    request_component = spec["components"]["schemas"]["LaterThingRequest"]
    assert request_component["required"] == ["name"]
    assert "default" not in request_component["properties"]["count"]


# --- 21: a typed client generated from the schema type-checks ------------------------------------


@pytest.fixture(scope="session")
def node_tools() -> Path:
    """openapi-typescript, openapi-fetch and typescript at the versions of tests/contract/package-lock.json."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if not (npm and node):
        pytest.skip("node and npm are not installed: the typed client cannot be generated and type-checked here")
    home = Path(settings.ALKEMY_DATA_DIR) / "api-contract-node"
    lock = (CONTRACT_DIR / "package-lock.json").read_bytes()
    installed = home / "package-lock.json"
    tools = [home / "node_modules" / ".bin" / name for name in ("openapi-typescript", "tsc")]
    if not (installed.exists() and installed.read_bytes() == lock and all(tool.exists() for tool in tools)):
        home.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(CONTRACT_DIR / name, home / name)
        subprocess.run(
            [npm, "ci", "--prefix", str(home), "--no-audit", "--no-fund", "--ignore-scripts"],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return home


def test_typescript_client_generated_from_the_schema_type_checks(node_tools, schema):
    work = node_tools / "check"  # inside the install folder, so `import "openapi-fetch"` resolves
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    (work / "openapi.json").write_text(json.dumps(schema))
    for name in ("client.ts", "tsconfig.json"):
        shutil.copyfile(CONTRACT_DIR / name, work / name)
    bin_dir = node_tools / "node_modules" / ".bin"

    generated = subprocess.run(
        [bin_dir / "openapi-typescript", "openapi.json", "--output", "schema.d.ts"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    checked = subprocess.run(
        [bin_dir / "tsc", "--project", "tsconfig.json"], cwd=work, capture_output=True, text=True, timeout=300
    )
    assert checked.returncode == 0, "tsc --strict found errors:\n" + checked.stdout + checked.stderr
