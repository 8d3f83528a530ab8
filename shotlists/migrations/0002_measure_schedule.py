from django.db import migrations

SCHEDULE = "measure shot list outputs"


def create_schedule(apps, schema_editor):
    # cluster None: the default (CPU) cluster's scheduler, every minute; face analysis needs no GPU
    apps.get_model("django_q", "Schedule").objects.update_or_create(
        name=SCHEDULE,
        defaults={"func": "shotlists.tasks.measure_finished_outputs", "schedule_type": "I", "minutes": 1,
                  "repeats": -1, "cluster": None},
    )  # fmt: skip


def delete_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=SCHEDULE).delete()


class Migration(migrations.Migration):
    """The outputs of shot lists' finished jobs are embedded in the background, so reports read a cache."""

    dependencies = [
        ("shotlists", "0001_initial"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]
    operations = [migrations.RunPython(create_schedule, delete_schedule)]
