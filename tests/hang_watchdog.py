"""A pytest plugin (loaded by conftest.py) that ends a hung test session with the stacks of the hang.

A test is taken for hung when its process and every process it started used (almost) no CPU for
O2O_TEST_IDLE_LIMIT seconds (default 300): a deadlock sits idle, while a test that is merely slow (compiling on a
loaded machine) keeps using CPU and is left alone. A backstop ends a test still running after O2O_TEST_TIME_LIMIT
seconds (default 2700) whatever its CPU use. On a hang the watchdog prints the test's id, every thread's Python stack
and the session's summary so far ("N passed, M failed", the hung test counted as failed), then exits with code 70: a
hung process cannot be unwound from inside (a thread blocked in XLA never returns to Python), hence the hard exit.

Why it exists: jaxlib 0.10.2's CPU LAPACK kernels split a batched decomposition over XLA's intra-op thread pool and
block until the pieces finish; when a program runs as many of them at once as the pool has threads (2 here), every
thread waits and none runs the pieces. A vmapped orthogonal init did this (see `orthogonal_kernel_init` in the
algorithm files) and a CI run sat idle until its limit."""
import faulthandler
import os
import sys
import threading
import time

import pytest

IDLE_LIMIT = float(os.environ.get("O2O_TEST_IDLE_LIMIT", "300"))
TIME_LIMIT = float(os.environ.get("O2O_TEST_TIME_LIMIT", "2700"))
IDLE_CPU = 0.02  # CPU seconds per wall second below which the test's processes count as idle
EXIT_CODE = 70
_outcomes = {"passed": 0, "failed": 0, "skipped": 0}
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class TreeCPU:
    """CPU seconds used by this process and its descendants (Linux /proc; elsewhere this process only). A finished
    descendant keeps the CPU it was last seen with, so the total never goes down."""

    def __init__(self):
        self.seen = {}

    def __call__(self) -> float:
        own = time.process_time()
        try:
            stats = {}
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/stat") as f:
                            fields = f.read().rsplit(")", 1)[1].split()
                    except OSError:
                        continue
                    stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
        except OSError:
            return own
        tree, frontier = set(), {os.getpid()}
        while frontier:
            tree |= frontier
            frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier and pid not in tree}
        for pid in tree - {os.getpid()}:
            self.seen[pid] = max(self.seen.get(pid, 0.0), stats[pid][1])
        return own + sum(self.seen.values())


def _hung(item, why):
    capture = item.config.pluginmanager.getplugin("capturemanager")
    try:  # write to the real stderr, not into the test's capture
        capture.suspend_global_capture(in_=True)
    except Exception:  # noqa: BLE001  (exiting anyway)
        pass
    sys.stderr.write(f"\n\nHANG: {item.nodeid} {why}; the Python stacks of every thread:\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    counts = {**_outcomes, "failed": _outcomes["failed"] + 1}
    sys.stderr.write(f"\n{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
                     f"(the session ended at the hung test)\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)


def _watch(item, done: threading.Event):
    cpu, start = TreeCPU(), time.monotonic()
    window = [(start, cpu())]  # (wall, cpu) samples of the last IDLE_LIMIT seconds
    while not done.wait(min(5.0, IDLE_LIMIT / 10)):
        now, used = time.monotonic(), cpu()
        window.append((now, used))
        while len(window) > 2 and now - window[1][0] >= IDLE_LIMIT:
            window.pop(0)
        t0, c0 = window[0]
        if now - t0 >= IDLE_LIMIT and used - c0 < IDLE_CPU * (now - t0):
            _hung(item, f"used {used - c0:.2f} s of CPU in the last {now - t0:.0f} s (O2O_TEST_IDLE_LIMIT)")
        if now - start >= TIME_LIMIT:
            _hung(item, f"still running after {TIME_LIMIT:.0f} s (O2O_TEST_TIME_LIMIT)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Watches each test's set-up, call and tear-down together."""
    done = threading.Event()
    threading.Thread(target=_watch, args=(item, done), daemon=True).start()
    try:
        yield
    finally:
        done.set()


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _outcomes[report.outcome] = _outcomes.get(report.outcome, 0) + 1
