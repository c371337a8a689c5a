# -*- test-case-name: tests.daemon.test_allocator -*-
"""
Keep the memory of a freed large body for the next one.

A 1 MB request body lives in a handful of 1 MB blocks: the body as read,
the parsed document, the body sent on.  With glibc's defaults each is
handed back to the kernel when freed (an C{mmap} block is unmapped; a
heap top over twice the largest such block is trimmed), and the next
request's blocks are mapped again, one zeroed page (a minor fault) at a
time: some 180 to 390 faults a request, a third of the proxy's CPU spent
in the kernel and C{orjson.loads} three times slower than on memory it
had touched before (C{bench/run.py} (b), C{bench/README.md}).

L{malloc_settings} is the policy: the ceilings glibc's own dynamic
thresholds would reach (blocks under 32 MiB come from the heap, and up to
64 MiB of free heap is kept), fixed from the start instead of learnt and
unlearnt, unless the operator tuned the allocator already.
L{tune_allocator} applies them through C{mallopt}, where there is one.
The cost is memory a busy proxy would take again anyway: a few MB of peak
RSS under eight concurrent 1 MB requests, none on an idle one.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Mapping, Optional

from twisted.logger import Logger

log = Logger()

#: C{mallopt} parameters, from glibc's C{malloc.h}.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: glibc's largest dynamic mmap threshold on a 64-bit host
#: (C{DEFAULT_MMAP_THRESHOLD_MAX}); it refuses a larger one.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Twice that, the trim threshold glibc pairs with it.
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

_NAMES = {M_MMAP_THRESHOLD: "mmap_threshold", M_TRIM_THRESHOLD: "trim_threshold"}

#: The environment an operator tunes glibc's allocator with; glibc read it
#: before Python started, and it wins over this module's defaults.
_OPERATOR_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)

Mallopt = Callable[[int, int], int]


def malloc_settings(environ: Mapping[str, str]) -> tuple[tuple[int, int], ...]:
    """
    The C{mallopt} calls to make, as (parameter, value) pairs: none when
    the operator set any of glibc's malloc tunables (C{GLIBC_TUNABLES}
    with a C{glibc.malloc.} entry, or a C{MALLOC_*_} variable), since
    theirs are the ones to keep.
    """
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return ()
    if any(name in environ for name in _OPERATOR_VARIABLES):
        return ()
    return ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def libc_mallopt() -> Optional[Mallopt]:
    """
    The C library's C{mallopt}, or L{None} where there is none (musl,
    macOS): those allocators are left as they are.
    """
    try:
        function = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


def tune_allocator(settings: tuple[tuple[int, int], ...], mallopt: Optional[Mallopt]) -> dict[str, int]:
    """
    Make each C{mallopt} call of C{settings}, and say once in the log what
    took (C{mallopt} returns 0 for a value it refuses, such as a 32 MiB
    threshold on a 32-bit host) or why nothing was set.

    @return: the settings that took, by glibc's tunable name.
    """
    if not settings:
        log.info("Memory allocator: left as the operator tuned it (glibc.malloc tunables are set)")
        return {}
    if mallopt is None:
        log.info("Memory allocator: left at its defaults (the C library has no mallopt)")
        return {}
    applied = {
        _NAMES.get(parameter, str(parameter)): value for parameter, value in settings if mallopt(parameter, value)
    }
    refused = sorted({_NAMES.get(parameter, str(parameter)) for parameter, _ in settings} - applied.keys())
    log.info(
        "Memory allocator: freed blocks kept for reuse ({applied}){refusal}",
        applied=", ".join(f"{name}={value}" for name, value in applied.items()) or "none",
        refusal=f"; refused: {', '.join(refused)}" if refused else "",
        malloc_applied=applied,
        malloc_refused=refused,
    )
    return applied
