"""Cross-tenant sweep, automatic: every route under /api/v1/ and every admin page, with tenant B's credentials
against tenant A's objects.

Routes are enumerated from the URL resolver (API) and from every registered ModelAdmin's URLs (admin), so a new
route is swept without anyone remembering to add it. What the sweep needs to know is keyed by route:

- `API_OBJECTS`: the collection segment before a path parameter (`characters` in `characters/{id}`) → A's
  object of that kind. A route whose parameter follows an unknown segment fails the sweep.
- `API_COLLECTION_WRITES`: each parameter-less route → a body that names A's objects (POSTed by B, must be
  refused) or None when such a body cannot name anything of A (the route's lists are still checked).
- `ADMIN_OBJECTS` / `ADMIN_PARAMS`: a registered model → A's row; an admin URL parameter name → A's object.

With B's API key every method on every object route answers 404 (405 where the route has no such method),
every list and search holds none of A's objects, and afterwards every tenant-owned row of A and every stored
file is exactly as before. A staff user of B sees none of A's rows on any changelist or add page, and every
object page of A's rows answers a redirect/403/404 without A's data.
"""

from __future__ import annotations

import json
import re

import pytest
from django.apps import apps
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone
from django_q.models import Failure, OrmQ, Schedule, Success, Task

from alkemy.jobs import JobStatus
from alkemy.tenancy.admin_base import is_tenant_owned
from alkemy.tenancy.models import Membership, Role, Tenant
from alkemy.tenancy.services import membership_set
from alkemy.webhooks.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from characters.models import Character, CharacterImport, ReferenceImage
from characters.services import character_create
from generation.models import GeneratedImage, GenerationJob
from shotlists.models import Shot, ShotJob, ShotList
from tests import photos
from tests.conftest import stored_files
from training.models import LoraArtifact, StyleLora, TrainingJob
from usage.models import Budget, PriceBook, Reservation, UsageEvent
from usage.services import budget_set, usage_record_job

pytestmark = pytest.mark.django_db

#: in every text field of A's rows; must never appear in anything B gets back
MARK = "qzxmark"
METHODS = ("get", "post", "put", "patch", "delete")
PNG = photos.encode(photos.astronaut()[:64, :64])


class World:
    """One object of every kind for tenant A (through the API where that is cheap), a character for B."""

    def __init__(self, studio_a, studio_b, media_root):
        self.a, self.b = studio_a, studio_b
        tenant = studio_a.tenant
        Tenant.objects.filter(pk=tenant.pk).update(name=f"Studio {MARK}")
        api = studio_a.client()
        response = api.post("/api/v1/characters", {"name": f"Aurora {MARK}", "description": f"lead {MARK}",
                                                   "tags": [MARK]}, format="json")  # fmt: skip
        assert response.status_code == 201, response.content
        self.character = Character.objects.unscoped().get(pk=response.json()["id"])
        self.photo = photos.encode(photos.astronaut())
        response = api.post(
            f"/api/v1/characters/{self.character.pk}/references",
            {"image": photos.upload(self.photo)},
            format="multipart",
        )
        assert response.status_code == 201, response.content
        self.reference = ReferenceImage.objects.unscoped().get(pk=response.json()["id"])

        # a queued generation through the API (its reservation too), and a finished one with an output
        response = api.post("/api/v1/generations", {"character": self.character.pk, "method": "pulid_flux",
                            "prompt": f"queued {MARK}", "width": 512, "height": 512, "steps": 4, "seed": 1},
                            format="json")  # fmt: skip
        assert response.status_code == 202, response.content
        self.queued_generation = GenerationJob.objects.unscoped().get(pk=response.json()["id"])
        now = timezone.now()
        self.generation = GenerationJob.objects.unscoped().create(
            tenant=tenant, character=self.character, method="pulid_flux", embedder="dlib", prompt=f"done {MARK}",
            width=64, height=64, steps=2, seed=1, status=JobStatus.SUCCEEDED, started_at=now, finished_at=now,
            device="cpu", device_seconds=1.5, attempt=1,
        )  # fmt: skip
        name = default_storage.save(f"tenants/{tenant.pk}/generations/{self.generation.pk}/0.png", ContentFile(PNG))
        self.output = GeneratedImage.objects.unscoped().create(
            tenant=tenant, job=self.generation, index=0, file=name, seed=1, width=64, height=64
        )
        assert usage_record_job(job=self.generation), "a finished job is billed"

        lora_name = default_storage.save(f"tenants/{tenant.pk}/loras/{'a' * 64}.safetensors", ContentFile(b"lora"))
        self.lora = LoraArtifact.objects.unscoped().create(
            tenant=tenant, character=self.character, version=1, base_model="sdxl", file=lora_name, sha256="a" * 64,
            file_size=4, lora_format="diffusers", rank=4, trigger_token=f"ohwx_{MARK}", source="uploaded",
            is_selected=True,
        )  # fmt: skip
        style_name = default_storage.save(f"tenants/{tenant.pk}/loras/{'b' * 64}.safetensors", ContentFile(b"style"))
        self.style_lora = StyleLora.objects.unscoped().create(
            tenant=tenant, name=f"Noir {MARK}", base_model="sdxl", file=style_name, sha256="b" * 64, file_size=5,
            lora_format="diffusers", rank=4, trigger_token=MARK,
        )  # fmt: skip
        self.training = TrainingJob.objects.unscoped().create(
            tenant=tenant, character=self.character, base_model="sdxl", steps=10, rank=4, alpha=4.0,
            learning_rate=1e-4, resolution=512, trigger_token=f"ohwx_{MARK}", seed=1, status=JobStatus.SUCCEEDED,
            validation_prompt=f"portrait {MARK}", lora=self.lora, finished_at=now,
        )  # fmt: skip
        render = default_storage.save(f"tenants/{tenant.pk}/trainings/{self.training.pk}/validation.png",
                                      ContentFile(PNG))  # fmt: skip
        TrainingJob.objects.unscoped().filter(pk=self.training.pk).update(validation_image=render)

        self.shot_list = ShotList.objects.unscoped().create(
            tenant=tenant, name=f"Chase {MARK}", character_ids=[self.character.pk], methods=["pulid_flux"]
        )
        shot = Shot.objects.unscoped().create(
            tenant=tenant, shot_list=self.shot_list, index=0, prompt=f"rain {MARK}", width=64, height=64, seed=1
        )
        ShotJob.objects.unscoped().create(
            tenant=tenant, shot_list=self.shot_list, shot=shot, character=self.character, method="pulid_flux",
            job=self.generation,
        )  # fmt: skip

        self.webhook = WebhookEndpoint.objects.unscoped().create(
            tenant=tenant, url=f"https://hooks.example.com/{MARK}", secret=f"whsec_{MARK}"
        )
        self.delivery = WebhookDelivery.objects.unscoped().create(
            tenant=tenant, endpoint=self.webhook, event="generation.succeeded", payload={"note": MARK}
        )
        WebhookAttempt.objects.unscoped().create(tenant=tenant, delivery=self.delivery, number=1, error=MARK)

        self.budget = budget_set(tenant=tenant, monthly_limit=123, method_limits={"pulid_flux": {"max_active_jobs": 7}})
        self.price_book = PriceBook.objects.create(name=f"Deal {MARK}", tenant=tenant, version=1)
        self.reservation = Reservation.objects.unscoped().get(job_id=self.queued_generation.pk)
        self.usage_event = UsageEvent.objects.unscoped().filter(tenant=tenant).first()

        archive = default_storage.save(f"tenants/{tenant.pk}/character-imports/{'c' * 64}.zip", ContentFile(b"PK"))
        self.character_import = CharacterImport.objects.unscoped().create(
            tenant=tenant, archive=archive, archive_name=f"cast-{MARK}.zip", archive_sha256="c" * 64, archive_size=2,
            report=[{"path": f"{MARK}/1.jpg", "outcome": "refused"}],
        )  # fmt: skip

        users = get_user_model().objects
        self.staff_of_a = users.create_user("alice", "alice@example.com", "pw-alice-123", is_staff=True)
        self.membership = membership_set(tenant=tenant, user=self.staff_of_a, role=Role.OWNER)
        self.staff_of_b = users.create_user("bob", "bob@example.com", "pw-bob-12345", is_staff=True)
        membership_set(tenant=studio_b.tenant, user=self.staff_of_b, role=Role.OWNER)
        self.character_of_b = character_create(tenant=studio_b.tenant, name="Bruno")
        self.media_root = media_root

    def snapshot(self) -> dict:
        """Every tenant-owned row of A (all columns), A's tenant and price books, and every stored file."""
        rows = {}
        for model in apps.get_models():
            if is_tenant_owned(model):
                queryset = model.objects.unscoped().filter(**{model.tenant_field: self.a.tenant.pk})
                rows[model._meta.label] = json.dumps(list(queryset.order_by("pk").values()), default=str)
        rows["tenant"] = json.dumps(list(Tenant.objects.filter(pk=self.a.tenant.pk).values()), default=str)
        rows["price_books"] = json.dumps(list(PriceBook.objects.filter(tenant=self.a.tenant).values()), default=str)
        files = {str(p): p.read_bytes() for p in stored_files(self.media_root)}
        return {"rows": rows, "files": files}


@pytest.fixture
def world(studio_a, studio_b, media_root) -> World:
    return World(studio_a, studio_b, media_root)


# --- the registries: extend these when a route or a model is added --------------------------------------

#: collection segment before a path parameter → A's object there
API_OBJECTS = {
    "characters": lambda w: w.character,
    "references": lambda w: w.reference,
    "loras": lambda w: w.lora,
    "style-loras": lambda w: w.style_lora,
    "generations": lambda w: w.generation,
    "outputs": lambda w: w.output,
    "trainings": lambda w: w.training,
    "shotlists": lambda w: w.shot_list,
    "webhooks": lambda w: w.webhook,
    "imports": lambda w: w.character_import,
}


def _generation_of_a(w):
    return {"character": w.character.pk, "method": "pulid_flux", "prompt": "x", "width": 512, "height": 512,
            "steps": 4}  # fmt: skip


def _lora_generation_of_b(w):  # B's own character rendered with A's style LoRA
    return {"character": w.character_of_b.pk, "method": "lora", "prompt": "x", "width": 512, "height": 512,
            "steps": 4, "params": {"style_lora": w.style_lora.pk}}  # fmt: skip


#: parameter-less route → bodies (JSON) that name A's objects, each POSTed by B and refused; None: nothing to name
API_COLLECTION_WRITES = {
    "characters": None,
    "characters/import": None,  # a zip for B's own tenant: nothing of A to name
    "characters/imports": None,
    "search/faces": None,  # multipart photo of A's character: checked by test_search_by_photo_finds_none_of_a
    "generations": lambda w: [_generation_of_a(w), _lora_generation_of_b(w)],
    "trainings": lambda w: [{"character": w.character.pk, "base_model": "sdxl", "steps": 10}],
    "shotlists": lambda w: [{"name": "x", "characters": [w.character.pk], "methods": ["pulid_flux"],
                             "shots": [{"prompt": "x", "width": 64, "height": 64, "steps": 2}]}],  # fmt: skip
    "style-loras": None,
    "webhooks": None,
    "tenant": None,
    "usage": None,
    "usage/budget": None,
    "usage/events": None,
    "health": None,
    "schema": None,
    "docs": None,
}


def api_routes() -> list[tuple[str, set[str]]]:
    """(template like 'characters/{character_pk}/references/{pk}', methods the view serves) of /api/v1/."""

    def walk(resolver, prefix):
        for entry in resolver.url_patterns:
            if isinstance(entry, URLResolver):
                yield from walk(entry, prefix + str(entry.pattern))
            elif isinstance(entry, URLPattern):
                yield prefix + str(entry.pattern), entry.callback

    routes = []
    for pattern, callback in walk(get_resolver(), ""):
        if not pattern.startswith("api/v1/"):
            continue
        template = pattern.removeprefix("api/v1/").replace("^", "").replace("$", "").replace("\\", "")
        template = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", template)
        template = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", template)
        actions = getattr(callback, "actions", None)
        view_class = getattr(callback, "cls", None) or getattr(callback, "view_class", None)
        methods = set(actions) if actions else {m for m in METHODS if hasattr(view_class, m)}
        routes.append((template, methods))
    return routes


def fill(template: str, world: World, parents: dict | None = None) -> tuple[str, list[str]]:
    """The URL of `template` with A's objects (or `parents` overrides), and the segments it could not fill."""
    missing = []
    segments = template.split("/")
    for i, segment in enumerate(segments):
        if segment.startswith("{"):
            collection = segments[i - 1] if i else ""
            if parents and collection in parents:
                segments[i] = str(parents[collection])
            elif collection in API_OBJECTS:
                segments[i] = str(API_OBJECTS[collection](world).pk)
            else:
                missing.append(f"{template}: no object for '{segment}' after '{collection}'")
    return "/api/v1/" + "/".join(segments), missing


def multipart_body():
    return {"image": photos.upload(PNG), "file": ContentFile(b"x", name="x.safetensors"), "name": "stolen",
            "base_model": "sdxl"}  # fmt: skip


def body_of(response) -> bytes:
    """The body, also of a file (streaming) response, read once."""
    if not hasattr(response, "_sweep_body"):
        response._sweep_body = b"".join(response.streaming_content) if response.streaming else response.content
    return response._sweep_body


def leaks(world: World, response) -> list[str]:
    """What of A a response shows: the mark in any text, A's tenant slug."""
    text = body_of(response).decode("utf-8", "replace")
    return [s for s in (MARK, world.a.tenant.slug, world.a.api_key.prefix) if s in text]


def test_api_sweep_with_tenant_b_key(world, django_capture_on_commit_callbacks, capsys):
    api = world.b.client()
    api.raise_request_exception = False  # a view that crashes is a 500 to report, not an exception ending the sweep
    before = world.snapshot()
    problems, routes, operations = [], 0, 0

    for template, served in api_routes():
        routes += 1
        if "{" not in template:
            if template not in API_COLLECTION_WRITES:
                problems.append(f"{template}: no entry in API_COLLECTION_WRITES")
                continue
            if "get" in served:
                response = api.get(f"/api/v1/{template}", {"character": world.character.pk, "page_size": 200})
                operations += 1
                if response.status_code >= 500 or leaks(world, response):
                    problems.append(f"GET {template}: {response.status_code} {leaks(world, response)}")
                if response.status_code == 200 and response.get("Content-Type", "").startswith("application/json"):
                    results = response.json().get("results") if isinstance(response.json(), dict) else None
                    collection = template.split("/")[-1]
                    if results is not None and collection in API_OBJECTS:
                        own = API_OBJECTS[collection](world).pk
                        if any(isinstance(r, dict) and r.get("id") == own for r in results):
                            problems.append(f"GET {template} lists A's object #{own}")
            bodies = API_COLLECTION_WRITES[template]
            for body in bodies(world) if bodies else []:
                with django_capture_on_commit_callbacks(execute=False):
                    response = api.post(f"/api/v1/{template}", body, format="json")
                operations += 1
                if response.status_code not in (400, 404, 422) or leaks(world, response):
                    problems.append(f"POST {template} naming A's objects: {response.status_code} {body_of(response)!r}")
            continue

        url, missing = fill(template, world)
        problems += missing
        if missing:
            continue
        variants = [url]
        if template.startswith("characters/{character_pk}/") and template.count("{") > 1:  # B's parent, A's child
            variants.append(fill(template, world, {"characters": world.character_of_b.pk})[0])
        for target in variants:
            for method in METHODS:
                if method in ("put", "patch"):
                    kwargs = {"data": {"name": "stolen", "url": "https://example.org/x"}, "format": "json"}
                elif method == "post":
                    kwargs = {"data": multipart_body(), "format": "multipart"}
                else:
                    kwargs = {}
                with django_capture_on_commit_callbacks(execute=True):
                    response = getattr(api, method)(target, **kwargs)
                operations += 1
                expected = {404} if method in served else {404, 405}
                if response.status_code not in expected or leaks(world, response):
                    problems.append(f"{method.upper()} {target} ({template}): {response.status_code} "
                                    f"{body_of(response)[:200]!r}")  # fmt: skip

    after = world.snapshot()
    changed = [label for label in before["rows"] if before["rows"][label] != after["rows"][label]]
    assert not changed, f"B's requests changed A's rows: {changed}"
    assert before["files"] == after["files"], "B's requests changed A's files"
    with capsys.disabled():
        print(f"\ncross-tenant API sweep: {routes} routes, {operations} operations")
    assert not problems, "\n".join(problems)
    assert routes >= 30 and operations >= 150
    searches_find_none_of_a(world)


def searches_find_none_of_a(world):
    """Search by photo, by text and for duplicates, with B's key: A's character of that very face is not found."""
    api = world.b.client()
    response = api.post("/api/v1/search/faces", {"image": photos.upload(world.photo)}, format="multipart")
    assert response.status_code in (200, 422), response.content
    assert not leaks(world, response)
    if response.status_code == 200:
        assert all(r["character"]["id"] != world.character.pk for r in response.json()["results"])
    assert api.get("/api/v1/characters", {"search": "Aurora"}).json()["count"] == 0
    # B's own character of the same face: its duplicates are searched among B's characters only
    from characters.services import reference_add

    reference_add(character=world.character_of_b, upload=photos.upload(photos.astronaut()[:, ::-1].copy()))
    similar = api.get(f"/api/v1/characters/{world.character_of_b.pk}/similar", {"min_similarity": -1})
    assert similar.status_code == 200, similar.content
    assert not leaks(world, similar)
    assert all(r["character"]["id"] != world.character.pk for r in similar.json()["results"])
    # A finds its own character with the same photo: the search works, B is simply not shown it
    own = world.a.client().post("/api/v1/search/faces", {"image": photos.upload(world.photo)}, format="multipart")
    assert [r["character"]["id"] for r in own.json()["results"]][:1] == [world.character.pk]


# --- admin -----------------------------------------------------------------------------------------------

#: registered model → A's row of it
ADMIN_OBJECTS = {
    Tenant: lambda w: w.a.tenant,
    Membership: lambda w: w.membership,
    Character: lambda w: w.character,
    GenerationJob: lambda w: w.generation,
    TrainingJob: lambda w: w.training,
    LoraArtifact: lambda w: w.lora,
    StyleLora: lambda w: w.style_lora,
    ShotList: lambda w: w.shot_list,
    WebhookEndpoint: lambda w: w.webhook,
    WebhookDelivery: lambda w: w.delivery,
    Budget: lambda w: w.budget,
    PriceBook: lambda w: w.price_book,
    Reservation: lambda w: w.reservation,
    UsageEvent: lambda w: w.usage_event,
    CharacterImport: lambda w: w.character_import,
}
ADMIN_OBJECTS[apps.get_model("tenancy", "ApiKey")] = lambda w: w.a.api_key
ADMIN_OBJECTS[get_user_model()] = lambda w: w.staff_of_a
# not tenant-owned, but they can hold tenants' data (task names and arguments): staff of a tenant sees none of it
ADMIN_OBJECTS[Group] = lambda w: Group.objects.create(name=f"group {MARK}")
ADMIN_OBJECTS[Schedule] = lambda w: Schedule.objects.create(name=MARK, func="math.floor", args=MARK)
ADMIN_OBJECTS[Success] = lambda w: Task.objects.create(
    id="a" * 32, name=MARK, func="math.floor", started=timezone.now(), stopped=timezone.now(), success=True
)
ADMIN_OBJECTS[Failure] = lambda w: Task.objects.create(
    id="b" * 32, name=MARK, func="math.floor", started=timezone.now(), stopped=timezone.now(), success=False
)
ADMIN_OBJECTS[OrmQ] = lambda w: OrmQ.objects.create(key=MARK, payload=MARK)

#: admin URL parameter (besides object_id) → A's object
ADMIN_PARAMS = {
    "output_id": lambda w: w.output,
    "character_id": lambda w: w.character,
    "reference_id": lambda w: w.reference,
    "shot_list_id": lambda w: w.shot_list,
    "job_id": lambda w: w.training,
    "id": lambda w: w.staff_of_a,  # the user admin's password page
}


def test_admin_sweep_with_staff_of_b(world, client, capsys):
    # the control: the same pages show A's mark to A's staff, so 'no mark' below means 'not shown'
    client.force_login(world.staff_of_a)
    assert MARK in client.get(f"/admin/characters/character/{world.character.pk}/change/").content.decode()
    assert MARK in client.get("/admin/characters/character/").content.decode()
    assert MARK in world.a.client().get(f"/api/v1/characters/{world.character.pk}").content.decode()

    client.force_login(world.staff_of_b)
    client.raise_request_exception = False
    before = world.snapshot()
    problems, pages, requests = [], 0, 0

    def check(method, url, *, object_page):
        nonlocal requests
        requests += 1
        response = client.post(url, {"post": "yes"}) if method == "post" else client.get(url)
        bad_status = response.status_code >= 500 or (object_page and response.status_code == 200)
        if bad_status or leaks(world, response):
            problems.append(f"{method.upper()} {url}: {response.status_code} {leaks(world, response)}")

    for url in ("/admin/", *{f"/admin/{m._meta.app_label}/" for m in admin.site._registry}):
        check("get", url, object_page=False)
    for model, model_admin in admin.site._registry.items():
        if model not in ADMIN_OBJECTS:
            problems.append(f"admin of {model._meta.label}: no entry in ADMIN_OBJECTS")
            continue
        row = ADMIN_OBJECTS[model](world)
        for pattern in model_admin.urls:
            if not isinstance(pattern, URLPattern) or not pattern.name:
                continue
            pages += 1
            kwargs = {}
            for name in pattern.pattern.converters:
                if name == "object_id":
                    kwargs[name] = row.pk
                elif name in ADMIN_PARAMS:
                    kwargs[name] = ADMIN_PARAMS[name](world).pk
                else:
                    problems.append(f"admin URL {pattern.name}: no object for <{name}>")
            if len(kwargs) != len(pattern.pattern.converters):
                continue
            url = reverse(f"admin:{pattern.name}", kwargs=kwargs)
            if kwargs:
                check("get", url, object_page=True)
                check("post", url, object_page=True)
            elif pattern.name.endswith("_changelist"):
                check("get", url, object_page=False)
                check("get", f"{url}?q=Aurora", object_page=False)
            else:
                check("get", url, object_page=False)

    after = world.snapshot()
    changed = [label for label in before["rows"] if before["rows"][label] != after["rows"][label]]
    assert not changed, f"B's staff changed A's rows: {changed}"
    assert before["files"] == after["files"]
    with capsys.disabled():
        print(f"\ncross-tenant admin sweep: {len(admin.site._registry)} model admins, {pages} pages, "
              f"{requests} requests")  # fmt: skip
    assert not problems, "\n".join(problems)
