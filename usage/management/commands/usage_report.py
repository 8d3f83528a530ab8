"""`manage.py usage_report --month YYYY-MM [--tenant slug] [--csv]`: a statement per tenant, or the events as CSV."""

import sys

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from alkemy.tenancy.models import Tenant
from alkemy.tenancy.scoping import all_tenants
from usage import reports
from usage.selectors import month_of


class Command(BaseCommand):
    help = "Print each tenant's usage statement for a month (UTC), or with --csv every event of the month."

    def add_arguments(self, parser):
        parser.add_argument("--month", required=True, help="YYYY-MM")
        parser.add_argument("--tenant", help="one tenant's slug (default: every tenant)")
        parser.add_argument("--csv", action="store_true", help="the month's events as CSV, one row each")

    def handle(self, *args, month, tenant=None, csv=False, **options):
        try:
            start, end = month_of(month)
        except ValueError:
            raise CommandError("--month must be YYYY-MM, e.g. 2026-12.") from None
        tenants = Tenant.objects.order_by("slug")
        if tenant:
            tenants = tenants.filter(slug=tenant)
            if not tenants.exists():
                raise CommandError(f"No tenant '{tenant}'.")
        with all_tenants():
            if csv:
                self.stdout.write(reports.events_csv(tenants=tenants, start=start, end=end), ending="")
                return
            # a progress bar on a terminal only (stdout may be piped; tqdm writes to stderr)
            for index, one in enumerate(tqdm(tenants, desc="tenants", file=sys.stderr, disable=None, leave=False)):
                if index:
                    self.stdout.write("")
                self.stdout.write(reports.statement_text(reports.statement(tenant=one, start=start, end=end)))
