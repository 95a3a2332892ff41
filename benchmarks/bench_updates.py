"""Time pure offline updates of IQL and Cal-QL on synthetic Hopper-shaped data, next to the CPU's matmul rate.

    python benchmarks/bench_updates.py                     # ~1-2 min on 2 CPU cores
    python benchmarks/bench_updates.py --seconds 20 --out benchmarks/results/bench_updates.json

Data: `--rows` (1M) random transitions with obs 11, act 3 (Hopper), device resident; batch 256; updates run
exactly as in training (jitted lax.scan blocks of `--block` updates, batches sampled inside the scan).
Networks: each algorithm's Hopper config (configs/<algo>/o2o/hopper/medium-v0.yaml if present, else the
dataclass defaults with the locomotion overrides below).

IQL is also timed with N seeds vmapped in one process (`--num_seeds 1,2,4`, as `iql.py --num_seeds N`):
the aggregate updates/s over all seeds and its ratio to one seed.

Reported per algorithm: updates/s, FLOPs per update (XLA cost analysis of one compiled update; XLA counts a
loop body once, so the compiled block's own count, also reported, is about one update), achieved GFLOP/s,
and that rate as a fraction of the float32 matmul rate measured in the same run for 256x256x256 and
2560x256x256 (the shapes of a batch-256 layer and of Cal-QL's 10-action CQL evaluations).
Other processes on the machine slow every number here: the JSON records the load average.
"""
import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "algorithms"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

OBS_DIM, ACT_DIM = 11, 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic dataset size")
    p.add_argument("--block", type=int, default=1000, help="updates per jitted block")
    p.add_argument("--seconds", type=float, default=10.0, help="timing budget per algorithm (after compile)")
    p.add_argument("--algos", default="iql,cal_ql", help="comma-separated subset of iql,cal_ql")
    p.add_argument("--num_seeds", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")],
                   help="IQL: seeds trained together (vmapped), aggregate updates/s for each count")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_updates.json"))
    return p.parse_args(argv)


def matmul_rate(m, k=256, n=256, seconds=2.0):
    a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            out = f(a, b)
        out.block_until_ready()
        reps += 20
    dt = (time.perf_counter() - t0) / reps
    return {"shape": f"{m}x{k}x{n}", "seconds_per_matmul": dt, "gflops": 2.0 * m * k * n / dt / 1e9}


def flops_of(compiled):
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per device
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def synthetic(rows, with_mc):
    rng = np.random.default_rng(0)
    cols = [rng.standard_normal((rows, OBS_DIM), np.float32), rng.uniform(-1, 1, (rows, ACT_DIM)).astype(np.float32),
            rng.standard_normal(rows).astype(np.float32), rng.standard_normal((rows, OBS_DIM), np.float32),
            (rng.random(rows) < 0.001).astype(np.float32)]
    if with_mc:
        cols.append(rng.standard_normal(rows).astype(np.float32) * 10)
    return [jnp.asarray(c) for c in cols]


def load_config(module, name):
    path = ROOT / "configs" / name / "o2o" / "hopper" / "medium-v0.yaml"
    import pyrallis
    if path.exists():
        cfg = pyrallis.parse(config_class=module.TrainConfig, config_path=str(path), args=[])
        return cfg, str(path.relative_to(ROOT))
    return None, None


def time_blocks(run_block, state, block, seconds):
    state, metrics = run_block(state)  # compile + warm up
    jax.block_until_ready(metrics)
    blocks, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or blocks < 2:
        state, metrics = run_block(state)
        jax.block_until_ready(metrics)
        blocks += 1
    dt = time.perf_counter() - t0
    return blocks * block / dt, blocks


def bench_iql(args):
    import iql
    cfg, source = load_config(iql, "iql")
    if cfg is None:
        cfg, source = iql.TrainConfig(expectile=0.7, beta=3.0, reward_bias=0.0), "TrainConfig defaults (locomotion)"
    cfg.update_block = args.block
    h = iql.make_hyper(cfg, OBS_DIM, ACT_DIM)
    offline = iql.Buffer(*synthetic(args.rows, with_mc=False))

    def setup(n_seeds):
        state = iql.stack_seeds([iql.init_state(h, jax.random.PRNGKey(s), np.zeros(OBS_DIM), np.ones(OBS_DIM))
                                 for s in range(n_seeds)])
        online = jax.tree.map(lambda x: jnp.zeros((n_seeds, 1) + x.shape[1:], x.dtype), offline)
        return state, online, jnp.zeros((n_seeds,), jnp.int32)

    state, online, sizes = setup(1)
    single = iql.seed_slice(state, 0)
    batch = jax.tree.map(lambda x: x[:h.batch_size], offline)
    one = jax.jit(iql.iql_update, static_argnames=("h",)).lower(single, batch, jax.random.PRNGKey(1), h=h).compile()
    block = iql.update_block.lower(state, offline, online, sizes, h=h).compile()
    out = {"config": source, "hidden": list(h.hidden), "n_critics": h.n_critics, "batch_size": h.batch_size,
           "flops_per_update": flops_of(one), "flops_compiled_block": flops_of(block), "num_seeds": {}}
    for n_seeds in args.num_seeds:
        state, online, sizes = setup(n_seeds)
        rate, blocks = time_blocks(lambda s: iql.update_block(s, offline, online, sizes, h), state, args.block,
                                   args.seconds)
        out["num_seeds"][n_seeds] = {"aggregate_updates_per_s": rate * n_seeds, "blocks_timed": blocks}
        print(f"iql --num_seeds {n_seeds}: {rate * n_seeds:.1f} aggregate updates/s")
    out["updates_per_s"] = out["num_seeds"][args.num_seeds[0]]["aggregate_updates_per_s"] / args.num_seeds[0]
    out["blocks_timed"] = out["num_seeds"][args.num_seeds[0]]["blocks_timed"]
    if 1 in out["num_seeds"]:
        base = out["num_seeds"][1]["aggregate_updates_per_s"]
        for v in out["num_seeds"].values():
            v["speedup_vs_1_seed"] = v["aggregate_updates_per_s"] / base
    return out


def bench_cal_ql(args):
    import cal_ql
    cfg, source = load_config(cal_ql, "cal_ql")
    if cfg is None:
        cfg = cal_ql.TrainConfig(critic_hidden=[256, 256], cql_lagrange=False, normalize=True, reward_scale=1.0,
                                 reward_bias=0.0, mc_failure_rule="none")
        source = "TrainConfig defaults (locomotion overrides)"
    cfg.update_block = args.block
    h = cal_ql.make_hyper(cfg, OBS_DIM, ACT_DIM)
    offline = cal_ql.Buffer(*synthetic(args.rows, with_mc=True))
    # one seed, as cal_ql.py --num_seeds 1 runs it: a leading seed axis of 1 on the state and the online rows
    online = jax.tree.map(lambda x: x[None, :1000], offline)
    sizes = jnp.zeros((1,), jnp.int32)
    single = cal_ql.init_state(h, jax.random.PRNGKey(0), np.zeros(OBS_DIM), np.ones(OBS_DIM), cfg.log_alpha_prime_init)
    state = cal_ql.stack_seeds([single])
    batch = jax.tree.map(lambda x: x[:h.batch_size], offline)
    one = jax.jit(cal_ql.calql_update, static_argnames=("h",)).lower(
        single, batch, jax.random.PRNGKey(1), True, cfg.cql_weight, h=h).compile()
    block = cal_ql.update_block.lower(state, offline, args.rows, online, sizes, True, cfg.cql_weight, h=h).compile()
    rate, blocks = time_blocks(
        lambda s: cal_ql.update_block(s, offline, args.rows, online, sizes, True, cfg.cql_weight, h),
        state, args.block, args.seconds)
    return {"config": source, "policy_hidden": list(h.policy_hidden), "critic_hidden": list(h.critic_hidden),
            "n_critics": h.n_critics, "cql_n_actions": h.n_actions, "batch_size": h.batch_size,
            "updates_per_s": rate, "blocks_timed": blocks, "flops_per_update": flops_of(one),
            "flops_compiled_block": flops_of(block)}


def main(args):
    result = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__, "backend": jax.default_backend(),
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "load_average_before": os.getloadavg(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "rows": args.rows, "block": args.block}
    try:
        with open("/proc/cpuinfo") as f:
            result["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result["matmul"] = [matmul_rate(256), matmul_rate(2560)]
    peak = max(m["gflops"] for m in result["matmul"])
    for m in result["matmul"]:
        print(f"matmul {m['shape']}: {m['gflops']:.1f} GFLOP/s")
    for name in args.algos.split(","):
        r = {"iql": bench_iql, "cal_ql": bench_cal_ql}[name](args)
        r["achieved_gflops"] = r["updates_per_s"] * r["flops_per_update"] / 1e9
        r["fraction_of_matmul_gflops"] = r["achieved_gflops"] / peak
        result[name] = r
        print(f"{name}: {r['updates_per_s']:.1f} updates/s, {r['flops_per_update'] / 1e6:.1f} MFLOP/update, "
              f"{r['achieved_gflops']:.1f} GFLOP/s = {100 * r['fraction_of_matmul_gflops']:.0f}% of the matmul rate")
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main(parse_args())
