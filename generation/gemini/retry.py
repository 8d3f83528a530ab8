"""Retrying one Gemini call: exponential backoff with jitter, the server's retry delay honoured, total wait capped.

Retried: HTTP 408 / 429 / 5xx and transport failures (timeouts, refused or dropped connections).
Everything else (safety blocks, auth failures, bad requests, malformed replies) fails at once.

Delay before retry k (k = 0, 1, ...): `backoff * 2**k`, scaled by a random factor in [0.5, 1]
("equal jitter": workers that failed together do not come back together, yet the delay never
collapses to zero). When the server names a delay (`RetryInfo.retryDelay` or `Retry-After`), we wait at
least that long. If the next delay would take the total wait past `max_wait`, we stop and raise
`provider_unavailable` with the server's delay in details, so the job fails now rather than sleeping
through its lease.
"""

from __future__ import annotations

import importlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from generation.gemini.errors import (
    ProviderAuthFailed,
    ProviderUnavailable,
    is_retryable_status,
    map_api_error,
    server_retry_delay,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Timeouts and connection failures of whichever HTTP package the SDK runs on (httpx2, or httpx)."""
    classes: list[type[BaseException]] = []
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        classes.append(module.TransportError)
    return tuple(classes)


@dataclass
class RetryPolicy:
    max_retries: int = 4
    backoff: float = 2.0
    max_wait: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def backoff_delay(self, retry: int) -> float:
        """The jittered exponential delay before retry number `retry` (0-based)."""
        return self.backoff * (2**retry) * self.rng.uniform(0.5, 1.0)


def call_with_retries(call: Callable[[], T], policy: RetryPolicy) -> T:
    """`call()`, retried per `policy`; raises a GeminiError (provider_unavailable / auth / error) on failure."""
    from google.auth import exceptions as auth_errors
    from google.genai import errors as genai_errors

    # google-auth's TransportError: a network failure while refreshing a Vertex AI token, transient too
    transport_errors = (*_transport_errors(), auth_errors.TransportError)
    waited = 0.0
    retry = 0
    while True:
        try:
            return call()
        except genai_errors.APIError as exc:
            if not is_retryable_status(exc.code):
                raise map_api_error(exc) from exc
            failure, hint, cause = map_api_error(exc), server_retry_delay(exc), exc
        except auth_errors.RefreshError as exc:  # Vertex AI credentials that cannot mint a token
            raise ProviderAuthFailed(f"Gemini credentials were refused: {exc}") from exc
        except transport_errors as exc:
            kind = "timed out" if "Timeout" in type(exc).__name__ else "connection failed"
            failure = ProviderUnavailable(f"Gemini {kind}: {exc}", details={"error": type(exc).__name__})
            hint, cause = None, exc

        delay = max(policy.backoff_delay(retry), hint or 0.0)
        if retry >= policy.max_retries or waited + delay > policy.max_wait:
            failure.details["attempts"] = retry + 1
            if hint is not None:
                failure.details["retry_after_seconds"] = hint
            raise failure from cause
        logger.info("Gemini call failed (%s); retry %d in %.2fs", failure.message, retry + 1, delay)
        policy.sleep(delay)
        waited += delay
        retry += 1
