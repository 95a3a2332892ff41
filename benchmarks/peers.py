"""Speed against the peers: our offline updates next to the same updates in unifloral, JAX-CORL and CORL (PyTorch,
1 and 2 threads), timed interleaved in one run.

    python benchmarks/peers.py [--rounds 3] [--seconds 8] [--updates iql,td3bc,cql,cal_ql] [--peer_dir DIR]

Each implementation runs in a warm process of its own (a worker: built, compiled and warmed up once), on identical
synthetic Hopper-shaped data (`--rows` 1M random transitions, obs 11, act 3, batch 256), with the batch sampling
inside the timed loop, exactly as each program trains (ours twice: float32 and `precision: bf16`): ours and
unifloral a jitted lax.scan of updates (`--block`), JAX-CORL its jitted `update_n_times` (its n_jitted_updates, 8),
CORL its `ReplayBuffer.sample` + `trainer.train(batch)` loop. The peers' code runs unmodified from checkouts of the
pinned commits outside this repository (--peer_dir holding unifloral/, jax_corl/, corl/; default the parity cache
directory, cloned when the network answers), with stand-ins for what they import at module level (gym, d4rl, wandb,
tyro, omegaconf).
Rounds: [matmul reference, every worker in turn] x `--rounds`, so machine drift hits all alike; each worker's
updates/s is the median over rounds. Updates: one update = what our file calls one update (TD3+BC: a critic step
and, every 2nd update, the actor step; unifloral's TD3+BC step is its num_critic_updates_per_step critic steps and
one actor step, so it counts as that many updates). FLOPs per update: XLA's cost analysis of one lowered update
(JAX: a conditional counts its costliest branch), torch's FlopCounterMode over one trainer.train (CORL).
Writes benchmarks/results/peers.json, the `peers` section of docs/speed.md (table + the same run's matmul rate,
load average before and after) and the README's short table (`peers_headline`); --from_json rewrites both from the
JSON.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "algorithms"))

OUT = HERE / "results" / "peers.json"
DOC = ROOT / "docs" / "speed.md"
PEERS = {  # name -> (git URL, pinned commit)
    "unifloral": ("https://github.com/EmptyJackson/unifloral", "f2dc1278eae18ed3e22c92255119c54885414d17"),
    "jax_corl": ("https://github.com/nissymori/JAX-CORL", "d747dd8ad4fcc088ff9f1ade49a6be43a60f6556"),
}
# update -> implementations that have it (ours first); corl_t2 / corl_t1: CORL with 2 / 1 torch threads
# ours_bf16: our file with `precision: bf16` (bf16 matrix products, float32 parameters and accumulation)
IMPLS = {"iql": ["ours", "ours_bf16", "unifloral", "jax_corl", "corl_t2", "corl_t1"],
         "td3bc": ["ours", "ours_bf16", "unifloral", "jax_corl", "corl_t2", "corl_t1"],
         "cql": ["ours", "ours_bf16", "unifloral", "jax_corl"],
         "cal_ql": ["ours", "ours_bf16", "corl_t2", "corl_t1"]}
OURS = {"iql": "iql.py (IQL)", "td3bc": "o2td3.py (TD3+BC pre-training)", "cql": "o2sac.py (CQL pre-training)",
        "cal_ql": "cal_ql.py (Cal-QL)"}
OBS_DIM, ACT_DIM, BATCH = 11, 3, 256


# ---------------------------------------------------------------------------------------------- workers
class Built(types.SimpleNamespace):
    """step() runs `per_call` updates and waits for them; flops: FLOPs per update; info: what was built."""


def synthetic(rows: int):
    import numpy as np
    rng = np.random.default_rng(0)
    return {"observations": rng.standard_normal((rows, OBS_DIM), np.float32),
            "actions": rng.uniform(-1, 1, (rows, ACT_DIM)).astype(np.float32),
            "rewards": rng.standard_normal(rows).astype(np.float32),
            "next_observations": rng.standard_normal((rows, OBS_DIM), np.float32),
            "terminals": (rng.random(rows) < 0.001).astype(np.float32),
            "mc_returns": (rng.standard_normal(rows) * 10).astype(np.float32)}


def jax_flops(lowered, per: float = 1.0) -> float:
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) / per


@contextlib.contextmanager
def unrolled_scans():
    """jax.lax.scan unrolled while a program is lowered for its FLOP count: XLA counts a loop body once."""
    from unittest import mock
    import jax
    scan = jax.lax.scan
    with mock.patch.object(jax.lax, "scan", lambda *a, **k: scan(*a, **{**k, "unroll": True})):
        yield


def build_ours(update: str, opts, precision: str = "float32") -> Built:
    import jax
    import bench_updates as B
    args = types.SimpleNamespace(block=opts.block, rows=opts.rows, precision=precision)
    setup = {"iql": B.setup_iql, "td3bc": B.setup_o2td3, "cql": B.setup_o2sac, "cal_ql": B.setup_cal_ql}[update](args)
    state = setup.module.stack_seeds([setup.init(jax.random.PRNGKey(0))])
    _, run = setup.block(1).compile(state)
    holder = [state]

    def step():
        holder[0], metrics = run(holder[0])
        jax.block_until_ready(holder[0])
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return Built(step=step, per_call=opts.block, flops=jax_flops(setup.one.lower(setup.init(B.KEY))),
                 info={**setup.info, "block": opts.block, "precision": precision,
                       "commit": head.stdout.strip() or "this repo"})


def _peer_module(name: str, rel: str, opts):
    """A peer's file imported from its checkout with stand-ins for its module-level imports."""
    from parity_refs import common
    url, commit = PEERS[name]
    common.REFERENCES.setdefault(name, (url, commit))  # checked out (or cloned) like the parity references
    root = common.reference_checkout(name, opts.peer_dir)
    stand_ins = common.reference_stand_ins()
    stand_ins["tyro"] = common.module("tyro", cli=lambda *a, **k: None)
    stand_ins["omegaconf"] = common.module("omegaconf", OmegaConf=types.SimpleNamespace(from_cli=lambda *a: {}))
    argv, sys.argv = sys.argv, [str(root / rel)]  # JAX-CORL parses the command line at import (OmegaConf.from_cli)
    xla_flags = os.environ.get("XLA_FLAGS")
    try:
        with common.reference_on_path(root, stand_ins):
            mod = common.load_file(root / rel, f"{name}_{Path(rel).stem}")
    finally:
        sys.argv = argv
        if xla_flags is None:  # unifloral sets a GPU-only XLA flag at import
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = xla_flags
    return mod, commit


def build_unifloral(update: str, opts) -> Built:
    import jax
    import jax.numpy as jnp
    rel = {"iql": "algorithms/iql.py", "td3bc": "algorithms/td3_bc.py", "cql": "algorithms/cql.py"}[update]
    mod, commit = _peer_module("unifloral", rel, opts)
    d = {k: jnp.asarray(v) for k, v in synthetic(opts.rows).items()}
    data = mod.Transition(obs=d["observations"], action=d["actions"], reward=d["rewards"],
                          next_obs=d["next_observations"], done=d["terminals"])
    args = mod.Args()
    mean, std = data.obs.mean(0), data.obs.std(0)
    obs0, act0 = jnp.zeros(OBS_DIM), jnp.zeros(ACT_DIM)
    k_actor, k_q, k_other = jax.random.split(jax.random.PRNGKey(0), 3)
    per_step = 1
    if update == "iql":
        actor, q, value = mod.TanhGaussianActor(ACT_DIM, mean, std), mod.DualQNetwork(mean, std), \
            mod.StateValueFunction(mean, std)
        state = mod.AgentTrainState(
            actor=mod.create_train_state(args, k_actor, actor, [obs0]),
            dual_q=mod.create_train_state(args, k_q, q, [obs0, act0]),
            dual_q_target=mod.create_train_state(args, k_q, q, [obs0, act0]),
            value=mod.create_train_state(args, k_other, value, [obs0]))
        step_fn = mod.make_train_step(args, actor.apply, q.apply, value.apply, data)
    elif update == "td3bc":
        actor, q = mod.DeterministicTanhActor(ACT_DIM, mean, std), mod.DualQNetwork(mean, std)
        state = mod.AgentTrainState(
            actor=mod.create_train_state(args, k_actor, actor, [obs0]),
            actor_target=mod.create_train_state(args, k_actor, actor, [obs0]),
            dual_q=mod.create_train_state(args, k_q, q, [obs0, act0]),
            dual_q_target=mod.create_train_state(args, k_q, q, [obs0, act0]))
        step_fn = mod.make_train_step(args, actor.apply, q.apply, data)
        per_step = args.num_critic_updates_per_step  # critic steps per actor step: our updates per step
    else:
        args.num_critics = 2  # its default is SAC-N's 10; CQL (and ours, JAX-CORL's) uses 2
        actor, q, alpha = mod.TanhGaussianActor(ACT_DIM), mod.VectorQ(args.num_critics), mod.EntropyCoef()
        actor_lr = args.actor_lr if args.actor_lr is not None else args.lr
        state = mod.AgentTrainState(
            actor=mod.create_train_state(args, k_actor, actor, [obs0], actor_lr),
            vec_q=mod.create_train_state(args, k_q, q, [obs0, act0]),
            vec_q_target=mod.create_train_state(args, k_q, q, [obs0, act0]),
            alpha=mod.create_train_state(args, k_other, alpha, []))
        step_fn = mod.make_train_step(args, actor.apply, q.apply, alpha.apply, data)
    steps = max(1, opts.block // per_step)
    block = jax.jit(lambda rs: jax.lax.scan(step_fn, rs, None, length=steps))
    holder = [(jax.random.PRNGKey(1), state)]
    with unrolled_scans():  # its TD3+BC step scans num_critic_updates_per_step critic steps
        flops = jax_flops(jax.jit(step_fn).lower(holder[0], None), per_step)

    def step():
        holder[0], _ = block(holder[0])
        jax.block_until_ready(holder[0])
    return Built(step=step, per_call=steps * per_step, flops=flops,
                 info={"file": rel, "commit": commit, "updates_per_step": per_step, "block_steps": steps})


def build_jax_corl(update: str, opts) -> Built:
    import jax
    import jax.numpy as jnp
    rel = {"iql": "algos/iql.py", "td3bc": "algos/td3bc.py", "cql": "algos/cql.py"}[update]
    mod, commit = _peer_module("jax_corl", rel, opts)
    d = {k: jnp.asarray(v) for k, v in synthetic(opts.rows).items()}
    cols = dict(observations=d["observations"], actions=d["actions"], rewards=d["rewards"],
                next_observations=d["next_observations"], dones=d["terminals"])
    if "dones_float" in mod.Transition._fields:
        cols["dones_float"] = d["terminals"]
    data = mod.Transition(**cols)
    key = jax.random.PRNGKey(0)
    config = mod.config  # the module's own instance (defaults: no command line); some of its code reads the global
    if update == "iql":
        algo = mod.IQL()
        state = mod.create_iql_train_state(key, data.observations[0], data.actions[0], config)
    elif update == "td3bc":
        algo = mod.TD3BC()
        state = mod.create_td3bc_train_state(key, data.observations[0], data.actions[0], config)
    else:
        algo = mod.CQL()
        config.action_dim = ACT_DIM
        if config.target_entropy >= 0.0:
            config.target_entropy = -float(ACT_DIM)
        state = mod.create_cql_train_state(key, data.observations[0], data.actions[0], config)
    update_fn = jax.jit(algo.update_n_times, static_argnums=(3,))
    n = config.n_jitted_updates
    holder = [state, jax.random.PRNGKey(1)]
    flops = jax_flops(update_fn.lower(state, data, holder[1], config), n)

    def step():
        holder[1], sub = jax.random.split(holder[1])
        holder[0], _ = update_fn(holder[0], data, sub, config)
        jax.block_until_ready(holder[0])
    return Built(step=step, per_call=n, flops=flops, info={"file": rel, "commit": commit, "n_jitted_updates": n})


def build_corl(update: str, opts, threads: int) -> Built:
    import torch
    from parity_refs import common
    torch.set_num_threads(threads)
    rel = {"iql": "algorithms/offline/iql.py", "td3bc": "algorithms/offline/td3_bc.py",
           "cal_ql": "algorithms/finetune/cal_ql.py"}[update]
    root = common.reference_checkout("corl", opts.peer_dir)
    import pyrallis  # noqa: F401
    with common.reference_on_path(root, common.reference_stand_ins()):
        mod = common.load_file(root / rel, f"corl_{Path(rel).stem}")
    data = synthetic(opts.rows)
    replay = mod.ReplayBuffer(OBS_DIM, ACT_DIM, opts.rows, "cpu")
    if update == "cal_ql":
        replay.load_d4rl_dataset(data)
    else:
        replay.load_d4rl_dataset({k: v for k, v in data.items() if k != "mc_returns"})
    torch.manual_seed(0)
    adam = lambda m, lr=3e-4: torch.optim.Adam(m.parameters(), lr=lr)  # noqa: E731
    if update == "iql":
        actor, q, v = mod.GaussianPolicy(OBS_DIM, ACT_DIM, 1.0), mod.TwinQ(OBS_DIM, ACT_DIM), \
            mod.ValueFunction(OBS_DIM)
        trainer = mod.ImplicitQLearning(max_action=1.0, actor=actor, actor_optimizer=adam(actor), q_network=q,
                                        q_optimizer=adam(q), v_network=v, v_optimizer=adam(v), iql_tau=0.7, beta=3.0,
                                        max_steps=1_000_000, discount=0.99, tau=0.005, device="cpu")
    elif update == "td3bc":
        actor, c1, c2 = mod.Actor(OBS_DIM, ACT_DIM, 1.0), mod.Critic(OBS_DIM, ACT_DIM), mod.Critic(OBS_DIM, ACT_DIM)
        trainer = mod.TD3_BC(max_action=1.0, actor=actor, actor_optimizer=adam(actor), critic_1=c1,
                             critic_1_optimizer=adam(c1), critic_2=c2, critic_2_optimizer=adam(c2), device="cpu")
    else:
        cfg = mod.TrainConfig()
        actor = mod.TanhGaussianPolicy(OBS_DIM, ACT_DIM, 1.0, orthogonal_init=cfg.orthogonal_init)
        c1, c2 = (mod.FullyConnectedQFunction(OBS_DIM, ACT_DIM, cfg.orthogonal_init, cfg.q_n_hidden_layers)
                  for _ in range(2))
        trainer = mod.CalQL(
            critic_1=c1, critic_1_optimizer=adam(c1, cfg.qf_lr), critic_2=c2, critic_2_optimizer=adam(c2, cfg.qf_lr),
            actor=actor, actor_optimizer=adam(actor, cfg.policy_lr), target_entropy=-ACT_DIM, discount=cfg.discount,
            alpha_multiplier=cfg.alpha_multiplier, use_automatic_entropy_tuning=cfg.use_automatic_entropy_tuning,
            backup_entropy=cfg.backup_entropy, policy_lr=cfg.policy_lr, qf_lr=cfg.qf_lr,
            soft_target_update_rate=cfg.soft_target_update_rate, bc_steps=0,
            target_update_period=cfg.target_update_period, cql_n_actions=cfg.cql_n_actions,
            cql_importance_sample=cfg.cql_importance_sample, cql_lagrange=cfg.cql_lagrange,
            cql_target_action_gap=cfg.cql_target_action_gap, cql_temp=cfg.cql_temp, cql_alpha=cfg.cql_alpha,
            cql_max_target_backup=cfg.cql_max_target_backup, cql_clip_diff_min=cfg.cql_clip_diff_min,
            cql_clip_diff_max=cfg.cql_clip_diff_max, device="cpu")
    from torch.utils.flop_counter import FlopCounterMode
    for _ in range(4):  # warm-up (and TD3+BC's actor step every 2nd update in the FLOP count below)
        trainer.train(replay.sample(BATCH))
    counter = FlopCounterMode(display=False)
    with counter:
        for _ in range(2):
            trainer.train(replay.sample(BATCH))
    per_call = max(1, opts.block // 10)

    def step():
        for _ in range(per_call):
            trainer.train(replay.sample(BATCH))
    return Built(step=step, per_call=per_call, flops=counter.get_total_flops() / 2,
                 info={"file": rel, "commit": common.REFERENCES["corl"][1], "threads": threads})


def build(impl: str, update: str, opts) -> Built:
    if impl in ("ours", "ours_bf16"):
        return build_ours(update, opts, "bf16" if impl == "ours_bf16" else "float32")
    if impl == "unifloral":
        return build_unifloral(update, opts)
    if impl == "jax_corl":
        return build_jax_corl(update, opts)
    return build_corl(update, opts, int(impl[-1]))


def worker(impl: str, update: str, opts) -> int:
    """Build, warm up, say `ready`; then answer `time SECONDS` lines with updates/s until `quit`. Protocol lines
    go to the original stdout; everything the libraries print goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.time()
    built = build(impl, update, opts)
    built.step()  # compile / warm up
    built.step()
    proto.write(json.dumps({"ready": True, "flops": built.flops, "per_call": built.per_call, "info": built.info,
                            "build_s": round(time.time() - t0, 1)}) + "\n")
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        seconds, calls, t = float(cmd[1]), 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - t < seconds:
            built.step()
            calls += 1
        dt = time.perf_counter() - t
        proto.write(json.dumps({"updates_per_s": calls * built.per_call / dt, "calls": calls, "seconds": dt}) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------- driver
class Worker:
    def __init__(self, impl: str, update: str, opts):
        self.impl, self.update = impl, update
        cmd = [sys.executable, __file__, "--worker", impl, update, "--rows", str(opts.rows), "--block",
               str(opts.block)] + (["--peer_dir", opts.peer_dir] if opts.peer_dir else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     stderr=open(opts.log_dir / f"{update}_{impl}.log", "w"))
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.impl}/{self.update} failed (exit {self.proc.wait()}); see its log")
        return json.loads(line)

    def time(self, seconds: float) -> dict:
        self.proc.stdin.write(f"time {seconds}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


def markdown(res: dict) -> str:
    mm = statistics.median(res["matmul_gflops"])
    lines = [f"Measured {res['date']} by `python benchmarks/peers.py` ({res['rounds']} interleaved rounds of "
             f"{res['seconds']:g} s per implementation; {res['cpus']} CPUs; load average {res['load_before']} "
             f"before, {res['load_after']} after; float32 256x256x256 matmul {mm:.0f} GFLOP/s, median of the "
             "rounds). Updates/s: median over rounds, one update as our file counts it; ratio = ours / peer (in "
             "brackets: ours in bf16 / peer).", "",
             "| update | implementation | commit | updates/s | ours / peer | GFLOP per update | GFLOP/s | "
             "fraction of matmul rate |", "|---|---|---|---|---|---|---|---|"]
    for update, rows in res["updates"].items():
        ours = rows.get("ours", {}).get("updates_per_s")
        bf16 = rows.get("ours_bf16", {}).get("updates_per_s")
        for impl, r in rows.items():
            if "error" in r:
                lines.append(f"| {update} | {impl} | – | not run: {r['error']} | | | | |")
                continue
            ups, gf = r["updates_per_s"], r["flops"] / 1e9
            name = {"ours": OURS[update], "ours_bf16": f"{OURS[update]}, bf16", "unifloral": "unifloral",
                    "jax_corl": "JAX-CORL", "corl_t2": "CORL, 2 threads", "corl_t1": "CORL, 1 thread"}[impl]
            ratio = "–" if impl.startswith("ours") or not ours else f"{ours / ups:.2f}x" + (
                f" ({bf16 / ups:.2f}x)" if bf16 else "")
            commit = r["info"].get("commit", "this repo")[:7]
            lines.append(f"| {update} | {name} | {commit} | {ups:.1f} | {ratio} | {gf:.3f} | {ups * gf:.1f} | "
                         f"{ups * gf / mm:.3f} |")
    return "\n".join(lines)


def headline(res: dict) -> str:
    """README's short table: per update, ours against the fastest JAX peer and CORL (2 threads)."""
    lines = ["Offline updates/s on this 2-core CPU, measured interleaved with the peers in one run (`python "
             "benchmarks/peers.py`; every implementation, FLOPs and notes: [docs/speed.md](docs/speed.md)).", "",
             "Each cell with two figures: ours in float32 / ours in bf16 (`precision: bf16`).", "",
             "| update | ours | fastest JAX peer | ours / it | CORL (PyTorch, 2 threads) | ours / CORL |",
             "|---|---|---|---|---|---|"]
    for update, rows in res["updates"].items():
        ours = rows.get("ours", {}).get("updates_per_s")
        if ours is None:
            continue
        bf16 = rows.get("ours_bf16", {}).get("updates_per_s")

        def both(fmt, f):  # "f(ours)" or "f(ours) / f(ours in bf16)"
            return fmt.format(f(ours)) + (" / " + fmt.format(f(bf16)) if bf16 else "")
        jax_peers = [(r["updates_per_s"], name) for name, r in rows.items()
                     if name in ("unifloral", "jax_corl") and "updates_per_s" in r]
        best = max(jax_peers, default=None)
        corl = rows.get("corl_t2", {}).get("updates_per_s")
        names = {"unifloral": "unifloral", "jax_corl": "JAX-CORL"}
        lines.append(f"| {update} | {both('{:.1f}', lambda x: x)} | "
                     + (f"{best[0]:.1f} ({names[best[1]]}) | {both('{:.2f}x', lambda x: x / best[0])} | "
                        if best else "– | – | ")
                     + (f"{corl:.1f} | {both('{:.2f}x', lambda x: x / corl)} |" if corl else "– | – |"))
    if "cql" in res["updates"]:
        flops = {k: r["flops"] / 1e9 for k, r in res["updates"]["cql"].items() if "flops" in r and k != "ours_bf16"}
        lines += ["", "cql: each implementation's own default CQL, not the same networks: " + ", ".join(
            f"{k} {v:.1f}" for k, v in flops.items()) + " GFLOP per update (ours: O2SAC's pre-training CQL, 3x256 "
            "critics, Q at 31 actions per state); the work rate per FLOP is in docs/speed.md."]
    return "\n".join(lines)


def write_docs(res: dict) -> int:
    from readme_tables import README, update_readme
    return update_readme("peers", markdown(res), DOC) or update_readme("peers_headline", headline(res), README)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", default=",".join(IMPLS))
    p.add_argument("--impls", default="", help="only these implementations (comma-separated)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--block", type=int, default=200, help="updates per timed call (CORL: block / 10)")
    p.add_argument("--peer_dir", default=None, help="directory holding the checkouts unifloral/, jax_corl/, corl/")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--no_doc", dest="doc", action="store_false")
    p.add_argument("--from_json", action="store_true", help="only rewrite the docs' tables from --out")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "UPDATE"), help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.worker:
        return worker(*opts.worker, opts)
    if opts.from_json:
        return write_docs(json.loads(Path(opts.out).read_text()))
    updates = [u for u in opts.updates.split(",") if u]
    bad = [u for u in updates if u not in IMPLS]
    if bad:
        p.error(f"--updates: unknown {bad}; choose from {','.join(IMPLS)}")
    only = set(filter(None, opts.impls.split(",")))
    import bench_updates as B
    import tempfile
    opts.log_dir = Path(tempfile.mkdtemp(prefix="peers_"))
    load_before = [round(x, 2) for x in os.getloadavg()]
    workers, res = [], {"updates": {u: {} for u in updates}}
    for update in updates:
        for impl in IMPLS[update]:
            if only and impl not in only and impl not in ("ours", "ours_bf16"):
                continue
            print(f"building {update} / {impl} ...", flush=True)
            try:
                w = Worker(impl, update, opts)
                workers.append(w)
                res["updates"][update][impl] = {"flops": w.ready["flops"], "info": w.ready["info"], "rates": []}
                print(f"  ready in {w.ready['build_s']} s", flush=True)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, the others still run
                res["updates"][update][impl] = {"error": f"{type(e).__name__}: {e}"}
                print(f"  failed: {e}", flush=True)
    mm = []
    try:
        for r in range(opts.rounds):
            mm.append(B.matmul_rate(256)["gflops"])
            for w in workers:
                rate = w.time(opts.seconds)["updates_per_s"]
                res["updates"][w.update][w.impl]["rates"].append(rate)
                print(f"round {r + 1}: {w.update} {w.impl}: {rate:.1f} updates/s", flush=True)
    finally:
        for w in workers:
            w.close()
    for rows in res["updates"].values():
        for r in rows.values():
            if "rates" in r:
                r["updates_per_s"] = statistics.median(r["rates"])
    import jax
    import platform
    res.update(date=time.strftime("%Y-%m-%d"), rounds=opts.rounds, seconds=opts.seconds, rows=opts.rows,
               cpus=os.cpu_count(), matmul_gflops=mm, load_before=load_before,
               load_after=[round(x, 2) for x in os.getloadavg()],
               versions={"python": platform.python_version(), "jax": jax.__version__},
               logs=str(opts.log_dir))
    Path(opts.out).write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    print(text)
    if opts.doc and Path(opts.out).resolve() == OUT.resolve():
        return write_docs(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
