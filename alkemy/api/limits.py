"""Upload bodies larger than their endpoint accepts are refused from the Content-Length, before a byte is read.

Django streams a multipart upload to a temporary file and DRF only then hands it to the view, so a 2 GB
"photo" used to be read (and written to disk) in full before the service refused it. An API view that takes
uploads declares its `upload_limit`; this middleware answers with that limit's refusal (the same 422 code
the service gives a file over the limit) when the declared length exceeds the file limit plus room for the
multipart envelope. A body without a Content-Length is never read by Django (WSGI gives it zero bytes), and
JSON bodies are capped by DATA_UPLOAD_MAX_MEMORY_SIZE (413, alkemy/api/errors.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.http import JsonResponse

from alkemy.api.errors import error_body

#: room for the multipart boundaries, part headers and small form fields around the file
MULTIPART_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class UploadLimit:
    setting: str  #: the setting holding the largest accepted file, in bytes (read per request)
    code: str  #: the error code the service gives a file over it
    field: str  #: the multipart field of the file
    what: str
    status: int = 422

    def file_bytes(self) -> int:
        return getattr(settings, self.setting)

    def refusal(self, content_length: int) -> JsonResponse:
        limit = self.file_bytes()
        body = error_body(
            self.code,
            f"The request is {content_length} bytes; {self.what} may be at most {limit} bytes.",
            {"field": self.field, "max_bytes": limit, "content_length": content_length},
        )
        response = JsonResponse(body, status=self.status)
        response["Connection"] = "close"  # the unread body must not be taken for the next request
        return response


PHOTO_UPLOAD = UploadLimit("ALKEMY_MAX_UPLOAD_BYTES", "image_too_large", "image", "a photo")
LORA_UPLOAD = UploadLimit("ALKEMY_MAX_LORA_BYTES", "invalid_lora", "file", "a LoRA file")
IMPORT_UPLOAD = UploadLimit("ALKEMY_IMPORT_MAX_ARCHIVE_BYTES", "archive_too_large", "archive", "an archive", 413)


class RequestBodyLimitMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        limit = getattr(getattr(view_func, "cls", None), "upload_limit", None)
        if limit is None:
            return None
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length <= limit.file_bytes() + MULTIPART_SLACK_BYTES:
            return None
        return limit.refusal(length)
