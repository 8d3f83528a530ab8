"""Training data from a character's reference photos: face-centred square crops, flips, captions.

Each reference photo gives two examples, the crop and its mirror image (a face seen from the other
side is the same person; text in the photo is rare in portraits). The crop is centred a little below
the stored face box and three face-heights wide, so it keeps the hair, the head and the shoulders: the
LoRA learns a person, not a floating face.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageOps

#: crop side in face-box heights, and how far below the face centre the crop is centred (face heights)
CROP_FACE_HEIGHTS = 3.0
CROP_CENTRE_BELOW = 0.35


@dataclass
class Example:
    image: Image.Image  # RGB, resolution × resolution
    caption: str


def default_caption(trigger_token: str) -> str:
    return f"a photo of {trigger_token} person"


def face_crop(image: Image.Image, face_box, size: int) -> Image.Image:
    """The head-and-shoulders square around `face_box` ([x1, y1, x2, y2] pixels), resized to `size`².

    The square shrinks to fit inside the photo when the face is close to an edge or fills the frame,
    and slides inside it rather than padding.
    """
    x1, y1, x2, y2 = (float(v) for v in face_box)
    face = max(x2 - x1, y2 - y1, 1.0)
    side = min(CROP_FACE_HEIGHTS * face, image.width, image.height)
    centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2 + CROP_CENTRE_BELOW * face
    left = min(max(centre_x - side / 2, 0.0), image.width - side)
    top = min(max(centre_y - side / 2, 0.0), image.height - side)
    box = (round(left), round(top), round(left + side), round(top + side))
    return image.convert("RGB").crop(box).resize((size, size), Image.Resampling.LANCZOS)


def with_flips(examples: list[Example]) -> list[Example]:
    """Each example followed by its mirror image (same caption)."""
    flipped = []
    for example in examples:
        flipped += [example, Example(ImageOps.mirror(example.image), example.caption)]
    return flipped


def caption_for(caption: str | None, trigger_token: str) -> str:
    """The given caption with the trigger token in it (in front when missing), else the default caption."""
    from generation.methods.lora import with_trigger

    if not caption:
        return default_caption(trigger_token)
    return with_trigger(caption, trigger_token)


def reference_examples(
    *, character, resolution: int, trigger_token: str, captions: dict | None = None
) -> list[Example]:
    """Crops of every reference photo of `character` (oldest first) and their flips, captioned.

    `captions` maps reference ids (as strings) to captions; the others get "a photo of <trigger> person".
    """
    from characters.models import ReferenceImage

    captions = captions or {}
    examples = []
    for reference in ReferenceImage.objects.unscoped().filter(character=character).order_by("created_at", "id"):
        with reference.file.open("rb") as handle:
            photo = ImageOps.exif_transpose(Image.open(handle)).convert("RGB")  # the face box is in these pixels
        crop = face_crop(photo, reference.face_box, resolution)
        examples.append(Example(crop, caption_for(captions.get(str(reference.pk)), trigger_token)))
    return with_flips(examples)
