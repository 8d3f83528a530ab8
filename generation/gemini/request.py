"""What we send to Gemini: the best reference photos, the prompt around them, and the generation config.

One request is: up to `MAX_REFERENCES` inline JPEG parts (best first), then one text part. Google
recommends images before the text that refers to them.

The text is the identity instruction, the user's prompt, and the negative prompt folded in as
"Avoid: ..." (Gemini has no negative prompt).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the web process checks Gemini requests without importing torch (methods.base does)
    from generation.methods.base import ReferenceFace

MAX_REFERENCES = 3
#: longest side of a reference as sent: keeps each image to about one 768 px tile of input tokens
REFERENCE_MAX_SIDE = 768
#: head-and-shoulders crop: a square of this many face widths around the face box
REFERENCE_CROP_FACES = 3.0
JPEG_QUALITY = 90
#: the brightness band (mean grey level of the face) outside which a photo counts as badly exposed,
#: as in characters.quality
DARK_BELOW, BRIGHT_ABOVE = 40, 220

IDENTITY_INSTRUCTION = (
    "The reference image{s} show{verb} one person. Generate a new photo of this same person: keep their face, "
    "identity, apparent age, skin tone and hairstyle. Do not copy the reference background, clothing or pose "
    "unless the description asks for them."
)


def reference_score(reference: ReferenceFace) -> float:
    """How useful a reference is to Gemini: sharpness x detection score, halved when badly exposed.

    Sharpness (Laplacian variance of the face, see characters.quality) says whether facial detail is there
    to copy; the detector's score says the crop is a clear, frontal-ish face. Missing figures count
    as neutral (sharpness 0, score 1), so references without quality keep their given order.
    """
    quality = reference.quality or {}
    score = float(quality.get("sharpness") or 0.0) * float(quality.get("det_score") or 1.0)
    brightness = quality.get("brightness")
    if brightness is not None and not DARK_BELOW <= float(brightness) <= BRIGHT_ABOVE:
        score *= 0.5
    return score


def pick_references(references: list[ReferenceFace], limit: int = MAX_REFERENCES) -> list[ReferenceFace]:
    """The `limit` best references, best first (score, then face size; ties keep the given order)."""
    ranked = sorted(
        enumerate(references),
        key=lambda item: (-reference_score(item[1]), -float((item[1].quality or {}).get("face_px") or 0), item[0]),
    )
    return [reference for _, reference in ranked[:limit]]


def reference_crop(reference: ReferenceFace) -> np.ndarray:
    """A square head-and-shoulders crop around the face (clipped to the photo).

    Cropping keeps other people and large backgrounds of the photo out of the reference, so the model
    knows whom to keep, and keeps the token count down.
    """
    image = reference.image
    height, width = image.shape[:2]
    x1, y1, x2, y2 = reference.box
    side = max(x2 - x1, y2 - y1) * REFERENCE_CROP_FACES
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(max(cx - side / 2, 0)), int(max(cy - side / 2, 0))
    right, bottom = int(min(cx + side / 2, width)), int(min(cy + side / 2, height))
    if right - left < 2 or bottom - top < 2:  # a degenerate box: send the whole photo
        return image
    return image[top:bottom, left:right]


def encode_reference(reference: ReferenceFace) -> bytes:
    """The reference crop as JPEG bytes, at most REFERENCE_MAX_SIDE on its longest side (never upscaled)."""
    picture = Image.fromarray(np.ascontiguousarray(reference_crop(reference))).convert("RGB")
    picture.thumbnail((REFERENCE_MAX_SIDE, REFERENCE_MAX_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def build_prompt(prompt: str, negative_prompt: str = "", reference_count: int = 1) -> str:
    """The text part: identity instruction, the description, and "Avoid: ..." for the negative prompt."""
    lines = []
    if reference_count:
        plural = reference_count > 1
        lines.append(IDENTITY_INSTRUCTION.format(s="s" if plural else "", verb="" if plural else "s"))
    lines.append(f"Description: {prompt.strip()}")
    if negative_prompt and negative_prompt.strip():
        lines.append(f"Avoid: {negative_prompt.strip()}")
    return "\n".join(lines)


def build_contents(references: list[ReferenceFace], prompt: str, negative_prompt: str = "") -> list:
    """The parts of the single user turn: the chosen references as inline JPEG, then the text."""
    from google.genai import types

    chosen = pick_references(references)
    parts = [types.Part.from_bytes(data=encode_reference(r), mime_type="image/jpeg") for r in chosen]
    parts.append(types.Part.from_text(text=build_prompt(prompt, negative_prompt, len(chosen))))
    return [types.Content(role="user", parts=parts)]


def build_config(aspect_ratio: str, seed: int | None = None):
    """Image output at `aspect_ratio`. TEXT is allowed too so a refusal comes back with the model's reason."""
    from google.genai import types

    return types.GenerateContentConfig(
        response_modalities=["TEXT", "IMAGE"],
        image_config=types.ImageConfig(aspect_ratio=aspect_ratio),
        # Gemini does not promise determinism for images, but a seed makes repeats likelier to match.
        seed=seed,
        candidate_count=1,  # image models give one candidate; num_images > 1 is one request each
        # No tools are sent, so the SDK's automatic function calling has nothing to do: off, and quiet.
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )
