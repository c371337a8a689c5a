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

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.daemon.allocator import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    MMAP_THRESHOLD,
    TRIM_THRESHOLD,
    libc_mallopt,
    malloc_settings,
    tune_allocator,
)

DEFAULTS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))

_CHILD = textwrap.dedent(
    """
    import resource, sys
    from oaiproxy.daemon.allocator import libc_mallopt, malloc_settings, tune_allocator

    if sys.argv[1] == "tuned":
        tune_allocator(malloc_settings({}), libc_mallopt())

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


class MallocSettingsTests(SynchronousTestCase):
    def test_default(self) -> None:
        """
        Left alone, the thresholds are fixed at glibc's own dynamic
        ceilings: blocks under 32 MiB come from the heap, 64 MiB of free
        heap is kept.
        """
        self.assertEqual(malloc_settings({}), DEFAULTS)
        self.assertEqual(dict(DEFAULTS), {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20})

    def test_operator_tunables(self) -> None:
        """
        An operator's own malloc tuning, either way glibc reads it, is
        kept: nothing is set over it.
        """
        for environ in (
            {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
            {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2:glibc.malloc.arena_max=2"},
            {"MALLOC_TRIM_THRESHOLD_": "131072"},
            {"MALLOC_MMAP_THRESHOLD_": "131072"},
            {"MALLOC_TOP_PAD_": "0"},
        ):
            self.assertEqual(malloc_settings(environ), (), environ)

    def test_other_tunables(self) -> None:
        """
        Tunables of something other than malloc do not stop the tuning.
        """
        self.assertEqual(
            malloc_settings({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2", "MALLOC_ARENA_MAX": "2"}), DEFAULTS
        )


class TuneAllocatorTests(SynchronousTestCase):
    def test_applied(self) -> None:
        """
        Each setting is one C{mallopt} call, in order, and one log line
        says what was set.
        """
        calls: list[tuple[int, int]] = []
        with capturedLogs() as events:
            applied = tune_allocator(DEFAULTS, lambda parameter, value: calls.append((parameter, value)) or 1)
        self.assertEqual(calls, list(DEFAULTS))
        self.assertEqual(applied, {"mmap_threshold": 32 << 20, "trim_threshold": 64 << 20})
        self.assertEqual(len(events), 1)
        self.assertEqual(
            formatEvent(events[0]),
            "Memory allocator: freed blocks kept for reuse (mmap_threshold=33554432, trim_threshold=67108864)",
        )
        self.assertEqual(events[0]["malloc_refused"], [])

    def test_refused(self) -> None:
        """
        A value C{mallopt} refuses (it returns 0) is named in the log line,
        and the others still apply.
        """
        with capturedLogs() as events:
            applied = tune_allocator(DEFAULTS, lambda parameter, value: int(parameter != M_MMAP_THRESHOLD))
        self.assertEqual(applied, {"trim_threshold": 64 << 20})
        self.assertEqual(
            formatEvent(events[0]),
            "Memory allocator: freed blocks kept for reuse (trim_threshold=67108864); refused: mmap_threshold",
        )
        self.assertEqual(events[0]["malloc_refused"], ["mmap_threshold"])

    def test_operator_tuned(self) -> None:
        """
        With nothing to set, C{mallopt} is not called and the log says the
        operator's tuning stands.
        """
        with capturedLogs() as events:
            applied = tune_allocator((), lambda parameter, value: self.fail("called"))
        self.assertEqual(applied, {})
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["Memory allocator: left as the operator tuned it (glibc.malloc tunables are set)"],
        )

    def test_no_mallopt(self) -> None:
        """
        A C library without C{mallopt} (musl, macOS) is left alone, and the
        log says so.
        """
        with capturedLogs() as events:
            applied = tune_allocator(DEFAULTS, None)
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
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
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
