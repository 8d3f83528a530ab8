"""django-q2 entry points of accounting (the default cluster's scheduler runs them)."""

from __future__ import annotations

from alkemy.tenancy.scoping import all_tenants


def record_storage() -> int:
    """Daily: yesterday's stored bytes of every tenant as a `storage_gb_hours` event (once per day)."""
    from usage.services import usage_record_storage_all

    with all_tenants():
        return usage_record_storage_all()
