"""What can go wrong talking to Gemini, as errors with stable codes, and how SDK errors map onto them.

| code                   | when                                                              | retried |
|------------------------|-------------------------------------------------------------------|---------|
| `content_blocked`      | a safety finish reason, or `promptFeedback.blockReason`           | never   |
| `no_image`             | a reply without an image part (the model's text is in details)    | no      |
| `provider_unavailable` | 408 / 429 / 5xx / timeout / connection error, after the retries   | yes     |
| `provider_auth_failed` | 401, 403, 400 `API_KEY_INVALID`, or no key configured at all      | never   |
| `provider_error`       | a malformed reply, or any other 4xx (bad model id, bad argument)  | never   |
"""

from __future__ import annotations

import re
import time
from email.utils import parsedate_to_datetime

from alkemy.errors import AlkemyError


class GeminiError(AlkemyError):
    """Base of the errors this package raises; `details` always says which provider."""

    status_code = 502
    code = "provider_error"

    def __init__(self, message: str, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.details.setdefault("provider", "gemini")


class ContentBlocked(GeminiError):
    status_code = 422
    code = "content_blocked"


class NoImage(GeminiError):
    status_code = 422
    code = "no_image"


class ProviderUnavailable(GeminiError):
    status_code = 503
    code = "provider_unavailable"


class ProviderAuthFailed(GeminiError):
    status_code = 502
    code = "provider_auth_failed"


class ProviderError(GeminiError):
    status_code = 502
    code = "provider_error"


#: HTTP statuses worth another try: request timeout, rate limit / quota, server-side failures
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
AUTH_STATUSES = frozenset({401, 403})
#: `google.rpc.ErrorInfo.reason` values that mean the key itself is wrong (sent with a 400)
AUTH_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED", "API_KEY_SERVICE_BLOCKED"})


def error_body(exc) -> dict:
    """The `error` object of Google's JSON error body, or {} (the SDK keeps the whole body in `details`)."""
    body = getattr(exc, "details", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        return inner if isinstance(inner, dict) else {}
    return {}


def _detail_entries(exc, type_suffix: str) -> list[dict]:
    entries = error_body(exc).get("details") or []
    return [e for e in entries if isinstance(e, dict) and str(e.get("@type", "")).endswith(type_suffix)]


def error_reasons(exc) -> set[str]:
    """The `google.rpc.ErrorInfo` reasons of an API error (e.g. {"API_KEY_INVALID"})."""
    return {str(e.get("reason")) for e in _detail_entries(exc, "google.rpc.ErrorInfo") if e.get("reason")}


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def parse_duration(value) -> float | None:
    """A protobuf JSON Duration ("1s", "0.5s", "1.500s") in seconds, or None."""
    match = _DURATION.match(str(value or ""))
    return float(match.group(1)) if match else None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """An HTTP `Retry-After` header: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


def server_retry_delay(exc) -> float | None:
    """How long the server asked us to wait: `RetryInfo.retryDelay` in the body, else `Retry-After`."""
    for entry in _detail_entries(exc, "google.rpc.RetryInfo"):
        delay = parse_duration(entry.get("retryDelay"))
        if delay is not None:
            return delay
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None:
        return parse_retry_after(headers.get("retry-after"))
    return None


def is_retryable_status(code: int | None) -> bool:
    return code in RETRYABLE_STATUSES


def map_api_error(exc) -> GeminiError:
    """A non-retryable (or retried-out) `google.genai.errors.APIError` as one of our errors."""
    code = getattr(exc, "code", None)
    body = error_body(exc)
    details = {"http_status": code, "status": getattr(exc, "status", None) or body.get("status")}
    message = getattr(exc, "message", None) or body.get("message") or str(exc)
    reasons = error_reasons(exc)
    if reasons:
        details["reasons"] = sorted(reasons)
    # Google always sends ErrorInfo with API_KEY_INVALID; the message check covers proxies that drop details.
    if code in AUTH_STATUSES or reasons & AUTH_REASONS or "api key not valid" in str(message).lower():
        return ProviderAuthFailed(f"Gemini rejected the API key: {message}", details=details)
    if is_retryable_status(code):
        return ProviderUnavailable(f"Gemini is unavailable ({code}): {message}", details=details)
    return ProviderError(f"Gemini refused the request ({code}): {message}", details=details)
