"""Gemini 2.5 Flash Image method against a real local HTTP server speaking the Gemini REST wire format.

The SDK is pointed at the server with its own `GOOGLE_GEMINI_BASE_URL` variable; the server records
every request (path, headers, JSON body) and answers from a script of replies.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from generation.gemini import (
    ASPECT_RATIOS,
    RetryPolicy,
    build_prompt,
    nearest_aspect_ratio,
    pick_references,
)
from generation.gemini.request import encode_reference
from generation.methods.base import GenerationRequest, LoadOptions, ReferenceFace
from generation.methods.gemini import GeminiMethod

MODEL = "gemini-2.5-flash-image"
GENERATE_PATH = f"/v1beta/models/{MODEL}:generateContent"
USAGE = {"promptTokenCount": 1100, "candidatesTokenCount": 1290, "totalTokenCount": 2390}


# --- the local Gemini server -------------------------------------------------------------------------------


class Reply:
    """One scripted answer: status, body (dict → JSON, bytes/str as is), extra headers, a delay before it."""

    def __init__(self, status: int = 200, body=None, headers: dict | None = None, delay: float = 0.0):
        self.status, self.body, self.headers, self.delay = status, body, headers or {}, delay


class FakeGemini:
    """A ThreadingHTTPServer answering `POST .../models/{model}:generateContent` from `replies` (last one repeats)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.replies: list[Reply] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                server.requests.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": json.loads(raw) if raw else None,
                        "at": time.monotonic(),
                    }
                )
                reply = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
                time.sleep(reply.delay)
                body = reply.body
                if isinstance(body, dict):
                    body = json.dumps(body).encode()
                elif isinstance(body, str):
                    body = body.encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def reply(self, *replies: Reply) -> FakeGemini:
        self.replies = list(replies)
        return self

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def image_reply(pixels: np.ndarray | None = None, text: str | None = None) -> Reply:
    from tests.photos import astronaut

    parts = [{"text": text}] if text else []
    parts.append({"inlineData": {"mimeType": "image/png", "data": png_b64(astronaut() if pixels is None else pixels)}})
    return Reply(
        body={
            "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": USAGE,
            "modelVersion": MODEL,
        }
    )


def error_reply(code: int, status: str, message: str, details: list | None = None, headers=None) -> Reply:
    error = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return Reply(code, {"error": error}, headers=headers)


def retry_info(delay: str) -> dict:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture
def gemini(monkeypatch, settings):
    """The local server, the SDK pointed at it with an env key, and fast retry settings."""
    server = FakeGemini()
    for name in (
        "GOOGLE_API_KEY",
        "GOOGLE_GENAI_USE_VERTEXAI",
        "GOOGLE_GENAI_USE_ENTERPRISE",
        "GOOGLE_GENAI_API_VERSION",
        "GOOGLE_CLOUD_PROJECT",
        "GOOGLE_CLOUD_LOCATION",
        "GOOGLE_VERTEX_BASE_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", server.url)
    monkeypatch.setenv("GEMINI_API_KEY", "env-key")
    settings.ALKEMY_GEMINI_MODEL = MODEL
    settings.ALKEMY_GEMINI_TIMEOUT_SECONDS = 5
    settings.ALKEMY_GEMINI_MAX_RETRIES = 2
    settings.ALKEMY_GEMINI_BACKOFF_SECONDS = 0.01
    settings.ALKEMY_GEMINI_MAX_WAIT_SECONDS = 5
    yield server
    server.close()


def reference(pixels: np.ndarray, quality: dict) -> ReferenceFace:
    from characters.faces import get_embedder

    embedder = get_embedder()
    face = embedder.analyze(pixels)[0]
    return ReferenceFace(pixels, face.box, face.keypoints, face.embedding, embedder.info.name, quality=quality)


@pytest.fixture(scope="module")
def references() -> dict[str, ReferenceFace]:
    """Five real people with different quality figures. Scores (sharpness x det_score, halved when badly
    exposed): astronaut 270, group-0 237.5 (overexposed), group-2 140, tom 80, group-1 49.5."""
    from tests.photos import astronaut, group_crops, tom_hanks

    crops = group_crops()
    return {
        "tom": reference(tom_hanks(), {"sharpness": 100, "det_score": 0.8, "brightness": 120, "face_px": 90}),
        "group-1": reference(crops[1], {"sharpness": 50, "det_score": 0.99, "brightness": 120, "face_px": 80}),
        "group-0": reference(crops[0], {"sharpness": 500, "det_score": 0.95, "brightness": 250, "face_px": 80}),
        "astronaut": reference(astronaut(), {"sharpness": 300, "det_score": 0.9, "brightness": 110, "face_px": 170}),
        "group-2": reference(crops[2], {"sharpness": 200, "det_score": 0.7, "brightness": 100, "face_px": 80}),
    }


def make_request(references, **overrides) -> GenerationRequest:
    fields = {
        "references": list(references.values()),
        "prompt": "a portrait on a rainy street at night",
        "negative_prompt": "blurry, extra fingers",
        "width": 768,
        "height": 1024,
        "seed": 7,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def generate(request: GenerationRequest, on_step=None) -> list[Image.Image]:
    return GeminiMethod.load(None, LoadOptions()).generate(request, on_step)


def inline_data(part: dict) -> tuple[str, bytes]:
    """(MIME type, bytes) of an `inlineData` part, read as Google's proto-JSON parser does.

    google-genai 3.6.1 writes blobs as `{"mime_type": ..., "data": <URL-safe base64>}`; proto3 JSON
    accepts the field's original or lowerCamelCase name and either base64 alphabet, so we do too.
    """
    blob = part["inlineData"]
    mime = blob.get("mimeType", blob.get("mime_type"))
    data = blob["data"].replace("-", "+").replace("_", "/")
    return mime, base64.b64decode(data + "=" * (-len(data) % 4))


def parts_of(sent: dict) -> list[dict]:
    (content,) = sent["body"]["contents"]
    assert content["role"] == "user"
    return content["parts"]


# --- success ----------------------------------------------------------------------------------------------


def test_generates_images_of_the_requested_size_and_records_usage(gemini, references):
    from characters.faces import get_embedder

    gemini.reply(image_reply())
    request = make_request(references, num_images=2)
    steps = []

    images = generate(request, lambda step, total: steps.append((step, total)))

    assert [image.size for image in images] == [(768, 1024), (768, 1024)]
    assert all(image.mode == "RGB" for image in images)
    assert steps == [(1, 2), (2, 2)]
    # one request per image; usage is the sum of both replies' usageMetadata
    assert request.usage == {
        "input_tokens": 2200, "output_tokens": 2580, "images": 2, "requests": 2, "model": MODEL,
        "key_source": "operator",
    }
    assert len(gemini.requests) == 2

    sent = gemini.requests[0]
    assert sent["path"] == GENERATE_PATH
    assert sent["headers"]["x-goog-api-key"] == "env-key"
    parts = parts_of(sent)
    # three references (the best three, best first) as inline JPEG, then the text
    images_sent = [inline_data(part) for part in parts[:-1]]
    assert [mime for mime, _ in images_sent] == ["image/jpeg"] * 3
    best = [references[name] for name in ("astronaut", "group-0", "group-2")]
    assert [data for _, data in images_sent] == [encode_reference(r) for r in best]
    # the first reference sent is a face crop of the astronaut, not something else
    first = np.asarray(Image.open(io.BytesIO(images_sent[0][1])).convert("RGB"))
    assert max(first.shape[:2]) <= 768
    face = get_embedder().analyze(first)[0]
    assert float(face.embedding @ references["astronaut"].embedding) > 0.9

    text = parts[-1]["text"]
    assert "Generate a new photo of this same person" in text
    assert "reference images show one person" in text
    assert "Description: a portrait on a rainy street at night" in text
    assert "Avoid: blurry, extra fingers" in text

    config = sent["body"]["generationConfig"]
    assert config["responseModalities"] == ["TEXT", "IMAGE"]
    assert config["imageConfig"] == {"aspectRatio": "3:4"}  # 768x1024 → 3:4
    assert [r["body"]["generationConfig"]["seed"] for r in gemini.requests] == [7, 8]


def test_the_returned_image_is_the_servers_cropped_to_the_request(gemini, references):
    """A 16:9 request gets 16:9; a square reply is centre-cropped, so the middle column survives."""
    reply = np.zeros((300, 300, 3), np.uint8)
    reply[:, 140:160] = (255, 0, 0)
    gemini.reply(image_reply(reply))

    (image,) = generate(make_request(references, width=640, height=360))

    assert gemini.requests[0]["body"]["generationConfig"]["imageConfig"]["aspectRatio"] == "16:9"
    pixels = np.asarray(image)
    assert image.size == (640, 360)
    assert pixels[180, 320, 0] > 200 and pixels[180, 320, 1] < 50  # centre stays red
    assert pixels[180, 10].max() < 30  # edges stay black


def test_a_tenant_key_overrides_the_environment_even_on_vertex_ai(gemini, references, monkeypatch):
    monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "true")
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "house-project")
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "us-central1")
    gemini.reply(image_reply())

    generate(make_request(references, credentials={"gemini_api_key": "tenant-key"}))

    (sent,) = gemini.requests
    assert sent["headers"]["x-goog-api-key"] == "tenant-key"
    assert sent["path"] == GENERATE_PATH  # the Developer API, not the deployment's Vertex project


def test_the_model_comes_from_params_then_settings(gemini, references, settings):
    gemini.reply(image_reply())
    settings.ALKEMY_GEMINI_MODEL = "gemini-house-image"
    settings.ALKEMY_GEMINI_ALLOWED_MODELS = ["gemini-tenant-image"]
    generate(make_request(references))
    request = make_request(references, params={"model": "gemini-tenant-image"})
    generate(request)

    assert [r["path"] for r in gemini.requests] == [
        "/v1beta/models/gemini-house-image:generateContent",
        "/v1beta/models/gemini-tenant-image:generateContent",
    ]
    assert request.usage["model"] == "gemini-tenant-image"


def test_a_model_off_the_allow_list_is_refused_without_a_call(gemini, references, settings):
    settings.ALKEMY_GEMINI_ALLOWED_MODELS = ["gemini-2.5-flash-image"]
    gemini.reply(image_reply())

    with pytest.raises(Exception) as caught:
        generate(make_request(references, params={"model": "tunedModels/not-ours"}))

    assert caught.value.code == "model_not_allowed"
    assert caught.value.details["field"] == "params.model"
    assert gemini.requests == []


def test_one_reference_and_no_negative_prompt(gemini, references):
    gemini.reply(image_reply())
    generate(make_request({"tom": references["tom"]}, negative_prompt=""))

    parts = parts_of(gemini.requests[0])
    assert len(parts) == 2 and inline_data(parts[0])[0] == "image/jpeg"
    assert "reference image shows one person" in parts[1]["text"]
    assert "Avoid" not in parts[1]["text"]


def test_cancelling_from_on_step_stops_before_the_next_call(gemini, references):
    gemini.reply(image_reply())

    def cancel(step, total):
        raise KeyboardInterrupt("cancelled")  # stands in for the job system's cancellation

    with pytest.raises(KeyboardInterrupt):
        generate(make_request(references, num_images=3), cancel)
    assert len(gemini.requests) == 1


# --- retries ----------------------------------------------------------------------------------------------


def test_429_is_retried_after_the_servers_retry_delay(gemini, references):
    gemini.reply(error_reply(429, "RESOURCE_EXHAUSTED", "Quota exceeded", [retry_info("0.3s")]), image_reply())
    request = make_request(references)

    (image,) = generate(request)

    assert image.size == (768, 1024)
    assert len(gemini.requests) == 2
    assert gemini.requests[1]["at"] - gemini.requests[0]["at"] >= 0.3  # backoff alone would be ~0.01 s
    assert request.usage == {
        "input_tokens": 1100, "output_tokens": 1290, "images": 1, "requests": 1, "model": MODEL,
        "key_source": "operator",
    }


def test_retry_after_header_is_honoured(gemini, references):
    """`Retry-After: 1` makes the wait at least 1 s (the sleep is recorded, not slept)."""
    gemini.reply(error_reply(503, "UNAVAILABLE", "overloaded", headers={"Retry-After": "1"}), image_reply())
    slept = []
    method = GeminiMethod(RetryPolicy(max_retries=2, backoff=0.01, max_wait=5, sleep=slept.append))

    method.generate(make_request(references))

    assert len(gemini.requests) == 2
    assert slept == [1.0]


def test_backoff_grows_exponentially_with_jitter(gemini, references):
    """With an injected sleep: retry k waits backoff * 2**k scaled into [0.5, 1]."""
    gemini.reply(error_reply(500, "INTERNAL", "oops"))
    slept = []
    method = GeminiMethod(RetryPolicy(max_retries=3, backoff=1.0, max_wait=100, sleep=slept.append))

    with pytest.raises(Exception) as caught:
        method.generate(make_request(references))

    assert caught.value.code == "provider_unavailable"
    assert len(gemini.requests) == 4 and len(slept) == 3
    for k, delay in enumerate(slept):
        assert 0.5 * 2**k <= delay <= 2**k


def test_503_every_time_is_provider_unavailable(gemini, references):
    gemini.reply(error_reply(503, "UNAVAILABLE", "The model is overloaded."))
    request = make_request(references)

    with pytest.raises(Exception) as caught:
        generate(request)

    error = caught.value
    assert error.code == "provider_unavailable"
    assert error.details["http_status"] == 503 and error.details["attempts"] == 3
    assert len(gemini.requests) == 3  # ALKEMY_GEMINI_MAX_RETRIES = 2
    assert request.usage["images"] == 0 and request.usage["requests"] == 0


def test_a_retry_delay_past_the_wait_cap_fails_at_once(gemini, references):
    gemini.reply(error_reply(429, "RESOURCE_EXHAUSTED", "Daily quota", [retry_info("30s")]))

    with pytest.raises(Exception) as caught:
        generate(make_request(references))

    assert caught.value.code == "provider_unavailable"
    assert caught.value.details["retry_after_seconds"] == 30
    assert len(gemini.requests) == 1


def test_timeouts_are_retried_then_provider_unavailable(gemini, references, settings):
    settings.ALKEMY_GEMINI_TIMEOUT_SECONDS = 0.3
    settings.ALKEMY_GEMINI_MAX_RETRIES = 1
    gemini.reply(Reply(delay=1.0, body=image_reply().body))

    with pytest.raises(Exception) as caught:
        generate(make_request(references))

    assert caught.value.code == "provider_unavailable"
    assert "timed out" in caught.value.message
    assert len(gemini.requests) == 2


def test_connection_refused_is_provider_unavailable(gemini, references, monkeypatch):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", f"http://127.0.0.1:{port}")

    with pytest.raises(Exception) as caught:
        generate(make_request(references))

    assert caught.value.code == "provider_unavailable"
    assert caught.value.details["attempts"] == 3


# --- failures that are not retried ------------------------------------------------------------------------


def test_image_safety_finish_reason_is_content_blocked_and_not_retried(gemini, references):
    rating = {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "HIGH", "blocked": True}
    gemini.reply(
        Reply(
            body={
                "candidates": [{"finishReason": "IMAGE_SAFETY", "index": 0, "safetyRatings": [rating]}],
                "usageMetadata": {"promptTokenCount": 1100, "totalTokenCount": 1100},
            }
        )
    )
    request = make_request(references)

    with pytest.raises(Exception) as caught:
        generate(request)

    error = caught.value
    assert error.code == "content_blocked"
    assert error.details["reason"] == "IMAGE_SAFETY"
    assert error.details["categories"] == ["HARM_CATEGORY_SEXUALLY_EXPLICIT"]
    assert len(gemini.requests) == 1
    # the blocked call is billed for its input
    assert request.usage == {
        "input_tokens": 1100, "output_tokens": 0, "images": 0, "requests": 1, "model": MODEL,
        "key_source": "operator",
    }


def test_prompt_block_reason_is_content_blocked_and_not_retried(gemini, references):
    gemini.reply(
        Reply(body={"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": {"promptTokenCount": 9}})
    )

    with pytest.raises(Exception) as caught:
        generate(make_request(references))

    assert caught.value.code == "content_blocked"
    assert caught.value.details["reason"] == "PROHIBITED_CONTENT"
    assert caught.value.details["source"] == "prompt"
    assert len(gemini.requests) == 1


def test_a_text_only_reply_is_no_image_with_the_models_text(gemini, references):
    text = "I can't generate images of that person."
    gemini.reply(
        Reply(
            body={
                "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
                "usageMetadata": USAGE,
            }
        )
    )

    with pytest.raises(Exception) as caught:
        generate(make_request(references))

    assert caught.value.code == "no_image"
    assert caught.value.details["text"] == text
    assert text in caught.value.message
    assert len(gemini.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        "<html>502 from a proxy, with status 200</html>",
        {"usageMetadata": USAGE},  # no candidates
        {"candidates": [{"content": {"parts": [{"text": "hi"}]}}], "usageMetadata": {"promptTokenCount": "many"}},
        {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "bm90IGEgcG5n"}}]}}]},
    ],
    ids=["not-json", "no-candidates", "wrong-shape", "not-an-image"],
)
def test_a_malformed_reply_is_provider_error(gemini, references, body):
    gemini.reply(Reply(body=body))

    with pytest.raises(Exception) as caught:
        generate(make_request(references))

    assert caught.value.code == "provider_error"
    assert len(gemini.requests) == 1


@pytest.mark.parametrize(
    "reply",
    [
        error_reply(
            400,
            "INVALID_ARGUMENT",
            "API key not valid. Please pass a valid API key.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ],
        ),
        error_reply(403, "PERMISSION_DENIED", "Permission denied: Consumer has been suspended."),
        error_reply(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
    ],
    ids=["400-api-key-invalid", "403", "401"],
)
def test_a_rejected_key_is_provider_auth_failed(gemini, references, reply):
    gemini.reply(reply)

    with pytest.raises(Exception) as caught:
        generate(make_request(references))

    assert caught.value.code == "provider_auth_failed"
    assert len(gemini.requests) == 1


def test_other_client_errors_are_provider_error_and_not_retried(gemini, references):
    gemini.reply(error_reply(404, "NOT_FOUND", "models/gemini-nope is not found for API version v1beta"))

    with pytest.raises(Exception) as caught:
        generate(make_request(references))

    assert caught.value.code == "provider_error"
    assert "not found" in caught.value.message
    assert len(gemini.requests) == 1


def test_no_key_anywhere_is_provider_auth_failed_without_a_call(gemini, references, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY")
    gemini.reply(image_reply())

    with pytest.raises(Exception) as caught:
        generate(make_request(references))

    assert caught.value.code == "provider_auth_failed"
    assert gemini.requests == []


# --- building blocks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "ratio"),
    [
        (1024, 1024, "1:1"),
        (832, 1248, "2:3"),
        (1248, 832, "3:2"),
        (768, 1024, "3:4"),
        (1024, 768, "4:3"),
        (896, 1120, "4:5"),
        (1120, 896, "5:4"),
        (720, 1280, "9:16"),
        (1920, 1080, "16:9"),
        (2560, 1080, "21:9"),
        (4000, 1000, "21:9"),  # wider than anything: the widest
        (1000, 4000, "9:16"),
        (1000, 1020, "1:1"),
    ],
)
def test_nearest_aspect_ratio(width, height, ratio):
    assert nearest_aspect_ratio(width, height) == ratio
    assert ratio in ASPECT_RATIOS


def test_references_without_quality_keep_their_order():
    faces = [
        ReferenceFace(np.zeros((8, 8, 3), np.uint8), (0, 0, 8, 8), np.zeros((5, 2)), np.zeros(4), "x") for _ in range(5)
    ]
    assert [id(f) for f in pick_references(faces)] == [id(f) for f in faces[:3]]


def test_prompt_template():
    assert build_prompt("a knight", "", 0) == "Description: a knight"
    assert build_prompt(" a knight ", " hats ", 2).splitlines()[1:] == ["Description: a knight", "Avoid: hats"]
