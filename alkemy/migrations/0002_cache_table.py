from django.core.management import call_command
from django.db import migrations


def create_cache_table(apps, schema_editor):
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    """The database cache table: django-q2 cluster heartbeats must be visible to every process."""

    dependencies = [("alkemy", "0001_pgvector_extension")]
    operations = [migrations.RunPython(create_cache_table, migrations.RunPython.noop)]
