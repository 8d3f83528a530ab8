"""`manage.py restore DIR`: a backup made by `manage.py backup`, into an empty database and media folder."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from alkemy.backup import BackupError, backup_restore


class Command(BaseCommand):
    help = (
        "Restore a backup made by `manage.py backup` into an empty database and media folder (a fresh data dir). "
        "Every checksum is verified before anything is written; row counts are compared afterwards."
    )

    def add_arguments(self, parser):
        parser.add_argument("directory", type=Path)

    def handle(self, *args, directory: Path, **options):
        try:
            result = backup_restore(directory=directory)
        except BackupError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(
            f"Restored {result.tables} tables ({result.rows} rows, counts as backed up) and {result.files} media "
            "files (checksums verified)"
        )
