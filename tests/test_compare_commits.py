"""benchmarks/compare_commits.py: programs compared up to symbol names, a bad commit refused in one line."""
import subprocess
import sys

import jax
import jax.numpy as jnp

from conftest import ROOT
import compare_commits


def lowered_text(fn):
    return jax.jit(fn).lower(jnp.ones((4, 4))).as_text()


def test_renamed_functions_give_the_same_program_and_a_changed_computation_does_not():
    def helper(x):
        return jnp.tanh(x @ x)

    def renamed_helper(x):
        return jnp.tanh(x @ x)

    def step(x):
        return jax.jit(helper)(x) + 1.0

    def renamed_step(x):
        return jax.jit(renamed_helper)(x) + 1.0

    def changed(x):
        return jax.jit(helper)(x) + 2.0

    a, b, c = (compare_commits.normalized(lowered_text(f)) for f in (step, renamed_step, changed))
    assert lowered_text(step) != lowered_text(renamed_step)  # the symbols differ ...
    assert a == b  # ... not the program
    assert a != c


def test_unknown_commit_is_one_line_error():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_commits.py"), "no-such-ref", "."],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == ["error: 'no-such-ref' is not a commit of this repository (git rev-parse "
                                             "failed); pass a commit or `.`"]
