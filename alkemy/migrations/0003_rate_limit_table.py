from django.db import migrations


class Migration(migrations.Migration):
    """Token buckets of the request rate limits and admin login throttling (alkemy/ratelimit.py).

    UNLOGGED: counters need no WAL; after a crash the table is empty, which only forgives the counts.
    """

    dependencies = [("alkemy", "0002_cache_table")]
    operations = [
        migrations.RunSQL(
            """
            CREATE UNLOGGED TABLE alkemy_rate_limit (
                bucket text PRIMARY KEY,
                tokens double precision NOT NULL,
                capacity double precision NOT NULL,
                period double precision NOT NULL,
                updated_at timestamptz NOT NULL,
                refused boolean NOT NULL DEFAULT false
            )
            """,
            "DROP TABLE alkemy_rate_limit",
        )
    ]
