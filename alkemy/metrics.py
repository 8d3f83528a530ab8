"""Prometheus metrics: GET /metrics with `Authorization: Bearer $ALKEMY_METRICS_TOKEN`.

Two kinds of figures:

* Process-local ones observed as things happen (`prometheus-client` histograms): HTTP request latency by
  route (the resolved URL name, never the raw path), face search latency, enrolment time, warm pipelines.
  Under gunicorn (several processes) set `PROMETHEUS_MULTIPROC_DIR` to an empty folder shared by the
  processes (deploy/gunicorn.conf.py marks dead workers); the scrape then sums every process's files.
* Figures read from PostgreSQL at scrape time by `DatabaseCollector`, so they are right whichever process
  answers and whichever process did the work: jobs by kind, status and method, queue depth per cluster,
  job wait and run durations (histograms over finished jobs), device seconds from the usage ledger,
  django-q2 cluster heartbeats and the job workers' latest heartbeats.

Without `ALKEMY_METRICS_TOKEN` the endpoint does not exist (404); with it, a missing or wrong token is 401.
"""

from __future__ import annotations

import hmac
import os
import time

from django.conf import settings
from django.http import Http404, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: queue wait and run time of jobs: seconds to hours
JOB_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, float("inf"))

HTTP_REQUEST_SECONDS = Histogram(
    "alkemy_http_request_duration_seconds",
    "Time to answer an HTTP request, by resolved route (URL name), method and status",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)
SEARCH_SECONDS = Histogram(
    "alkemy_search_duration_seconds", "Nearest-character search in PostgreSQL (pgvector)", buckets=LATENCY_BUCKETS
)
ENROLMENT_SECONDS = Histogram(
    "alkemy_enrolment_duration_seconds",
    "Enrolling one reference photo: validate, detect, embed, store, update the identity",
    buckets=LATENCY_BUCKETS,
)
WARM_PIPELINES = Gauge(
    "alkemy_warm_pipelines",
    "Generation methods loaded and kept warm by GPU workers (sum over live processes)",
    multiprocess_mode="livesum",
)


# --- HTTP latency ----------------------------------------------------------------------------------


class MetricsMiddleware:
    """Times every request; labels it with the URL name it resolved to (`unmatched` for a 404 path)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        response = self.get_response(request)
        match = getattr(request, "resolver_match", None)
        route = (match.view_name or match.route) if match is not None else "unmatched"
        HTTP_REQUEST_SECONDS.labels(route=route, method=request.method, status=str(response.status_code)).observe(
            time.perf_counter() - started
        )
        return response


# --- figures read from the database at scrape time ------------------------------------------------


def _job_kinds():
    from characters.models import CharacterImport
    from generation.models import GenerationJob
    from training.models import TrainingJob

    # (kind, model, the column that says its method, or None)
    return [("generation", GenerationJob, "method"), ("training", TrainingJob, "base_model"),
            ("import", CharacterImport, None)]


def _duration_histogram(queryset, start: str, end: str) -> tuple[list[tuple[str, float]], float]:
    """Cumulative buckets and sum of `end - start` (seconds) over rows where both are set, in one query."""
    from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum

    duration = ExpressionWrapper(F(end) - F(start), output_field=DurationField())
    rows = queryset.filter(**{f"{start}__isnull": False, f"{end}__isnull": False}).annotate(d=duration)
    from datetime import timedelta

    aggregates = {
        f"le{i}": Count("pk", filter=Q(d__lte=timedelta(seconds=bound)))
        for i, bound in enumerate(JOB_BUCKETS)
        if bound != float("inf")
    }
    result = rows.aggregate(total=Count("pk"), seconds=Sum("d"), **aggregates)
    buckets = [
        (str(float(bound)), float(result[f"le{i}"])) for i, bound in enumerate(JOB_BUCKETS) if bound != float("inf")
    ]
    buckets.append(("+Inf", float(result["total"])))
    seconds = result["seconds"].total_seconds() if result["seconds"] else 0.0
    return buckets, seconds


class DatabaseCollector:
    """Metrics computed from PostgreSQL on each scrape (see the module docstring)."""

    def collect(self):
        from django.db.models import Count, Max, Sum

        jobs = GaugeMetricFamily("alkemy_jobs", "Jobs by kind, status and method", labels=["kind", "status", "method"])
        wait = HistogramMetricFamily(
            "alkemy_job_wait_seconds", "Time finished-or-running jobs waited in the queue", labels=["kind"]
        )
        run = HistogramMetricFamily("alkemy_job_run_seconds", "Run time of finished jobs", labels=["kind"])
        beats = GaugeMetricFamily(
            "alkemy_job_worker_heartbeat_timestamp_seconds",
            "Latest heartbeat of a running job, by the worker (host:pid) holding it",
            labels=["kind", "worker"],
        )
        for kind, model, method_field in _job_kinds():
            rows = model.objects.unscoped()
            fields = ["status", method_field] if method_field else ["status"]
            for row in rows.values(*fields).annotate(n=Count("pk")).order_by():
                jobs.add_metric([kind, row["status"], (row[method_field] or "") if method_field else ""], row["n"])
            buckets, seconds = _duration_histogram(rows, "queued_at", "started_at")
            wait.add_metric([kind], buckets, seconds)
            buckets, seconds = _duration_histogram(rows, "started_at", "finished_at")
            run.add_metric([kind], buckets, seconds)
            running = rows.filter(status="running", heartbeat_at__isnull=False)
            for row in running.values("worker").annotate(at=Max("heartbeat_at")).order_by():
                beats.add_metric([kind, row["worker"]], row["at"].timestamp())
        yield from (jobs, wait, run, beats)

        from usage.models import DEVICE_METERS, UsageEvent

        device = CounterMetricFamily(
            "alkemy_device_seconds", "Device time recorded in the usage ledger", labels=["meter", "kind", "method"]
        )
        events = UsageEvent.objects.unscoped().filter(meter__in=list(DEVICE_METERS))
        for row in events.values("meter", "job_kind", "method").annotate(q=Sum("quantity")).order_by():
            device.add_metric([row["meter"], row["job_kind"], row["method"]], float(row["q"]))
        yield device

        yield from self.queue()

    def queue(self):
        from django_q.brokers import get_broker
        from django_q.status import Stat

        depth = GaugeMetricFamily("alkemy_queue_depth", "Tasks waiting in the broker, by cluster", labels=["cluster"])
        clusters = ["default", *settings.Q_CLUSTER.get("ALT_CLUSTERS", {})]
        if settings.REDIS_URL:
            for name in clusters:
                depth.add_metric([name], get_broker(name).queue_size() or 0)
        else:
            from django.db.models import Count
            from django_q.models import OrmQ

            counted = dict(OrmQ.objects.values_list("key").annotate(n=Count("pk")).order_by())
            for name in sorted({*clusters, *counted}):
                depth.add_metric([name], counted.get(name, 0))
        yield depth

        heartbeat = GaugeMetricFamily(
            "alkemy_queue_cluster_heartbeat_timestamp_seconds",
            "Latest heartbeat of each django-q2 cluster",
            labels=["cluster", "host", "status"],
        )
        workers = GaugeMetricFamily(
            "alkemy_queue_cluster_workers", "Worker processes of each django-q2 cluster", labels=["cluster", "host"]
        )
        for stat in Stat.get_all():
            cluster = str(stat.cluster_id)
            if stat.timestamp:
                heartbeat.add_metric([cluster, stat.host, stat.status], stat.timestamp.timestamp())
            workers.add_metric([cluster, stat.host], len(stat.workers))
        yield from (heartbeat, workers)


def scrape_registry() -> CollectorRegistry:
    """Process metrics (all processes' in multi-process mode) plus a fresh database collector."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Forward(REGISTRY))
    registry.register(DatabaseCollector())
    return registry


class _Forward:
    """This process's default registry (histograms, the Python runtime) inside the scrape registry."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()


def metrics_view(request):
    token = settings.ALKEMY_METRICS_TOKEN
    if not token:
        raise Http404("metrics are off")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        response = HttpResponse("a bearer token is required\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(scrape_registry()), content_type=CONTENT_TYPE_LATEST)
