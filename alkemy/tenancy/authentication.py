"""DRF authentication: `Authorization: Api-Key ak_<prefix>_<secret>`."""

from __future__ import annotations

from rest_framework import authentication, exceptions

from alkemy.tenancy.models import ApiKey
from alkemy.tenancy.services import ApiKeyRejected, api_key_authenticate

KEYWORD = "Api-Key"


class ApiKeyPrincipal:
    """request.user for API-key requests: the key acts for its tenant, not for a person."""

    is_authenticated = True
    is_anonymous = False
    is_active = True
    is_staff = False
    is_superuser = False
    pk = None
    id = None

    def __init__(self, api_key: ApiKey) -> None:
        self.api_key = api_key
        self.tenant = api_key.tenant

    def __str__(self) -> str:
        return f"api-key:{self.api_key.prefix}"


class ApiKeyFailed(exceptions.AuthenticationFailed):
    def __init__(self, rejected: ApiKeyRejected) -> None:
        super().__init__(rejected.message, code=rejected.code)


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1").strip()
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme.lower() != KEYWORD.lower():
            if scheme.lower() in {"bearer", "token"}:
                raise ApiKeyFailed(ApiKeyRejected("Use 'Authorization: Api-Key <key>'.", code="malformed_api_key"))
            return None  # another scheme: let the next authenticator try
        raw_key = raw_key.strip()
        if not raw_key or " " in raw_key:
            raise ApiKeyFailed(ApiKeyRejected("The API key is missing or malformed.", code="malformed_api_key"))
        try:
            api_key = api_key_authenticate(raw_key)
        except ApiKeyRejected as rejected:
            raise ApiKeyFailed(rejected) from None
        return ApiKeyPrincipal(api_key), api_key

    def authenticate_header(self, request) -> str:
        return KEYWORD
