"""One JSON error shape for every API failure: {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import Http404, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from alkemy.errors import AlkemyError

logger = logging.getLogger(__name__)

# DRF default codes → our public codes, where DRF's are too generic.
_CODE_RENAMES = {
    "invalid": "validation_error",
    "not_authenticated": "not_authenticated",
    "authentication_failed": "authentication_failed",
    "permission_denied": "permission_denied",
    "not_found": "not_found",
    "method_not_allowed": "method_not_allowed",
    "unsupported_media_type": "unsupported_media_type",
    "parse_error": "malformed_request",
    "throttled": "rate_limited",
}


def error_body(code: str, message: str, details: dict | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def _first_code(detail) -> str | None:
    if isinstance(detail, exceptions.ErrorDetail):
        return detail.code
    if isinstance(detail, list) and detail:
        return _first_code(detail[0])
    if isinstance(detail, dict) and detail:
        return _first_code(next(iter(detail.values())))
    return None


def _plain(detail):
    if isinstance(detail, dict):
        return {key: _plain(value) for key, value in detail.items()}
    if isinstance(detail, list):
        return [_plain(item) for item in detail]
    return str(detail)


def _first_message(value) -> str:
    while isinstance(value, (list, dict)) and value:
        value = value[0] if isinstance(value, list) else next(iter(value.values()))
    return str(value) if value else "Invalid input."


_TOO_LARGE = (RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent)


def request_too_large_body(exc: Exception) -> dict:
    """413 body for a request Django refused to read: its body or its form has too much in it."""
    if isinstance(exc, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return error_body(
            "request_too_large",
            f"The request body is larger than {limit} bytes (photos and LoRA files go as multipart uploads).",
            {"limit_bytes": limit},
        )
    return error_body("request_too_large", "The request has too many form fields or files.")


def exception_handler(exc, context):
    """DRF exception handler: AlkemyError, DRF and Django exceptions → our error body."""
    if isinstance(exc, AlkemyError):
        return Response(error_body(exc.code, exc.message, exc.details), status=exc.status_code)
    if isinstance(exc, _TOO_LARGE):
        return Response(request_too_large_body(exc), status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a real bug: Django's 500 handler logs it and answers with handler500

    if isinstance(exc, exceptions.ValidationError):
        fields = _plain(exc.detail) if isinstance(exc.detail, dict) else {"non_field_errors": _plain(exc.detail)}
        first_field = next(iter(fields), None)
        message = _first_message(fields.get(first_field)) if first_field else "Invalid input."
        if first_field and first_field != "non_field_errors":
            message = f"{first_field}: {message}"
        body = error_body("validation_error", message, {"fields": fields, "field": first_field})
    else:
        code = getattr(exc, "custom_code", None) or _first_code(exc.detail) or exc.default_code
        code = _CODE_RENAMES.get(code, code)
        message = str(exc.detail) if not isinstance(exc.detail, (dict, list)) else str(exc.default_detail)
        details = {}
        if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
            details["retry_after_seconds"] = exc.wait
            details.update(getattr(exc, "extra_details", {}))  # rate limits: scope, limit_per_minute
        body = error_body(code, message, details)
    response.data = body
    return response


def _is_api(request) -> bool:
    return request.path.startswith("/api/")


def handler400(request, exception=None):
    """Django's own 400s (a body too large to read, a suspicious request) in our format under /api/."""
    if _is_api(request):
        if isinstance(exception, _TOO_LARGE):
            return JsonResponse(request_too_large_body(exception), status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
        return JsonResponse(error_body("bad_request", "The request could not be read."), status=400)
    from django.views.defaults import bad_request

    return bad_request(request, exception)


def handler404(request, exception=None):
    if _is_api(request):
        return JsonResponse(error_body("not_found", "No such endpoint or object."), status=status.HTTP_404_NOT_FOUND)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


def handler500(request):
    if _is_api(request):
        return JsonResponse(
            error_body("internal_error", "Something went wrong on our side; it has been logged."),
            status=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )
    from django.views.defaults import server_error

    return server_error(request)
