"""The two refusals of admission: over budget (402) and too many jobs in flight (429)."""

from __future__ import annotations

from alkemy.errors import AlkemyError


class BudgetExceeded(AlkemyError):
    """402: the job's estimate does not fit the tenant's (or the method's) monthly limit.
    `details`: spent, reserved, limit, estimate, remaining (USD strings), period, method when per method."""

    status_code = 402
    code = "budget_exceeded"


class TooManyJobs(AlkemyError):
    """429: the tenant has as many jobs queued or in flight as its limits allow. The API sends `Retry-After`."""

    status_code = 429
    code = "too_many_jobs"

    def __init__(self, message: str, *, retry_after: int, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after
        self.details.setdefault("retry_after_seconds", retry_after)
