from django.db import migrations

SWEEP = "deliver due webhooks"  # created by generation 0002_schedules


def to_webhooks_cluster(apps, schema_editor):
    # Run by the webhooks cluster's scheduler, queued to its own workers: retries to slow receivers
    # never occupy the default cluster, which runs the reaper and Gemini jobs.
    apps.get_model("django_q", "Schedule").objects.filter(name=SWEEP).update(cluster="webhooks")


def to_default_cluster(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=SWEEP).update(cluster=None)


class Migration(migrations.Migration):
    dependencies = [("webhooks", "0001_initial"), ("generation", "0002_schedules")]
    operations = [migrations.RunPython(to_webhooks_cluster, to_default_cluster)]
