"""`manage.py backup DIR`: the database (pg_dump, one snapshot), the media files and a manifest with checksums."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from alkemy.backup import BackupError, backup_create


class Command(BaseCommand):
    help = "Back up the database and the media files into DIR (new or empty), with a manifest of checksums."

    def add_arguments(self, parser):
        parser.add_argument("directory", type=Path)

    def handle(self, *args, directory: Path, **options):
        try:
            result = backup_create(directory=directory)
        except BackupError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(
            f"Backed up {result.tables} tables ({result.rows} rows) and {result.files} media files "
            f"({result.bytes} bytes) into {result.directory}"
        )
        if result.missing:
            self.stderr.write(
                f"{len(result.missing)} files named by rows were not in the media folder "
                f"(listed under media.missing in the manifest): {', '.join(result.missing[:5])}"
            )
