"""
The allocator tuning: which C{mallopt} calls the policy makes, how they are
applied and told, and (in a child process, since the setting cannot be
undone) that it keeps a freed 1 MB body's memory mapped for the next one.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.daemon.allocator import (
    DISABLED,
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    MMAP_THRESHOLD,
    NARROW,
    OPERATOR,
    TRIM_THRESHOLD,
    TUNED,
    AllocatorPlan,
    allocator_plan,
    libc_mallopt,
    tune_allocator,
)

DEFAULTS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
PLAN = AllocatorPlan(DEFAULTS, TUNED)

_CHILD = textwrap.dedent(
    """
    import resource, sys
    from oaiproxy.daemon.allocator import allocator_plan, libc_mallopt, tune_allocator

    if sys.argv[1] == "tuned":
        tune_allocator(allocator_plan({}), libc_mallopt())

    def eight_bodies():
        # Eight concurrent 1 MB bodies, written (so every page is touched),
        # then all freed, as bench/run.py (b) does to the daemon.
        bodies = [b"x" * (1 << 20) for _ in range(8)]
        del bodies

    eight_bodies()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        eight_bodies()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
    """
)


class AllocatorPlanTests(SynchronousTestCase):
    def test_default(self) -> None:
        """
        Left alone, a 64-bit process fixes the thresholds at glibc's own
        dynamic ceilings, the mmap threshold first: blocks under 32 MiB
        come from the heap, 64 MiB of free heap is kept.
        """
        self.assertEqual(allocator_plan({}, pointer_size=8), PLAN)
        self.assertEqual(DEFAULTS, ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20)))

    def test_disabled(self) -> None:
        """
        C{--no-malloc-tuning} sets nothing, so glibc's thresholds stay
        dynamic.
        """
        self.assertEqual(allocator_plan({}, enabled=False, pointer_size=8), AllocatorPlan((), DISABLED))

    def test_narrow(self) -> None:
        """
        A 32-bit process, whose glibc keeps no block over 512 KiB on the
        heap, sets nothing.
        """
        self.assertEqual(allocator_plan({}, pointer_size=4), AllocatorPlan((), NARROW))

    def test_operator_tunables(self) -> None:
        """
        An operator's own threshold, either way glibc reads it, is kept:
        nothing is set over it, and the plan names what decided it.
        """
        for environ, tunable in (
            ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}, "glibc.malloc.trim_threshold"),
            (
                {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2:glibc.malloc.mmap_threshold=65536"},
                "glibc.malloc.mmap_threshold",
            ),
            ({"GLIBC_TUNABLES": "glibc.malloc.top_pad=0"}, "glibc.malloc.top_pad"),
            ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"}, "glibc.malloc.mmap_max"),
            ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_"),
            ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "MALLOC_MMAP_THRESHOLD_"),
            ({"MALLOC_TOP_PAD_": "0"}, "MALLOC_TOP_PAD_"),
            ({"MALLOC_MMAP_MAX_": "0"}, "MALLOC_MMAP_MAX_"),
        ):
            self.assertEqual(allocator_plan(environ, pointer_size=8), AllocatorPlan((), OPERATOR, tunable), environ)

    def test_other_tunables(self) -> None:
        """
        Tunables that leave the thresholds dynamic (other malloc ones, other
        subsystems', a name that only starts like a threshold's) do not stop
        the tuning.
        """
        for environ in (
            {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2", "MALLOC_ARENA_MAX": "2"},
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"},
            {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold_x=1:x=glibc.malloc.top_pad"},
        ):
            self.assertEqual(allocator_plan(environ, pointer_size=8), PLAN, environ)


class TuneAllocatorTests(SynchronousTestCase):
    def test_applied(self) -> None:
        """
        Each setting is one C{mallopt} call, in order, and one log line
        says what was set.
        """
        calls: list[tuple[int, int]] = []
        with capturedLogs() as events:
            applied = tune_allocator(PLAN, lambda parameter, value: calls.append((parameter, value)) or 1)
        self.assertEqual(calls, list(DEFAULTS))
        self.assertEqual(applied, {"mmap_threshold": 32 << 20, "trim_threshold": 64 << 20})
        self.assertEqual(len(events), 1)
        self.assertEqual(
            formatEvent(events[0]),
            "Memory allocator: freed blocks kept for reuse (mmap_threshold=33554432, trim_threshold=67108864 bytes)",
        )
        self.assertEqual(events[0]["log_level"], LogLevel.info)
        self.assertEqual(events[0]["malloc_reason"], "tuned")

    def test_refused(self) -> None:
        """
        A value C{mallopt} refuses (it returns 0) stops the tuning there:
        the trim threshold is not set after a refused mmap threshold (it
        would stop glibc's adaptation for nothing), and a warning says so.
        """
        calls: list[int] = []
        with capturedLogs() as events:
            applied = tune_allocator(PLAN, lambda parameter, value: calls.append(parameter) or 0)
        self.assertEqual(applied, {})
        self.assertEqual(calls, [M_MMAP_THRESHOLD])
        self.assertEqual(
            formatEvent(events[0]),
            "Memory allocator: glibc refused mmap_threshold=33554432; the tuning stopped there "
            "(set before it: nothing)",
        )
        self.assertEqual(events[0]["log_level"], LogLevel.warn)
        self.assertEqual(events[0]["malloc_reason"], "refused")

    def test_refused_later(self) -> None:
        """
        A refusal after a setting took names what was set before it.
        """
        with capturedLogs() as events:
            applied = tune_allocator(PLAN, lambda parameter, value: int(parameter == M_MMAP_THRESHOLD))
        self.assertEqual(applied, {"mmap_threshold": 32 << 20})
        self.assertEqual(
            formatEvent(events[0]),
            "Memory allocator: glibc refused trim_threshold=67108864; the tuning stopped there "
            "(set before it: mmap_threshold)",
        )

    def test_left(self) -> None:
        """
        With nothing to set, C{mallopt} is not called and one line says
        why.
        """
        for plan, line in (
            (
                AllocatorPlan((), OPERATOR, "MALLOC_TOP_PAD_"),
                "Memory allocator: left as the operator tuned it (MALLOC_TOP_PAD_ is set)",
            ),
            (
                AllocatorPlan((), DISABLED),
                "Memory allocator: left at glibc's defaults (--no-malloc-tuning or OAIPROXY_MALLOC_TUNING=off)",
            ),
            (
                AllocatorPlan((), NARROW),
                "Memory allocator: left at its defaults (a 32-bit process cannot keep 1 MB blocks on the heap)",
            ),
        ):
            with capturedLogs() as events:
                applied = tune_allocator(plan, lambda parameter, value: self.fail("called"))
            self.assertEqual(applied, {})
            self.assertEqual([formatEvent(e) for e in events], [line])
            self.assertEqual(events[0]["malloc_reason"], plan.reason)

    def test_no_mallopt(self) -> None:
        """
        A C library without C{mallopt} (musl, macOS) is left alone, and the
        log says so.
        """
        with capturedLogs() as events:
            applied = tune_allocator(PLAN, None)
        self.assertEqual(applied, {})
        self.assertEqual(
            [formatEvent(e) for e in events], ["Memory allocator: left at its defaults (the C library has no mallopt)"]
        )


GLIBC = platform.libc_ver()[0] == "glibc"


class GlibcTests(SynchronousTestCase):
    if not GLIBC:
        skip = "glibc's allocator only"

    def test_found(self) -> None:
        """
        glibc's C{mallopt} is found.
        """
        self.assertIsNotNone(libc_mallopt())

    def faults(self, mode: str) -> int:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # The child gets glibc's and CPython's default allocators, whatever
        # the test run was given.
        ignored = ("GLIBC_TUNABLES", "PYTHONMALLOC")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ignored}
        env["PYTHONPATH"] = root
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, mode], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        return int(done.stdout)

    def test_freed_bodies_reused(self) -> None:
        """
        With glibc's defaults, eight freed 1 MB bodies are handed back to
        the kernel and the next eight fault every page in again (some
        2,000 minor faults); tuned, they reuse the memory already mapped.
        """
        self.assertGreater(self.faults("plain"), 1000)
        self.assertLess(self.faults("tuned"), 50)
