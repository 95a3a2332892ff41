"""A pytest plugin (loaded by conftest.py): a test still running after O2O_TEST_TIME_LIMIT seconds (default 600; the
slowest test takes about a minute here) is taken for a hang. The watchdog prints the test's id and every thread's
Python stack, then ends the session with exit code 70, so CI fails within minutes and says where, instead of
running into its time limit with no output. A hung process cannot be unwound from inside (a thread blocked in XLA
never returns to Python), hence the hard exit.

Why it exists: jaxlib 0.10.2's CPU LAPACK kernels split a batched decomposition over XLA's intra-op thread pool and
block until the pieces finish; when a program runs as many of them at once as the pool has threads (2 here), every
thread waits and none runs the pieces. A vmapped orthogonal init did this (see `orthogonal_kernel_init` in the
algorithm files) and a CI run sat idle until its limit."""
import faulthandler
import os
import sys
import threading

import pytest

TIME_LIMIT = float(os.environ.get("O2O_TEST_TIME_LIMIT", "600"))
EXIT_CODE = 70


def _hung(item):
    capture = item.config.pluginmanager.getplugin("capturemanager")
    try:  # write to the real stderr, not into the test's capture
        capture.suspend_global_capture(in_=True)
    except Exception:  # noqa: BLE001  (exiting anyway)
        pass
    sys.stderr.write(f"\n\nHANG: {item.nodeid} still running after {TIME_LIMIT:.0f} s "
                     f"(O2O_TEST_TIME_LIMIT); the Python stacks of every thread:\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(EXIT_CODE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Times each test's set-up, call and tear-down together."""
    timer = threading.Timer(TIME_LIMIT, _hung, (item,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
