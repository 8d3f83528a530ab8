"""Gemini 2.5 Flash Image: character consistency from reference photos, through Google's API.

No weights and no GPU: the method runs on the default (CPU) cluster and spends its time waiting on HTTP.
Per requested image it makes one `generateContent` call (image models return one candidate), sending:

- up to 3 of the character's references, best first (sharpness x detection score, see
  `generation.gemini.request.reference_score`), as head-and-shoulders JPEG crops;
- a text part: a short identity instruction, the prompt, and the negative prompt as "Avoid: ...";
- the supported aspect ratio nearest to width/height (`ImageConfig.aspect_ratio`).

The image Gemini returns (its own ~1 MP resolution) is centre-cropped and resized to exactly
width x height. `steps` and `guidance` do not apply and are ignored. `seed + i` is passed as the
request seed of image i (best effort: Gemini does not promise deterministic images).

`request.params`: `model` (default settings.ALKEMY_GEMINI_MODEL, "gemini-2.5-flash-image"; only models in
settings.ALKEMY_GEMINI_ALLOWED_MODELS, else `model_not_allowed`, see `generation.gemini.client.allowed_model`).
`request.credentials["gemini_api_key"]`: a tenant's own key; otherwise the SDK's environment variables.
`request.usage` gets input_tokens, output_tokens (from usageMetadata), images and requests (HTTP 200 replies,
the billable ones; blocked replies are billed for their input and count too), and the `model` they were
billed for.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from PIL import Image

from generation.gemini import (
    GeminiSettings,
    ProviderError,
    RetryPolicy,
    build_config,
    build_contents,
    call_with_retries,
    extract_image,
    fit_to_size,
    make_client,
    nearest_aspect_ratio,
    record_usage,
)
from generation.methods.base import GenerationMethod, GenerationRequest, LoadOptions, StepCallback


class GeminiMethod(GenerationMethod):
    key: ClassVar[str] = "gemini"
    label: ClassVar[str] = "Gemini 2.5 Flash Image (Google API)"
    cluster: ClassVar[str] = "default"
    default_steps: ClassVar[int] = 1  # one API call per image; steps do not apply
    default_guidance: ClassVar[float] = 0.0  # no classifier-free guidance to set
    needs_embedder: ClassVar[str | None] = None

    def __init__(self, retry_policy: RetryPolicy | None = None) -> None:
        #: None: built from settings for each request (tests inject one with a fake sleep or rng)
        self.retry_policy = retry_policy

    @classmethod
    def load(cls, models_dir: Path, options: LoadOptions) -> GeminiMethod:
        """Nothing to load: the model lives at Google. The arguments are there for the common interface."""
        return cls()

    def generate(self, request: GenerationRequest, on_step: StepCallback | None = None) -> list[Image.Image]:
        """`num_images` images of the reference person; fills `request.usage`; raises GeminiError subclasses."""
        config = GeminiSettings.from_django(request.params)
        policy = self.retry_policy or RetryPolicy(
            max_retries=config.max_retries, backoff=config.backoff_seconds, max_wait=config.max_wait_seconds
        )
        usage = request.usage
        for key in ("input_tokens", "output_tokens", "images", "requests"):
            usage.setdefault(key, 0)
        usage["model"] = config.model  # what was billed: prices differ per model
        # Google bills the owner of the key: a studio on its own key pays Google itself (accounting
        # records those tokens but does not bill them again)
        usage["key_source"] = "tenant" if request.credentials.get("gemini_api_key") else "operator"
        aspect_ratio = nearest_aspect_ratio(request.width, request.height)
        # The references are encoded once and reused by every image's request.
        contents = build_contents(request.references, request.prompt, request.negative_prompt)
        images: list[Image.Image] = []
        with make_client(request.credentials, config.timeout_seconds) as client:
            for index in range(request.num_images):
                generate_config = build_config(aspect_ratio, seed=request.seed + index)

                def send(generate_config=generate_config):
                    try:
                        return client.models.generate_content(
                            model=config.model, contents=contents, config=generate_config
                        )
                    except ValueError as exc:  # a body that is not JSON, or not the shape the SDK expects
                        raise ProviderError(
                            "Gemini's reply could not be read.", details={"reason": "malformed_response"}
                        ) from exc

                response = call_with_retries(send, policy)
                record_usage(usage, response)  # before extract_image: a blocked reply is billed too
                picture = fit_to_size(extract_image(response), request.width, request.height)
                images.append(picture)
                usage["images"] += 1
                if on_step is not None:
                    on_step(index + 1, request.num_images)  # may raise to cancel before the next call
        return images
