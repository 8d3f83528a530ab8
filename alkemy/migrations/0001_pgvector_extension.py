from django.db import migrations
from pgvector.django import VectorExtension


class Migration(migrations.Migration):
    """CREATE EXTENSION IF NOT EXISTS vector: every embedding column depends on it."""

    initial = True
    dependencies = []
    operations = [VectorExtension()]
