"""Train the SAC behaviour policies of the local D4RL-style suite (JAX).

D4RL built its locomotion datasets from SAC agents (Fu et al. 2020, https://arxiv.org/abs/2004.07219):
expert = the fully trained policy, medium = a policy at about a third of expert return, medium-replay =
the replay buffer collected until the medium policy. This script trains one such agent per environment
and writes, into its work directory:

  progress.csv          one row per evaluation (step, deterministic + stochastic return, losses, time)
  snapshots/step_N.npz  the actor parameters every `snapshot_every` env steps (the acting policy of the
                        next `snapshot_every` steps: this is what rebuilds medium-replay)
  checkpoint/           full state (networks, optimisers, replay buffer, RNGs, env state), for --resume

`benchmarks/make_datasets.py --select` then picks the medium/expert snapshots and copies the few files
the datasets need into `benchmarks/behavior_policies/<env>/` (committed).

Reproduce the shipped policies (one process per environment; resumable, so it can span sessions):
    python benchmarks/train_behavior.py --env hopper --seed 0 --resume
    python benchmarks/train_behavior.py --env walker2d --seed 0 --resume
    python benchmarks/train_behavior.py --env halfcheetah --seed 0 --resume

SAC (Haarnoja et al. 2018): 2 critics vmapped, 256-256 MLPs, Adam 3e-4, batch 256, gamma 0.99, tau
0.005, automatic temperature with target entropy -|A|, 10k uniform-random start steps. Updates run in
jitted `lax.scan` blocks of `block` updates after every `block` env steps (1 update per env step on
average; SpinningUp's `update_every`), with batches sampled on device from a device-resident buffer.
A resumed run restores the MuJoCo state of the episode in progress, so it continues the same stream of
transitions (not bit-identical to an uninterrupted run: MuJoCo's solver warm start is not restored).
"""
import argparse
import csv
import json
import os
import pickle
import time
from functools import partial
from typing import NamedTuple

import numpy as np

ENV_IDS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", required=True, choices=sorted(ENV_IDS), help="environment to train on")
    p.add_argument("--seed", type=int, default=0, help="seed of networks, env and sampling")
    p.add_argument("--total_steps", type=int, default=1_000_000, help="env steps (= updates) in all")
    p.add_argument("--start_steps", type=int, default=10_000, help="uniform-random steps before learning")
    p.add_argument("--block", type=int, default=50, help="env steps between update blocks (= updates per block)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--tau", type=float, default=0.005)
    p.add_argument("--eval_every", type=int, default=10_000, help="env steps between evaluations")
    p.add_argument("--eval_episodes", type=int, default=5)
    p.add_argument("--snapshot_every", type=int, default=10_000, help="env steps between actor snapshots")
    p.add_argument("--checkpoint_every", type=int, default=50_000, help="env steps between full checkpoints")
    p.add_argument("--workdir", default=None, help="default: benchmarks/behavior_runs/<env>_seed<seed>")
    p.add_argument("--resume", action="store_true", help="continue from workdir/checkpoint if it exists")
    args = p.parse_args(argv)
    for name in ("eval_every", "snapshot_every", "checkpoint_every", "start_steps"):
        if getattr(args, name) % args.block:
            p.error(f"--{name}={getattr(args, name)} must be a multiple of --block={args.block}")
    if args.workdir is None:
        args.workdir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "behavior_runs",
                                    f"{args.env}_seed{args.seed}")
    return args


# ---- networks ----
import jax  # noqa: E402  (after argparse so --help is instant)
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402
import optax  # noqa: E402
from flax import serialization  # noqa: E402
from flax.training.train_state import TrainState  # noqa: E402


class Actor(nn.Module):
    """Tanh-Gaussian actor. Layer names match the .npz snapshot layout read by make_datasets.py."""
    act_dim: int
    hidden: int = 256

    @nn.compact
    def __call__(self, obs):
        h = nn.relu(nn.Dense(self.hidden, name="l0")(obs))
        h = nn.relu(nn.Dense(self.hidden, name="l1")(h))
        out = nn.Dense(2 * self.act_dim, name="l2")(h)
        mean, log_std = jnp.split(out, 2, axis=-1)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class Critic(nn.Module):
    hidden: int = 256

    @nn.compact
    def __call__(self, obs, act):
        h = jnp.concatenate([obs, act], -1)
        h = nn.relu(nn.Dense(self.hidden)(h))
        h = nn.relu(nn.Dense(self.hidden)(h))
        return nn.Dense(1)(h).squeeze(-1)


def make_critic_ensemble(hidden, n=2):
    return nn.vmap(Critic, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=None, out_axes=0, axis_size=n)(hidden=hidden)


def sample_tanh_gaussian(mean, log_std, key):
    """Reparameterised tanh-Gaussian sample and its log-prob (stable tanh correction)."""
    std = jnp.exp(log_std)
    u = mean + std * jax.random.normal(key, mean.shape)
    logp_u = -0.5 * (((u - mean) / std) ** 2 + 2 * log_std + jnp.log(2 * jnp.pi))
    log_det = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.tanh(u), jnp.sum(logp_u - log_det, -1)


# ---- state ----
class SACState(NamedTuple):
    actor: TrainState
    critic: TrainState
    critic_target: dict
    alpha: TrainState
    key: jax.Array


class Buffer(NamedTuple):
    obs: jax.Array
    act: jax.Array
    rew: jax.Array
    next_obs: jax.Array
    done: jax.Array  # true terminations only (time-limit truncations bootstrap)


def init_state(key, obs_dim, act_dim, args):
    k_actor, k_critic, key = jax.random.split(key, 3)
    actor = Actor(act_dim, args.hidden)
    critic = make_critic_ensemble(args.hidden)
    o, a = jnp.zeros((1, obs_dim)), jnp.zeros((1, act_dim))
    actor_params = actor.init(k_actor, o)["params"]
    critic_params = critic.init(k_critic, o, a)["params"]
    tx = lambda: optax.adam(args.lr)  # noqa: E731
    return SACState(
        actor=TrainState.create(apply_fn=actor.apply, params=actor_params, tx=tx()),
        critic=TrainState.create(apply_fn=critic.apply, params=critic_params, tx=tx()),
        critic_target=critic_params,
        alpha=TrainState.create(apply_fn=None, params={"log_alpha": jnp.zeros(())}, tx=tx()),
        key=key)


# ---- updates ----
def sac_update(state: SACState, batch: Buffer, key, gamma, tau, target_entropy):
    k_next, k_pi = jax.random.split(key)
    alpha = jnp.exp(state.alpha.params["log_alpha"])

    # critic
    mean, log_std = state.actor.apply_fn({"params": state.actor.params}, batch.next_obs)
    next_act, next_logp = sample_tanh_gaussian(mean, log_std, k_next)
    q_next = state.critic.apply_fn({"params": state.critic_target}, batch.next_obs, next_act).min(0)
    target = batch.rew + gamma * (1.0 - batch.done) * (q_next - alpha * next_logp)

    def critic_loss(params):
        q = state.critic.apply_fn({"params": params}, batch.obs, batch.act)
        return ((q - target) ** 2).mean(1).sum(), q.mean()

    (c_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic.params)
    critic = state.critic.apply_gradients(grads=grads)

    # actor
    def actor_loss(params):
        mean, log_std = state.actor.apply_fn({"params": params}, batch.obs)
        act, logp = sample_tanh_gaussian(mean, log_std, k_pi)
        q = critic.apply_fn({"params": critic.params}, batch.obs, act).min(0)
        return (alpha * logp - q).mean(), logp

    (a_loss, logp), grads = jax.value_and_grad(actor_loss, has_aux=True)(state.actor.params)
    actor = state.actor.apply_gradients(grads=grads)

    # temperature
    entropy_gap = jax.lax.stop_gradient(-logp.mean() - target_entropy)
    alpha_grads = jax.grad(lambda p: p["log_alpha"] * entropy_gap)(state.alpha.params)
    alpha_state = state.alpha.apply_gradients(grads=alpha_grads)

    critic_target = optax.incremental_update(critic.params, state.critic_target, tau)
    metrics = {"critic_loss": c_loss, "actor_loss": a_loss, "q": q_mean, "alpha": alpha,
               "entropy": -logp.mean()}
    return state._replace(actor=actor, critic=critic, critic_target=critic_target, alpha=alpha_state), metrics


@partial(jax.jit, static_argnames=("n", "batch_size", "gamma", "tau", "target_entropy"))
def update_block(state: SACState, buffer: Buffer, size, n, batch_size, gamma, tau, target_entropy):
    """`n` SAC updates in one scan; batches drawn on device from buffer rows [0, size)."""
    def body(state, _):
        key, k_idx, k_upd = jax.random.split(state.key, 3)
        idx = jax.random.randint(k_idx, (batch_size,), 0, size)
        batch = jax.tree.map(lambda x: x[idx], buffer)
        state, metrics = sac_update(state._replace(key=key), batch, k_upd, gamma, tau, target_entropy)
        return state, metrics

    state, metrics = jax.lax.scan(body, state, None, length=n)
    return state, jax.tree.map(jnp.mean, metrics)


@partial(jax.jit, donate_argnums=(0,))
def buffer_insert(buffer: Buffer, chunk: Buffer, start):
    return jax.tree.map(lambda b, c: jax.lax.dynamic_update_slice_in_dim(b, c, start, 0), buffer, chunk)


def make_act(actor: Actor):
    @jax.jit
    def act(params, obs, key):
        key, sub = jax.random.split(key)
        mean, log_std = actor.apply({"params": params}, obs)
        action, _ = sample_tanh_gaussian(mean, log_std, sub)
        return action, jnp.tanh(mean), key
    return act


# ---- env helpers ----
def _time_limit(env):
    import gymnasium as gym
    while not isinstance(env, gym.wrappers.TimeLimit):
        env = env.env
    return env


def env_snapshot(env, obs, ep_ret, ep_len):
    u, tl = env.unwrapped, _time_limit(env)
    return {"qpos": u.data.qpos.copy(), "qvel": u.data.qvel.copy(), "elapsed": tl._elapsed_steps,
            "np_random": u.np_random.bit_generator.state, "obs": obs, "ep_ret": ep_ret, "ep_len": ep_len}


def env_restore(env, snap):
    env.reset()  # initialises wrappers (order enforcing, time limit)
    u = env.unwrapped
    u.set_state(snap["qpos"], snap["qvel"])
    u.np_random.bit_generator.state = snap["np_random"]
    _time_limit(env)._elapsed_steps = snap["elapsed"]
    return snap["obs"], snap["ep_ret"], snap["ep_len"]


def evaluate(env, act, params, key, episodes, deterministic):
    returns = []
    for _ in range(episodes):
        obs, _ = env.reset()
        done, ret = False, 0.0
        while not done:
            a, a_det, key = act(params, obs, key)
            obs, r, term, trunc, _ = env.step(np.asarray(a_det if deterministic else a))
            ret += r
            done = term or trunc
        returns.append(ret)
    return float(np.mean(returns)), float(np.std(returns)), key


def save_snapshot(path, params):
    flat = {f"{layer}_{name}": np.asarray(v) for layer, d in params.items() for name, v in d.items()}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)


# ---- training ----
def train(args):
    import gymnasium as gym
    from tqdm import tqdm

    os.makedirs(os.path.join(args.workdir, "snapshots"), exist_ok=True)
    ckpt_dir = os.path.join(args.workdir, "checkpoint")
    env, eval_env = gym.make(ENV_IDS[args.env]), gym.make(ENV_IDS[args.env])
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    assert np.all(env.action_space.high == 1) and np.all(env.action_space.low == -1)
    target_entropy = -float(act_dim)

    state = init_state(jax.random.PRNGKey(args.seed), obs_dim, act_dim, args)
    act = make_act(Actor(act_dim, args.hidden))
    cap = args.total_steps
    buffer = Buffer(jnp.zeros((cap, obs_dim)), jnp.zeros((cap, act_dim)), jnp.zeros(cap),
                    jnp.zeros((cap, obs_dim)), jnp.zeros(cap))
    np_rng = np.random.default_rng(args.seed)
    act_key = jax.random.PRNGKey(args.seed + 10_000)
    eval_key = jax.random.PRNGKey(args.seed + 20_000)
    step, wall_offset = 0, 0.0

    if args.resume and os.path.exists(os.path.join(ckpt_dir, "meta.pkl")):
        with open(os.path.join(ckpt_dir, "meta.pkl"), "rb") as f:
            meta = pickle.load(f)
        with open(os.path.join(ckpt_dir, "state.msgpack"), "rb") as f:
            state = serialization.from_bytes(state, f.read())
        with np.load(os.path.join(ckpt_dir, "buffer.npz")) as z:
            rows = {k: z[k] for k in z.files}
        n = meta["step"]
        buffer = Buffer(*(b.at[:n].set(rows[name]) for b, name in zip(buffer, Buffer._fields)))
        step, wall_offset = meta["step"], meta["wall"]
        np_rng.bit_generator.state = meta["np_rng"]
        act_key, eval_key = jnp.asarray(meta["act_key"]), jnp.asarray(meta["eval_key"])
        obs, ep_ret, ep_len = env_restore(env, meta["env"])
        eval_env.reset(seed=args.seed + 1)
        eval_env.unwrapped.np_random.bit_generator.state = meta["eval_env_rng"]
        print(f"resumed {args.env} at step {step}")
    else:
        obs, _ = env.reset(seed=args.seed)
        eval_env.reset(seed=args.seed + 1)
        ep_ret, ep_len = 0.0, 0
        with open(os.path.join(args.workdir, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=1)

    log_path = os.path.join(args.workdir, "progress.csv")
    fields = ["step", "return_det", "return_det_std", "return_stoch", "return_stoch_std", "train_episode_return",
              "critic_loss", "actor_loss", "q", "alpha", "entropy", "wall_s"]
    if not os.path.exists(log_path):
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)
    else:  # drop rows logged after the checkpoint we resumed from
        with open(log_path) as f:
            rows_kept = [r for i, r in enumerate(csv.reader(f)) if i == 0 or int(r[0]) <= step]
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerows(rows_kept)

    t0 = time.time() - wall_offset
    metrics, recent_returns = {}, []
    chunk = {k: np.zeros((args.block,) + s, np.float32) for k, s in
             [("obs", (obs_dim,)), ("act", (act_dim,)), ("rew", ()), ("next_obs", (obs_dim,)), ("done", ())]}
    pbar = tqdm(total=args.total_steps, initial=step, desc=f"SAC {args.env}", mininterval=10)
    while step < args.total_steps:
        if step % args.snapshot_every == 0:  # the policy that acts for the next snapshot_every steps
            save_snapshot(os.path.join(args.workdir, "snapshots", f"step_{step:07d}.npz"), state.actor.params)
        for i in range(args.block):
            if step + i < args.start_steps:
                a = np_rng.uniform(-1.0, 1.0, act_dim).astype(np.float32)
            else:
                a, _, act_key = act(state.actor.params, obs, act_key)
                a = np.asarray(a)
            next_obs, r, term, trunc, _ = env.step(a)
            for k, v in (("obs", obs), ("act", a), ("rew", r), ("next_obs", next_obs), ("done", float(term))):
                chunk[k][i] = v
            ep_ret, ep_len = ep_ret + r, ep_len + 1
            obs = next_obs
            if term or trunc:
                recent_returns = (recent_returns + [ep_ret])[-10:]
                obs, _ = env.reset()
                ep_ret, ep_len = 0.0, 0
        buffer = buffer_insert(buffer, Buffer(*(jnp.asarray(chunk[k]) for k in Buffer._fields)), step)
        step += args.block
        pbar.update(args.block)
        if step >= args.start_steps:
            state, metrics = update_block(state, buffer, step, args.block, args.batch_size, args.gamma,
                                          args.tau, target_entropy)
        if step % args.eval_every == 0:
            det, det_std, eval_key = evaluate(eval_env, act, state.actor.params, eval_key, args.eval_episodes, True)
            sto, sto_std, eval_key = evaluate(eval_env, act, state.actor.params, eval_key, args.eval_episodes, False)
            m = {k: float(v) for k, v in metrics.items()}
            row = [step, det, det_std, sto, sto_std, float(np.mean(recent_returns)) if recent_returns else 0.0] + \
                  [m.get(k, float("nan")) for k in fields[6:11]] + [time.time() - t0]
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow(row)
            pbar.set_postfix(det=f"{det:.0f}", sto=f"{sto:.0f}", alpha=f"{m.get('alpha', 1):.3f}")
        if step % args.checkpoint_every == 0 or step == args.total_steps:
            tmp = ckpt_dir + ".tmp"
            os.makedirs(tmp, exist_ok=True)
            with open(os.path.join(tmp, "state.msgpack"), "wb") as f:
                f.write(serialization.to_bytes(state))
            np.savez(os.path.join(tmp, "buffer.npz"),
                     **{k: np.asarray(v[:step]) for k, v in zip(Buffer._fields, buffer)})
            meta = {"step": step, "wall": time.time() - t0, "np_rng": np_rng.bit_generator.state,
                    "act_key": np.asarray(act_key), "eval_key": np.asarray(eval_key),
                    "env": env_snapshot(env, obs, ep_ret, ep_len),
                    "eval_env_rng": eval_env.unwrapped.np_random.bit_generator.state}
            with open(os.path.join(tmp, "meta.pkl"), "wb") as f:
                pickle.dump(meta, f)
            if os.path.exists(ckpt_dir):
                os.replace(ckpt_dir, ckpt_dir + ".old")
            os.replace(tmp, ckpt_dir)
            if os.path.exists(ckpt_dir + ".old"):
                import shutil
                shutil.rmtree(ckpt_dir + ".old")
    save_snapshot(os.path.join(args.workdir, "snapshots", f"step_{step:07d}.npz"), state.actor.params)
    pbar.close()
    print(f"done: {args.env} {step} steps in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    train(parse_args())
