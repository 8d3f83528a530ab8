"""The tenant becomes the unit of the search index (characters/search.py, bench/README.md).

* The per-embedder HNSW indexes of migration 0004 go: at 1M rows their recall collapsed for
  tenant searches. Tenants with enough rows get their own partial HNSW index instead
  (`search.sync_tenant_indexes`, run here, by the schedule below and `manage.py sync_search_indexes`);
  the others are searched exactly through the `(tenant_id, embedder)` B-tree.
* Reference vectors are stored inline (`STORAGE MAIN`): a 512-d `vector` is 2 KB, which PostgreSQL
  otherwise moves to TOAST, so an exact scan paid one TOAST lookup per row. Existing rows are
  rewritten so they move inline too.
* Identities get `embedding_bits`, a stored generated column `binary_quantize(embedding)` (64 bytes
  for 512-d) that the superuser-only platform-wide search scans by Hamming distance. The model does
  not declare it: PostgreSQL computes it on every write.
"""

from django.db import migrations

EMBEDDERS = {"dlib": 128, "arcface_antelopev2": 512, "arcface_buffalo_l": 512}
TABLES = {"characters_faceembedding": "faceemb", "characters_characteridentity": "identity"}
SCHEDULE = "sync tenant search indexes"


def _global_index(table: str, name: str, embedder: str, dims: int) -> str:
    return (
        f"CREATE INDEX IF NOT EXISTS {name} ON {table} USING hnsw ((embedding::halfvec({dims})) halfvec_cosine_ops) "
        f"WITH (m = 16, ef_construction = 64) WHERE embedder = '{embedder}'"
    )


def _drop_global_indexes():
    for table, short in TABLES.items():
        for embedder, dims in EMBEDDERS.items():
            name = f"{short}_hnsw_{embedder}"
            yield migrations.RunSQL(f"DROP INDEX IF EXISTS {name}", _global_index(table, name, embedder, dims))


def build_tenant_indexes(apps, schema_editor):
    from characters.search import sync_tenant_indexes

    with schema_editor.connection.cursor() as cursor:
        sync_tenant_indexes(cursor, concurrently=False)


def drop_tenant_indexes(apps, schema_editor):
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid IN ('characters_faceembedding'::regclass, 'characters_characteridentity'::regclass) "
            "AND (c.relname LIKE 'faceemb\\_t%%' OR c.relname LIKE 'identity\\_t%%')"
        )
        for (name,) in cursor.fetchall():
            cursor.execute(f"DROP INDEX IF EXISTS {name}")


def create_schedule(apps, schema_editor):
    # the default (CPU) cluster's scheduler, every 5 minutes: a growing tenant gets its index soon
    apps.get_model("django_q", "Schedule").objects.update_or_create(
        name=SCHEDULE,
        defaults={"func": "characters.search.tenant_indexes_sync", "schedule_type": "I", "minutes": 5,
                  "repeats": -1, "cluster": None},
    )  # fmt: skip


def delete_schedule(apps, schema_editor):
    apps.get_model("django_q", "Schedule").objects.filter(name=SCHEDULE).delete()


class Migration(migrations.Migration):
    atomic = False  # the rewrite and the index builds can be long; each statement commits on its own

    dependencies = [
        ("characters", "0006_character_import"),
        ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more"),
    ]

    operations = [
        *_drop_global_indexes(),
        migrations.RunSQL(
            "ALTER TABLE characters_faceembedding ALTER COLUMN embedding SET STORAGE MAIN",
            "ALTER TABLE characters_faceembedding ALTER COLUMN embedding SET STORAGE EXTERNAL",
        ),
        # a new value (text round trip, exact for float4) is stored under the new storage; the old one is dropped
        migrations.RunSQL(
            "UPDATE characters_faceembedding SET embedding = embedding::text::vector", migrations.RunSQL.noop
        ),
        migrations.RunSQL(
            "ALTER TABLE characters_characteridentity ADD COLUMN embedding_bits varbit "
            "GENERATED ALWAYS AS (binary_quantize(embedding)::varbit) STORED",
            "ALTER TABLE characters_characteridentity DROP COLUMN embedding_bits",
        ),
        migrations.RunPython(build_tenant_indexes, drop_tenant_indexes),
        migrations.RunPython(create_schedule, delete_schedule),
    ]
