"""`manage.py import_characters DIR --tenant SLUG`: enrol a folder of characters (one folder per character)."""

import json

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from alkemy.errors import AlkemyError
from alkemy.tenancy.models import Tenant
from alkemy.tenancy.scoping import tenant_scope
from characters.imports import REFUSED, entries_from_directory, import_run


class Command(BaseCommand):
    help = (
        "Enrol characters from DIR: one folder per character (the folder name is the character's name) holding "
        "1-5 photos. Photos go through the same checks as single uploads; refused ones are listed with their "
        "reasons and do not stop the run. Re-running is safe and resumes an interrupted import: photos already "
        "enrolled (same file) are skipped. Face analysis uses one process per core (--workers)."
    )

    def add_arguments(self, parser):
        parser.add_argument("directory")
        parser.add_argument("--tenant", required=True, help="Tenant slug or id")
        parser.add_argument("--dry-run", action="store_true", help="Analyse and report only; enrol nothing")
        parser.add_argument("--workers", type=int, default=None, help="Analysis processes (default: one per core)")
        parser.add_argument("--report", help="Also write the per-file report to this JSON file")
        parser.add_argument("--no-progress", action="store_true", help="No progress bar")

    def handle(self, *args, directory: str, tenant: str, dry_run: bool, workers, report, no_progress, **options):
        found = Tenant.objects.filter(slug=tenant).first() or (
            Tenant.objects.filter(pk=int(tenant)).first() if tenant.isdigit() else None
        )
        if found is None:
            raise CommandError(f"No tenant '{tenant}'.")
        try:
            entries = entries_from_directory(directory)
        except AlkemyError as exc:
            raise CommandError(exc.message) from None
        if not entries:
            raise CommandError(f"{directory} holds no character folder with photos.")

        bar = tqdm(total=len(entries), unit="photo", disable=no_progress, file=self.stderr._out)

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.n)

        with tenant_scope(found):
            try:
                result = import_run(tenant=found, entries=entries, dry_run=dry_run, workers=workers, progress=progress)
            finally:
                bar.close()

        counts = result.counts()
        verb = "would be enrolled" if dry_run else "enrolled"
        self.stdout.write(
            f"{counts['total_files']} file(s): {counts['enrolled_count']} {verb}, {counts['skipped_count']} already "
            f"enrolled (skipped), {counts['refused_count']} refused; {counts['characters_created']} character(s) "
            f"created; {counts['duplicate_count']} photo(s) resemble another character."
        )
        refusals = result.refusals()
        if refusals:
            self.stdout.write("Refused:")
            for code, count in refusals.items():
                self.stdout.write(f"  {code}: {count}")
            for entry in result.report:
                if entry["outcome"] == REFUSED:
                    self.stdout.write(f"    {entry['path']}: {entry['code']} - {entry['message']}")
        duplicates = [entry for entry in result.report if entry.get("similar")]
        if duplicates:
            self.stdout.write("Possible duplicates:")
            for entry in duplicates:
                others = ", ".join(f"{s['name']} ({s['similarity']:.3f})" for s in entry["similar"])
                self.stdout.write(f"  {entry['path']} ({entry['character']}) resembles {others}")
        if report:
            with open(report, "w") as handle:
                json.dump({"counts": counts, "refusals": refusals, "files": result.report}, handle, indent=1)
