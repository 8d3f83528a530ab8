"""Token buckets in PostgreSQL, shared by every process that uses the database (all gunicorn workers).

A bucket named e.g. `key:42` holds up to `capacity` tokens and refills `capacity` tokens per `period`
seconds. `take()` takes one token from each named bucket in ONE statement (an upsert: the row lock
makes concurrent takers from any process count exactly), returns which buckets refused and how long
until a token is back. `peek()` reads without taking (admin login: is this name locked out?).

The table (`alkemy_rate_limit`, UNLOGGED: no WAL, emptied after a crash, which only forgives the
counts) holds one row per bucket; a row idle for a whole period is a full bucket, so such rows are
deleted now and then (`prune`). Times are the database's (`statement_timestamp()`), so workers on
several machines agree without synchronised clocks.

Used by `alkemy.api.throttling` (per API key and per tenant) and `alkemy.admin_login` (failed logins).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from django.db import connections

TABLE = "alkemy_rate_limit"

#: one call in this many also deletes idle rows
PRUNE_ONE_IN = 1000


@dataclass(frozen=True)
class Limit:
    bucket: str
    capacity: float  # tokens (requests, failures) per period, also the burst
    period: float  # seconds to refill `capacity` tokens


@dataclass(frozen=True)
class Refusal:
    bucket: str
    retry_after: int  # whole seconds until one token is back


_REFILLED = (
    "LEAST(EXCLUDED.capacity, b.tokens + GREATEST(0, EXTRACT(EPOCH FROM statement_timestamp() - b.updated_at))"
    " * EXCLUDED.capacity / EXCLUDED.period)"
)

_TAKE = f"""
INSERT INTO {TABLE} AS b (bucket, tokens, capacity, period, updated_at, refused)
VALUES {{values}}
ON CONFLICT (bucket) DO UPDATE SET
    tokens = CASE WHEN {_REFILLED} >= 1 THEN {_REFILLED} - 1 ELSE {_REFILLED} END,
    refused = {_REFILLED} < 1,
    capacity = EXCLUDED.capacity,
    period = EXCLUDED.period,
    updated_at = statement_timestamp()
RETURNING bucket, tokens, capacity, period, refused
"""
_VALUE = "(%s, %s::double precision - 1, %s, %s, statement_timestamp(), %s::double precision < 1)"


def _retry_after(tokens: float, capacity: float, period: float) -> int:
    return max(1, math.ceil((1 - tokens) * period / capacity))


def take(limits: Sequence[Limit], *, using: str = "default") -> list[Refusal]:
    """Take a token from every bucket of `limits`; the buckets that had none (empty: allowed).

    Buckets are locked in name order, so two takers never wait on each other in a cycle. A bucket that
    refuses keeps its (fractional) tokens; the others have still spent theirs.
    """
    limits = sorted((limit for limit in limits if limit.capacity > 0), key=lambda limit: limit.bucket)
    if not limits:
        return []
    params: list = []
    for limit in limits:
        params += [limit.bucket, limit.capacity, limit.capacity, limit.period, limit.capacity]
    with connections[using].cursor() as cursor:
        cursor.execute(_TAKE.format(values=", ".join([_VALUE] * len(limits))), params)
        rows = cursor.fetchall()
        if random.randrange(PRUNE_ONE_IN) == 0:
            prune(cursor)
    return [
        Refusal(bucket, _retry_after(tokens, capacity, period))
        for bucket, tokens, capacity, period, refused in rows
        if refused
    ]


def peek(limits: Sequence[Limit], *, using: str = "default") -> list[Refusal]:
    """The buckets of `limits` that are empty now, without taking anything."""
    by_name = {limit.bucket: limit for limit in limits if limit.capacity > 0}
    if not by_name:
        return []
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT bucket, tokens + GREATEST(0, EXTRACT(EPOCH FROM statement_timestamp() - updated_at))"
            f" * capacity / period FROM {TABLE} WHERE bucket = ANY(%s)",
            [list(by_name)],
        )
        rows = cursor.fetchall()
    refusals = []
    for bucket, tokens in rows:
        limit = by_name[bucket]
        if tokens < 1:
            refusals.append(Refusal(bucket, _retry_after(tokens, limit.capacity, limit.period)))
    return refusals


def reset(buckets: Sequence[str], *, using: str = "default") -> None:
    """Forget buckets (full again): a successful login clears its user's failures."""
    with connections[using].cursor() as cursor:
        cursor.execute(f"DELETE FROM {TABLE} WHERE bucket = ANY(%s)", [list(buckets)])


def prune(cursor) -> None:
    """Delete rows idle for a whole period: they are full buckets, the same as no row."""
    cursor.execute(f"DELETE FROM {TABLE} WHERE updated_at < statement_timestamp() - period * interval '1 second'")
