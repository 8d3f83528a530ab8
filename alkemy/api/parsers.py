"""The API's JSON parser: what cannot be stored or echoed back is a 400, never a 500 further down.

DRF's own parser turns `ValueError` into a 400 but lets `RecursionError` (a few thousand `[`) escape as a
500, and accepts what PostgreSQL and UTF-8 cannot hold: `1e400` parses to infinity (jsonb and most numeric
columns refuse it) and a `"\\ud800"` escape to a lone surrogate (no UTF-8 encoding, so any save fails).
This parser refuses all of them with `ParseError`, rendered as 400 `malformed_request`.
"""

from __future__ import annotations

import math
import re

from rest_framework import parsers
from rest_framework.exceptions import ParseError

#: far above any body our endpoints take; deep enough bodies would recurse in serializers and json.dumps
MAX_JSON_DEPTH = 64

_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels.") from None
        problem = json_problem(data, max_depth=MAX_JSON_DEPTH)
        if problem:
            raise ParseError(f"JSON parse error - {problem}.")
        return data


def json_problem(value, *, max_depth: int) -> str | None:
    """Why `value` (parsed JSON) cannot be stored as it is, or None: depth, lone surrogates, non-finite numbers.

    Iterative, so a hostile document cannot exhaust the stack here either.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "numbers must be finite"
        elif isinstance(item, (dict, list)):
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
    return None
