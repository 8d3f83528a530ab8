"""`manage.py sync_search_indexes`: build the per-tenant HNSW indexes tenants have grown into, drop the others."""

from django.core.management.base import BaseCommand

from characters.search import min_rows, tenant_indexes_sync


class Command(BaseCommand):
    help = (
        "Give every tenant with enough face embeddings of one embedder its own HNSW index (and drop the indexes "
        "of tenants that shrank below half the threshold). Runs every 5 minutes on the default cluster; "
        "run it by hand after a large import. Thresholds: "
        + ", ".join(f"{table} {'never' if rows is None else f'{rows} rows'}" for table, rows in min_rows().items())
        + " (settings.ALKEMY_SEARCH_INDEX_MIN_ROWS)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--tenant", type=int, help="only this tenant id")

    def handle(self, *args, tenant: int | None = None, **options):
        report = tenant_indexes_sync(tenant_id=tenant)
        for label, names in (("created", report.created), ("dropped", report.dropped), ("kept", report.kept)):
            self.stdout.write(f"{label}: {len(names)}" + (f" ({', '.join(names)})" if names else ""))
