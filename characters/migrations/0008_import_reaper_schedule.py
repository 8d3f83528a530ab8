from django.db import migrations

SCHEDULE = "reap lost character imports"


def create_schedule(apps, schema_editor):
    # cluster None: run by the default (CPU) cluster's scheduler, every minute, like the other reapers
    apps.get_model("django_q", "Schedule").objects.update_or_create(
        name=SCHEDULE,
        defaults={"func": "characters.import_jobs.reap_import_jobs", "schedule_type": "I", "minutes": 1,
                  "repeats": -1, "cluster": None},
    )  # fmt: skip


def delete_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=SCHEDULE).delete()


class Migration(migrations.Migration):
    """Character imports whose worker died are re-queued (the re-run skips what was enrolled) or failed."""

    dependencies = [
        ("characters", "0007_tenant_search_indexes"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]
    operations = [migrations.RunPython(create_schedule, delete_schedule)]
