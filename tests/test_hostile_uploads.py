"""Hostile uploads: every photo and LoRA a client can throw at the API is refused with a 4xx and its own code,
leaving no row and no file, or (formats that are legitimately photos) accepted and converted correctly.

Documented in README's upload-refusal paragraph: CMYK JPEG, 16-bit PNG, palette PNG with transparency and
EXIF-rotated JPEG are accepted (converted to upright 8-bit RGB); animated images, SVG and image/zip polyglots
are refused; a body larger than the endpoint accepts is refused from its Content-Length, unread.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import numpy as np
import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from PIL import Image

from characters.models import Character, FaceEmbedding, ReferenceImage
from characters.photos import load_photo
from characters.services import character_create
from tests import photos
from tests.conftest import stored_files
from training.models import LoraArtifact, StyleLora

pytestmark = pytest.mark.django_db


@pytest.fixture
def hero(studio_a, media_root) -> Character:
    return character_create(tenant=studio_a.tenant, name="Hero")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of(width: int, height: int, idat: bytes, *, color_type: int = 0) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def bomb_png() -> bytes:
    """7000x7000 grey PNG (49 Mpx, over the 40 Mpx limit) that compresses to ~50 kB."""
    side = 7000
    return png_of(side, side, zlib.compress(b"\x00" * ((side + 1) * side), 9))


def frames(fmt: str, **options) -> bytes:
    pixels = photos.astronaut()[:160, 160:320]  # the face; refused before any analysis
    first, second = Image.fromarray(pixels), Image.fromarray(pixels[:, ::-1].copy())
    buffer = io.BytesIO()
    first.save(buffer, fmt, save_all=True, append_images=[second], duration=100, loop=0, **options)
    return buffer.getvalue()


def polyglot() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("payload.html", "<script>alert(1)</script>")
    return photos.encode(photos.astronaut()) + archive.getvalue()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="512" height="512"><circle cx="9" cy="9" r="4"/></svg>'

HOSTILE = {
    "zero bytes": (lambda: b"", "photo.jpg", "invalid_image"),
    "text named .jpg": (lambda: b"I am not a photo, just text.\n" * 40, "photo.jpg", "invalid_image"),
    "truncated JPEG": (lambda: photos.encode(photos.astronaut(), "JPEG")[:20_000], "t.jpg", "invalid_image"),
    "truncated PNG": (lambda: photos.encode(photos.astronaut())[:50_000], "t.png", "invalid_image"),
    "PNG decompression bomb": (bomb_png, "bomb.png", "image_too_large"),
    "30000x30000 header, tiny body": (lambda: png_of(30_000, 30_000, zlib.compress(b"\x00" * 64)), "big.png",
                                      "image_too_large"),  # fmt: skip
    "animated GIF": (lambda: frames("GIF"), "a.gif", "unsupported_image_format"),
    "animated WebP": (lambda: frames("WEBP"), "a.webp", "unsupported_image_format"),
    "APNG": (lambda: frames("PNG"), "a.png", "unsupported_image_format"),
    "PNG + zip polyglot": (polyglot, "poly.png", "invalid_image"),
    "SVG": (lambda: SVG, "face.svg", "invalid_image"),
}


def counts(media_root) -> tuple:
    return (ReferenceImage.objects.unscoped().count(), FaceEmbedding.objects.unscoped().count(),
            LoraArtifact.objects.unscoped().count(), StyleLora.objects.unscoped().count(),
            len(stored_files(media_root)))  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_photo_is_refused_with_its_code_and_leaves_nothing(api_a, hero, media_root, case):
    build, name, code = HOSTILE[case]
    before = counts(media_root)
    upload = SimpleUploadedFile(name, build(), content_type="image/jpeg")
    response = api_a.post(f"/api/v1/characters/{hero.pk}/references", {"image": upload}, format="multipart")
    assert response.status_code == 422, response.content
    assert response.json()["error"]["code"] == code, response.json()
    assert counts(media_root) == before
    # the same bytes as a search photo are refused the same way
    upload.seek(0)
    assert api_a.post("/api/v1/search/faces", {"image": upload}, format="multipart").json()["error"]["code"] == code


# --- legitimate photos in unusual encodings: accepted, converted to upright 8-bit RGB --------------------


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photos.astronaut()).convert("CMYK").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def grey16_png() -> bytes:
    grey = np.asarray(Image.fromarray(photos.astronaut()).convert("L"), dtype=np.uint16) * 257
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode.startswith("I")  # really 16 bits per sample
    return buffer.getvalue()


def palette_alpha_png() -> bytes:
    image = Image.fromarray(photos.astronaut()).quantize(255)
    image.info["transparency"] = 255  # one palette entry transparent (unused by the photo's pixels)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=255)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """The photo stored lying on its side, with EXIF Orientation 6 ('rotate 90° clockwise to view')."""
    lying = Image.fromarray(photos.astronaut()).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    lying.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


ACCEPTED = {
    "CMYK JPEG": (cmyk_jpeg, "JPEG", 12),
    "16-bit grey PNG": (grey16_png, "PNG", 2),
    "palette PNG with transparency": (palette_alpha_png, "PNG", 12),
    "EXIF-rotated JPEG": (exif_rotated_jpeg, "JPEG", 12),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_unusual_encoding_of_a_real_photo_is_accepted_and_converted(api_a, hero, media_root, case):
    build, fmt, tolerance = ACCEPTED[case]
    data = build()
    photo = load_photo(data)
    original = photos.astronaut()
    if case == "16-bit grey PNG":
        original = np.asarray(Image.fromarray(original).convert("L").convert("RGB"))
    assert photo.image_format == fmt and photo.pixels.dtype == np.uint8 and photo.pixels.shape == original.shape
    difference = np.abs(photo.pixels.astype(int) - original.astype(int)).mean()
    assert difference < tolerance, f"{case}: mean difference {difference:.1f} from the upright RGB photo"

    response = api_a.post(
        f"/api/v1/characters/{hero.pk}/references", {"image": SimpleUploadedFile("p", data)}, format="multipart"
    )
    assert response.status_code == 201, response.content
    assert (response.json()["width"], response.json()["height"]) == (512, 512)
    assert len(stored_files(media_root)) == 1


# --- bodies larger than the limit -----------------------------------------------------------------------


class CountingStream:
    """A wsgi.input of `size` bytes that never holds them: it counts what the server reads."""

    def __init__(self, size: int, prefix: bytes = b""):
        self.size, self.prefix, self.read_bytes = size, prefix, 0

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.read_bytes
        n = left if n is None or n < 0 else min(n, left)
        start = self.read_bytes
        self.read_bytes += n
        head = self.prefix[start : start + n]
        return head + b"\0" * (n - len(head))

    def readline(self, n: int = -1) -> bytes:
        return self.read(min(n, 8192) if n and n > 0 else 8192)


@pytest.mark.parametrize(
    ("url", "limit_setting", "code"),
    [
        ("/api/v1/characters/{pk}/references", "ALKEMY_MAX_UPLOAD_BYTES", "image_too_large"),
        ("/api/v1/search/faces", "ALKEMY_MAX_UPLOAD_BYTES", "image_too_large"),
        ("/api/v1/characters/{pk}/loras", "ALKEMY_MAX_LORA_BYTES", "invalid_lora"),
        ("/api/v1/style-loras", "ALKEMY_MAX_LORA_BYTES", "invalid_lora"),
        ("/api/v1/characters/import", "ALKEMY_IMPORT_MAX_ARCHIVE_BYTES", "archive_too_large"),
    ],
)
def test_body_over_the_limit_is_refused_unread(studio_a, hero, media_root, url, limit_setting, code):
    """A 3 GB upload (declared in Content-Length) is refused before the server reads a byte of it."""
    size = 3 * 1024**3
    assert size > getattr(settings, limit_setting) * 2
    stream = CountingStream(size, b'--boundary\r\nContent-Disposition: form-data; name="image"; filename="a"\r\n\r\n')
    before = counts(media_root)
    response = Client().generic(
        "POST", url.format(pk=hero.pk), HTTP_AUTHORIZATION=f"Api-Key {studio_a.key}",
        CONTENT_TYPE="multipart/form-data; boundary=boundary", CONTENT_LENGTH=str(size), **{"wsgi.input": stream},
    )  # fmt: skip
    assert response.status_code == (413 if code == "archive_too_large" else 422), response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert error["details"]["max_bytes"] == getattr(settings, limit_setting)
    assert error["details"]["content_length"] == size
    assert stream.read_bytes == 0
    assert counts(media_root) == before


def test_photo_just_over_the_limit_is_refused_as_too_large(api_a, hero, media_root, settings):
    data = photos.encode(photos.astronaut())
    settings.ALKEMY_MAX_UPLOAD_BYTES = len(data) - 1  # within the multipart slack: read_upload refuses it
    response = api_a.post(f"/api/v1/characters/{hero.pk}/references", {"image": photos.upload(data)},
                          format="multipart")  # fmt: skip
    assert response.status_code == 422 and response.json()["error"]["code"] == "image_too_large"
    assert counts(media_root) == (0, 0, 0, 0, 0)


# --- LoRA files -------------------------------------------------------------------------------------------


def huge_header(claimed: int) -> bytes:
    return struct.pack("<Q", claimed) + b'{"__metadata__": {"a": "' + b"x" * 1000 + b'"}}'


HOSTILE_LORAS = {
    "header length 2**63": huge_header(2**63),
    "header length 100 MB, 1 kB sent": huge_header(100 * 1024**2),
    "header of 4 MB of JSON": struct.pack("<Q", 4 * 1024**2 + 2) + b"[" + b"1," * (2 * 1024**2) + b"]",
    "a PNG": photos.encode(photos.astronaut()[:64, :64]),
    "a pickle (torch .bin)": b"\x80\x02}q\x00X\x06\x00\x00\x00weightq\x01K\x01s." * 4,
    "zero bytes": b"",
}


@pytest.mark.parametrize("case", list(HOSTILE_LORAS))
def test_hostile_lora_is_refused_and_leaves_nothing(api_a, hero, media_root, case):
    before = counts(media_root)
    data = HOSTILE_LORAS[case]
    response = api_a.post(f"/api/v1/characters/{hero.pk}/loras",
                          {"file": SimpleUploadedFile("l.safetensors", data), "base_model": "sdxl"},
                          format="multipart")  # fmt: skip
    assert response.status_code == 422, response.content
    assert response.json()["error"]["code"] == "invalid_lora"
    response = api_a.post("/api/v1/style-loras", {"file": SimpleUploadedFile("s.safetensors", data),
                          "name": "noir", "base_model": "sdxl"}, format="multipart")  # fmt: skip
    assert response.status_code == 422, response.content
    assert response.json()["error"]["code"] == "invalid_lora"
    assert counts(media_root) == before
