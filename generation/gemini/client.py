"""Settings for the Gemini method and the SDK client built from them.

Which endpoint and key the client uses, in order:

- a tenant's own key (`request.credentials["gemini_api_key"]`) → Gemini Developer API with that key,
  even when the deployment runs on Vertex AI (the tenant pays for its own calls);
- otherwise whatever the SDK finds in the environment: `GOOGLE_API_KEY` / `GEMINI_API_KEY`, or Vertex AI
  with `GOOGLE_GENAI_USE_VERTEXAI=true` + `GOOGLE_CLOUD_PROJECT` + `GOOGLE_CLOUD_LOCATION`.

The base URL is the SDK's own business: `GOOGLE_GEMINI_BASE_URL` (Developer API) or `GOOGLE_VERTEX_BASE_URL`
(Vertex AI) point it elsewhere (a proxy, or the tests' local server); we never set one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from django.conf import settings

from alkemy.errors import AlkemyError
from generation.gemini.errors import ProviderAuthFailed

DEFAULT_MODEL = "gemini-2.5-flash-image"
#: google-genai 3.x defaults the Developer API to `v1`; Google documents image output (`imageConfig`,
#: `responseModalities`) on `v1beta`, so we ask for it unless GOOGLE_GENAI_API_VERSION says otherwise.
DEVELOPER_API_VERSION = "v1beta"


@dataclass(frozen=True)
class GeminiSettings:
    """The knobs, read from Django settings (all optional) at call time so tests can change them."""

    model: str = DEFAULT_MODEL
    timeout_seconds: float = 120.0
    max_retries: int = 4
    backoff_seconds: float = 2.0
    #: cap on the time spent waiting between attempts of one request (not counting the attempts)
    max_wait_seconds: float = 60.0

    @classmethod
    def from_django(cls, params: dict | None = None) -> GeminiSettings:
        """The settings for one request; raises ModelNotAllowed for a `params["model"]` off the allow-list."""
        return cls(
            model=allowed_model(params),
            timeout_seconds=float(getattr(settings, "ALKEMY_GEMINI_TIMEOUT_SECONDS", 120)),
            max_retries=int(getattr(settings, "ALKEMY_GEMINI_MAX_RETRIES", 4)),
            backoff_seconds=float(getattr(settings, "ALKEMY_GEMINI_BACKOFF_SECONDS", 2.0)),
            max_wait_seconds=float(getattr(settings, "ALKEMY_GEMINI_MAX_WAIT_SECONDS", 60.0)),
        )


class ModelNotAllowed(AlkemyError):
    status_code = 422
    code = "model_not_allowed"


def allowed_models() -> list[str]:
    """What `params.model` may name: settings.ALKEMY_GEMINI_ALLOWED_MODELS plus the default model."""
    default = getattr(settings, "ALKEMY_GEMINI_MODEL", DEFAULT_MODEL)
    listed = list(getattr(settings, "ALKEMY_GEMINI_ALLOWED_MODELS", [DEFAULT_MODEL]))
    return listed if default in listed else [default, *listed]


def allowed_model(params: dict | None) -> str:
    """The model a request runs on: `params["model"]` when it is allow-listed, the default when absent.

    Every call spends a Gemini key, often the operator's, so a tenant must not pick an expensive or
    someone else's (tuned) model: anything off the list raises ModelNotAllowed (422, `params.model`).
    Checked when a job is submitted and again when it runs (the list may have shrunk meanwhile).
    """
    model = (params or {}).get("model")
    if model is None:
        return getattr(settings, "ALKEMY_GEMINI_MODEL", DEFAULT_MODEL)
    allowed = allowed_models()
    if not isinstance(model, str) or model not in allowed:
        raise ModelNotAllowed(
            f"Model {model!r} is not allowed for Gemini generations; allowed: {', '.join(allowed)}.",
            field="params.model",
            details={"allowed": allowed},
        )
    return model


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true")


def uses_vertex_ai(api_key: str | None) -> bool:
    """Whether the client will talk to Vertex AI: never with a tenant key, else as the SDK's env says."""
    if api_key:
        return False
    return _env_true("GOOGLE_GENAI_USE_ENTERPRISE") or _env_true("GOOGLE_GENAI_USE_VERTEXAI")


def make_client(credentials: dict | None, timeout_seconds: float):
    """A `google.genai.Client` for one job: the tenant's key when given, else the SDK's environment.

    The SDK's own retries stay off (a single attempt): `generation.gemini.retry` retries, so the
    number of attempts, the backoff and the total wait are ours and testable.
    Raises ProviderAuthFailed when no key or Vertex AI project is configured at all.
    """
    from google import genai
    from google.auth import exceptions as auth_errors
    from google.genai import types

    api_key = (credentials or {}).get("gemini_api_key") or None
    vertex = uses_vertex_ai(api_key)
    api_version = None
    if not vertex and not os.environ.get("GOOGLE_GENAI_API_VERSION"):
        api_version = DEVELOPER_API_VERSION
    http_options = types.HttpOptions(
        api_version=api_version,
        timeout=max(int(timeout_seconds * 1000), 1),  # milliseconds
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    try:
        if api_key:
            return genai.Client(api_key=api_key, vertexai=False, http_options=http_options)
        return genai.Client(http_options=http_options)
    # ValueError: the SDK's "No API key was provided" / "Project or API key must be set";
    # DefaultCredentialsError: Vertex AI without a project and no application default credentials
    except (ValueError, auth_errors.DefaultCredentialsError) as exc:
        raise ProviderAuthFailed(
            "No Gemini credentials: set GEMINI_API_KEY (or Vertex AI variables), or give the tenant a Gemini key.",
            details={"reason": str(exc)},
        ) from exc
