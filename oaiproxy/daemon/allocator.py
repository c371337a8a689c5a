# -*- test-case-name: tests.daemon.test_allocator -*-
"""
Keep the memory of a freed large body for the next one.

A 1 MB request body lives in a handful of 1 MB blocks: the body as read,
the parsed document, the body sent on.  With glibc's defaults each is
handed back to the kernel when freed (an C{mmap} block is unmapped; a
heap top over twice the largest such block is trimmed), and the next
request's blocks are mapped again, one zeroed page (a minor fault) at a
time: some 160 to 390 faults a request, a third of the proxy's CPU spent
in the kernel and C{orjson.loads} three times slower than on memory it
had touched before (C{bench/run.py} (b), C{bench/README.md}).

L{allocator_plan} is the policy: the ceilings glibc's own dynamic
thresholds rise towards (blocks under 32 MiB come from the heap, and up
to 64 MiB of free heap is kept), fixed from the start instead of reached
one freed block at a time, unless the operator turned the tuning off or
tuned those thresholds already.  L{tune_allocator} applies the plan
through C{mallopt}, where there is one.

The cost is the heap a burst leaves: the proxy keeps what its busiest
moment took (some 18 MB more RSS after eight concurrent 1 MB requests
than glibc's defaults leave), to serve the next burst without faulting
it in again.  Setting either threshold also stops glibc's own adaptation,
which is why the way back to glibc's behaviour is not to set a threshold
but C{--no-malloc-tuning}.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
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

#: The tuning, in the order it is applied: the mmap threshold first, the
#: one a 1 MB block needs, so that a refusal of it leaves glibc's dynamic
#: thresholds untouched.
SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))

_NAMES = {M_MMAP_THRESHOLD: "mmap_threshold", M_TRIM_THRESHOLD: "trim_threshold"}

#: The thresholds an operator may have tuned, by their C{GLIBC_TUNABLES}
#: name and their older environment variable.  glibc read them before
#: Python started; setting any one of them fixes glibc's thresholds, and
#: the operator's values win over this module's.
_OPERATOR_TUNABLES = (
    ("glibc.malloc.mmap_threshold", "MALLOC_MMAP_THRESHOLD_"),
    ("glibc.malloc.trim_threshold", "MALLOC_TRIM_THRESHOLD_"),
    ("glibc.malloc.top_pad", "MALLOC_TOP_PAD_"),
    ("glibc.malloc.mmap_max", "MALLOC_MMAP_MAX_"),
)

#: Why a plan sets nothing.
TUNED, DISABLED, OPERATOR, NARROW = "tuned", "disabled", "operator", "32-bit"

Mallopt = Callable[[int, int], int]


@dataclass(frozen=True)
class AllocatorPlan:
    """
    What to do to the allocator.

    @ivar settings: the C{mallopt} calls to make, as (parameter, value)
        pairs, in order; empty when nothing is to be set.
    @ivar reason: L{TUNED} when there are settings, else why not:
        L{DISABLED}, L{OPERATOR} or L{NARROW}.
    @ivar tunable: with L{OPERATOR}, the operator's setting that decided it.
    """

    settings: tuple[tuple[int, int], ...]
    reason: str
    tunable: str = ""


def operator_tunable(environ: Mapping[str, str]) -> Optional[str]:
    """
    The first of glibc's threshold tunables the operator set, by the name
    they set it under, or L{None}.  C{GLIBC_TUNABLES} is C{name=value}
    entries joined by C{:}; other malloc tunables (C{arena_max},
    C{tcache_count}) leave the thresholds dynamic and do not count.
    """
    given = {
        name.strip() for name, _, _ in (entry.partition("=") for entry in environ.get("GLIBC_TUNABLES", "").split(":"))
    }
    for tunable, variable in _OPERATOR_TUNABLES:
        if tunable in given:
            return tunable
        if variable in environ:
            return variable
    return None


def allocator_plan(
    environ: Mapping[str, str], enabled: bool = True, pointer_size: int = ctypes.sizeof(ctypes.c_void_p)
) -> AllocatorPlan:
    """
    The tuning for a process with this environment.

    @param enabled: C{False} for C{--no-malloc-tuning}.
    @param pointer_size: the process's pointer width in bytes: a 32-bit
        glibc's mmap threshold stops at 512 KiB, below a 1 MB body, so
        there is nothing to gain there.
    """
    if not enabled:
        return AllocatorPlan((), DISABLED)
    tunable = operator_tunable(environ)
    if tunable is not None:
        return AllocatorPlan((), OPERATOR, tunable)
    if pointer_size < 8:
        return AllocatorPlan((), NARROW)
    return AllocatorPlan(SETTINGS, TUNED)


def libc_mallopt() -> Optional[Mallopt]:
    """
    The C library's C{mallopt}, or L{None} where there is none (musl,
    macOS, Windows): those allocators are left as they are.
    """
    try:
        function = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


_LEFT = {
    DISABLED: "Memory allocator: left at glibc's defaults (--no-malloc-tuning or OAIPROXY_MALLOC_TUNING=off)",
    OPERATOR: "Memory allocator: left as the operator tuned it ({malloc_tunable} is set)",
    NARROW: "Memory allocator: left at its defaults (a 32-bit process cannot keep 1 MB blocks on the heap)",
}


def tune_allocator(plan: AllocatorPlan, mallopt: Optional[Mallopt]) -> dict[str, int]:
    """
    Make the plan's C{mallopt} calls in order, stopping at the first that
    C{mallopt} refuses (it returns 0), and say once in the log what was
    set or why nothing was.

    @return: the settings that took, by glibc's tunable name.
    """
    if plan.reason != TUNED:
        log.info(_LEFT[plan.reason], malloc_reason=plan.reason, malloc_tunable=plan.tunable, malloc_applied={})
        return {}
    if mallopt is None:
        log.info(
            "Memory allocator: left at its defaults (the C library has no mallopt)",
            malloc_reason="no-mallopt",
            malloc_applied={},
        )
        return {}
    applied: dict[str, int] = {}
    for parameter, value in plan.settings:
        name = _NAMES.get(parameter, str(parameter))
        if not mallopt(parameter, value):
            log.warn(
                "Memory allocator: glibc refused {malloc_refused}={malloc_value}; "
                "the tuning stopped there (set before it: {malloc_set})",
                malloc_reason="refused",
                malloc_refused=name,
                malloc_value=value,
                malloc_set=", ".join(applied) or "nothing",
                malloc_applied=applied,
            )
            return applied
        applied[name] = value
    log.info(
        "Memory allocator: freed blocks kept for reuse "
        "(mmap_threshold={malloc_mmap_threshold}, trim_threshold={malloc_trim_threshold} bytes)",
        malloc_reason=TUNED,
        malloc_mmap_threshold=applied.get("mmap_threshold"),
        malloc_trim_threshold=applied.get("trim_threshold"),
        malloc_applied=applied,
    )
    return applied
