"""Rebuild the per-embedder HNSW indexes over half-precision casts (`halfvec`).

bench/search.py measured at 100k 512-d embeddings: the halfvec index at ef_search 200 reached
identity recall 0.997 (global) / 0.990 (a 10k-character tenant) at ~6.5 ms p95, where the
full-precision index needed ef_search 400 and 31-34 ms for the same recall; the index is half the
size. The column keeps full precision: similarities are computed from it for the returned rows.
"""

from django.db import migrations

EMBEDDERS = {"dlib": 128, "arcface_antelopev2": 512, "arcface_buffalo_l": 512}
TABLES = {"characters_faceembedding": "faceemb", "characters_characteridentity": "identity"}


def _index_sql(table: str, name: str, embedder: str, dims: int, kind: str) -> str:
    return (
        f"CREATE INDEX {name} ON {table} USING hnsw ((embedding::{kind}({dims})) {kind}_cosine_ops) "
        f"WITH (m = 16, ef_construction = 64) WHERE embedder = '{embedder}'"
    )


def _operations():
    for table, short in TABLES.items():
        for embedder, dims in EMBEDDERS.items():
            name = f"{short}_hnsw_{embedder}"
            yield migrations.RunSQL(
                [f"DROP INDEX IF EXISTS {name}", _index_sql(table, name, embedder, dims, "halfvec")],
                [f"DROP INDEX IF EXISTS {name}", _index_sql(table, name, embedder, dims, "vector")],
            )


class Migration(migrations.Migration):
    dependencies = [("characters", "0003_hnsw_indexes")]
    operations = list(_operations())
