"""Talking to Gemini 2.5 Flash Image through google-genai: client, request, reply, errors, retries.

The method itself is `generation.methods.gemini.GeminiMethod`; this package holds its parts so each
can be read (and tested) on its own:

- `client`: settings (with the model allow-list) and the SDK client (tenant key or the SDK's environment;
  SDK retries off);
- `request`: reference choice, the prompt template, the generation config;
- `aspect`: the supported aspect ratios and the nearest one to a size;
- `response`: image / block / no-image from a reply, usage, fitting to the requested size;
- `errors`: our error codes and the mapping from SDK errors;
- `retry`: exponential backoff with jitter around one call.

Importing this package imports neither the SDK nor torch (the web process validates requests with it);
the functions that need the SDK import it when called.
"""

from generation.gemini.aspect import ASPECT_RATIOS, nearest_aspect_ratio
from generation.gemini.client import (
    DEFAULT_MODEL,
    GeminiSettings,
    ModelNotAllowed,
    allowed_model,
    allowed_models,
    make_client,
)
from generation.gemini.errors import (
    ContentBlocked,
    GeminiError,
    NoImage,
    ProviderAuthFailed,
    ProviderError,
    ProviderUnavailable,
)
from generation.gemini.request import (
    IDENTITY_INSTRUCTION,
    MAX_REFERENCES,
    build_config,
    build_contents,
    build_prompt,
    pick_references,
    reference_score,
)
from generation.gemini.response import extract_image, fit_to_size, record_usage
from generation.gemini.retry import RetryPolicy, call_with_retries

__all__ = [
    "ASPECT_RATIOS",
    "DEFAULT_MODEL",
    "IDENTITY_INSTRUCTION",
    "MAX_REFERENCES",
    "ContentBlocked",
    "GeminiError",
    "GeminiSettings",
    "ModelNotAllowed",
    "NoImage",
    "ProviderAuthFailed",
    "ProviderError",
    "ProviderUnavailable",
    "RetryPolicy",
    "allowed_model",
    "allowed_models",
    "build_config",
    "build_contents",
    "build_prompt",
    "call_with_retries",
    "extract_image",
    "fit_to_size",
    "make_client",
    "nearest_aspect_ratio",
    "pick_references",
    "record_usage",
    "reference_score",
]
