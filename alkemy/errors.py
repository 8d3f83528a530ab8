"""Errors users can act on: a stable code, a message, and the offending field when there is one.

Services raise these; the API renders them as `{"error": {"code", "message", "details"}}`,
and admin views show the message.
"""

from __future__ import annotations

from typing import Any


class AlkemyError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        details: dict[str, Any] | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status_code:
            self.status_code = status_code
        self.field = field
        self.details = dict(details or {})
        if field:
            self.details.setdefault("field", field)


class NotFound(AlkemyError):
    status_code = 404
    code = "not_found"


class Conflict(AlkemyError):
    status_code = 409
    code = "conflict"


class Unprocessable(AlkemyError):
    """Well-formed request whose content cannot be used (no face in the photo, corrupt image...)."""

    status_code = 422
    code = "unprocessable"


class PermissionDenied(AlkemyError):
    status_code = 403
    code = "permission_denied"
