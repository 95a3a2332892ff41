"""Speed of every algorithm's offline update in both precisions (`precision: float32` and `precision: bf16`),
measured interleaved in one process, written into docs/speed.md (section `precision`).

    python benchmarks/precision.py                          # all seven, 3 rounds
    python benchmarks/precision.py --algos iql,cal_ql --rounds 5 --seconds 10
    python benchmarks/precision.py --block 50 --seconds 4     # the committed run: ~25 min on one busy core (the
                                                            # CQL-based cal_ql and o2sac take most of it)

Each algorithm's offline update block is built as benchmarks/bench_updates.py builds it (its Hopper config,
synthetic Hopper-shaped data, batch 256, batches sampled inside the jitted lax.scan), once per precision, both
compiled before any timing. Then `--rounds` rounds each time the two blocks for `--seconds` (after a warm-up
block), the order of the two alternating between rounds so drift on the machine hits both alike. Reported: updates/s
per precision (median over rounds) and bf16 / float32, the ratio being the figure to read on a noisy machine; with
the 256x256x256 matmul rate in float32 and bf16 (float32 accumulation) measured at the start, i.e. what this CPU's
XLA gains on a plain product. The JSON keeps every round and the load average before and after.

bf16 here means: the forward matrix products take bfloat16 operands and sum in float32; parameters, gradients,
Adam state and every other op stay float32 (the gradients' products follow JAX's transpose of a mixed-precision
product, which computes in float32).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_updates as B  # noqa: E402
from readme_tables import DOCS, update_readme  # noqa: E402

PRECISIONS = ("float32", "bf16")
DTYPES = {"float32": jnp.float32, "bf16": jnp.bfloat16}
SECTION = "precision"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algos", default=",".join(B.ALGOS), help=f"comma-separated subset of {','.join(B.ALGOS)}")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--seconds", type=float, default=8.0, help="timing per block and round (after a warm-up)")
    p.add_argument("--block", type=int, default=200, help="updates per jitted block")
    p.add_argument("--rows", type=int, default=100_000, help="synthetic dataset size")
    p.add_argument("--out", default=str(HERE / "results" / "precision.json"))
    p.add_argument("--table_only", action="store_true", help="only rewrite the docs table from --out")
    args = p.parse_args(argv)
    unknown = set(args.algos.split(",")) - set(B.ALGOS)
    if unknown:
        p.error(f"--algos: unknown {sorted(unknown)}; choose from {','.join(B.ALGOS)}")
    if args.rounds < 1 or args.seconds <= 0 or args.block < 1:
        p.error("--rounds and --block must be >= 1 and --seconds > 0")
    return args


def compiled_block(name, precision, args):
    """(run: state -> (state, metrics), the one-seed state) of `name`'s offline block in `precision`."""
    setup = B.SETUPS[name](B.parse_args(["--rows", str(args.rows), "--block", str(args.block),
                                         "--precision", precision]))
    state = jax.jit(lambda k: setup.module.stack_seeds([setup.init(k)]))(B.KEY)
    _, run = setup.block(1).compile(state)
    return run, state


def measure(args) -> dict:
    result = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__, "backend": jax.default_backend(),
              "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg(), "rounds": args.rounds,
              "seconds": args.seconds, "block": args.block, "rows": args.rows,
              "matmul_256_gflops": {p: B.matmul_rate(256, seconds=1.0, dtype=DTYPES[p])["gflops"]
                                    for p in PRECISIONS}, "algorithms": {}}
    print("matmul 256^3: " + ", ".join(f"{p} {v:.0f} GFLOP/s" for p, v in result["matmul_256_gflops"].items()))
    for name in args.algos.split(","):
        runs = {p: compiled_block(name, p, args) for p in PRECISIONS}
        rates = {p: [] for p in PRECISIONS}
        for r in range(args.rounds):
            for p in (PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]):
                run, state = runs[p]
                rates[p].append(B.time_blocks(run, state, args.block, args.seconds)[0])
        med = {p: statistics.median(v) for p, v in rates.items()}
        result["algorithms"][name] = {"updates_per_s": med, "rounds": rates, "bf16_over_float32":
                                      med["bf16"] / med["float32"]}
        print(f"{name}: float32 {med['float32']:.1f}, bf16 {med['bf16']:.1f} updates/s "
              f"({med['bf16'] / med['float32']:.2f}x)", flush=True)
    result["load_average_after"] = os.getloadavg()
    return result


def table(result: dict) -> str:
    mm = result["matmul_256_gflops"]
    lines = [f"Measured {result['time'][:10]} by `python benchmarks/precision.py` ({result['rounds']} interleaved "
             f"rounds of {result['seconds']:g} s per precision, blocks of {result['block']} updates; "
             f"{result['cpu_count']} CPUs; load average "
             f"{[round(x, 2) for x in result['load_average_before']]} before, "
             f"{[round(x, 2) for x in result['load_average_after']]} after). Plain 256x256x256 matmul in the same "
             f"run: float32 {mm['float32']:.0f}, bf16 {mm['bf16']:.0f} GFLOP/s ({mm['bf16'] / mm['float32']:.2f}x).",
             "", "| algorithm | offline updates/s, float32 | offline updates/s, bf16 | bf16 / float32 |",
             "|---|---|---|---|"]
    for name, r in result["algorithms"].items():
        u = r["updates_per_s"]
        lines.append(f"| {name} | {u['float32']:.1f} | {u['bf16']:.1f} | {r['bf16_over_float32']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        result = json.loads(out.read_text())
    else:
        result = measure(args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return update_readme(SECTION, table(result), DOCS / "speed.md")


if __name__ == "__main__":
    sys.exit(main())
