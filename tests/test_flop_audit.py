"""FLOP audit (benchmarks/flop_audit.py): every algorithm's offline update computes the matrix products its algorithm
needs (the script's analytic minimum) plus only the excess the script lists and explains, so a change that adds an
unneeded product fails here. Lowering only (no compilation): ~20-30 s for the seven on one core."""
import jax
import jax.numpy as jnp
import pytest

import flop_audit as F


@pytest.mark.parametrize("name", sorted(F.AUDITS))
def test_matmul_flops_within_minimum_and_explained_excess(name):
    r = F.audit(name)
    minimum, measured, explained = r["minimum_flops"], r["matmul_flops"], r["explained_excess_flops"]
    excess = "; ".join(f"{x['item']}: {x['flops'] / 1e6:.2f} MFLOP" for x in r["excess"]) or "none"
    assert measured <= minimum * (1 + F.TOLERANCE) + explained, (
        f"{name}: {measured / 1e6:.2f} MFLOP of matrix products, more than the minimum {minimum / 1e6:.2f} plus the "
        f"explained excess {explained / 1e6:.2f} ({excess}): a product the algorithm does not need?")
    # the minimum must stay a lower bound of what the update computes (else the analytic list is wrong)
    assert measured >= minimum * (1 - F.TOLERANCE), f"{name}: measured {measured} < minimum {minimum}"
    assert r["xla_flops"] >= measured * (1 - F.TOLERANCE)  # XLA's total includes the products
    for x in r["excess"]:
        assert x["flops"] > 0 and x["why"]


def test_dot_counter_calls_and_conditional_branches():
    """A private function's dots count once per call; a lax.cond counts its costliest branch, marked conditional."""
    layer = jax.jit(lambda x, w: x @ w)  # a private function named @"<lambda>" (a quoted symbol)

    def f(pred, x, w):
        y = layer(layer(x, w), w)  # 2 calls: 2 x 2*8*16*16
        return jax.lax.cond(pred, lambda v: (v @ w) @ w, lambda v: v, y)  # costliest branch: 2 x 2*8*16*16
    x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
    flops, dots = F.matmul_flops(jax.jit(f).lower(True, x, w).as_text())
    one = 2 * 8 * 16 * 16
    assert flops == 4 * one
    assert sum(d["flops"] for d in dots if d["conditional"]) == 2 * one
    assert len(dots) == 4
