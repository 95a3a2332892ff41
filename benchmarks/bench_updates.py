"""Time the offline updates of the seven algorithms on synthetic Hopper-shaped data, next to the CPU's matmul rate,
and the online loop's per-env-step overhead (act + env.step) against the update time.

    python benchmarks/bench_updates.py                     # ~15-20 min on 2 busy CPU cores (see below)
    python benchmarks/bench_updates.py --seconds 20 --out benchmarks/results/bench_updates.json
    python benchmarks/bench_updates.py --algos iql,o2sac --seconds 5

Offline updates. Data: `--rows` (1M) random transitions with obs 11, act 3 (Hopper), device resident; batch 256;
networks and hyper-parameters from configs/<algo>/o2o/hopper/medium-v0.yaml (`--block` replaces update_block).
Each algorithm's offline pre-training update runs exactly as its script's train() runs it, with one seed (a
leading seed axis of 1, the state from the module's `stack_seeds`): jitted lax.scan blocks of `--block` updates,
batches sampled inside the scan. The updates timed: iql `scan_updates`, cal_ql `scan_updates` (CQL + calibration,
the offline cql_weight), o2sac `scan_cql_updates` (CQL pre-training), o2td3 `scan_updates` in phase "offline" (TD3+BC),
o2ppo `scan_offline_updates` (IQL pre-training), aca `scan_updates` (SAC + ML), pex `scan_updates` with an IQLState (its
IQL pre-training); the online buffers these take are empty (size 0: every row offline, as in the offline phase).
IQL is also timed with N seeds vmapped in one process (`--num_seeds 1,2,4`, as `iql.py --num_seeds N`): the
aggregate updates/s over all seeds and its ratio to one seed.

Reported per algorithm: updates/s (one seed), FLOPs per update (XLA cost analysis of ONE jitted update on one
batch, without the batch sampling; of the lowered program, not compiled to save time: it is within 0.1% of the
compiled program's count; XLA counts a loop body once, so the compiled block's own count, also reported, is
about one update too), achieved GFLOP/s and that rate as a fraction of the float32 matmul rate measured in the
same run for 256x256x256 and 2560x256x256 (the shapes of a batch-256 layer and of a 10-action CQL evaluation).
The matmul rates drift on this shared VM (the 256x256x256 rate was seen anywhere from 127 to 166 GFLOP/s within
one session), so each is sampled at the start and after every algorithm and the ratios use the median of the samples.
For --profile algorithms (default iql, cal_ql), in a child process right after the algorithm's timing: one block of
200 updates traced with jax.profiler (op time by kind: matmul, copy, loop, other) and the update's dots alone: the
update's speed if every other op were free (the shapes and dimension numbers read from the compiled block; as XLA
lays them out, and as plain matmuls). A child that fails or passes its time limit is retried once.

Online loop. A real gymnasium Hopper-v5 env (the env of the o2o/hopper datasets; no dataset needed) and the
algorithm's jitted exploration act function (`act_explore`: o2td3 with its explore_noise, o2ppo with its Gaussian
actor, pex with its composite action from the offline actor, the new actor and the critic) on the freshly
initialised one-seed state: `--env_steps` steps of act (incl. the host->device transfer of obs and the active
mask and the device->host copy of the action) + env.step (+ env.reset at an episode end), i.e. what each script
does per online env step. Reported: act_ms, env_ms, step_ms (per env step); online_overhead_fraction = step_ms /
update_ms, where update_ms = 1000 / updates_per_s: the time of one OFFLINE update stands in for one online update
(the same update for iql and cal_ql; same-sized networks for o2td3 (its online update: ~1.3x the FLOPs), aca and pex;
for o2sac the CQL update is ~10x its online fine-tuning update's FLOPs, so its two online numbers are lower bounds),
at one update per env step (the issue's target: <= 10%); and env_steps_per_s =
1000 / (step_ms + utd * update_ms) with utd the config's updates per env step (o2sac utd, cal_ql online_utd, else
1). o2ppo fine-tunes on-policy (PPO epochs over each rollout_length rollout), so its update cost is amortised over
rollouts and not a per-step cost: its env_steps_per_s is env + act only. Not counted: each script's per-block
buffer_insert and update dispatch (per env step for o2sac and o2td3, whose online_block is 1) and its logging.
Caveat: a random-initialised actor ends Hopper episodes early, so there are more resets than with a trained one.

Run time: every algorithm runs one warm-up block and at least 2 timed blocks; at ~6-10 updates/s a 1000-update
block of cal_ql or o2sac (CQL: Q at 31 actions per state) takes 100-170 s, most of the total (`--block 200`
shortens it). Other processes on the machine slow every number here: the JSON records the load average.
"""
import argparse
import functools
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "algorithms"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

OBS_DIM, ACT_DIM = 11, 3
MATMUL_ROWS = (256, 2560)  # the reference matmuls: (rows, 256) @ (256, 256), float32
ENV_ID = "Hopper-v5"
ALGOS = ("iql", "cal_ql", "o2sac", "o2td3", "o2ppo", "aca", "pex")
NORM = (np.zeros(OBS_DIM, np.float32), np.ones(OBS_DIM, np.float32))  # obs mean / std of the states
KEY = jax.random.PRNGKey(1)  # the update key of the single-update cost analysis
ONLINE_NOTE = ("per env step, one seed: act_ms (act function incl. transfers) + env_ms (env.step, env.reset at an "
               "episode end) = step_ms; update_ms = 1000 / updates_per_s: one OFFLINE update stands in for one "
               "online update; online_overhead_fraction = step_ms / update_ms (one update per env step); "
               "env_steps_per_s = 1000 / (step_ms + updates_per_env_step * update_ms), updates_per_env_step from "
               "the config (null: on-policy, see the algorithm's online_note)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="synthetic dataset size")
    p.add_argument("--block", type=int, default=1000, help="updates per jitted block")
    p.add_argument("--seconds", type=float, default=10.0, help="timing budget per algorithm (after compile)")
    p.add_argument("--algos", default=",".join(ALGOS), help=f"comma-separated subset of {','.join(ALGOS)}")
    p.add_argument("--num_seeds", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")],
                   help="IQL: seeds trained together (vmapped), aggregate updates/s for each count")
    p.add_argument("--precision", default="float32", choices=("float32", "bf16"),
                   help="the algorithms' `precision` field (bf16: bfloat16 matrix products summed in float32)")
    p.add_argument("--env_steps", type=int, default=2000, help="online loop: env steps timed per algorithm")
    p.add_argument("--profile", default="iql,cal_ql",
                   help="comma-separated algorithms whose update block is also traced with jax.profiler to split its "
                        "time into matmuls, copies and other ops ('' for none)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_updates.json"))
    p.add_argument("--profile_child", default="", help=argparse.SUPPRESS)  # internal: the traced process
    args = p.parse_args(argv)
    for opt in ("algos", "profile"):
        unknown = set(filter(None, getattr(args, opt).split(","))) - set(ALGOS)
        if unknown:
            p.error(f"--{opt}: unknown {sorted(unknown)}; choose from {','.join(ALGOS)}")
    return args


def matmul_rate(m, k=256, n=256, seconds=2.0, batch=(), dtype=jnp.float32):
    """GFLOP/s of an (m, k) @ (k, n) matmul with `dtype` operands summed in float32; with batch=(B,), B independent
    ones in one batched matmul (the shape a layer takes when B seeds are vmapped)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (*batch, m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (*batch, k, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - t0 < seconds:
        for _ in range(20):
            out = f(a, b)
        out.block_until_ready()
        reps += 20
    dt = (time.perf_counter() - t0) / reps
    size = int(np.prod(batch, dtype=np.int64))
    return {"shape": "x".join(map(str, (*batch, m, k, n))), "seconds_per_matmul": dt,
            "gflops": 2.0 * size * m * k * n / dt / 1e9}


def flops_of(program):
    """XLA's FLOP count of a lowered or compiled program."""
    cost = program.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per device
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


# ---------------------------------------------------------------------------------------------- inputs
@functools.lru_cache(maxsize=None)
def synthetic(rows):
    """obs, act, rew, next_obs, done, mc_return columns of `rows` random transitions (device arrays)."""
    rng = np.random.default_rng(0)
    cols = [rng.standard_normal((rows, OBS_DIM), np.float32), rng.uniform(-1, 1, (rows, ACT_DIM)).astype(np.float32),
            rng.standard_normal(rows).astype(np.float32), rng.standard_normal((rows, OBS_DIM), np.float32),
            (rng.random(rows) < 0.001).astype(np.float32), rng.standard_normal(rows).astype(np.float32) * 10]
    return tuple(jnp.asarray(c) for c in cols)


def offline_buffer(module, rows):
    """The synthetic rows as `module.Buffer` (its first fields: obs, act, rew, next_obs, done[, mc])."""
    return module.Buffer(*synthetic(rows)[:len(module.Buffer._fields)])


def empty_online(offline, n_seeds):
    """An online buffer of one zero row per seed and online sizes 0 (offline phase: every batch row offline)."""
    online = jax.tree.map(lambda x: jnp.zeros((n_seeds, 1) + x.shape[1:], x.dtype), offline)
    return online, jnp.zeros((n_seeds,), jnp.int32)


def first_rows(buffer, n):
    return jax.tree.map(lambda x: x[:n], buffer)


def load_config(module, name, block, precision="float32"):
    """The algorithm's Hopper config (pyrallis.decode: what pyrallis.parse gives without a command line, ~1 s
    faster) with update_block = `block` and the given `precision`, and its path."""
    import pyrallis
    import yaml
    path = ROOT / "configs" / name / "o2o" / "hopper" / "medium-v0.yaml"
    cfg = pyrallis.decode(module.TrainConfig, yaml.safe_load(path.read_text()))
    cfg.update_block = block
    cfg.precision = precision
    return cfg, str(path.relative_to(ROOT))


HYPER_FIELDS = {"hidden_dims": "hidden", "policy_hidden": "policy_hidden", "actor_hidden": "actor_hidden",
                "critic_hidden": "critic_hidden", "n_critics": "n_critics", "cql_n_actions": "cql_n_actions",
                "batch_size": "batch_size", "iql_batch_size": "batch_size",
                # o2sac's offline CQL networks (its Hyper also holds the fine-tuning critic's sizes)
                "cql_critic_hidden": "critic_hidden", "cql_n_critics": "n_critics"}


def describe(source, h):
    """The JSON's description of a setup: its config file and the network sizes of its Hyper `h`."""
    fields = {key: getattr(h, f) for f, key in HYPER_FIELDS.items() if hasattr(h, f)}
    return {"config": source, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}


class Call(NamedTuple):
    """A jitted function applied to a state and fixed further arguments (`static`: its static keyword ones)."""
    fn: Any
    args: tuple = ()
    static: dict = {}

    def lower(self, state):
        return self.fn.lower(state, *self.args, **self.static)

    def compile(self, state):
        """(the compiled program, state -> fn(state, *args) run by that program: no second compilation)."""
        compiled = self.lower(state).compile()
        return compiled, lambda s: compiled(s, *self.args)


def one_update(update, *args, h):
    """Call of one (pure, not jitted) update function `update(state, *args, h=h)` jitted on its own."""
    return Call(jax.jit(update, static_argnames=("h",)), args, {"h": h})


class Setup(NamedTuple):
    """What an algorithm's adapter builds; `bench` does the rest."""
    info: dict  # config file and network sizes
    module: Any  # the algorithm's module (its stack_seeds makes the seed axis)
    init: Callable  # PRNG key -> one seed's state
    block: Callable  # n_seeds -> Call of the offline update block on states with a leading seed axis n_seeds
    one: Call  # one offline update of one seed's state on one batch
    act: Callable  # one-seed state -> act(obs [1, obs_dim], keys [1, 2], active [1]) -> (actions, keys)
    utd: Optional[int] = 1  # online updates per env step (None: on-policy, updates amortised over rollouts)
    note: str = ""  # how far the offline update stands in for the online one, where it is far off


# ---------------------------------------------------------------------------------------------- adapters
def prepare(name, args, hyper=lambda module, cfg: module.make_hyper(cfg, OBS_DIM, ACT_DIM)):
    """(module, config, Hyper, offline buffer, description) of algorithm `name`."""
    module = importlib.import_module(name)
    cfg, source = load_config(module, name, args.block, args.precision)
    h = hyper(module, cfg)
    return module, cfg, h, offline_buffer(module, args.rows), describe(source, h)


def explore(module, h, *extra):
    """One-seed state -> the script's per-step act call: module.act_explore(actor params, obs stats, obs, keys,
    active, *extra, h) -> (action, next keys) (its first and last outputs)."""
    def act(s):
        def step(obs, keys, active):
            out = module.act_explore(s.actor.params, s.obs_mean, s.obs_std, obs, keys, active, *extra, h)
            return out[0], out[-1]
        return step
    return act


def setup_iql(args):
    iql, cfg, h, offline, info = prepare("iql", args)
    return Setup(
        info, iql, lambda key: iql.init_state(h, key, *NORM),
        lambda n: Call(iql.scan_updates, (offline, *empty_online(offline, n)), {"h": h}),
        one_update(iql.iql_update, first_rows(offline, h.batch_size), KEY, h=h), explore(iql, h))


def setup_cal_ql(args):
    cal_ql, cfg, h, offline, info = prepare("cal_ql", args)
    flags = (cfg.calibration, cfg.cql_weight)  # the offline phase's
    return Setup(
        info, cal_ql, lambda key: cal_ql.init_state(h, key, *NORM, cfg.log_alpha_prime_init),
        lambda n: Call(cal_ql.scan_updates, (offline, args.rows, *empty_online(offline, n), *flags), {"h": h}),
        one_update(cal_ql.calql_update, first_rows(offline, h.batch_size), KEY, *flags, h=h), explore(cal_ql, h),
        cfg.online_utd)


def setup_o2sac(args):
    # one Hyper holds the CQL hyper-parameters (cql_*) too; the fine-tuning actor is the CQL actor (the same network)
    o2sac, cfg, h, offline, info = prepare("o2sac", args)
    return Setup(
        info, o2sac, lambda key: o2sac.init_cql_state(h, key, *NORM),
        lambda n: Call(o2sac.scan_cql_updates, (offline, args.rows), {"h": h}),
        one_update(o2sac.cql_update, first_rows(offline, h.batch_size), KEY, h=h), explore(o2sac, h),
        cfg.utd, "the offline CQL update (Q at 1 + 3 cql_n_actions actions per state) is ~10x the FLOPs of the "
                 "online fine-tuning update: online_overhead_fraction and env_steps_per_s are lower bounds")


def setup_o2td3(args):
    # the TD3+BC hyper-parameters; fine-tuning keeps the actor network
    o2td3, cfg, h, offline, info = prepare("o2td3", args, lambda m, cfg: m.make_hyper(cfg, OBS_DIM, ACT_DIM, True))
    return Setup(
        info, o2td3, lambda key: o2td3.init_offline_state(h, key, *NORM),
        lambda n: Call(o2td3.scan_updates, (offline,), {"phase": "offline", "h": h}),
        one_update(o2td3.td3bc_update, first_rows(offline, h.batch_size), KEY, 0, h=h),
        explore(o2td3, h, cfg.explore_noise))  # the executed (noisy) action


def setup_o2ppo(args):
    o2ppo, cfg, h, offline, info = prepare("o2ppo", args)
    return Setup(
        info, o2ppo, lambda key: o2ppo.init_iql_state(h, key, *NORM),
        lambda n: Call(o2ppo.scan_offline_updates, (offline,), {"h": h}),
        one_update(o2ppo.iql_update, first_rows(offline, h.iql_batch_size), h=h),
        explore(o2ppo, h),  # PPO acts with the IQL actor's network and parameters (it starts from them)
        None, "on-policy PPO online: its updates are amortised over rollouts, env_steps_per_s = 1000 / step_ms "
              "(env + act only)")


def setup_aca(args):
    aca, cfg, h, offline, info = prepare("aca", args)
    noise = {k: jnp.zeros((h.batch_size, ACT_DIM)) for k in ("temp", "next", "z_next", "pi")}
    return Setup(
        info, aca, lambda key: aca.init_state(h, key, *NORM, cfg.initial_temperature),
        lambda n: Call(aca.scan_updates, (offline,), {"h": h}),
        one_update(aca.offline_update, first_rows(offline, h.batch_size), noise, h=h), explore(aca, h))


def setup_pex(args):
    pex, cfg, h, offline, info = prepare("pex", args)

    def act(state):  # online: the expanded state (frozen offline actor + new actor), composite actions
        s = jax.jit(jax.vmap(lambda one: pex.expand(one, h, cfg.reset_optimizers)))(state)
        return lambda o, k, a: pex.act_explore(s.offline_actor, s.actor.params, s.critic.params, s.obs_mean,
                                               s.obs_std, o, k, a, h)[::2]  # (action, key)
    return Setup(
        info, pex, lambda key: pex.init_state(h, key, *NORM),
        lambda n: Call(pex.scan_updates, (offline, args.rows), {"h": h}),
        one_update(pex.iql_update, first_rows(offline, h.batch_size), KEY, h=h), act)


SETUPS = {"iql": setup_iql, "cal_ql": setup_cal_ql, "o2sac": setup_o2sac, "o2td3": setup_o2td3,
          "o2ppo": setup_o2ppo, "aca": setup_aca, "pex": setup_pex}


# ---------------------------------------------------------------------------------------------- measuring
def time_blocks(run_block, state, block, seconds):
    """(updates/s, blocks timed): blocks of `block` updates for `seconds` (at least 2), after one warm-up block."""
    state, metrics = run_block(state)
    jax.block_until_ready(metrics)
    blocks, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or blocks < 2:
        state, metrics = run_block(state)
        jax.block_until_ready(metrics)
        blocks += 1
    dt = time.perf_counter() - t0
    return blocks * block / dt, blocks


def time_online(act, env_steps, seed=0):
    """Per env step: act (one seed, as the scripts call it) then env.step, env.reset at an episode end."""
    import gymnasium as gym
    env = gym.make(ENV_ID)
    assert env.observation_space.shape == (OBS_DIM,) and env.action_space.shape == (ACT_DIM,)
    obs = np.zeros((1, OBS_DIM), np.float32)
    obs[0] = env.reset(seed=seed)[0]
    keys, active = jnp.asarray(jax.random.PRNGKey(seed))[None], np.ones(1, bool)
    np.asarray(act(obs, keys, jnp.asarray(active))[0])  # compile
    t_act = t_env = 0.0
    episodes = 0
    for _ in range(env_steps):
        t0 = time.perf_counter()
        actions, keys = act(obs, keys, jnp.asarray(active))
        actions = np.asarray(actions)
        t1 = time.perf_counter()
        next_obs, _, term, trunc, _ = env.step(np.clip(actions[0], -1.0, 1.0))
        if term or trunc:
            next_obs, episodes = env.reset()[0], episodes + 1
        obs[0] = next_obs
        t_act, t_env = t_act + t1 - t0, t_env + time.perf_counter() - t1
    env.close()
    n = max(env_steps, 1)
    return {"act_ms": 1000 * t_act / n, "env_ms": 1000 * t_env / n, "step_ms": 1000 * (t_act + t_env) / n,
            "env_steps_timed": env_steps, "episodes_ended": episodes}


# XLA:CPU runs a compiled program as a sequence of ops ("thunks") on its worker threads; jax.profiler records one
# event per op there, named after the HLO instruction. Events that are the executor's own bookkeeping:
_NOT_OPS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ")


def op_kinds(hlo_text):
    """HLO instruction name -> 'matmul' (a dot, or a fusion whose computation has one: XLA:CPU hands those to
    YNNPACK/Eigen), 'copy' (copies and copy fusions: layout changes, mostly transposes), 'loop' (while, call,
    conditional: the scan's own control) or 'other' (elementwise, reductions, gathers, RNG)."""
    computations = _computations(hlo_text)
    has_dot = {c for c, body in computations.items() if any(re.search(r" dot\(", ln) for ln in body)}
    kinds = {}
    for body in computations.values():
        for line in body:
            m = re.match(r"\s*(?:ROOT )?%(\S+) = .*?\s([\w-]+)\(", line)
            if not m:
                continue
            name, opcode = m.groups()
            called = re.search(r"calls=%([\w.-]+)", line)
            if opcode == "dot" or (opcode == "fusion" and called and called.group(1) in has_dot):
                kinds[name] = "matmul"
            elif opcode == "copy" or (opcode == "fusion" and name.startswith("copy")):
                kinds[name] = "copy"
            elif opcode in ("while", "call", "conditional"):
                kinds[name] = "loop"
            else:
                kinds[name] = "other"
    return kinds


def _computations(hlo_text):
    """Computation name -> its instruction lines, from a compiled program's HLO text."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if head and line.rstrip().endswith("{"):
            current = computations.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    return computations


def dot_specs(hlo_text):
    """(lhs shape, rhs shape, dimension numbers) of every dot of a compiled program (a while loop's body once, so
    for an update block: the dots of one update, as XLA kept them after its rewrites)."""
    specs = []
    for body in _computations(hlo_text).values():
        shapes = {}
        for line in body:
            m = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]", line)
            if m:
                shapes[m.group(1)] = tuple(int(d) for d in m.group(2).split(",") if d)
            d = re.search(r" dot\(%([\w.-]+), %([\w.-]+)\)", line)
            if d:
                dims = {k: tuple(int(x) for x in v.split(",") if x) for k, v in
                        re.findall(r"(\w+_dims)=\{([\d,]*)\}", line)}
                specs.append((shapes[d.group(1)], shapes[d.group(2)],
                              ((dims.get("lhs_contracting_dims", ()), dims.get("rhs_contracting_dims", ())),
                               (dims.get("lhs_batch_dims", ()), dims.get("rhs_batch_dims", ())))))
    return specs


def canonical(spec):
    """The same dot as a plain batched [B, M, K] @ [B, K, N] matmul (contraction last on the left, first on the
    right: no operand needs a transpose): same FLOPs, the layout a GEMM library likes best."""
    lhs, rhs, ((lc, rc), (lb, rb)) = spec
    size = lambda shape, axes: int(np.prod([shape[i] for i in axes]))  # noqa: E731
    b, k = size(lhs, lb), size(lhs, lc)
    m = size(lhs, [i for i in range(len(lhs)) if i not in lc + lb])
    n = size(rhs, [i for i in range(len(rhs)) if i not in rc + rb])
    return (b, m, k), (b, k, n), (((2,), (1,)), ((0,), (0,)))


def dots_only_rate(specs, seconds=2.0, as_gemms=False):
    """Time a program that does nothing but these dots (random float32 operands; one jitted call for all of them,
    so independent dots may run concurrently as in the update): the time an update would take if everything else
    were free. As given, XLA picks the operands' layouts (and adds the transposes its matmul library needs);
    `as_gemms`: each dot as its canonical() matmul. GFLOP/s counts 2 * |lhs| * the rhs's free size per dot."""
    if as_gemms:
        specs = [canonical(spec) for spec in specs]
    keys = jax.random.split(jax.random.PRNGKey(2), 2 * len(specs))
    operands = [(jax.random.normal(keys[2 * i], lhs), jax.random.normal(keys[2 * i + 1], rhs))
                for i, (lhs, rhs, _) in enumerate(specs)]
    dns = [dn for *_, dn in specs]
    f = jax.jit(lambda ops: [jax.lax.dot_general(a, b, dn) for (a, b), dn in zip(ops, dns)])
    jax.block_until_ready(f(operands))
    reps, t0 = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - t0 < seconds:
        for _ in range(5):
            out = f(operands)
        jax.block_until_ready(out)
        reps += 5
    dt = (time.perf_counter() - t0) / reps
    flops = 0.0
    for lhs, rhs, ((_, rc), (_, rb)) in specs:  # 2 * |lhs| * the rhs's free (neither contracted nor batch) size
        flops += 2.0 * np.prod(lhs) * np.prod([n for i, n in enumerate(rhs) if i not in rc + rb])
    return {"dots": len(specs), "flops": flops, "ms_per_call": 1000 * dt, "gflops": flops / dt / 1e9}


def profile_block(compiled, run, state, block):
    """One block of `block` updates traced with jax.profiler. Per update: the block's wall time and the summed
    duration of XLA's op events by kind (op_kinds). Ops run concurrently on the worker threads, and a matmul op
    also uses the other core inside its library call, so the kinds' sum can exceed the wall time: read them as
    shares of the op time, not of the cores. The trace slows the block down (one event per op)."""
    import glob
    import tempfile
    from jax.profiler import ProfileData
    kinds = op_kinds(compiled.as_text())
    jax.block_until_ready(run(state))  # warm
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            jax.block_until_ready(run(state))
            wall = time.perf_counter() - t0
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return {"error": "jax.profiler wrote no trace"}
        data = ProfileData.from_file(files[0])
    ms = {"matmul": 0.0, "copy": 0.0, "loop": 0.0, "other": 0.0, "unmatched": 0.0}
    events = 0
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                kind = kinds.get(ev.name)
                if kind is None:  # executor bookkeeping and Python frames are skipped; an op name not in the
                    if ev.name.startswith(_NOT_OPS) or not re.fullmatch(r"[\w.-]+", ev.name):  # program: counted
                        continue
                    kind = "unmatched"
                ms[kind] += ev.duration_ns / 1e6 / block
                events += 1
    total = sum(ms.values())
    return {"wall_ms_per_update_traced": 1000 * wall / block, "op_ms_per_update": ms,
            "op_share": {k: v / total for k, v in ms.items()} if total else {}, "op_events_per_update": events / block}


PROFILE_BLOCK = 200  # updates in the child's traced block (XLA lists a loop body once: same ops and dots)


def profile_child(args):
    """In its own process: trace one block of algorithm `args.profile_child` (profile_block), then time its dots
    alone (dots_only_rate: as laid out by XLA, and as plain matmuls); print the results as one JSON line. The
    parent never loads the profiler nor runs the dots-only programs. (This was first done because two runs hung in
    a LATER algorithm's block; the cause found later was jaxlib's batched-LAPACK deadlock in that algorithm's
    orthogonal init, gone since the algorithm files' orthogonal_kernel_init; see tests/test_thread_pool_hang.py.
    The child's time limit still bounds any hang.)"""
    setup = SETUPS[args.profile_child](args)
    state = jax.jit(lambda key: setup.module.stack_seeds([setup.init(key)]))(jax.random.PRNGKey(0))
    compiled, run = setup.block(1).compile(state)
    out = {"profile": profile_block(compiled, run, state, args.block)}
    specs = dot_specs(compiled.as_text())
    for key, as_gemms in (("dots_only", False), ("dots_as_gemms", True)):
        dots = dots_only_rate(specs, seconds=min(2.0, max(args.seconds, 0.1)), as_gemms=as_gemms)
        dots["updates_per_s"] = 1000.0 / dots["ms_per_call"]
        out[key] = dots
    print("PROFILE_JSON " + json.dumps(out), flush=True)


def profile_in_subprocess(name, args, timeout, tries=2):
    """profile_child's results for `name` from a child process; a failed or timed-out child is retried once;
    {'profile': {'error': ...}} if every try fails."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--profile_child", name, "--rows", str(args.rows),
           "--block", str(min(args.block, PROFILE_BLOCK)), "--seconds", str(args.seconds), "--algos", name,
           "--profile", ""]
    errors = []
    for _ in range(tries):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            errors.append(f"the child did not finish within {timeout:.0f} s")
            continue
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROFILE_JSON ")), None)
        if proc.returncode == 0 and line is not None:
            result = json.loads(line[len("PROFILE_JSON "):])
            result["profile"]["tries"] = len(errors) + 1
            return result
        errors.append(f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}")
    return {"profile": {"error": "; ".join(errors)}}


def bench(args, setup: Setup, seed_counts=(), profile=False):
    """One algorithm: its single update's FLOPs, its block's updates/s with one seed (and with each of
    `seed_counts` seeds vmapped), the online loop's step time against the update time."""
    # the seeds' states stacked by the module's stack_seeds, in one jitted program (eagerly: ~70 small compiles)
    stacked = jax.jit(lambda keys: setup.module.stack_seeds([setup.init(k) for k in keys]))

    def timed(n_seeds):  # (compiled block, updates/s per seed, blocks timed, the state before the blocks)
        state = stacked([jax.random.PRNGKey(s) for s in range(n_seeds)])
        compiled, run = setup.block(n_seeds).compile(state)
        return (compiled, *time_blocks(run, state, args.block, args.seconds), state)

    # lowered only (shapes suffice), not compiled: saves time
    out = {**setup.info, "flops_per_update": flops_of(setup.one.lower(jax.eval_shape(setup.init, KEY)))}
    compiled, rate, out["blocks_timed"], state = timed(1)
    out["flops_compiled_block"] = flops_of(compiled)
    if profile:  # compile, a warm-up and a traced block, and the dots, in the child: a generous time limit
        child = profile_in_subprocess(setup.module.__name__, args,
                                      timeout=300 + 10 * min(args.block, PROFILE_BLOCK) / rate)
        out.update(child)
        prof = out["profile"]
        if "op_ms_per_update" in prof:  # the matmul ops' own rate: the update's FLOPs are almost all theirs
            prof["matmul_gflops_within_ops"] = out["flops_per_update"] / prof["op_ms_per_update"]["matmul"] / 1e6
    out["updates_per_s"] = rate
    out["achieved_gflops"] = rate * out["flops_per_update"] / 1e9  # (its fraction of the matmul rate: main)
    if seed_counts:
        out["num_seeds"] = {}
        for n in seed_counts:
            rate_n, blocks = (rate, out["blocks_timed"]) if n == 1 else timed(n)[1:3]
            out["num_seeds"][n] = {"aggregate_updates_per_s": rate_n * n, "blocks_timed": blocks,
                                   "speedup_vs_1_seed": rate_n * n / rate}
    online = time_online(setup.act(state), args.env_steps)
    update_ms = 1000.0 / rate
    steps_per_s = 1000.0 / (online["step_ms"] + (setup.utd or 0) * update_ms)
    out.update(online, update_ms=update_ms, online_overhead_fraction=online["step_ms"] / update_ms,
               updates_per_env_step=setup.utd, env_steps_per_s=steps_per_s)
    if setup.note:
        out["online_note"] = setup.note
    return out


def main(args):
    result = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__, "backend": jax.default_backend(),
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "load_average_before": os.getloadavg(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "rows": args.rows, "block": args.block, "precision": args.precision, "env": ENV_ID,
              "env_steps": args.env_steps,
              "online_note": ONLINE_NOTE}
    try:
        with open("/proc/cpuinfo") as f:
            result["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # The matmul rates drift on a shared machine (other tenants of the VM): each is sampled at the start and after
    # every algorithm, and the ratios use the median of the samples (all samples are in the JSON).
    samples = {m: [] for m in MATMUL_ROWS}

    def sample_matmuls():
        for m in MATMUL_ROWS:
            samples[m].append(matmul_rate(m, seconds=min(1.0, args.seconds)))
    sample_matmuls()
    for m in MATMUL_ROWS:
        print(f"matmul {samples[m][0]['shape']}: {samples[m][0]['gflops']:.1f} GFLOP/s (first sample)")
    # the ceiling of the --num_seeds speed-up for matmul-bound updates: 4 seeds' 256x256x256 layers in one batched
    # matmul vs one seed's
    batched = matmul_rate(256, seconds=min(2.0, args.seconds), batch=(4,))
    batched["ratio_to_single"] = batched["gflops"] / samples[256][0]["gflops"]  # the sample just before
    result["matmul_batched"] = batched
    print(f"matmul {batched['shape']} (batched): {batched['gflops']:.1f} GFLOP/s = "
          f"{batched['ratio_to_single']:.2f}x the 256x256x256 rate")
    for name in args.algos.split(","):
        r = bench(args, SETUPS[name](args), args.num_seeds if name == "iql" else (),
                  profile=name in args.profile.split(","))
        result[name] = r
        sample_matmuls()
        for n, v in r.get("num_seeds", {}).items():
            print(f"{name} --num_seeds {n}: {v['aggregate_updates_per_s']:.1f} aggregate updates/s "
                  f"({v['speedup_vs_1_seed']:.2f}x one seed)")
        utd = f"{r['updates_per_env_step']} update(s)/step" if r["updates_per_env_step"] else "env + act only"
        print(f"{name}: {r['updates_per_s']:.1f} updates/s, {r['flops_per_update'] / 1e6:.1f} MFLOP/update, "
              f"{r['achieved_gflops']:.1f} GFLOP/s; "
              f"online step {r['step_ms']:.2f} ms (act {r['act_ms']:.2f} + env {r['env_ms']:.2f}) = "
              f"{100 * r['online_overhead_fraction']:.1f}% of an update, {r['env_steps_per_s']:.0f} env steps/s "
              f"({utd})")
        if "op_share" in r.get("profile", {}):
            pr = r["profile"]
            print(f"{name} profile: {pr['wall_ms_per_update_traced']:.2f} ms/update traced; op time " + ", ".join(
                f"{k} {v:.2f} ms ({100 * pr['op_share'][k]:.0f}%)" for k, v in pr["op_ms_per_update"].items())
                + f"; matmul ops at {pr['matmul_gflops_within_ops']:.0f} GFLOP/s")
        for key, what in (("dots_only", "dots alone"), ("dots_as_gemms", "dots as plain matmuls")):
            if key in r:
                d = r[key]
                print(f"{name}: its {d['dots']} {what}: {d['ms_per_call']:.2f} ms ({d['flops'] / 1e6:.1f} MFLOP) = "
                      f"{d['updates_per_s']:.1f} updates/s, {d['gflops']:.1f} GFLOP/s")
    result["matmul"] = []
    for m in MATMUL_ROWS:
        rates = [x["gflops"] for x in samples[m]]
        result["matmul"].append({"shape": samples[m][0]["shape"], "gflops": float(np.median(rates)),
                                 "gflops_samples": rates, "statistic": "median of the samples"})
        print(f"matmul {result['matmul'][-1]['shape']}: median {np.median(rates):.1f} GFLOP/s over {len(rates)} "
              f"samples ({min(rates):.1f}-{max(rates):.1f})")
    peak = max(m["gflops"] for m in result["matmul"])
    for name in args.algos.split(","):
        r = result[name]
        r["fraction_of_matmul_gflops"] = r["achieved_gflops"] / peak  # of the faster (2560-row) rate
        r["fraction_of_matmul_256"] = r["achieved_gflops"] / result["matmul"][0]["gflops"]
        msg = (f"{name}: {r['achieved_gflops']:.1f} GFLOP/s = {r['fraction_of_matmul_256']:.2f}x the 256^3 rate, "
               f"{r['fraction_of_matmul_gflops']:.2f}x the 2560x256^2 rate")
        for key in ("dots_only", "dots_as_gemms"):
            if key in r:
                r[key]["fraction_of_matmul_gflops"] = r[key]["gflops"] / peak
                msg += f"; {key} {r[key]['gflops'] / result['matmul'][0]['gflops']:.2f}x / " \
                       f"{r[key]['fraction_of_matmul_gflops']:.2f}x"
        print(msg)
    result["load_average_after"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    _args = parse_args()
    if _args.profile_child:
        profile_child(_args)
    else:
        main(_args)
