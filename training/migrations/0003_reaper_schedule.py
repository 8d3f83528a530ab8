from django.db import migrations

SCHEDULE = "reap lost training jobs"


def create_schedule(apps, schema_editor):
    # cluster None: run by the default (CPU) cluster's scheduler, every minute, like the generation reaper
    apps.get_model("django_q", "Schedule").objects.update_or_create(
        name=SCHEDULE,
        defaults={"func": "training.tasks.reap_training_jobs", "schedule_type": "I", "minutes": 1, "repeats": -1,
                  "cluster": None},
    )


def delete_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=SCHEDULE).delete()


class Migration(migrations.Migration):
    """Training jobs whose worker died are re-queued (and resume from their checkpoint) or failed."""

    dependencies = [
        ("training", "0002_trainingjob"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]
    operations = [migrations.RunPython(create_schedule, delete_schedule)]
