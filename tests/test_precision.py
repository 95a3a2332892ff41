"""`precision: bf16` (every algorithm file): the update's forward matrix products take bfloat16 operands and sum in
float32, while parameters and optimiser state stay float32; the float32 default has no bfloat16 anywhere. Each
algorithm's offline update is built as benchmarks/bench_updates.py builds it (its Hopper config, synthetic data)
and lowered (not compiled); IQL's and Cal-QL's update also runs once in both precisions from the same state (in a
fresh process)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import bench_updates as B

ALGOS = ["iql", "cal_ql", "o2sac", "o2td3", "o2ppo", "aca", "pex"]


def build(name, precision):
    return B.SETUPS[name](B.parse_args(["--rows", "2000", "--block", "2", "--precision", precision]))


def dot_operand_types(hlo: str):
    """(lhs, rhs, result) element types of every dot_general in a StableHLO text."""
    t = r"tensor<(?:\d+x)*(\w+)>"
    found = re.findall(rf"stablehlo.dot_general.*?: \({t}, {t}\) -> {t}", hlo)
    assert found, "no dot_general found in the lowered update"
    return found


@pytest.mark.parametrize("name", ALGOS)
def test_bf16_products_and_float32_state(name):
    for precision in ("float32", "bf16"):
        setup = build(name, precision)
        state = setup.init(jax.random.PRNGKey(0))
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(state) if np.issubdtype(leaf.dtype, np.floating)}
        assert dtypes == {np.dtype("float32")}, f"{name} {precision}: state dtypes {dtypes}"
        types = dot_operand_types(setup.one.lower(state).as_text())
        bf16 = [t for t in types if t[0] == "bf16" and t[1] == "bf16"]
        if precision == "float32":
            assert "bf16" not in str(types), f"{name}: bfloat16 in the float32 update"
        else:
            assert bf16, f"{name}: no bfloat16 matrix product in the bf16 update"
            assert all(t[2] == "f32" for t in bf16), f"{name}: a bf16 product does not sum into float32"


# One update in each precision, run in a fresh process: compiling these updates late in a long pytest process (after
# ~600 other compiled programs) crashed XLA's CPU compiler twice here (a segfault in backend_compile_and_load; the
# same test passes on its own and at the start of a process), so it is kept out of the shared process.
ONE_UPDATE = """
import json, sys
import jax, numpy as np
sys.path[:0] = sys.argv[3:]
import bench_updates as B
setup = B.SETUPS[sys.argv[1]](B.parse_args(["--rows", "2000", "--block", "2", "--precision", sys.argv[2]]))
state = setup.init(jax.random.PRNGKey(0))
new_state, metrics = setup.one.fn(state, *setup.one.args, **setup.one.static)
dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(new_state) if np.issubdtype(x.dtype, np.floating)})
print(json.dumps({"dtypes": dtypes, "metrics": {k: float(v) for k, v in metrics.items()}}))
"""


@pytest.mark.parametrize("name", ["iql", "cal_ql"])
def test_bf16_update_close_to_float32(name):
    """One update from the same state and batch: every metric within bfloat16's round-off of float32's (8 bits of
    mantissa: a relative 2^-8 per operand, summed over a few layers), the new parameters float32."""
    root = Path(__file__).resolve().parent.parent
    out = {}
    for precision in ("float32", "bf16"):
        proc = subprocess.run([sys.executable, "-c", ONE_UPDATE, name, precision, str(root / "benchmarks"),
                               str(root / "algorithms")], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{name} {precision}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got["dtypes"] == ["float32"], f"{name} {precision}: new state dtypes {got['dtypes']}"
        out[precision] = got["metrics"]
    for k, ref in out["float32"].items():
        got = out["bf16"][k]
        assert abs(got - ref) <= 0.05 * abs(ref) + 1e-3, f"{name} {k}: bf16 {got} vs float32 {ref}"
