"""Structured logs: one JSON object a line, with the request id, the job and the tenant, secrets redacted.

* `RequestIdMiddleware` takes the caller's `X-Request-ID` (a sane one: letters, digits, `._:-`, at most 128
  characters) or makes one, binds it to everything logged while the request runs, and echoes it in the
  response's `X-Request-ID`. The API base view adds the tenant's slug once it has resolved the tenant.
* `job_logging(kind)` wraps a task entry point (`run_generation_job(job_id)`, ...): its lines carry
  `job_kind`, `job_id` and the job's tenant.
* `RedactFilter` (on the handler, so it sees every record, Django's and libraries' too) replaces API keys
  (`ak_<prefix>_<secret>`), webhook secrets (`whsec_...`), credentials after `Authorization:`-style schemes
  (`Api-Key`, `Bearer`, `Basic`), `secret=`/`password=`/`token=`-style values and the configured secrets
  themselves (SECRET_KEY, the encryption keys, the operator and metrics tokens, provider API keys) with
  `[REDACTED]`, in the message and in the traceback.
* `JsonFormatter` writes `{"time", "level", "logger", "message", "request_id", "tenant", "job_kind",
  "job_id", "exception"}` (absent context: null). `LOG_FORMAT=plain` keeps the one-line text format.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

_context: ContextVar[dict | None] = ContextVar("alkemy_log_context", default=None)

REDACTED = "[REDACTED]"
_PATTERNS = [
    re.compile(r"\bak_[A-Za-z0-9]+_[A-Za-z0-9_\-]+"),  # API keys
    re.compile(r"\bwhsec_[A-Za-z0-9_\-]+"),  # webhook signing secrets
    re.compile(r"(?i)\b(?:api-key|bearer|basic)\s+([A-Za-z0-9_\-.~+/=]{8,})"),
    re.compile(
        r"(?i)\b(?:secret|password|passwd|token|api[_-]?key|authorization|encryption[_-]?keys?)"
        r"(?:[\"']?\s*[:=]\s*[\"']?)([^\s\"',;}&\\]{4,})"
    ),
]
_SECRET_SETTINGS = ("SECRET_KEY", "ALKEMY_OPERATOR_TOKEN", "ALKEMY_METRICS_TOKEN")
_SECRET_ENV = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "AWS_SECRET_ACCESS_KEY", "ALKEMY_ENCRYPTION_KEY")


def _configured_secrets() -> list[str]:
    values: list[str] = [os.environ.get(name, "") for name in _SECRET_ENV]
    try:
        from django.conf import settings

        if settings.configured:
            values += [str(getattr(settings, name, "") or "") for name in _SECRET_SETTINGS]
            values += [str(key) for key in getattr(settings, "ALKEMY_ENCRYPTION_KEYS", [])]
    except Exception:  # logging must never fail
        pass
    return sorted({v for v in values if len(v) >= 8}, key=len, reverse=True)


def redact(text: str) -> str:
    for secret in _configured_secrets():
        text = text.replace(secret, REDACTED)
    for pattern in _PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(0).replace(m.group(1), REDACTED), text)
        else:
            text = pattern.sub(REDACTED, text)
    return text


# --- context -------------------------------------------------------------------------------------


def log_context() -> dict:
    return dict(_context.get() or {})


def bind(**values) -> None:
    """Add to the current request's or job's log context (e.g. the tenant once it is known)."""
    current = _context.get()
    if current is None:
        _context.set(dict(values))
    else:
        current.update(values)


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class RequestIdMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        given = request.headers.get("X-Request-ID", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        request.request_id = request_id
        token = _context.set({"request_id": request_id})
        try:
            response = self.get_response(request)
        finally:
            _context.reset(token)
        response["X-Request-ID"] = request_id
        return response


_JOB_MODELS = {
    "generation": "generation.GenerationJob",
    "training": "training.TrainingJob",
    "import": "characters.CharacterImport",
}


def job_logging(kind: str):
    """Decorate a task entry point taking `job_id`: its log lines name the job and its tenant."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(job_id, *args, **kwargs):
            from django.apps import apps

            context = {"job_kind": kind, "job_id": job_id, "request_id": None}
            try:
                model = apps.get_model(_JOB_MODELS[kind])
                context["tenant"] = model.objects.unscoped().filter(pk=job_id).values_list(
                    "tenant__slug", flat=True
                ).first()
            except Exception:  # the job's own code reports a missing row or database
                pass
            token = _context.set(context)
            try:
                return function(job_id, *args, **kwargs)
            finally:
                _context.reset(token)

        return wrapper

    return decorate


# --- handler pieces ----------------------------------------------------------------------------------


class RedactFilter(logging.Filter):
    """Redacts the formatted message and the traceback of every record (and adds the context)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)  # formatters print exc_text when it is set
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in log_context().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    FIELDS = ("request_id", "tenant", "job_kind", "job_id")

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = log_context()
        for field in self.FIELDS:
            entry[field] = getattr(record, field, context.get(field))
        exception = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else None)
        if exception:
            entry["exception"] = exception
        if record.stack_info:
            entry["stack"] = record.stack_info
        # a second pass over the whole line: anything that reached the record unfiltered is caught here
        return redact(json.dumps(entry, default=str, ensure_ascii=False))
