"""manage.py fetch_models against a loopback server that speaks the Hub's file-download protocol.

The server answers what `huggingface_hub` asks (HF_ENDPOINT points at it): HEAD/GET
`/{repo}/resolve/{revision}/{file}` with `X-Repo-Commit` and an `ETag` (the git blob SHA-1 of a small
file), or, for an LFS file, a 302 to a CDN origin with `X-Linked-Etag` (its SHA-256) and
`X-Linked-Size`; 401/403 with `X-Error-Code: GatedRepo` for a gated repository without an authorised
token; 404 `EntryNotFound`; byte ranges (206) on the CDN. It can drop a connection part way through a
file, or stall there so the downloading process can be killed, as a pod would be.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from generation import model_fetch
from generation.model_fetch import SOURCES, FetchError, HubSource, Manifest, UrlSource, fetch_hub_file
from generation.model_registry import COMPONENTS, METHOD_COMPONENTS, missing_files

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_test_token_with_access"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".onnx")
CHUNK = 10 * 1024 * 1024  # huggingface_hub writes what it receives in 10 MiB chunks
BIG = CHUNK + 2 * 1024 * 1024  # a file longer than one chunk, so a cut leaves a partial file behind


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324


def content_for(repo: str, name: str) -> bytes:
    return f"{repo}/{name}\n".encode() * 7


class FakeHub:
    """State of the loopback Hub: repositories, plain files, what was asked, and injected faults."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated = {"black-forest-labs/FLUX.1-dev"}
        self.plain: dict[str, bytes] = {}  # /files/<name>: the non-Hub URL sources
        self.requests: list[dict] = []
        self.cut: dict[str, int] = {}  # cdn sha256 → drop the connection after this many bytes (once)
        self.stall: dict[str, int] = {}  # cdn sha256 → send this many bytes, then hang until released
        self.release = threading.Event()
        self.sent: dict[str, int] = {}
        self.lock = threading.Lock()
        self.bad_checksum: set[str] = set()  # sha256s whose X-Linked-Etag is published wrong
        for source in SOURCES.values():
            if isinstance(source, HubSource):
                files = self.repos.setdefault(source.repo_id, {})
                for name in source.files:
                    files[name] = content_for(source.repo_id, name)

    def blob(self, sha: str) -> bytes | None:
        for files in self.repos.values():
            for data in files.values():
                if hashlib.sha256(data).hexdigest() == sha:
                    return data
        return None


def make_handler(hub: FakeHub, port_holder: list[int]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self.handle_request(body=False)

        def do_GET(self):
            self.handle_request(body=True)

        def record(self):
            with hub.lock:
                hub.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "host": self.headers.get("Host", ""),
                        "auth": self.headers.get("Authorization"),
                        "range": self.headers.get("Range"),
                    }
                )

        def error(self, status: int, code: str | None, message: str):
            payload = f'{{"error": "{message}"}}'.encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(payload)

        def handle_request(self, body: bool):
            self.record()
            path = self.path.split("?")[0]
            if path.startswith("/cdn/"):
                return self.send_bytes(hub.blob(path[5:]), key=path[5:], body=body)
            if path.startswith("/files/"):
                return self.send_bytes(hub.plain.get(path[7:]), key=path, body=body)
            parts = path.lstrip("/").split("/", 4)
            if len(parts) < 5 or parts[2] != "resolve":
                return self.error(404, None, "Not Found")
            repo, filename = f"{parts[0]}/{parts[1]}", parts[4]
            if repo not in hub.repos:
                return self.error(401, "RepoNotFound", "Repository not found")
            if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
                status = 403 if self.headers.get("Authorization") else 401
                return self.error(
                    status, "GatedRepo",
                    f"Access to model {repo} is restricted. You must have access to it and be authenticated.",
                )  # fmt: skip
            data = hub.repos[repo].get(filename)
            if data is None:
                return self.error(404, "EntryNotFound", f"{filename} does not exist on main")
            if filename.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                published = ("0" * 64) if sha in hub.bad_checksum else sha
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port_holder[0]}/cdn/{sha}?signed=1")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{git_blob_sha1(b"version https://git-lfs.github.com/spec/v1")}"')
                self.send_header("X-Linked-Etag", f'"{published}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{git_blob_sha1(data)}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def send_bytes(self, data: bytes | None, key: str, body: bool):
            if data is None:
                return self.error(404, None, "Not Found")
            start = 0
            requested = self.headers.get("Range")
            if requested and requested.startswith("bytes="):
                start = int(requested[6:].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            with hub.lock:
                cut = hub.cut.pop(key, None) if start == 0 else None
                stall = hub.stall.pop(key, None) if start == 0 else None
            if cut is not None or stall is not None:
                limit = cut if cut is not None else stall
                self.wfile.write(data[:limit])
                self.wfile.flush()
                with hub.lock:
                    hub.sent[key] = limit
                if stall is not None:
                    hub.release.wait(30)
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    return Handler


@pytest.fixture
def hub(monkeypatch):
    state = FakeHub()
    port_holder: list[int] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state, port_holder))
    server.daemon_threads = True
    port_holder.append(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.endpoint = f"http://127.0.0.1:{port_holder[0]}"
    state.port = port_holder[0]
    monkeypatch.setenv("HF_ENDPOINT", state.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


def face_pack_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in SOURCES["antelopev2"].members:  # nested one folder down, as the released zip is
            archive.writestr(f"antelopev2/{name}", f"onnx {name}".encode())
    return buffer.getvalue()


def url_options(hub: FakeHub) -> list[str]:
    hub.plain["parsing_bisenet.pth"] = b"bisenet weights"
    hub.plain["antelopev2.zip"] = face_pack_zip()
    return [
        f"face_parsing={hub.endpoint}/files/parsing_bisenet.pth",
        f"antelopev2={hub.endpoint}/files/antelopev2.zip",
    ]


def run_fetch(*args: str, **options) -> str:
    out = io.StringIO()
    call_command("fetch_models", *args, stdout=out, **options)
    return out.getvalue()


def test_fetch_models_fills_the_registry_layout_and_check_models_passes(hub, tmp_path):
    zip_sha = hashlib.sha256(face_pack_zip()).hexdigest()
    output = run_fetch("--models-dir", str(tmp_path), *sum((["--url", u] for u in url_options(hub)), []),
                       "--sha256", f"antelopev2={zip_sha}")  # fmt: skip

    for method in ("pulid_flux", "instantid_sdxl", "lora"):
        assert missing_files(tmp_path, method) == [], method
    assert "pulid_flux       ready" in output and "instantid_sdxl   ready" in output  # check_models ran
    # exactly the listed files, with the served bytes, in the registry's layout
    for key, source in SOURCES.items():
        dest = model_fetch.destination(tmp_path, key)
        if isinstance(source, HubSource):
            for name in source.files:
                target = dest if COMPONENTS[key].files == ("",) else dest / source.local_name(name)
                assert target.read_bytes() == content_for(source.repo_id, name)
    pack = tmp_path / "insightface" / "models" / "antelopev2"
    assert sorted(p.name for p in pack.iterdir()) == sorted(SOURCES["antelopev2"].members)
    assert (tmp_path / "instantid" / "ControlNetModel" / "config.json").is_file()
    assert (tmp_path / "facexlib" / "parsing_bisenet.pth").read_bytes() == b"bisenet weights"
    downloaded = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    expected_hub = sum(len(s.files) for s in SOURCES.values() if isinstance(s, HubSource))
    assert len([p for p in downloaded if not p.startswith(".fetch/")]) == expected_hub + 1 + 5
    assert not list((tmp_path / ".fetch" / "partial").iterdir())
    # every checksum the Hub published was verified: sha256 for LFS files, git blob sha1 for the others
    manifest = Manifest(tmp_path).entries
    assert manifest["flux1-dev/transformer/config.json"]["checksum"] == "git-sha1"
    assert manifest["pulid/pulid_flux_v0.9.1.safetensors"]["checksum"] == "sha256"
    assert manifest["pulid/pulid_flux_v0.9.1.safetensors"]["commit"] == COMMIT
    # the token goes to the Hub, never to the CDN the LFS files redirect to
    hub_calls = [r for r in hub.requests if "/resolve/" in r["path"]]
    cdn_calls = [r for r in hub.requests if r["path"].startswith("/cdn/")]
    assert hub_calls and all(r["auth"] == f"Bearer {TOKEN}" for r in hub_calls)
    assert cdn_calls and all(r["auth"] is None and r["host"].startswith("localhost") for r in cdn_calls)

    hub.requests.clear()
    again = run_fetch("--models-dir", str(tmp_path), *sum((["--url", u] for u in url_options(hub)), []))
    assert "Downloaded 0 file(s)" in again
    assert all(r["method"] == "HEAD" for r in hub.requests)  # metadata only: nothing is downloaded twice

    # a pod restarting while the Hub cannot be reached keeps the verified files and starts
    hub.requests.clear()
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # discard port: connection refused (monkeypatch restores)
    offline = run_fetch("--models-dir", str(tmp_path), "--method", "instantid_sdxl")
    assert "Downloaded 0 file(s)" in offline and "instantid_sdxl   ready" in offline


def test_gated_repository_without_access_is_explained_and_the_rest_is_fetched(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(CommandError) as refused:
        run_fetch("--method", "pulid_flux", "--models-dir", str(tmp_path), "--url", url_options(hub)[0],
                  "--url", url_options(hub)[1])  # fmt: skip
    message = str(refused.value)
    assert "black-forest-labs/FLUX.1-dev is a gated repository" in message
    assert "HTTP 401; HF_TOKEN is not set" in message
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in message and "set HF_TOKEN" in message
    assert (tmp_path / "pulid" / "pulid_flux_v0.9.1.safetensors").is_file()  # other components went on
    assert not (tmp_path / "flux1-dev").exists()

    monkeypatch.setenv("HF_TOKEN", "hf_token_of_an_account_without_access")
    with pytest.raises(CommandError) as refused:
        run_fetch("--method", "pulid_flux", "--models-dir", str(tmp_path))  # the face files are there now
    assert "HTTP 403; HF_TOKEN is set" in str(refused.value)
    assert "1 component(s) could not be fetched" in str(refused.value)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run_fetch("--method", "pulid_flux", "--models-dir", str(tmp_path))
    assert missing_files(tmp_path, "pulid_flux") == []


def big_shard(hub: FakeHub) -> tuple[HubSource, str, bytes, str]:
    source = SOURCES["flux"]
    name = "transformer/diffusion_pytorch_model-00001-of-00003.safetensors"
    data = os.urandom(BIG)
    hub.repos[source.repo_id][name] = data
    return source, name, data, hashlib.sha256(data).hexdigest()


def test_a_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    source, name, data, sha = big_shard(hub)
    hub.cut[sha] = CHUNK + 1024 * 1024  # the first GET breaks off 11 MiB in
    dest = tmp_path / "flux1-dev" / "transformer" / Path(name).name

    assert fetch_hub_file(models_dir=tmp_path, source=source, repo_file=name, dest=dest, manifest=Manifest(tmp_path))

    assert dest.read_bytes() == data
    ranges = [r["range"] for r in hub.requests if r["path"].startswith(f"/cdn/{sha}")]
    assert ranges == [None, f"bytes={CHUNK}-"]  # the second GET continues after what was written


def test_a_killed_download_resumes_on_the_next_run(hub, tmp_path):
    source, name, data, sha = big_shard(hub)
    hub.stall[sha] = CHUNK + 1024 * 1024
    dest = tmp_path / "flux1-dev" / "transformer" / Path(name).name
    script = (
        "from pathlib import Path; from generation.model_fetch import *; "
        f"fetch_hub_file(models_dir=Path({str(tmp_path)!r}), source=SOURCES['flux'], repo_file={name!r}, "
        f"dest=Path({str(dest)!r}), manifest=Manifest(Path({str(tmp_path)!r})))"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=os.environ.copy(), start_new_session=True)
    partial = tmp_path / ".fetch" / "partial" / sha
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size == CHUNK):
            assert child.poll() is None, "the download process ended before it was killed"
            assert time.monotonic() < deadline, "the first 10 MiB never reached the partial file"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # as a pod killed mid-download
        child.wait(10)
        hub.release.set()
    assert not dest.exists()

    hub.requests.clear()
    assert fetch_hub_file(models_dir=tmp_path, source=source, repo_file=name, dest=dest, manifest=Manifest(tmp_path))

    assert dest.read_bytes() == data
    assert [r["range"] for r in hub.requests if r["method"] == "GET"] == [f"bytes={CHUNK}-"]
    assert not partial.exists()


def test_a_file_that_does_not_match_its_published_checksum_is_refused(hub, tmp_path):
    source = SOURCES["pulid_flux_weights"]
    name = source.files[0]
    hub.bad_checksum.add(hashlib.sha256(hub.repos[source.repo_id][name]).hexdigest())
    dest = tmp_path / "pulid" / name

    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch_hub_file(models_dir=tmp_path, source=source, repo_file=name, dest=dest, manifest=Manifest(tmp_path))

    assert not dest.exists()
    assert not list((tmp_path / ".fetch" / "partial").iterdir())  # the next run starts over


def test_a_url_source_with_a_wrong_sha256_is_refused(hub, tmp_path):
    hub.plain["parsing_bisenet.pth"] = b"something else"
    dest = tmp_path / "facexlib" / "parsing_bisenet.pth"
    source = UrlSource(f"{hub.endpoint}/files/parsing_bisenet.pth", sha256="ab" * 32)
    with pytest.raises(FetchError, match="checksum mismatch"):
        model_fetch.fetch_url(models_dir=tmp_path, key="face_parsing", source=source, dest=dest,
                              manifest=Manifest(tmp_path))  # fmt: skip
    assert not dest.exists()


def test_every_registry_component_has_a_source_and_list_prints_exactly_them():
    assert set(COMPONENTS) <= set(SOURCES)
    everything = model_fetch.plan(m for m, c in METHOD_COMPONENTS.items() if c)
    assert set(everything) == set(COMPONENTS) | {"antelopev2"}
    out = io.StringIO()
    call_command("fetch_models", "--list", "--method", "instantid_sdxl", stdout=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == len(SOURCES["sdxl"].files) + 2 + 1 + 1  # SDXL, ControlNet, ip-adapter, face pack
    assert "InstantX/InstantID@main\tip-adapter.bin" in out.getvalue()
