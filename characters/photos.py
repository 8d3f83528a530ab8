"""Reading an uploaded photo for real: content sniffing, size limits, EXIF orientation, corruption.

Nothing here trusts the file name or the client's content type: Pillow identifies the bytes.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
from django.conf import settings
from PIL import ExifTags, Image, UnidentifiedImageError

from alkemy.errors import Unprocessable

ACCEPTED_FORMATS = {"JPEG", "PNG", "WEBP"}
#: no detector finds a face in fewer pixels than this; thinner images (2100x1) are refused before analysis
MIN_PHOTO_SIDE = 32

#: EXIF Orientation → the transposition that shows the photo upright (as `ImageOps.exif_transpose`)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


_SIXTEEN_BIT_GREY = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def oriented(image: Image.Image) -> Image.Image:
    """The image turned upright by its EXIF Orientation (and 16-bit grey as 8-bit); everyone who reads a stored
    photo must use this.

    Not `ImageOps.exif_transpose`: besides turning the pixels it rewrites the EXIF block, which raises
    `struct.error` when another tag has an unexpected type (PlanarConfiguration stored as ASCII), and we
    only need the pixels. EXIF that cannot be read at all is ignored, as browsers do.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (struct.error, ValueError, TypeError, KeyError, IndexError, OSError, SyntaxError):
        orientation = 1
    method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    if image.mode in _SIXTEEN_BIT_GREY:  # 16-bit grey PNG: convert("RGB") would clip it to white; scale to 8 bits
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) // 257, 0, 255).astype(np.uint8), "L")
    return image.transpose(method) if method is not None else image


@dataclass
class Photo:
    data: bytes  # the original bytes, stored as uploaded
    sha256: str
    image_format: str
    width: int  # after EXIF orientation
    height: int
    pixels: np.ndarray  # RGB uint8, oriented


def _too_large(message: str, **details) -> Unprocessable:
    return Unprocessable(message, code="image_too_large", field="image", details=details)


def read_upload(upload, *, max_bytes: int | None = None) -> bytes:
    """Read an UploadedFile (or any file object) up to the byte limit."""
    max_bytes = max_bytes or settings.ALKEMY_MAX_UPLOAD_BYTES
    if upload is None:
        raise Unprocessable("Send the photo as multipart field 'image'.", code="image_required", field="image")
    size = getattr(upload, "size", None)
    if size is not None and size > max_bytes:
        raise _too_large(f"The file is {size} bytes; the limit is {max_bytes}.", size=size, max_bytes=max_bytes)
    if hasattr(upload, "seek"):
        upload.seek(0)
    data = upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(f"The file is larger than the limit of {max_bytes} bytes.", max_bytes=max_bytes)
    if not data:
        raise Unprocessable("The file is empty.", code="invalid_image", field="image")
    return data


def _is_zip(data: bytes) -> bool:
    """Whether a zip reader opens `data` as an archive with entries (an image+zip polyglot); the central
    directory must be valid, so stray bytes that look like a zip end record do not count."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return bool(archive.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return False


def load_photo(data: bytes, *, max_pixels: int | None = None) -> Photo:
    """Validate and decode photo bytes; raises Unprocessable with a specific code."""
    max_pixels = max_pixels or settings.ALKEMY_MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image_format = image.format
            if image_format not in ACCEPTED_FORMATS:
                raise Unprocessable(
                    f"{image_format or 'This'} images are not accepted; send JPEG, PNG or WebP.",
                    code="unsupported_image_format",
                    field="image",
                    details={"format": image_format, "accepted": sorted(ACCEPTED_FORMATS)},
                )
            if getattr(image, "n_frames", 1) > 1:  # animated WebP, APNG: a reference is one still photo
                raise Unprocessable(
                    "Animated images are not accepted; send one still photo (JPEG, PNG or WebP).",
                    code="unsupported_image_format",
                    field="image",
                    details={"format": image_format, "animated": True, "accepted": sorted(ACCEPTED_FORMATS)},
                )
            if _is_zip(data):
                raise Unprocessable(
                    "The file is an image and a zip archive at once; send the photo alone.",
                    code="invalid_image",
                    field="image",
                    details={"polyglot": "zip"},
                )
            width, height = image.size
            if width * height > max_pixels:
                raise _too_large(
                    f"The image has {width}x{height} pixels; the limit is {max_pixels} pixels.",
                    width=width,
                    height=height,
                    max_pixels=max_pixels,
                )
            if min(width, height) < MIN_PHOTO_SIDE:
                raise Unprocessable(
                    f"The image is {width}x{height} pixels; a face photo needs at least {MIN_PHOTO_SIDE} pixels "
                    "on each side.",
                    code="face_too_small",
                    field="image",
                    details={"width": width, "height": height, "min_side": MIN_PHOTO_SIDE},
                )
            image.load()
            image = oriented(image)
            pixels = np.asarray(image.convert("RGB"))
    except Unprocessable:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large("The image has too many pixels.", max_pixels=max_pixels) from None
    except UnidentifiedImageError:
        raise Unprocessable(
            "The file is not an image we can read (JPEG, PNG or WebP).", code="invalid_image", field="image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Unprocessable(
            f"The image is corrupt or truncated ({exc}).", code="invalid_image", field="image"
        ) from None
    return Photo(
        data=data,
        sha256=hashlib.sha256(data).hexdigest(),
        image_format=image_format,
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        pixels=pixels,
    )
