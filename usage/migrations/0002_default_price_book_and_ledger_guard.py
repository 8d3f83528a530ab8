from datetime import UTC, datetime
from decimal import Decimal

from django.db import migrations

# A frozen copy of usage/defaults.py at the time of this migration (sources: README, "Usage and cost").
RATES = [
    ("gpu_seconds", "H200", Decimal("3.99")),
    ("gpu_seconds", "H100", Decimal("2.99")),
    ("gpu_seconds", "A100", Decimal("1.79")),
    ("gpu_seconds", "L40S", Decimal("0.99")),
    ("gpu_seconds", "default", Decimal("2.99")),
    ("cpu_seconds", "cpu", Decimal("0.10")),
    ("gemini_input_tokens", "", Decimal("0.30")),
    ("gemini_output_tokens", "", Decimal("30.00")),
    ("images_generated", "", Decimal("0")),
    ("training_steps", "", Decimal("0")),
    ("storage_gb_hours", "", Decimal("0.023")),
]
SOURCE = (
    "GPU: on-demand list prices of public GPU clouds (Lambda, RunPod, 2025-2026), per GPU-hour. "
    "Gemini 2.5 Flash Image: Google AI for Developers pricing, $0.30 per 1M input tokens, $30 per 1M "
    "output tokens (1290 tokens per 1024x1024 image = $0.039). Storage: S3 Standard, $0.023 per GB-month."
)
STORAGE_SCHEDULE = "record tenants' storage"


def create_default_book(apps, schema_editor):
    PriceBook = apps.get_model("usage", "PriceBook")
    PriceRate = apps.get_model("usage", "PriceRate")
    if PriceBook.objects.filter(tenant__isnull=True).exists():
        return
    book = PriceBook.objects.create(
        name="Public list prices", tenant=None, version=1, effective_from=datetime(2026, 1, 1, tzinfo=UTC),
        source=SOURCE,
    )
    PriceRate.objects.bulk_create(
        PriceRate(price_book=book, meter=meter, gpu_class=gpu_class, price=price) for meter, gpu_class, price in RATES
    )


def delete_default_book(apps, schema_editor):
    PriceBook = apps.get_model("usage", "PriceBook")
    PriceBook.objects.filter(tenant__isnull=True, version=1, events__isnull=True).delete()


def create_schedule(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    # daily, on the default (CPU) cluster's scheduler
    Schedule.objects.update_or_create(
        name=STORAGE_SCHEDULE,
        defaults={"func": "usage.tasks.record_storage", "schedule_type": "D", "repeats": -1, "cluster": None},
    )


def delete_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=STORAGE_SCHEDULE).delete()


# The ledger is append-only in the database too: an UPDATE of an event is refused whoever sends it.
# (DELETE stays possible for a tenant's cascade delete; the ORM's queryset refuses it for everything else.)
LEDGER_GUARD = """
CREATE FUNCTION usage_event_refuse_update() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'usage_usageevent is append-only: record a correcting event instead';
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER usage_event_append_only BEFORE UPDATE ON usage_usageevent
    FOR EACH ROW EXECUTE FUNCTION usage_event_refuse_update();
"""
DROP_LEDGER_GUARD = """
DROP TRIGGER IF EXISTS usage_event_append_only ON usage_usageevent;
DROP FUNCTION IF EXISTS usage_event_refuse_update();
"""


class Migration(migrations.Migration):
    """The default price book, the daily storage schedule, and the ledger's UPDATE guard."""

    dependencies = [
        ("usage", "0001_initial"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]
    operations = [
        migrations.RunPython(create_default_book, delete_default_book),
        migrations.RunPython(create_schedule, delete_schedule),
        migrations.RunSQL(LEDGER_GUARD, DROP_LEDGER_GUARD),
    ]
