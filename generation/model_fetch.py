"""Fill $ALKEMY_MODELS_DIR on a fresh GPU machine: exactly the files the model registry's layout needs.

`manage.py fetch_models` is the only thing that downloads weights, and only when an operator runs
it (an init container / one-shot service in deploy/); the workers never do. Each registry component
(`generation.model_registry.COMPONENTS`) has one source below: a Hugging Face Hub repository and the
exact files taken from it, or a plain URL for what is not on the Hub (facexlib's face parser, the
insightface antelopev2 pack, a zip). Both URLs are configurable (`--url KEY=URL`), for a mirror.

Hub files go through `huggingface_hub` (its HEAD metadata call with redirects, auth and the gated /
not-found errors, and its streaming GET that retries a dropped connection from where it stopped with
a `Range` request). `HF_ENDPOINT` is read at call time, so a mirror or a test server can stand in for
the Hub; `HF_TOKEN` authenticates (FLUX.1-dev is gated). Unlike `hf_hub_download`, which drops a
partial file when its process ends, a partial download is kept under `<models>/.fetch/partial/` named
by the file's ETag, so a rerun after a killed pod resumes it with `Range` instead of starting again.

Checksums: the Hub publishes each file's ETag, the SHA-256 of an LFS file (`X-Linked-Etag`) or the
git blob SHA-1 of a small one; both are verified before the file is moved into place. A URL source
is verified against its configured SHA-256 when one is given (`--sha256 KEY=HEX`). What was fetched is
recorded in `<models>/.fetch/manifest.json`, so a rerun skips files whose ETag has not changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

HF_DEFAULT_ENDPOINT = "https://huggingface.co"
FETCH_DIR = ".fetch"  # under the models dir: partial downloads and the manifest


@dataclass(frozen=True)
class HubSource:
    """Files of one Hub repository. `subfolder` is the repo folder that maps onto the component's path."""

    repo_id: str
    files: tuple[str, ...]  # repository paths, exactly what is downloaded
    subfolder: str = ""
    revision: str = "main"
    gated: bool = False  # say so up front: a licence must be accepted on the Hub and HF_TOKEN set

    def local_name(self, repo_file: str) -> str:
        return repo_file[len(self.subfolder) + 1 :] if self.subfolder else repo_file


@dataclass(frozen=True)
class UrlSource:
    """One file from a plain URL; `members` makes it a zip whose named files are extracted (flat)."""

    url: str
    sha256: str | None = None  # None: the publisher gives no checksum (the file is still size-checked)
    members: tuple[str, ...] = ()


TOKENIZER_CLIP = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")

#: component key (generation.model_registry.COMPONENTS, plus the antelopev2 face pack) → its source
SOURCES: dict[str, HubSource | UrlSource] = {
    "flux": HubSource(
        "black-forest-labs/FLUX.1-dev",
        (
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors.index.json",
            "text_encoder_2/model-00001-of-00002.safetensors",
            "text_encoder_2/model-00002-of-00002.safetensors",
            *(f"tokenizer/{name}" for name in TOKENIZER_CLIP),
            "tokenizer_2/special_tokens_map.json",
            "tokenizer_2/spiece.model",
            "tokenizer_2/tokenizer.json",
            "tokenizer_2/tokenizer_config.json",
            "transformer/config.json",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
            "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ),
        gated=True,
    ),
    "pulid_flux_weights": HubSource("guozinan/PuLID", ("pulid_flux_v0.9.1.safetensors",)),
    "eva_clip": HubSource("QuanSun/EVA-CLIP", ("EVA02_CLIP_L_336_psz14_s6B.pt",)),
    "face_parsing": UrlSource("https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth"),
    "sdxl": HubSource(
        "stabilityai/stable-diffusion-xl-base-1.0",
        (
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder_2/config.json",
            "text_encoder_2/model.safetensors",
            *(f"tokenizer/{name}" for name in TOKENIZER_CLIP),
            *(f"tokenizer_2/{name}" for name in TOKENIZER_CLIP),
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
        ),
    ),
    "instantid_controlnet": HubSource(
        "InstantX/InstantID",
        ("ControlNetModel/config.json", "ControlNetModel/diffusion_pytorch_model.safetensors"),
        subfolder="ControlNetModel",
    ),
    "instantid_ip_adapter": HubSource("InstantX/InstantID", ("ip-adapter.bin",)),
    # insightface's own download location for the pack (insightface.utils.storage, release "model-zoo")
    "antelopev2": UrlSource(
        "https://github.com/deepinsight/insightface/releases/download/model-zoo/antelopev2.zip",
        members=("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx"),
    ),
}

FACE_PACK_KEY = "antelopev2"  # the production face embedder's pack (model_registry.PRODUCTION_EMBEDDER)


def destination(models_dir: Path, key: str) -> Path:
    """Where `key` lives in the models dir (the registry's path; the face pack's insightface folder)."""
    if key == FACE_PACK_KEY:
        from characters.faces.insightface_backend import pack_dir_in

        return pack_dir_in(Path(models_dir), FACE_PACK_KEY)
    from generation.model_registry import component_path

    return component_path(Path(models_dir), key)


def plan(methods: Iterable[str]) -> list[str]:
    """The component keys `methods` need, in registry order; identity methods also need the face pack."""
    from generation.model_registry import ID_ENCODER_COMPONENTS, METHOD_COMPONENTS

    keys: list[str] = []
    for method in methods:
        wanted = list(METHOD_COMPONENTS[method])
        if method in ID_ENCODER_COMPONENTS:
            wanted.append(FACE_PACK_KEY)
        keys.extend(key for key in wanted if key not in keys)
    return keys


class FetchError(Exception):
    """One component could not be fetched; `message` says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class Outcome:
    key: str
    downloaded: list[str] = field(default_factory=list)
    up_to_date: list[str] = field(default_factory=list)
    error: str | None = None


# --- checksums and the manifest ----------------------------------------------------------------------

SHA256 = re.compile(r"[0-9a-f]{64}")
GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1_of(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())  # noqa: S324 (git's object id)
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_etag(path: Path, etag: str) -> str | None:
    """Check a downloaded file against the Hub's ETag. Returns the kind of checksum checked, None if the
    ETag is neither a SHA-256 (LFS) nor a git blob SHA-1; raises FetchError on a mismatch."""
    if SHA256.fullmatch(etag):
        kind, actual = "sha256", sha256_of(path)
    elif GIT_SHA1.fullmatch(etag):
        kind, actual = "git-sha1", git_blob_sha1_of(path)
    else:
        return None
    if actual != etag:
        raise FetchError(f"checksum mismatch for {path.name}: the source publishes {kind} {etag}, got {actual}")
    return kind


class Manifest:
    """`<models>/.fetch/manifest.json`: what was fetched (relative path → etag, size, source, commit)."""

    def __init__(self, models_dir: Path) -> None:
        self.path = Path(models_dir) / FETCH_DIR / "manifest.json"
        try:
            self.entries: dict[str, dict] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}

    def matches(self, relative: str, etag: str, size: int | None, file: Path) -> bool:
        entry = self.entries.get(relative)
        return (
            entry is not None
            and file.is_file()
            and entry.get("etag") == etag
            and (size is None or file.stat().st_size == size)
        )

    def record(self, relative: str, **entry) -> None:
        self.entries[relative] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        os.replace(temporary, self.path)


# --- transfers -----------------------------------------------------------------------------------------


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or HF_DEFAULT_ENDPOINT


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _partial_path(models_dir: Path, etag: str) -> Path:
    return Path(models_dir) / FETCH_DIR / "partial" / re.sub(r"[^0-9A-Za-z._-]", "_", etag)


def _resume_into(partial: Path, url: str, headers: dict, expected_size: int | None) -> None:
    """GET `url` into `partial`, continuing from its current length with a Range request."""
    from huggingface_hub.file_download import http_get

    partial.parent.mkdir(parents=True, exist_ok=True)
    if expected_size is not None and partial.exists() and partial.stat().st_size > expected_size:
        partial.unlink()  # longer than the file: not a prefix of it
    with open(partial, "r+b" if partial.exists() else "wb") as handle:
        handle.seek(0, os.SEEK_END)
        http_get(url, handle, resume_size=handle.tell(), headers=headers, expected_size=expected_size)


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlparse(a), urlparse(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def hub_error_message(exc: Exception, source: HubSource, filename: str) -> str:
    """What an operator needs to read when the Hub refuses a file."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{HF_DEFAULT_ENDPOINT}/{source.repo_id}"
    token_state = "HF_TOKEN is set" if hub_token() else "HF_TOKEN is not set"
    if isinstance(exc, GatedRepoError):
        status = exc.response.status_code if exc.response is not None else "?"
        return (
            f"{source.repo_id} is a gated repository and access was refused (HTTP {status}; {token_state}). "
            f"Accept its licence at {page} with a Hugging Face account, create a read token for that account "
            f"and set HF_TOKEN to it, then rerun fetch_models."
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"{source.repo_id} has no revision '{source.revision}'."
    if isinstance(exc, EntryNotFoundError):
        return f"{source.repo_id}@{source.revision} has no file '{filename}' (has the repository changed?)."
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"{source.repo_id} was not found or is private ({token_state}); check the name, or set HF_TOKEN to a "
            f"token that can read it."
        )
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return f"{source.repo_id}/{filename}: the Hub answered HTTP {status}: {str(exc).splitlines()[0]}"
    return f"{source.repo_id}/{filename}: {type(exc).__name__}: {exc}"


def fetch_hub_file(*, models_dir: Path, source: HubSource, repo_file: str, dest: Path, manifest: Manifest) -> bool:
    """Download one Hub file to `dest` unless the manifest says it is there already. True if downloaded."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers

    endpoint, token = hub_endpoint(), hub_token()
    url = hf_hub_url(source.repo_id, repo_file, revision=source.revision, endpoint=endpoint)
    relative = str(dest.relative_to(models_dir))
    fetched_before = relative in manifest.entries and dest.is_file()
    try:
        try:
            metadata = get_hf_file_metadata(url, token=token, endpoint=endpoint, retry_on_errors=not fetched_before)
        except (HfHubHTTPError, httpx2.HTTPError, OSError):
            if fetched_before:
                return False  # the Hub cannot be asked (offline, token gone): keep the verified file we have
            raise
        if metadata.etag is None or metadata.commit_hash is None:
            raise FetchError(f"{url} did not answer like the Hugging Face Hub (no ETag or X-Repo-Commit).")
        etag = metadata.etag
        if manifest.matches(relative, etag, metadata.size, dest):
            return False
        placed = dest.is_file() and relative not in manifest.entries and SHA256.fullmatch(etag)
        if placed and sha256_of(dest) == etag:  # placed by hand (or an older run): adopt it
            manifest.record(relative, etag=etag, size=dest.stat().st_size, source=url, commit=metadata.commit_hash)
            return False
        headers = build_hf_headers(token=token)
        headers["Accept-Encoding"] = "identity"  # byte ranges of the file itself, not of a compressed body
        location = metadata.location or url
        if not _same_origin(url, location):
            headers.pop("authorization", None)  # a signed CDN URL: the token stays with the Hub
        partial = _partial_path(models_dir, etag)
        _resume_into(partial, location, headers, metadata.size)
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        raise FetchError(hub_error_message(exc, source, repo_file)) from exc
    try:
        checked = verify_etag(partial, etag)
    except FetchError:
        partial.unlink(missing_ok=True)  # corrupt: the next run starts this file again
        raise
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, dest)
    manifest.record(
        relative, etag=etag, size=dest.stat().st_size, source=url, commit=metadata.commit_hash, checksum=checked
    )
    return True


def fetch_url(*, models_dir: Path, key: str, source: UrlSource, dest: Path, manifest: Manifest) -> bool:
    """Download a URL source (resumable), verify its SHA-256 when configured, unzip `members` flat into
    `dest` for an archive. True if downloaded."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    targets = [dest / member for member in source.members] if source.members else [dest]
    relative = str(dest.relative_to(models_dir))
    entry = manifest.entries.get(relative)
    expected = source.sha256.lower() if source.sha256 else None
    if all(target.is_file() for target in targets):  # fetched before, or placed by hand
        if expected is None or (entry and entry.get("sha256") == expected):
            return False
        if entry is None and not source.members and sha256_of(dest) == expected:
            return False
    partial = _partial_path(models_dir, "url-" + hashlib.sha256(source.url.encode()).hexdigest()[:32])
    try:
        _resume_into(partial, source.url, {"Accept-Encoding": "identity"}, None)
    except (HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = f"HTTP {status}" if status else f"{type(exc).__name__}: {exc}"
        raise FetchError(f"downloading {source.url} failed ({reason}); set another with --url {key}=URL") from exc
    digest = sha256_of(partial)
    if expected and digest != expected:
        partial.unlink(missing_ok=True)
        raise FetchError(f"checksum mismatch for {source.url}: expected sha256 {source.sha256}, got {digest}")
    if source.members:
        _extract_members(partial, dest, source.members, key)
        partial.unlink()
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, dest)
    manifest.record(relative, source=source.url, sha256=digest, checksum="sha256" if source.sha256 else None)
    return True


def _extract_members(archive: Path, dest: Path, members: tuple[str, ...], key: str) -> None:
    """Extract the named files wherever they sit in the zip (the antelopev2 zip nests a folder) into `dest`."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            by_name = {Path(info.filename).name: info for info in zipped.infolist() if not info.is_dir()}
            absent = [name for name in members if name not in by_name]
            if absent:
                raise FetchError(f"the archive lacks {', '.join(absent)}")
            dest.mkdir(parents=True, exist_ok=True)
            for name in members:
                temporary = dest / f".{name}.tmp"
                with zipped.open(by_name[name]) as source, open(temporary, "wb") as target:
                    shutil.copyfileobj(source, target, 8 << 20)
                os.replace(temporary, dest / name)
    except zipfile.BadZipFile as exc:
        archive.unlink(missing_ok=True)
        raise FetchError(f"the download is not a zip archive ({exc})") from exc


def fetch(
    *,
    models_dir: Path,
    keys: Iterable[str],
    urls: dict[str, str] | None = None,
    sha256s: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> list[Outcome]:
    """Fetch every component in `keys` into `models_dir`; one component's failure does not stop the others."""
    models_dir = Path(models_dir)
    lock = models_dir / FETCH_DIR / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        # Fetchers sharing the volume (the Job, every GPU pod's init container) take turns: the next one
        # finds the files done and only asks the Hub for their metadata.
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            return _fetch_locked(models_dir, keys, urls, sha256s, log)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_locked(models_dir, keys, urls, sha256s, log) -> list[Outcome]:
    manifest = Manifest(models_dir)
    outcomes = []
    for key in keys:
        source = SOURCES[key]
        if isinstance(source, UrlSource) and (key in (urls or {}) or key in (sha256s or {})):
            source = UrlSource(
                (urls or {}).get(key, source.url), (sha256s or {}).get(key, source.sha256), source.members
            )
        dest = destination(models_dir, key)
        outcome = Outcome(key)
        outcomes.append(outcome)
        try:
            if isinstance(source, UrlSource):
                log(f"{key}: {source.url}")
                done = fetch_url(models_dir=models_dir, key=key, source=source, dest=dest, manifest=manifest)
                (outcome.downloaded if done else outcome.up_to_date).append(str(dest.relative_to(models_dir)))
                continue
            log(f"{key}: {source.repo_id}@{source.revision}" + (" (gated: needs HF_TOKEN)" if source.gated else ""))
            from generation.model_registry import COMPONENTS

            single = COMPONENTS[key].files == ("",)  # the component is one file, not a folder
            for repo_file in source.files:
                target = dest if single else dest / source.local_name(repo_file)
                done = fetch_hub_file(
                    models_dir=models_dir, source=source, repo_file=repo_file, dest=target, manifest=manifest
                )
                (outcome.downloaded if done else outcome.up_to_date).append(str(target.relative_to(models_dir)))
                log(f"  {'downloaded' if done else 'up to date'}  {target.relative_to(models_dir)}")
        except FetchError as exc:
            outcome.error = exc.message
            log(f"  FAILED: {exc.message}")
    return outcomes
