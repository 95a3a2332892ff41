"""The CPU thread-pool deadlock of jaxlib 0.10.2's batched LAPACK kernels, and what the project does about it.

jaxlib 0.10.2 splits a batched LAPACK call (here: the QR of nn.initializers.orthogonal, batched by a vmapped
ensemble or by several seeds) over XLA's intra-op thread pool and blocks until the pieces finish. A program that
runs as many such calls at once as the pool has threads (2 on this machine) deadlocks: every thread waits, none
runs the pieces (gdb: both "tf_XLAEigen" threads in jax::ParallelBatchMap -> BlockingCounter::Wait under
lapack_sgeqrf_ffi). It hung the bench_updates test in a state init, where a CI run had sat until its time limit.
The algorithm files therefore build their orthogonal kernels without LAPACK (`orthogonal_kernel_init`, Householder
QR in jnp ops); test_official_ids checks that no program a script compiles calls LAPACK; tests/hang_watchdog.py
ends a hung test session with its stacks.
"""
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
WITH_ORTHOGONAL_INIT = ("cal_ql", "o2sac", "o2td3", "o2ppo")


@pytest.mark.parametrize("algo", WITH_ORTHOGONAL_INIT)
def test_orthogonal_kernel_init_is_flax_orthogonal_without_lapack(algo):
    """The same kernels as nn.initializers.orthogonal (same key, same normal draw; up to float round-off), for
    tall, wide, square and one-column kernels, also vmapped over an ensemble axis; and no LAPACK call."""
    init = importlib.import_module(algo).orthogonal_kernel_init
    key = jax.random.PRNGKey(7)
    for shape, scale in (((14, 256), 2 ** 0.5), ((256, 256), 1.0), ((256, 1), 1e-2), ((3, 17), 1.0)):
        ours = jax.jit(init(scale), static_argnums=1)(key, shape)
        np.testing.assert_allclose(ours, nn.initializers.orthogonal(scale)(key, shape), atol=1e-5 * max(scale, 1))
        small = min(shape)
        gram = ours.T @ ours if shape[0] >= shape[1] else ours @ ours.T
        np.testing.assert_allclose(gram / scale ** 2, np.eye(small), atol=2e-5)
    keys = jax.random.split(key, 4)
    batched = jax.jit(jax.vmap(lambda k: init(1.0)(k, (32, 32))))
    assert "lapack" not in batched.lower(keys).as_text()
    np.testing.assert_allclose(batched(keys), jax.vmap(lambda k: nn.initializers.orthogonal()(k, (32, 32)))(keys),
                               atol=1e-5)


def test_hang_watchdog_ends_a_hung_session(tmp_path):
    """A test whose processes use no CPU for O2O_TEST_IDLE_LIMIT seconds ends pytest with exit code 70, its id, its
    stack and the summary so far; a test that is slow but busy (here a child process spinning) is left alone."""
    (tmp_path / "test_stuck.py").write_text(textwrap.dedent("""
        import subprocess, sys, time
        def test_fine():
            pass
        def test_slow_but_busy():
            subprocess.run([sys.executable, "-c", "import time; t = time.time()\\nwhile time.time() - t < 6: pass"])
        def test_stuck():
            time.sleep(120)
    """))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(TESTS), "O2O_TEST_IDLE_LIMIT": "3"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "hang_watchdog", "-q", "-p", "no:cacheprovider",
                          str(tmp_path / "test_stuck.py")], capture_output=True, text=True, env=env, timeout=60,
                         cwd=tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 70, text
    assert "HANG: test_stuck.py::test_stuck used 0.0" in text and "(O2O_TEST_IDLE_LIMIT)" in text
    assert 'test_stuck.py", line 8 in test_stuck' in text  # where it hangs, from every thread's stack
    assert "\n2 passed, 1 failed, 0 skipped (the session ended at the hung test)" in text
