# -*- test-case-name: tests.test_validation -*-
"""
JSON parsing on the hot path.

Every request body is parsed once for validation and every answer once for
its usage, so the parser's speed is the proxy's.  C{orjson} parses typical
request bodies about 2.5 times faster than the standard library (see
C{bench/README.md}).  It is stricter in two ways: integers beyond 64 bits
and C{NaN}/C{Infinity} literals.  A body it refuses is parsed again by the
standard library, so the proxy accepts exactly what C{json} accepts and the
strictness costs only bodies that are unusual anyway.
"""

from __future__ import annotations

import json
from typing import Any, Union

try:
    import orjson
except ImportError:  # pragma: no cover - a platform without orjson wheels
    orjson = None  # type: ignore[assignment]

__all__ = ["loads"]


def loads(data: Union[bytes, str]) -> Any:
    """
    Parse JSON.

    @raise ValueError: for anything the standard library would refuse
        (including invalid UTF-8); C{RecursionError} for absurd nesting.
    """
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)
