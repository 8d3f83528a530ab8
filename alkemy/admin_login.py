"""Admin login throttling: too many failed logins for one username or from one address lock it out a while.

Each failed login takes a token from two buckets (`alkemy.ratelimit`, in PostgreSQL so every worker
counts): `login-user:<username>` (`ALKEMY_LOGIN_FAILURES_PER_USER`) and `login-ip:<REMOTE_ADDR>`
(`ALKEMY_LOGIN_FAILURES_PER_IP`), both refilling over `ALKEMY_LOGIN_FAILURE_WINDOW_SECONDS`. While
either is empty the login form refuses before checking the password (the right password too), saying
when to try again. A successful login clears its username's bucket. Behind a reverse proxy REMOTE_ADDR is
the proxy's: set the per-address limit with that in mind (or 0 to turn it off).
"""

from __future__ import annotations

import math

from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.exceptions import ValidationError

from alkemy import ratelimit


def login_limits(*, username: str, address: str) -> list[ratelimit.Limit]:
    window = float(settings.ALKEMY_LOGIN_FAILURE_WINDOW_SECONDS)
    name = username.strip().lower()[:200]
    return [
        ratelimit.Limit(f"login-user:{name}", settings.ALKEMY_LOGIN_FAILURES_PER_USER, window),
        ratelimit.Limit(f"login-ip:{address}", settings.ALKEMY_LOGIN_FAILURES_PER_IP, window),
    ]


class ThrottledAdminAuthenticationForm(AdminAuthenticationForm):
    error_messages = {
        **AdminAuthenticationForm.error_messages,
        "throttled": "Too many failed logins for this account or from this address. Try again in %(minutes)s minutes.",
    }

    def _limits(self) -> list[ratelimit.Limit]:
        address = self.request.META.get("REMOTE_ADDR", "") if self.request else ""
        return login_limits(username=self.cleaned_data.get("username") or "", address=address)

    def clean(self):
        refusals = ratelimit.peek(self._limits())
        if refusals:
            wait = max(refusal.retry_after for refusal in refusals)
            raise ValidationError(
                self.error_messages["throttled"], code="throttled", params={"minutes": max(1, math.ceil(wait / 60))}
            )
        cleaned = super().clean()
        ratelimit.reset([self._limits()[0].bucket])
        return cleaned

    def get_invalid_login_error(self):
        ratelimit.take(self._limits())  # a wrong username or password counts against both buckets
        return super().get_invalid_login_error()
