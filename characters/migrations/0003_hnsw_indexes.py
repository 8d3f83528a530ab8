"""One partial expression HNSW index per embedder and table (pgvector README, "different dimensions").

The `embedding` columns are untyped `vector`; each index casts to the embedder's dimension and
covers only that embedder's rows. Queries must use the same cast and predicate to use it
(characters/search.py). A new embedder needs a new migration like this one.
"""

from django.db import migrations

EMBEDDERS = {"dlib": 128, "arcface_antelopev2": 512, "arcface_buffalo_l": 512}
TABLES = {"characters_faceembedding": "faceemb", "characters_characteridentity": "identity"}


def _operations():
    for table, short in TABLES.items():
        for embedder, dims in EMBEDDERS.items():
            name = f"{short}_hnsw_{embedder}"
            yield migrations.RunSQL(
                f"CREATE INDEX IF NOT EXISTS {name} ON {table} USING hnsw "
                f"((embedding::vector({dims})) vector_cosine_ops) WITH (m = 16, ef_construction = 64) "
                f"WHERE embedder = '{embedder}'",
                f"DROP INDEX IF EXISTS {name}",
            )


class Migration(migrations.Migration):
    dependencies = [("characters", "0002_references_embeddings_identities")]
    operations = list(_operations())
