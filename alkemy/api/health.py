"""GET /api/v1/health: is the service up; for operators also which PostgreSQL and pgvector, is the queue moving.

Anyone (a load balancer, an uptime probe) gets `{"status": "ok"}` (200) or `{"status": "unavailable"}`
(503) from a database round trip. Versions, worker host names and the queue size of all tenants are
for operators only: a superuser's admin session, or `Authorization: Bearer $ALKEMY_OPERATOR_TOKEN`
when that variable is set. Tenants' API keys are not operators.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.db import connection
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
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


def is_operator(request) -> bool:
    """A superuser's session, or the operator token (`ALKEMY_OPERATOR_TOKEN`) as a Bearer token."""
    token = settings.ALKEMY_OPERATOR_TOKEN
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return True
    user = request.user
    return bool(user and user.is_authenticated and user.is_superuser)


HealthSerializer = inline_serializer(
    "Health",
    {
        "status": serializers.ChoiceField(choices=["ok", "degraded", "unavailable"]),
        "database": serializers.DictField(required=False, help_text="Operators only: PostgreSQL and pgvector"),
        "queue": serializers.DictField(required=False, help_text="Operators only: broker, queued tasks, workers"),
    },
)


class HealthView(APIView):
    authentication_classes = [SessionAuthentication]  # a superuser's admin session; see is_operator
    permission_classes = [AllowAny]

    @extend_schema(
        summary="Service health (details for operators)",
        responses={
            200: HealthSerializer,
            503: OpenApiResponse(HealthSerializer, description="The database cannot be reached"),
        },
    )
    def get(self, request):
        database = database_health()
        if not is_operator(request):
            status = "ok" if database["ok"] else "unavailable"
            return Response({"status": status}, status=200 if database["ok"] else 503)
        queue = queue_health() if database["ok"] else {"ok": False, "error": "database unavailable"}
        healthy = database["ok"] and queue.get("ok", False)
        return Response(
            {"status": "ok" if healthy else "degraded", "database": database, "queue": queue},
            status=200 if database["ok"] else 503,
        )
