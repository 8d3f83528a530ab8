"""GET /api/v1/health: is the database up, which PostgreSQL and pgvector, is the queue moving."""

from __future__ import annotations

from django.db import connection
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView


def database_health() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            server_version = cursor.fetchone()[0]
            cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            row = cursor.fetchone()
        return {"ok": True, "postgresql": server_version, "pgvector": row[0] if row else None}
    except Exception as exc:  # health must answer even when the database is down
        return {"ok": False, "error": str(exc)[:300]}


def queue_health() -> dict:
    from django.conf import settings
    from django_q.status import Stat

    broker = "redis" if settings.REDIS_URL else "orm"
    result: dict = {"broker": broker}
    try:
        if broker == "orm":
            from django_q.models import OrmQ

            result["queued_tasks"] = OrmQ.objects.count()
        clusters = Stat.get_all()
        result["workers"] = [
            {
                "cluster": stat.cluster_id and str(stat.cluster_id),
                "host": stat.host,
                "status": stat.status,
                "workers": len(stat.workers),
                "seen_at": stat.timestamp.isoformat() if stat.timestamp else None,
            }
            for stat in clusters
        ]
        result["ok"] = True
    except Exception as exc:
        result.update(ok=False, error=str(exc)[:300])
    return result


class HealthView(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]

    @extend_schema(
        summary="Service health",
        responses=inline_serializer(
            "Health",
            {
                "status": serializers.ChoiceField(choices=["ok", "degraded"]),
                "database": serializers.DictField(),
                "queue": serializers.DictField(),
            },
        ),
    )
    def get(self, request):
        database = database_health()
        queue = queue_health() if database["ok"] else {"ok": False, "error": "database unavailable"}
        healthy = database["ok"] and queue.get("ok", False)
        return Response(
            {"status": "ok" if healthy else "degraded", "database": database, "queue": queue},
            status=200 if database["ok"] else 503,
        )
