from django.db import migrations

SCHEDULES = {
    "reap lost generation jobs": "generation.tasks.reap_jobs",
    "deliver due webhooks": "generation.tasks.deliver_due_webhooks",
}


def create_schedules(apps, schema_editor):
    Schedule = apps.get_model("django_q", "Schedule")
    for name, func in SCHEDULES.items():
        # cluster None: run by the default (CPU) cluster's scheduler
        Schedule.objects.update_or_create(
            name=name, defaults={"func": func, "schedule_type": "I", "minutes": 1, "repeats": -1, "cluster": None}
        )


def delete_schedules(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name__in=SCHEDULES).delete()


class Migration(migrations.Migration):
    """The reaper and the webhook retry sweep run every minute on the default cluster."""

    dependencies = [("generation", "0001_initial"), ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more")]
    operations = [migrations.RunPython(create_schedules, delete_schedules)]
