"""Reading a `generateContent` reply: the image, or why there is none; and the metered usage."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from generation.gemini.errors import ContentBlocked, NoImage, ProviderError

#: finish reasons that mean a policy stopped the output: retrying the same prompt will not help
BLOCKING_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "RECITATION",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
    }
)


def _name(value) -> str | None:
    """An SDK enum (or a plain string the SDK did not know) as its wire name."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


def record_usage(usage: dict, response) -> None:
    """Add one reply's `usageMetadata` to `usage` (input_tokens, output_tokens, requests).

    Thinking tokens are billed as output, so they count as output; Gemini 2.5 Flash Image does not think,
    but a configured model might. `images` is counted by the caller, per image delivered.
    """
    metadata = getattr(response, "usage_metadata", None)
    usage["requests"] = usage.get("requests", 0) + 1
    usage.setdefault("input_tokens", 0)
    usage.setdefault("output_tokens", 0)
    if metadata is None:
        return
    usage["input_tokens"] += metadata.prompt_token_count or 0
    usage["output_tokens"] += (metadata.candidates_token_count or 0) + (metadata.thoughts_token_count or 0)


def _decode(data: bytes, mime_type: str | None) -> Image.Image:
    try:
        picture = Image.open(io.BytesIO(data))
        picture.load()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ProviderError(
            "Gemini returned image data that is not a readable image.", details={"mime_type": mime_type}
        ) from exc
    return picture.convert("RGB")


def extract_image(response) -> Image.Image:
    """The first image of the first candidate, or ContentBlocked / NoImage / ProviderError."""
    feedback = getattr(response, "prompt_feedback", None)
    block_reason = _name(getattr(feedback, "block_reason", None))
    if block_reason and block_reason != "BLOCKED_REASON_UNSPECIFIED":
        raise ContentBlocked(
            f"Gemini blocked the prompt ({block_reason}).",
            details={
                "reason": block_reason,
                "source": "prompt",
                "message": getattr(feedback, "block_reason_message", None),
            },
        )
    candidates = getattr(response, "candidates", None)
    if not candidates:
        raise ProviderError("Gemini's reply has no candidates.", details={"reason": "no_candidates"})
    candidate = candidates[0]
    finish_reason = _name(candidate.finish_reason)
    parts = (candidate.content.parts if candidate.content else None) or []
    texts = [part.text for part in parts if part.text and not part.thought]
    if finish_reason in BLOCKING_FINISH_REASONS:
        blocked = [_name(r.category) for r in candidate.safety_ratings or [] if r.blocked]
        raise ContentBlocked(
            f"Gemini blocked the image ({finish_reason}).",
            details={"reason": finish_reason, "source": "output", "categories": blocked, "text": "\n".join(texts)},
        )
    for part in parts:
        inline = part.inline_data
        if inline is not None and inline.data and (inline.mime_type or "").startswith("image/"):
            return _decode(inline.data, inline.mime_type)
    text = "\n".join(texts)
    raise NoImage(
        "Gemini answered without an image" + (f": {text[:500]}" if text else "."),
        details={"finish_reason": finish_reason, "text": text},
    )


def fit_to_size(picture: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop to width:height, then resize to exactly width x height.

    Gemini returns its own resolution for the aspect ratio we asked (~1 MP), and the nearest supported
    ratio may differ a little from the one requested; the crop trims that difference and the resize
    may upscale (a 2048 px request gets a ~1024 px image enlarged).
    """
    if picture.size == (width, height):
        return picture
    return ImageOps.fit(picture, (width, height), method=Image.Resampling.LANCZOS)
