"""Keep each embedding's raw length: PuLID and InstantID feed insightface's raw ArcFace `embedding`
(unit vector × raw_norm), not the unit vector search uses. Existing rows stay empty (NULL): the
methods then fall back to a length of sqrt(dims) until `manage.py reembed_references` fills them."""

import pgvector.django
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("characters", "0004_halfvec_hnsw_indexes")]

    operations = [
        migrations.AlterField(
            model_name="faceembedding",
            name="embedding",
            field=pgvector.django.VectorField(help_text="Unit vector (what search and identities compare)"),
        ),
        migrations.AddField(
            model_name="faceembedding",
            name="raw_norm",
            field=models.FloatField(
                blank=True,
                null=True,
                help_text="Length of the embedder's raw output (insightface's `embedding`); unit vector × raw_norm "
                "is the raw embedding PuLID and InstantID feed their ID encoders. Empty for dlib (no meaningful raw "
                "length) and for rows enrolled before it was kept (`manage.py reembed_references` fills it).",
            ),
        ),
    ]
