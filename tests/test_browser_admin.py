"""Studio admin as a person uses it: a real browser (Playwright driving Debian's chromium) against a live
server, with a real GPU-cluster worker process rendering on tiny models.

The module is one walk through the studio's day, in order: log in, create a character with a photo, get a
photo refused, find the character by photo, cancel a queued render, watch a render finish, then look for all
of it as another studio's staff. Server, browser, workers and the data are shared by the whole module (the
steps build on each other), so the module manages its own database rows: they are committed (the server
thread and the worker process must see them) and flushed at the end, as transactional tests are.

Screenshots of every step go to test-artifacts/browser/ (git-ignored). Without chromium (`.ci/run` installs
Debian's `chromium` when it runs as root) or the `playwright` package, the module is skipped with that reason.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests import photos

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("ALKEMY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
STEP_TIMEOUT_MS = 20_000
RENDER_TIMEOUT_MS = 150_000

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (dev.txt)")

pytestmark = [
    pytest.mark.slow,
    # Asks pytest-django for the test database. Each step runs in a transaction that rolls back, but the
    # steps write nothing themselves: the server thread and the worker commit on their own connections.
    pytest.mark.django_db,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium to drive: install Debian's chromium (`apt-get install chromium`, which .ci/run does as "
        "root) or point ALKEMY_CHROMIUM at a Chromium binary",
    ),
]


class Studio:
    """What the walk shares: the server, the browser, the two studios' users and what the steps created."""

    def __init__(self, url, browser, files):
        self.url = url
        self.browser = browser
        self.files = files
        self.pages: dict[str, object] = {}
        self.found: dict[str, int] = {}
        self.cluster = None

    def page_of(self, username: str):
        """One logged-out browser context (its own cookies) per user."""
        if username not in self.pages:
            context = self.browser.new_context(viewport={"width": 1280, "height": 900})
            context.set_default_timeout(STEP_TIMEOUT_MS)
            self.pages[username] = context.new_page()
        return self.pages[username]

    def start_workers(self):
        from tests.qcluster import Cluster

        if self.cluster is None:
            self.cluster = Cluster("gpu").start()
        return self.cluster


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def write_photos(folder: Path) -> dict[str, Path]:
    gradient = np.tile(np.linspace(0, 255, 400, dtype=np.uint8), (300, 1))
    images = {
        "eileen.png": photos.astronaut(),
        "eileen-mirrored.png": np.ascontiguousarray(photos.astronaut()[:, ::-1]),
        "no-face.png": np.stack([gradient] * 3, axis=-1),
    }
    for name, pixels in images.items():
        (folder / name).write_bytes(photos.encode(pixels))
    return {name: folder / name for name in images}


@pytest.fixture(scope="module")
def studio(django_db_setup, django_db_blocker, tiny_models_dir, tmp_path_factory):
    from django.contrib.auth import get_user_model
    from django.contrib.staticfiles.handlers import StaticFilesHandler
    from django.core.management import call_command
    from django.db import connections
    from django.test.testcases import LiveServerThread
    from django.test.utils import override_settings

    from alkemy.tenancy.services import membership_set
    from characters.services import character_create, reference_add
    from tests.conftest import make_tenant

    media = tmp_path_factory.mktemp("browser-media")
    overrides = override_settings(
        MEDIA_ROOT=str(media), ALKEMY_MODELS_DIR=tiny_models_dir, ALLOWED_HOSTS=["localhost", "127.0.0.1"]
    )
    with django_db_blocker.unblock(), pytest.MonkeyPatch.context() as env:
        # Playwright's sync API keeps an event loop in this thread; the ORM calls the steps make here are
        # plain blocking calls between browser actions, which is what Django's async guard exists to flag.
        env.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        overrides.enable()
        server = None
        playwright = None
        state = None
        # What the migrations put in the database (schedules, the default price book): a flush empties
        # every table, so it is put back afterwards, as serialized_rollback does for transactional tests.
        seeded = connections["default"].creation.serialize_db_to_string()
        try:
            studio_a, studio_b = make_tenant("studio-a"), make_tenant("studio-b")
            users = get_user_model().objects
            alice = users.create_user("alice", "alice@example.com", "pw-alice-123", is_staff=True)
            bob = users.create_user("bob", "bob@example.com", "pw-bob-12345", is_staff=True)
            membership_set(tenant=studio_a.tenant, user=alice)
            membership_set(tenant=studio_b.tenant, user=bob)
            tom = character_create(tenant=studio_a.tenant, name="Tom")  # a second face for the ranking
            reference_add(character=tom, upload=photos.upload(photos.tom_hanks()))

            server = LiveServerThread("localhost", static_handler=StaticFilesHandler, port=0)
            server.daemon = True
            server.start()
            server.is_ready.wait()
            if server.error:
                raise server.error
            playwright = sync_api.sync_playwright().start()
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            state = Studio(f"http://localhost:{server.port}", browser, write_photos(tmp_path_factory.mktemp("photos")))
            yield state
        finally:
            if state is not None and state.cluster is not None:
                state.cluster.stop()
            if playwright is not None:
                # While Playwright runs, this thread's code runs in another context, and Django keeps its
                # connections per context: close the steps' connection before leaving that context for good.
                connections.close_all()
                playwright.stop()  # closes the browser
            if server is not None:
                server.terminate()
                wait_for_request_threads()  # each closes its database connection as it ends
            try:  # as after a transactional test with serialized_rollback
                call_command("flush", verbosity=0, interactive=False, inhibit_post_migrate=True, reset_sequences=False)
                connections["default"].creation.deserialize_db_from_string(seeded)
            finally:
                overrides.disable()


@pytest.fixture(autouse=True)
def screenshot_on_failure(request, studio):
    """A failed step leaves a picture of every open page, next to the steps' own screenshots."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:  # the call's report is counted before teardown
        for username, page in studio.pages.items():
            for number, tab in enumerate(page.context.pages):
                screenshot(tab, f"FAILED-{request.node.name}-{username}-{number}")


def wait_for_request_threads(timeout: float = 10) -> None:
    import threading
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any("process_request" in thread.name for thread in threading.enumerate()):
            return
        time.sleep(0.05)


def log_in(studio: Studio, username: str, password: str):
    page = studio.page_of(username)
    page.goto(f"{studio.url}/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_selector("#site-name")
    return page


def messages(page, level: str) -> list[str]:
    """The page's messages of one level, lower-cased (a message may start with a file name, capitalised)."""
    return [text.lower() for text in page.locator(f"ul.messagelist li.{level}").all_text_contents()]


def test_staff_logs_in_and_sees_the_studio_admin(studio):
    page = log_in(studio, "alice", "pw-alice-123")
    assert page.url == f"{studio.url}/admin/"
    assert page.get_by_role("link", name="Characters").first.is_visible()
    assert page.get_by_role("link", name="Generation jobs").first.is_visible()
    screenshot(page, "01-admin-index")


def test_creates_a_character_and_sees_the_face_box_thumbnail(studio):
    page = studio.page_of("alice")
    page.goto(f"{studio.url}/admin/characters/character/add/")
    page.locator("#id_name").press_sequentially("Eileen Collins")  # typed, so the slug follows
    assert page.input_value("#id_slug") == "eileen-collins"  # prepopulated as the name is typed
    assert page.locator("#id_tenant option:checked").inner_text() != "---------"  # the one studio she edits
    page.set_input_files("#id_new_references", str(studio.files["eileen.png"]))
    page.click("input[name=_continue]")
    page.wait_for_url(re.compile(r"/admin/characters/character/\d+/change/"))
    added = messages(page, "success")
    assert any("eileen.png: reference added" in m for m in added), added
    studio.found["eileen"] = int(re.search(r"/character/(\d+)/change/", page.url).group(1))

    thumbnail = page.locator("img[src*='thumbnail.jpg?size=256']")
    assert thumbnail.count() == 1
    thumbnail.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
    assert page.get_by_text("sharpness").first.is_visible()
    screenshot(page, "02-character-with-reference")


def test_a_photo_without_a_face_is_refused_with_a_message(studio):
    page = studio.page_of("alice")
    page.goto(f"{studio.url}/admin/characters/character/{studio.found['eileen']}/change/")
    page.set_input_files("#id_new_references", str(studio.files["no-face.png"]))
    page.click("input[name=_continue]")
    page.wait_for_selector("ul.messagelist")
    errors = messages(page, "error")
    assert any("no-face.png: not added" in m and "(no_face)" in m for m in errors), errors
    assert page.locator("img[src*='thumbnail.jpg?size=256']").count() == 1  # still only the first photo
    screenshot(page, "03-photo-without-face-refused")


def test_finds_the_character_by_photo(studio):
    page = studio.page_of("alice")
    page.goto(f"{studio.url}/admin/characters/character/")
    page.get_by_role("link", name="Find character by photo").click()
    page.set_input_files("#id_image", str(studio.files["eileen-mirrored.png"]))
    page.click("input[type=submit][value=Search]")
    rows = page.locator("#content-main table tbody tr")  # the ranking (the sidebar has tables too)
    rows.first.wait_for()
    ranking = [rows.nth(i).locator("td").nth(2).inner_text().splitlines()[0] for i in range(rows.count())]
    assert ranking[:2] == ["Eileen Collins", "Tom"], ranking
    assert rows.first.locator("td").nth(4).inner_text() == "yes"  # the same person
    screenshot(page, "04-find-by-photo")


def render(page, studio: Studio, *, seed: int) -> int:
    """Fill "Render this character in a new scene…" and return the new job's id (its page is open)."""
    page.goto(f"{studio.url}/admin/characters/character/{studio.found['eileen']}/change/")
    page.get_by_role("link", name="Render this character in a new scene…").click()
    page.fill("#id_prompt", "walking in the rain")  # the default method, PuLID-FLUX
    for field, value in {"#id_width": "64", "#id_height": "64", "#id_steps": "3", "#id_seed": str(seed)}.items():
        page.fill(field, value)
    page.click("input[type=submit]")
    page.wait_for_url(re.compile(r"/admin/generation/generationjob/\d+/change/"))
    return int(re.search(r"/generationjob/(\d+)/change/", page.url).group(1))


def test_cancels_a_queued_render_from_the_job_list(studio):
    page = studio.page_of("alice")
    job_id = render(page, studio, seed=5)  # no worker runs yet: it stays queued
    assert any(f"generation #{job_id} queued." in m for m in messages(page, "success"))
    assert page.locator(f"[data-job-status='{job_id}']").inner_text() == "queued"

    page.goto(f"{studio.url}/admin/generation/generationjob/")
    page.check(f"input[name=_selected_action][value='{job_id}']")
    page.select_option("select[name=action]", "cancel")
    page.click("button[name=index]")
    page.wait_for_selector("ul.messagelist")
    assert any("cancel requested for 1 job(s)." in m for m in messages(page, "info"))
    assert page.locator(f"[data-job-status='{job_id}']").inner_text() == "canceled"
    screenshot(page, "05-queued-render-canceled")


def test_render_reaches_succeeded_with_its_output_and_identity_score(studio):
    page = studio.page_of("alice")
    job_id = render(page, studio, seed=11)
    studio.found["job"] = job_id
    job_page = page
    jobs_page = page.context.new_page()  # the list in a second tab, to see it update in place
    jobs_page.goto(f"{studio.url}/admin/generation/generationjob/")
    status_cell = jobs_page.locator(f"[data-job-status='{job_id}']")
    assert status_cell.inner_text() == "queued"
    jobs_page.evaluate("window.stillTheSamePage = true")

    studio.start_workers()
    jobs_page.wait_for_function(
        f"document.querySelector(\"[data-job-status='{job_id}']\").textContent === 'succeeded'",
        timeout=RENDER_TIMEOUT_MS,
    )
    assert jobs_page.evaluate("window.stillTheSamePage") is True  # updated by polling, not by a reload
    assert jobs_page.locator(f"[data-job-progress='{job_id}']").inner_text() == "100%"
    screenshot(jobs_page, "06-job-list-updated-live")

    # the job page reloads itself once its job finished: the output and its identity score appear
    output = job_page.locator("img[src*='/generationjob/outputs/']")
    output.wait_for(timeout=RENDER_TIMEOUT_MS)
    job_page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=output.element_handle())
    assert job_page.locator(f"[data-job-status='{job_id}']").inner_text() == "succeeded"
    outputs_table = job_page.locator("#outputs-group").inner_text()
    assert "no_face" in outputs_table  # tiny random networks draw no face, and the score says so
    screenshot(job_page, "07-job-succeeded-with-output")

    # the character page shows the render in its gallery, with its badge, and what it cost
    job_page.goto(f"{studio.url}/admin/characters/character/{studio.found['eileen']}/change/")
    gallery = job_page.locator(".generation-gallery figure")
    assert gallery.count() == 1
    assert gallery.first.locator(".identity-badge").inner_text() == "no face"
    spend = job_page.locator(".character-spend").inner_text()
    assert re.search(r"all time \$\d+\.\d+ over [1-9]\d* usage events", spend), spend
    screenshot(job_page, "08-character-gallery-and-spend")


def test_another_studios_staff_sees_none_of_it(studio):
    page = log_in(studio, "bob", "pw-bob-12345")
    eileen, job_id = studio.found["eileen"], studio.found["job"]

    for query in ("", "?q=Eileen", f"?q={eileen}"):  # the list, a search by name and by id
        page.goto(f"{studio.url}/admin/characters/character/{query}")
        assert page.locator("#result_list").count() == 0 and "0 characters" in page.locator("#changelist").inner_text()
    page.fill("#searchbar", "Eileen")  # and the search box, typed
    page.press("#searchbar", "Enter")
    page.wait_for_url("**/?q=Eileen")
    assert page.locator("#result_list").count() == 0
    screenshot(page, "09-other-studio-search")

    page.goto(f"{studio.url}/admin/characters/character/{eileen}/change/")
    assert page.url == f"{studio.url}/admin/"  # as if it did not exist
    assert any("doesn’t exist" in m for m in messages(page, "warning"))
    page.goto(f"{studio.url}/admin/generation/generationjob/")
    assert "0 generation jobs" in page.locator("#changelist").inner_text()
    page.goto(f"{studio.url}/admin/generation/generationjob/{job_id}/change/")
    assert page.url == f"{studio.url}/admin/"
    screenshot(page, "10-other-studio-job-by-url")

    status = page.goto(f"{studio.url}/admin/generation/generationjob/status.json?ids={job_id}")
    assert status.json() == {"jobs": {}}
    from generation.models import GeneratedImage

    output_id = GeneratedImage.objects.unscoped().get(job_id=job_id).pk
    assert page.goto(f"{studio.url}/admin/generation/generationjob/outputs/{output_id}/image.png").status == 404
