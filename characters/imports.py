"""Bulk enrolment: many characters at once from one folder per character (folder name = character name,
1-5 photos each), read from a directory (`manage.py import_characters DIR`) or a zip archive
(`POST /api/v1/characters/import`, a `CharacterImport` job on the CPU cluster).

Every photo goes through the service a single upload uses (`photo_analyse_bytes` + `reference_store`):
the same validation, the same refusal codes, the same similar-character report. What an import adds:

- Face analysis (the slow part) runs in a pool of worker processes, one per core, while the parent
  writes to the database in order; a bad file is a refusal in the report, never the end of the run.
- Idempotent, so resumable: a photo whose bytes (sha256) are already a reference of the character is
  `skipped`; the same bytes under another character, or twice in the import, are refused `duplicate_photo`.
  A character is found by name (case-insensitive) or created when its first photo is accepted.
- Possible duplicates: each enrolled photo lists the characters (of the registry or made earlier in
  this import) whose identity resembles its character's, as `reference_add` reports them.

Archives are checked before anything is read: entry count, declared uncompressed size, path traversal
(absolute paths, `..`, drive letters), symlinks; reading an entry stops at the photo byte limit whatever
its header claims, so a zip bomb costs at most that much per entry.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import stat
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.db import transaction

from alkemy.errors import AlkemyError, Unprocessable
from alkemy.tenancy.models import Tenant
from characters import import_worker
from characters.models import Character, ReferenceImage

#: the layout: 1-5 photos per character folder
MAX_PHOTOS_PER_CHARACTER = 5
#: system files that archivers and file managers add; not photos, not reported
IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
IGNORED_FOLDERS = {"__MACOSX"}

ENROLLED, SKIPPED, REFUSED, WOULD_ENROL = "enrolled", "skipped", "refused", "would_enrol"


#: defaults of the settings of the same names (alkemy/settings.py reads them from the environment)
DEFAULT_LIMITS = {
    "ALKEMY_IMPORT_MAX_ARCHIVE_BYTES": 1024**3,
    "ALKEMY_IMPORT_MAX_FILES": 5000,
    "ALKEMY_IMPORT_MAX_UNCOMPRESSED_BYTES": 4 * 1024**3,
}


def import_limit(name: str) -> int:
    return int(getattr(settings, name, DEFAULT_LIMITS[name]))


def import_limits() -> dict:
    return {
        "max_files": import_limit("ALKEMY_IMPORT_MAX_FILES"),
        "max_uncompressed_bytes": import_limit("ALKEMY_IMPORT_MAX_UNCOMPRESSED_BYTES"),
        "max_photo_bytes": settings.ALKEMY_MAX_UPLOAD_BYTES,
    }


# --- the layout ----------------------------------------------------------------------------------


@dataclass
class ImportEntry:
    """One file of the layout: `path` as in the folder or archive, `character` its folder's name."""

    path: str
    character: str
    read: Callable[[], bytes] | None = None  # None when refused on its path alone
    refusal: tuple[str, str] | None = None  # (code, message)


def _refused(path: str, character: str, code: str, message: str) -> ImportEntry:
    return ImportEntry(path=path, character=character, refusal=(code, message))


def _ignored(parts: tuple[str, ...]) -> bool:
    return any(part in IGNORED_FOLDERS or part.startswith(".") for part in parts) or parts[-1] in IGNORED_NAMES


def _layout(items: Iterable[tuple[tuple[str, ...], Callable[[], bytes]]]) -> list[ImportEntry]:
    """Entries of (path parts, reader) in path order: photos beyond MAX_PHOTOS_PER_CHARACTER, files outside a
    character folder and files in sub-folders of one are refused on their path."""
    entries: list[ImportEntry] = []
    per_character: dict[str, int] = {}
    for parts, read in sorted(items, key=lambda item: item[0]):
        if _ignored(parts):
            continue
        path = "/".join(parts)
        if len(parts) == 1:
            entries.append(_refused(path, "", "not_in_a_folder", "Put each photo in its character's folder."))
            continue
        name = " ".join(parts[0].split())
        if len(parts) > 2:
            message = "Sub-folders of a character folder are not read; put its photos directly in it."
            entries.append(_refused(path, name, "nested_folder", message))
            continue
        if not name or len(name) > Character._meta.get_field("name").max_length:
            entries.append(_refused(path, name, "invalid_name", "The folder name is not a usable character name."))
            continue
        seen = per_character.get(name.casefold(), 0)
        per_character[name.casefold()] = seen + 1
        if seen >= MAX_PHOTOS_PER_CHARACTER:
            message = f"A character folder holds at most {MAX_PHOTOS_PER_CHARACTER} photos; this one is extra."
            entries.append(_refused(path, name, "too_many_photos", message))
            continue
        entries.append(ImportEntry(path=path, character=name, read=read))
    return entries


def _read_limited(handle, limit: int) -> bytes:
    data = handle.read(limit + 1)
    if len(data) > limit:
        raise Unprocessable(
            f"The file is larger than the limit of {limit} bytes.", code="image_too_large", field="image"
        )
    return data


def entries_from_directory(root: Path) -> list[ImportEntry]:
    """The layout of a folder on disk; symlinks are not followed out of it."""
    root = Path(root)
    if not root.is_dir():
        raise AlkemyError(f"{root} is not a directory.", code="not_a_directory", field="directory")
    limit = import_limits()["max_photo_bytes"]
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not (Path(dirpath) / d).is_symlink()]
        for filename in filenames:
            path = Path(dirpath) / filename
            if path.is_symlink() or not path.is_file():
                continue

            def read(path=path) -> bytes:
                with open(path, "rb") as handle:
                    return _read_limited(handle, limit)

            items.append((path.relative_to(root).parts, read))
    return _layout(items)


def _bad_archive(message: str, code: str = "invalid_archive", **details) -> AlkemyError:
    return AlkemyError(message, code=code, field="archive", details=details)


def open_archive(handle) -> zipfile.ZipFile:
    """Open and check a zip archive before anything is extracted; AlkemyError (400) names the problem:
    `invalid_archive` (not a zip), `archive_too_large` (entries or declared size over the limits),
    `unsafe_archive` (a path leaving the archive or a symlink)."""
    limits = import_limits()
    try:
        archive = zipfile.ZipFile(handle)
        members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError):
        raise _bad_archive("The file is not a zip archive we can read.") from None
    files = [m for m in members if not m.is_dir()]
    if len(files) > limits["max_files"]:
        raise _bad_archive(
            f"The archive holds {len(files)} files; an import takes at most {limits['max_files']}.",
            code="archive_too_large",
            files=len(files),
            max_files=limits["max_files"],
        )
    declared = sum(m.file_size for m in files)
    if declared > limits["max_uncompressed_bytes"]:
        raise _bad_archive(
            f"The archive unpacks to {declared} bytes; an import takes at most {limits['max_uncompressed_bytes']}.",
            code="archive_too_large",
            uncompressed_bytes=declared,
            max_uncompressed_bytes=limits["max_uncompressed_bytes"],
        )
    for member in members:
        name = member.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise _bad_archive("The archive has a path that leaves it.", code="unsafe_archive", path=name[:300])
        if stat.S_ISLNK(member.external_attr >> 16):
            raise _bad_archive("The archive holds a symbolic link.", code="unsafe_archive", path=name[:300])
    return archive


def entries_from_archive(archive: zipfile.ZipFile) -> list[ImportEntry]:
    """The layout of an archive `open_archive` accepted. Each entry reads at most the photo byte limit."""
    limit = import_limits()["max_photo_bytes"]
    items = []
    for member in archive.infolist():
        if member.is_dir():
            continue
        parts = tuple(p for p in PurePosixPath(member.filename.replace("\\", "/")).parts if p not in ("", "."))
        if not parts:
            continue

        def read(member=member) -> bytes:
            if member.flag_bits & 0x1:
                raise Unprocessable("The file is encrypted in the archive.", code="invalid_image", field="image")
            if member.file_size > limit:
                raise Unprocessable(
                    f"The file is {member.file_size} bytes; the limit is {limit}.",
                    code="image_too_large",
                    field="image",
                )
            try:
                with archive.open(member) as handle:
                    return _read_limited(handle, limit)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, ValueError) as exc:
                raise Unprocessable(
                    f"The file is corrupt in the archive ({exc}).", code="invalid_image", field="image"
                ) from None

        items.append((parts, read))
    return _layout(items)


# --- analysis, in worker processes ---------------------------------------------------------------


def _pool_size(workers: int | None) -> int:
    if multiprocessing.current_process().daemon:  # a queue worker may not have child processes
        return 1
    return max(1, workers or os.cpu_count() or 1)


def analyse_all(readers: list[Callable[[], bytes]], *, workers: int | None = None) -> Iterator:
    """`import_worker.analyse` of each photo, in order, on `workers` processes (default: one per core; 1: in this one).
    Photos are read as the pool takes them (a few ahead per worker), so memory does not grow with the import."""
    min_face_px, max_pixels = settings.ALKEMY_MIN_FACE_PX, settings.ALKEMY_MAX_IMAGE_PIXELS
    size = min(_pool_size(workers), len(readers))

    def read(reader):
        try:
            return reader(), None
        except AlkemyError as exc:
            return None, (exc.code, exc.message, exc.details)

    if size <= 1:
        for reader in readers:
            data, refusal = read(reader)
            yield refusal or import_worker.analyse(data, min_face_px, max_pixels)
        return
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the parent holds database connections and maybe threads; a fork would share them
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=size, mp_context=context, initializer=import_worker.init) as pool:
        pending: deque = deque()
        queue = iter(readers)
        try:
            while True:
                while len(pending) < size * 4:
                    reader = next(queue, None)
                    if reader is None:
                        break
                    data, refusal = read(reader)
                    work = refusal or pool.submit(import_worker.analyse, data, min_face_px, max_pixels)
                    pending.append(work)
                if not pending:
                    return
                head = pending.popleft()
                yield head if isinstance(head, tuple) else head.result()
        finally:
            for future in pending:
                if not isinstance(future, tuple):
                    future.cancel()


# --- the run --------------------------------------------------------------------------------------


@dataclass
class ImportResult:
    report: list[dict] = field(default_factory=list)
    characters_created: int = 0
    stopped: bool = False

    def count(self, outcome: str) -> int:
        return sum(1 for entry in self.report if entry["outcome"] == outcome)

    @property
    def duplicates(self) -> int:
        return sum(1 for entry in self.report if entry.get("similar"))

    def counts(self) -> dict:
        return {
            "total_files": len(self.report),
            "enrolled_count": self.count(ENROLLED) + self.count(WOULD_ENROL),
            "skipped_count": self.count(SKIPPED),
            "refused_count": self.count(REFUSED),
            "characters_created": self.characters_created,
            "duplicate_count": self.duplicates,
        }

    def refusals(self) -> dict[str, int]:
        """How many files were refused for each reason."""
        reasons: dict[str, int] = {}
        for entry in self.report:
            if entry["outcome"] == REFUSED:
                reasons[entry["code"]] = reasons.get(entry["code"], 0) + 1
        return dict(sorted(reasons.items(), key=lambda item: -item[1]))


def _entry(item: ImportEntry, outcome: str, code: str = "", message: str = "", **extra) -> dict:
    return {"path": item.path, "character": item.character, "outcome": outcome, "code": code, "message": message,
            "character_id": None, "reference_id": None, **extra}  # fmt: skip


def _similar_json(similar) -> list[dict]:
    return [
        {"character_id": s.character.pk, "name": s.character.name, "similarity": s.similarity, "is_match": s.is_match}
        for s in similar
    ]


def import_run(
    *,
    tenant: Tenant,
    entries: list[ImportEntry],
    dry_run: bool = False,
    workers: int | None = None,
    created_by=None,
    created_by_api_key=None,
    progress: Callable[[int, int], bool | None] | None = None,
) -> ImportResult:
    """Enrol the photos of `entries` into `tenant`'s registry (see the module docstring).

    `progress(done, total)` is called after each file; returning True stops the run there (the rest is
    left out of the report; running the import again carries on). Nothing here raises for a bad file.
    """
    from characters.services import reference_store

    result = ImportResult()
    total = len(entries)
    done = 0

    def tick() -> bool:
        nonlocal done
        done += 1
        return bool(progress and progress(done, total))

    # 1. Refusals on the path alone, reading, and duplicates by file hash (cheap: before any face work).
    known = {
        sha: (character_id, name)
        for sha, character_id, name in ReferenceImage.objects.unscoped()
        .filter(tenant=tenant)
        .values_list("sha256", "character_id", "character__name")
    }
    seen: dict[str, str] = {}
    to_analyse: list[ImportEntry] = []
    for item in entries:
        if item.refusal is not None:
            result.report.append(_entry(item, REFUSED, *item.refusal))
        else:
            try:
                sha = hashlib.sha256(item.read()).hexdigest()  # read again for the analysis: memory stays flat
            except AlkemyError as exc:
                result.report.append(_entry(item, REFUSED, exc.code, exc.message))
                sha = None
            if sha is None:
                pass
            elif sha in seen:
                message = f"The same file is already in this import as {seen[sha]}."
                result.report.append(_entry(item, REFUSED, "duplicate_photo", message))
            elif sha in known and known[sha][1].casefold() == item.character.casefold():
                message = "This photo is already a reference of the character."
                result.report.append(_entry(item, SKIPPED, "already_enrolled", message, character_id=known[sha][0]))
                seen[sha] = item.path
            elif sha in known:
                message = f"This photo is already a reference of another character, '{known[sha][1]}'."
                result.report.append(
                    _entry(item, REFUSED, "duplicate_photo", message, other_character_id=known[sha][0])
                )
            else:
                seen[sha] = item.path
                to_analyse.append(item)
                continue
        if tick():
            result.stopped = True
            return result

    # 2. Face work in the pool; storing in this process, in order, as results come back.
    characters: dict[str, Character] = {}
    outcomes = analyse_all([item.read for item in to_analyse], workers=workers)
    try:
        for item, analysed in zip(to_analyse, outcomes, strict=True):
            if isinstance(analysed, tuple):
                code, message, details = analysed
                result.report.append(_entry(item, REFUSED, code, message, details=details or {}))
            elif dry_run:
                result.report.append(_would_enrol(tenant, item, analysed))
            else:
                result.report.append(
                    _store(tenant, item, analysed, characters, result, reference_store,
                           created_by=created_by, created_by_api_key=created_by_api_key)
                )  # fmt: skip
            if tick():
                result.stopped = True
                break
    finally:
        outcomes.close()  # stops the pool when the run stopped early
    result.report.sort(key=lambda entry: entry["path"])
    return result


def _store(tenant, item, analysed, characters, result, reference_store, *, created_by, created_by_api_key) -> dict:
    """Enrol one analysed photo: into the folder's character, found by name or created with this photo."""
    from characters.services import character_create

    key = item.character.casefold()
    created = False
    try:
        with transaction.atomic():  # a character is created only together with its first accepted photo
            character = characters.get(key) or (
                Character.objects.unscoped().filter(tenant=tenant, name__iexact=item.character).order_by("pk").first()
            )
            if character is None:
                character = character_create(
                    tenant=tenant, name=item.character, created_by=created_by, created_by_api_key=created_by_api_key
                )
                created = True
            added = reference_store(character=character, analysed=analysed, created_by=created_by)
    except AlkemyError as exc:
        return _entry(item, REFUSED, exc.code, exc.message)
    characters[key] = character
    result.characters_created += created
    return _entry(
        item,
        ENROLLED,
        character_id=character.pk,
        reference_id=added.reference.pk,
        warnings=analysed.warnings,
        similar=_similar_json(added.similar_characters),
    )


def _would_enrol(tenant: Tenant, item: ImportEntry, analysed) -> dict:
    """Dry run: what storing would do, without storing; the registry's characters that resemble the face."""
    import numpy as np

    from characters.search import similar_identities
    from characters.services import _with_characters

    existing = Character.objects.unscoped().filter(tenant=tenant, name__iexact=item.character).first()
    neighbours = similar_identities(
        tenant_id=tenant.pk,
        embedder=analysed.embedder.name,
        vector=np.asarray(analysed.subject.embedding),
        exclude_character_id=existing.pk if existing else 0,  # 0: none (the character does not exist yet)
        min_similarity=analysed.embedder.duplicate_threshold,
    )
    return _entry(
        item,
        WOULD_ENROL,
        character_id=existing.pk if existing else None,
        warnings=analysed.warnings,
        similar=_similar_json(_with_characters(neighbours, analysed.embedder)),
    )
