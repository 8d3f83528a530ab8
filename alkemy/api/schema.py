"""How the API appears in its OpenAPI schema, the contract the frontend generates its client from.

- `ApiKeyScheme`: our API key authentication as a security scheme.
- `AutoSchema` (`REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]`), for every view, present and future:
  * documents the error envelope `ErrorResponse` (`{"error": {code, message, details}}`) under
    each status code the operation can answer, derived from the operation's shape (does it take
    input, need credentials, address an object, change state). A view documents anything more
    with `extend_schema(responses={..., 422: error_response("...")})`; what a view declares wins,
    except that an error status declared as an untyped object (or without a body) is given the
    envelope too, since every error the API answers has it.
  * leaves `default` out of request bodies and says it in the description instead: generators
    such as openapi-typescript 7 turn a property with a `default` into a *required* property of
    a request component, so every caller would have to send `limit`, `num_images`, ...
"""

from __future__ import annotations

import json

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers
from rest_framework.permissions import AllowAny


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "alkemy.tenancy.authentication.ApiKeyAuthentication"
    name = "ApiKeyAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Api-Key ak_<prefix>_<secret>`: a key of one tenant (create_tenant --api-key or admin).",
        }


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="Stable snake_case code to act on, e.g. `validation_error`, `no_face`")
    message = serializers.CharField(help_text="What went wrong, for people")
    details = serializers.DictField(
        help_text="Context; for invalid input `field` (the first offending field) and `fields` (messages per field)"
    )


class ErrorResponseSerializer(serializers.Serializer):
    error = ErrorSerializer()


def error_response(description: str) -> OpenApiResponse:
    """An error status documented with the error envelope, for `extend_schema(responses={...})`."""
    return OpenApiResponse(ErrorResponseSerializer, description=description)


ERRORS = {
    400: "Invalid input: `validation_error` (`details.field` names the first offending field, "
    "`details.fields` has every message), `malformed_request`, or a more specific code.",
    401: "No credentials, or they were refused: `not_authenticated`, `authentication_failed`.",
    403: "Not allowed: `tenant_required`, `read_only_role`, `permission_denied`.",
    404: "No such object in the caller's tenant (other tenants' objects answer 404 too), or no such page.",
    409: "Conflicts with the current state, e.g. `slug_taken`, `idempotency_key_reused`, `lora_in_use`.",
    413: "`request_too_large`: the request body is over the server's limit.",
    415: "`unsupported_media_type`: send the body in the documented content type.",
    422: "Well-formed but unusable content, e.g. `no_face`, `invalid_image`, `invalid_lora`, `no_identity`.",
    429: "`rate_limited`: too many requests a minute for this API key (or user) or this tenant "
    "(`details.scope`: `key`, `user` or `tenant`; `details.limit_per_minute`); wait `Retry-After` seconds.",
}

RETRY_AFTER_HEADER = {
    "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before trying again."}
}

UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _is_free_form(response: dict) -> bool:
    """A documented response with no body, or only untyped JSON objects as its body."""
    content = response.get("content")
    if not content:
        return True
    return all(
        media.get("schema", {}).get("type") == "object" and "properties" not in media.get("schema", {})
        for media in content.values()
    )


class AutoSchema(SpectacularAutoSchema):
    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        responses = operation["responses"]
        for status_code, response in responses.items():
            # Every error body is the envelope (alkemy.api.errors): an error status a view declares
            # as a free-form object, or without a body, gets it with the view's description.
            if status_code[0] in "45" and _is_free_form(response):
                description = response.get("description") or ERRORS.get(int(status_code), "")
                responses[status_code] = self._get_response_for_code(error_response(description), status_code)
        for status_code in self.error_statuses(operation):
            responses.setdefault(
                str(status_code), self._get_response_for_code(error_response(ERRORS[status_code]), str(status_code))
            )
        if "429" in responses:
            if self._is_tenant_view() and "rate_limited" not in responses["429"].get("description", ""):
                responses["429"]["description"] += " Also " + ERRORS[429]
            responses["429"].setdefault("headers", {}).update(RETRY_AFTER_HEADER)
        operation["responses"] = dict(sorted(responses.items()))
        return operation

    def error_statuses(self, operation: dict) -> list[int]:
        """The error statuses an operation can answer, from its shape.

        400 when it takes input (a body, query or header parameters); 401/403 unless anyone may
        call it; 404 when it addresses an object (path parameters), names objects in its body,
        or is a page of a list; 409 when it changes state; 413, 415 and 422 when it takes a body.
        """
        parameters = operation.get("parameters", [])
        has_body = "requestBody" in operation
        takes_input = has_body or any(parameter["in"] in ("query", "header") for parameter in parameters)
        addresses_object = any(parameter["in"] == "path" for parameter in parameters)
        paginated = self._is_list_view() and self._get_paginator() is not None
        public = all(isinstance(permission, AllowAny) for permission in self.view.get_permissions())

        statuses = []
        if takes_input:
            statuses.append(400)
        if not public:
            statuses += [401, 403]
        if addresses_object or has_body or paginated:
            statuses.append(404)
        if self.method in UNSAFE_METHODS:
            statuses.append(409)
        if has_body:
            statuses += [413, 415, 422]
        if self._is_tenant_view():
            statuses.append(429)  # request rate limits (alkemy/api/throttling.py)
        return statuses

    def _is_tenant_view(self) -> bool:
        from alkemy.api.base import TenantScopedMixin

        return isinstance(self.view, TenantScopedMixin)

    def _get_serializer_field_meta(self, field, direction):
        meta = super()._get_serializer_field_meta(field, direction)
        if direction == "request" and "default" in meta:
            note = f"Default: `{json.dumps(meta.pop('default'))}`."
            meta["description"] = f"{meta['description']} {note}" if meta.get("description") else note
        return meta
