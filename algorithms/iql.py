"""IQL offline-to-online (single file, JAX): offline pre-training on a Minari dataset, then online fine-tuning.

Paper:  Kostrikov, Nair, Levine, "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022,
        https://arxiv.org/abs/2110.06169 (official code: https://github.com/ikostrikov/implicit_q_learning).
Reference implementation followed here (offline->online): CORL `algorithms/finetune/iql.py`,
        https://github.com/tinkoff-ai/CORL @ 6afec90484bbf47dee05fdf525e26a3ebe028e9b.

What is implemented (CORL semantics unless listed below):
  * V(s) by expectile regression on min_i Qbar_i(s,a) - V(s) (expectile `expectile`);
  * Q_i(s,a) by TD towards r + gamma (1-d) V(s') with the pre-update V; Polyak target Qbar (rate `tau`);
  * actor: Gaussian with tanh-squashed mean and a state-independent log-std (not squashed), trained by
    advantage-weighted regression  mean(min(exp(beta * adv), exp_adv_max) * -log pi(a|s));
  * update order per step: V, Q (with V(s') from before the V step), target EMA, actor (adv from the V step);
  * networks: MLPs with PyTorch-default init (U(+-1/sqrt(fan_in)) for weights and biases), a vmapped Q
    ensemble (`n_critics`, members initialised independently);
  * data: states normalised with the dataset mean/std; rewards `reward_scale * r + reward_bias` (AntMaze
    configs: r - 1), optionally scaled by 1000 / (max - min episode return) (IQL paper, MuJoCo);
    online transitions appended to the SAME device buffer as the offline data and sampled uniformly;
  * online: exploration by sampling the Gaussian (clipped to [-1, 1]); only true terminations are terminal,
    time-limit truncations bootstrap; deterministic evaluation (mean action) on a separate env seeded with
    `eval_seed`, normalised score and success rate (goal tasks).

Deviations (and the switch that restores the reference behaviour where one exists):
  1. Actor learning rate (ALGORITHMS.md decision 5): offline, the actor LR follows CORL's cosine decay
     to 0 over `offline_updates`, written explicitly as an optax schedule; online it is the constant
     `actor_lr`. `corl_cosine_restart: true` reproduces CORL's un-reset PyTorch CosineAnnealingLR, whose LR
     rises again online as actor_lr * (1 - cos(pi k / offline_updates)) / 2.
  2. Online updates run in jitted blocks: the agent collects up to `online_block` env steps with a fixed
     policy (a block also ends at an episode end), appends them, then does as many updates (UTD 1) in
     jitted loops (lax.scan blocks of `update_block`, a lax.fori_loop for a smaller remainder). CORL does
     one update after every env step (`online_block: 1` is that, but slower).
  3. Online evaluation and checkpoints happen at the first episode end after every `online_eval_every`
     env steps (not mid-episode), so a checkpoint restores the training env exactly (only its RNG states
     matter at an episode boundary) and a resumed run reproduces an uninterrupted one bit for bit on CPU.
  4. The Gaussian's dropout (`actor_dropout`, Adroit configs) is active in the actor loss only; exploration
     actions are sampled without dropout (CORL samples in train mode, i.e. with dropout).
  5. `terminate_on_success` (AntMaze configs) ends an episode as terminal when info['success'] is True,
     reproducing D4RL's AntMaze `eval=True` semantics on the continuing-task Minari environments.
  6. CORL's `iql_deterministic` actor variant is not implemented.
  7. Datasets are Minari's: AntMaze `D4RL/antmaze/*-v1` and Adroit `D4RL/<task>/cloned-v2` (CORL: D4RL's
     antmaze-*-v2 and *-cloned-v1); locomotion uses this project's local `o2o/...` suite.

Usage:
    python algorithms/iql.py --config_path configs/iql/quickstart.yaml
    python algorithms/iql.py --config_path configs/iql/quickstart.yaml --resume          # continue a killed run
    python algorithms/iql.py --config_path ... --offline_checkpoint runs/.../checkpoints/offline
Writes to `run_dir`: config.yaml, eval.jsonl (one JSON line per evaluation), checkpoints/{latest,offline},
checkpoints/buffer/ (online transitions, appended at each checkpoint), wandb/ (mode `wandb_mode`, or the
WANDB_MODE environment variable when set).
"""

import json
import math
import os
import pickle
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, List, NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402  (the project's shared dataset utility)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pyrallis  # noqa: E402

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # CORL's clamp of the state-independent log-std


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    # experiment
    dataset_id: str = "D4RL/antmaze/umaze-v1"  # Minari dataset id (also gives the env), see algorithms/data.py
    seed: int = 0  # seed of networks, sampling, exploration and the training env
    eval_seed: int = 100  # seed of the evaluation env (re-seeded at the start of every evaluation)
    run_dir: str = ""  # output directory; "" = runs/iql/<dataset_id>/seed<seed>
    project: str = "o2o-jax"  # wandb project
    group: str = "iql"  # wandb group
    name: str = ""  # wandb run name; "" = iql-<dataset_id>-seed<seed>
    wandb_mode: str = "offline"  # online | offline | disabled (the WANDB_MODE env variable overrides it)
    resume: bool = False  # continue from run_dir/checkpoints/latest if it exists (`--resume` alone works)
    offline_checkpoint: str = ""  # skip pre-training: start fine-tuning from this saved offline checkpoint dir
    # schedule
    offline_updates: int = 1_000_000  # gradient steps of offline pre-training
    online_steps: int = 1_000_000  # env steps of online fine-tuning (one update per env step)
    update_block: int = 1000  # updates per jitted lax.scan block (a smaller remainder runs in one fori_loop)
    online_block: int = 50  # max env steps collected with a fixed policy before their updates run
    offline_eval_every: int = 50_000  # offline updates between evaluations (+ checkpoint)
    online_eval_every: int = 50_000  # online env steps between evaluations (+ checkpoint), at episode ends
    eval_episodes: int = 100  # deterministic evaluation episodes per evaluation
    # data
    batch_size: int = 256  # transitions per gradient step
    discount: float = 0.99  # gamma
    normalize: bool = True  # normalise states with the dataset mean / std (+1e-3)
    reward_scale: float = 1.0  # r <- reward_scale * r + reward_bias, offline and online
    reward_bias: float = -1.0  # AntMaze: r - 1 (CORL `normalize_reward` for AntMaze)
    normalize_reward_by_returns: bool = False  # first scale r by 1000 / (max - min dataset episode return)
    terminate_on_success: bool = True  # end episodes as terminal when info['success'] (D4RL AntMaze eval=True)
    # IQL
    expectile: float = 0.9  # tau of the expectile value loss (CORL `iql_tau`)
    beta: float = 10.0  # inverse temperature of the advantage weights
    exp_adv_max: float = 100.0  # clip of exp(beta * adv)
    tau: float = 0.005  # Polyak rate of the target Q networks
    actor_lr: float = 3e-4  # Adam LR of the actor (see the schedule flags)
    critic_lr: float = 3e-4  # Adam LR of the Q ensemble
    value_lr: float = 3e-4  # Adam LR of V
    offline_cosine: bool = True  # offline actor LR: cosine decay to 0 over offline_updates (CORL)
    corl_cosine_restart: bool = False  # online actor LR continues CORL's un-reset cosine (else constant actor_lr)
    hidden_dims: List[int] = field(default_factory=lambda: [256, 256])  # hidden widths of actor, Q and V MLPs
    n_critics: int = 2  # Q ensemble size (min over members in targets)
    actor_dropout: float = 0.0  # dropout after each hidden layer of the actor (Adroit: 0.1)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid config: {msg}")
        for name in ("update_block", "online_block", "offline_eval_every", "online_eval_every", "eval_episodes",
                     "batch_size", "n_critics"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.offline_updates >= 0 and self.online_steps >= 0, "offline_updates/online_steps must be >= 0")
        need(self.offline_updates % self.update_block == 0,
             f"offline_updates={self.offline_updates} must be a multiple of update_block={self.update_block}")
        need(self.offline_eval_every % self.update_block == 0,
             f"offline_eval_every={self.offline_eval_every} must be a multiple of update_block={self.update_block}")
        need(self.wandb_mode in ("online", "offline", "disabled"),
             f"wandb_mode must be online|offline|disabled, got {self.wandb_mode!r}")
        need(0.0 < self.expectile < 1.0, f"expectile must be in (0, 1), got {self.expectile}")
        need(0.0 <= self.actor_dropout < 1.0, f"actor_dropout must be in [0, 1), got {self.actor_dropout}")
        need(len(self.hidden_dims) > 0 and all(h > 0 for h in self.hidden_dims), "hidden_dims must be positive")


class Hyper(NamedTuple):
    """Static (hashable) hyper-parameters the jitted functions are specialised on."""
    obs_dim: int
    act_dim: int
    hidden: tuple
    n_critics: int
    dropout: float
    batch_size: int
    block: int
    discount: float
    tau: float
    expectile: float
    beta: float
    exp_adv_max: float
    actor_lr: float
    critic_lr: float
    value_lr: float
    offline_updates: int
    offline_cosine: bool
    corl_cosine_restart: bool


def make_hyper(cfg: TrainConfig, obs_dim: int, act_dim: int) -> Hyper:
    return Hyper(obs_dim, act_dim, tuple(cfg.hidden_dims), cfg.n_critics, float(cfg.actor_dropout),
                 cfg.batch_size, cfg.update_block, cfg.discount, cfg.tau, cfg.expectile, cfg.beta, cfg.exp_adv_max,
                 cfg.actor_lr, cfg.critic_lr, cfg.value_lr, cfg.offline_updates, cfg.offline_cosine,
                 cfg.corl_cosine_restart)


# ---------------------------------------------------------------------------------------------- networks
class TorchLinear(nn.Module):
    """Dense layer with PyTorch's default init: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    features: int

    @nn.compact
    def __call__(self, x):
        bound = 1.0 / math.sqrt(x.shape[-1])
        init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        return x @ kernel + bias


class GaussianActor(nn.Module):
    """N(tanh(MLP(s)), exp(log_std)^2) with a learnable state-independent log-std (CORL GaussianPolicy)."""
    act_dim: int
    hidden: tuple
    dropout: float = 0.0

    @nn.compact
    def __call__(self, obs, train: bool = False):
        x = obs
        for h in self.hidden:
            x = nn.relu(TorchLinear(h)(x))
            if self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        mean = jnp.tanh(TorchLinear(self.act_dim)(x))
        log_std = self.param("log_std", nn.initializers.zeros, (self.act_dim,))
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class QNet(nn.Module):
    hidden: tuple

    @nn.compact
    def __call__(self, obs, act):
        x = jnp.concatenate([obs, act], -1)
        for h in self.hidden:
            x = nn.relu(TorchLinear(h)(x))
        return TorchLinear(1)(x)[..., 0]


class VNet(nn.Module):
    hidden: tuple

    @nn.compact
    def __call__(self, obs):
        x = obs
        for h in self.hidden:
            x = nn.relu(TorchLinear(h)(x))
        return TorchLinear(1)(x)[..., 0]


def critic_ensemble(hidden: tuple, n: int) -> nn.Module:
    """`n` Q networks with independent parameters, evaluated on the same inputs: output [n, ...]."""
    return nn.vmap(QNet, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                   axis_size=n)(hidden=hidden)


def networks(h: Hyper):
    return GaussianActor(h.act_dim, h.hidden, h.dropout), critic_ensemble(h.hidden, h.n_critics), VNet(h.hidden)


# ---------------------------------------------------------------------------------------------- maths
def expectile_loss(u, expectile):
    """|expectile - 1[u < 0]| * u^2, elementwise (u = target - prediction)."""
    return jnp.abs(expectile - (u < 0).astype(u.dtype)) * u ** 2


def gaussian_log_prob(mean, log_std, x):
    """log N(x; mean, exp(log_std)^2) summed over the last axis."""
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z ** 2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), -1)


def actor_lr_schedule(h: Hyper):
    """Actor LR as a function of the actor's update count (decision 5 of ALGORITHMS.md, see header)."""
    period = max(h.offline_updates, 1)

    def schedule(count):
        cosine = h.actor_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * count / period))  # PyTorch CosineAnnealingLR
        if h.corl_cosine_restart:
            return cosine
        offline = cosine if h.offline_cosine else h.actor_lr
        return jnp.where(count < h.offline_updates, offline, h.actor_lr)
    return schedule


def optimizers(h: Hyper):
    return {"actor": optax.adam(actor_lr_schedule(h)), "critic": optax.adam(h.critic_lr),
            "value": optax.adam(h.value_lr)}


# ---------------------------------------------------------------------------------------------- state
class Trainable(NamedTuple):
    """Parameters and optimiser state (a TrainState without functions, so states stay plain pytrees)."""
    params: Any
    opt_state: Any


class IQLState(NamedTuple):
    actor: Trainable
    critic: Trainable  # ensemble, leading axis n_critics
    value: Trainable
    critic_target: Any
    key: jax.Array  # RNG of the updates (batch sampling, dropout)
    updates: jax.Array  # gradient steps done
    obs_mean: jax.Array
    obs_std: jax.Array


class Buffer(NamedTuple):
    obs: jax.Array
    act: jax.Array
    rew: jax.Array
    next_obs: jax.Array
    done: jax.Array  # 1.0 for true terminations only


def init_state(h: Hyper, key, obs_mean, obs_std) -> IQLState:
    actor, critic, value = networks(h)
    k_actor, k_critic, k_value, key = jax.random.split(key, 4)
    o, a = jnp.zeros((1, h.obs_dim)), jnp.zeros((1, h.act_dim))
    params = {"actor": actor.init(k_actor, o)["params"], "critic": critic.init(k_critic, o, a)["params"],
              "value": value.init(k_value, o)["params"]}
    txs = optimizers(h)
    tr = {k: Trainable(p, txs[k].init(p)) for k, p in params.items()}
    return IQLState(tr["actor"], tr["critic"], tr["value"], params["critic"], key, jnp.zeros((), jnp.int32),
                    jnp.asarray(obs_mean, jnp.float32), jnp.asarray(obs_std, jnp.float32))


def _step(trainable: Trainable, grads, tx) -> Trainable:
    updates, opt_state = tx.update(grads, trainable.opt_state, trainable.params)
    return Trainable(optax.apply_updates(trainable.params, updates), opt_state)


# ---------------------------------------------------------------------------------------------- update
def iql_update(state: IQLState, batch: Buffer, key, h: Hyper):
    """One IQL step: V (expectile), Q (TD to pre-update V(s')), target EMA, actor (AWR). Pure."""
    actor, critic, value = networks(h)
    txs = optimizers(h)
    obs = (batch.obs - state.obs_mean) / state.obs_std
    next_obs = (batch.next_obs - state.obs_mean) / state.obs_std
    n = obs.shape[0]

    # V step; V(s') uses the same pre-update parameters (one forward over [s; s'])
    target_q = critic.apply({"params": state.critic_target}, obs, batch.act).min(0)

    def value_loss(p):
        v_all = value.apply({"params": p}, jnp.concatenate([obs, next_obs]))
        v = v_all[:n]
        adv = target_q - v
        return expectile_loss(adv, h.expectile).mean(), (adv, v, jax.lax.stop_gradient(v_all[n:]))

    (v_loss, (adv, v, next_v)), v_grads = jax.value_and_grad(value_loss, has_aux=True)(state.value.params)
    value_tr = _step(state.value, v_grads, txs["value"])

    # Q step
    y = batch.rew + h.discount * (1.0 - batch.done) * next_v

    def critic_loss(p):
        q = critic.apply({"params": p}, obs, batch.act)  # [n_critics, B]
        return ((q - y) ** 2).mean(1).mean(), q  # CORL: sum of member MSEs / n_critics

    (q_loss, q), q_grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic.params)
    critic_tr = _step(state.critic, q_grads, txs["critic"])
    critic_target = optax.incremental_update(critic_tr.params, state.critic_target, h.tau)

    # actor step (advantages from the V step, detached)
    weights = jnp.minimum(jnp.exp(h.beta * jax.lax.stop_gradient(adv)), h.exp_adv_max)

    def actor_loss(p):
        mean, log_std = actor.apply({"params": p}, obs, train=True, rngs={"dropout": key})
        return (weights * -gaussian_log_prob(mean, log_std, batch.act)).mean()

    a_loss, a_grads = jax.value_and_grad(actor_loss)(state.actor.params)
    lr = actor_lr_schedule(h)(state.actor.opt_state[0].count)
    actor_tr = _step(state.actor, a_grads, txs["actor"])

    metrics = {"value_loss": v_loss, "critic_loss": q_loss, "actor_loss": a_loss, "v": v.mean(), "q": q.mean(),
               "adv": adv.mean(), "adv_weight": weights.mean(), "actor_lr": lr}
    new_state = state._replace(actor=actor_tr, critic=critic_tr, value=value_tr, critic_target=critic_target,
                               updates=state.updates + 1)
    return new_state, metrics


def sampled_update(state: IQLState, buffer: Buffer, size, h: Hyper):
    """Draw a batch from buffer rows [0, size) on device, then one IQL update."""
    key, k_idx, k_upd = jax.random.split(state.key, 3)
    idx = jax.random.randint(k_idx, (h.batch_size,), 0, size)
    batch = jax.tree.map(lambda x: x[idx], buffer)
    return iql_update(state._replace(key=key), batch, k_upd, h)


@partial(jax.jit, static_argnames=("h",))
def update_block(state: IQLState, buffer: Buffer, size, h: Hyper):
    """`h.block` updates in one lax.scan, batches sampled inside the scan; metrics of shape [h.block]."""
    return jax.lax.scan(lambda s, _: sampled_update(s, buffer, size, h), state, None, length=h.block)


@partial(jax.jit, static_argnames=("h",))
def update_few(state: IQLState, buffer: Buffer, size, n, h: Hyper):
    """`n` < h.block updates (n traced: one compiled program for every remainder) in a lax.fori_loop;
    metrics of shape [h.block], rows >= n are zero."""
    shapes = jax.eval_shape(lambda s: sampled_update(s, buffer, size, h)[1], state)

    def body(i, carry):
        state, metrics = sampled_update(carry[0], buffer, size, h)
        return state, jax.tree.map(lambda all_, m: all_.at[i].set(m), carry[1], metrics)
    zeros = jax.tree.map(lambda x: jnp.zeros((h.block,) + x.shape, x.dtype), shapes)
    return jax.lax.fori_loop(0, n, body, (state, zeros))


@partial(jax.jit, donate_argnums=(0,))
def buffer_insert(buffer: Buffer, rows: Buffer, start):
    """Write `rows` at `start` in place (the buffer is donated: no copy, no re-upload)."""
    return jax.tree.map(lambda b, r: jax.lax.dynamic_update_slice_in_dim(b, r, start, 0), buffer, rows)


# ---------------------------------------------------------------------------------------------- acting
@partial(jax.jit, static_argnames=("h",))
def act_explore(actor_params, obs_mean, obs_std, obs, key, h: Hyper):
    """Sample a ~ N(mu(s), sigma^2) clipped to [-1, 1]; returns (action, next key). One call per env step."""
    key, sub = jax.random.split(key)
    mean, log_std = networks(h)[0].apply({"params": actor_params}, (obs - obs_mean) / obs_std)
    action = mean + jnp.exp(log_std) * jax.random.normal(sub, mean.shape)
    return jnp.clip(action, -1.0, 1.0), key


@partial(jax.jit, static_argnames=("h",))
def act_deterministic(actor_params, obs_mean, obs_std, obs, h: Hyper):
    mean, _ = networks(h)[0].apply({"params": actor_params}, (obs - obs_mean) / obs_std)
    return jnp.clip(mean, -1.0, 1.0)


def evaluate(env, policy, episodes: int, seed: int, terminate_on_success: bool, goal_task: bool, refs):
    """Deterministic evaluation: `episodes` episodes, the first reset seeded with `seed` (reproducible)."""
    returns, lengths, successes = [], [], []
    has_success = goal_task
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed if ep == 0 else None)
        ret, length, success, done = 0.0, 0, False, False
        while not done:
            obs, r, term, trunc, info = env.step(np.asarray(policy(np.asarray(obs, np.float32))))
            ret, length = ret + float(r), length + 1
            if "success" in info:
                has_success = True
                success = success or bool(info["success"])
            if goal_task and r > 0:
                success = True
            done = term or trunc or (terminate_on_success and bool(info.get("success", False)))
        returns.append(ret)
        lengths.append(length)
        successes.append(success)
    out = {"return": float(np.mean(returns)), "return_std": float(np.std(returns)),
           "length": float(np.mean(lengths)), "episodes": episodes}
    if refs is not None:
        scores = data.normalized_score("", returns, refs)
        out["normalized_score"] = float(np.mean(scores))
        out["normalized_score_std"] = float(np.std(scores))
    if has_success:
        out["success_rate"] = float(np.mean(successes))
    return out


# ---------------------------------------------------------------------------------------------- env RNG
def _env_generators(env) -> dict:
    """Every numpy Generator the env (and envs nested in it, e.g. AntMaze's ant_env) draws from."""
    import gymnasium as gym
    found, seen = {}, set()

    def walk(obj, path, depth):
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        gen = getattr(obj, "_np_random", None)
        if isinstance(gen, np.random.Generator):
            found[path] = gen
        for k, v in vars(obj).items():
            if isinstance(v, gym.Env):
                walk(v, f"{path}.{k}", depth + 1)
    walk(env.unwrapped, "unwrapped", 0)
    return found


def env_rng_snapshot(env) -> dict:
    """RNG state of an env at an episode boundary: restoring it reproduces every later reset exactly."""
    return {k: g.bit_generator.state for k, g in _env_generators(env).items()}


def env_rng_restore(env, snapshot: dict, seed: int):
    env.reset(seed=seed)  # initialises the wrappers and creates the generators
    gens = _env_generators(env)
    if set(gens) != set(snapshot):
        raise RuntimeError(f"env RNG layout changed since the checkpoint: {sorted(gens)} vs {sorted(snapshot)}")
    for k, state in snapshot.items():
        gens[k].bit_generator.state = state


# ---------------------------------------------------------------------------------------------- checkpoints
def save_tree(path: Path, tree):
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    np.savez(path, **{f"{i:04d}{jax.tree_util.keystr(k)}": np.asarray(v) for i, (k, v) in enumerate(leaves)})


def load_tree(path: Path, template):
    """Load arrays saved by save_tree into `template`'s structure, checking names and shapes."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    with np.load(path) as z:
        names = sorted(z.files)
        expected = [f"{i:04d}{jax.tree_util.keystr(k)}" for i, (k, _) in enumerate(flat)]
        if names != sorted(expected):
            missing, unexpected = sorted(set(expected) - set(names))[:5], sorted(set(names) - set(expected))[:5]
            raise ValueError(f"checkpoint {path} does not match this model: missing {missing}, unexpected {unexpected}")
        leaves = []
        for name, (k, ref) in zip(expected, flat):
            arr = z[name]
            if arr.shape != np.shape(ref):
                raise ValueError(f"checkpoint {path}: {jax.tree_util.keystr(k)} has shape {arr.shape}, this config "
                                 f"needs {np.shape(ref)} (different network sizes or dataset?)")
            leaves.append(jnp.asarray(arr, dtype=ref.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def save_checkpoint(path: Path, state, meta: dict, cfg):
    """Atomically write state + host meta + resolved config into directory `path`."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tree(tmp / "state.npz", state)
    with open(tmp / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    with open(tmp / "config.yaml", "w") as f:
        pyrallis.dump(cfg, f)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: Path) -> Optional[Path]:
    for p in (path, path.with_name(path.name + ".old")):  # .old survives a kill between the two renames
        if (p / "meta.pkl").exists() and (p / "state.npz").exists():
            return p
    return None


def load_checkpoint(path: Path, template):
    with open(path / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    return load_tree(path / "state.npz", template), meta


def save_buffer_rows(buffer_dir: Path, buffer: Buffer, offset: int, start: int, end: int):
    """Append online rows [start, end) (online numbering; device rows offset+start...) as one file."""
    if end <= start:
        return
    buffer_dir.mkdir(parents=True, exist_ok=True)
    rows = {k: np.asarray(v[offset + start: offset + end]) for k, v in buffer._asdict().items()}
    tmp = buffer_dir / f"rows_{start:010d}_{end:010d}.tmp.npz"
    np.savez(tmp, **rows)
    os.replace(tmp, buffer_dir / f"rows_{start:010d}_{end:010d}.npz")


def load_buffer_rows(buffer_dir: Path, size: int) -> Optional[dict]:
    """Online rows [0, size) from the row files; files beyond `size` (written after the checkpoint) are removed."""
    if size == 0:
        if buffer_dir.exists():
            shutil.rmtree(buffer_dir)
        return None
    parts, pos = [], 0
    for f in sorted(buffer_dir.glob("rows_*.npz")):
        start, end = (int(x) for x in f.stem.split("_")[1:3])
        if start >= size:
            f.unlink()
            continue
        if start != pos or end > size:
            raise RuntimeError(f"online buffer files in {buffer_dir} are inconsistent at {f.name} (expected start "
                               f"{pos}, checkpoint size {size})")
        with np.load(f) as z:
            parts.append({k: z[k] for k in z.files})
        pos = end
    if pos != size:
        raise RuntimeError(f"online buffer files in {buffer_dir} hold {pos} rows, the checkpoint needs {size}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ---------------------------------------------------------------------------------------------- logging
class Logger:
    """wandb + eval.jsonl + console. Metrics are namespaced offline/..., online/..., eval/...."""

    def __init__(self, cfg, run_dir: Path, wandb_id: str, eval_lines: int):
        self.eval_path = run_dir / "eval.jsonl"
        if self.eval_path.exists():  # drop evaluations logged after the checkpoint we resume from
            lines = self.eval_path.read_text().splitlines()[:eval_lines]
            self.eval_path.write_text("".join(line + "\n" for line in lines))
        self.eval_lines = eval_lines
        mode = os.environ.get("WANDB_MODE", cfg.wandb_mode)
        self.wandb = None
        if mode != "disabled":
            import wandb
            self.wandb = wandb.init(project=cfg.project, group=cfg.group, name=cfg.name, id=wandb_id,
                                    resume="allow", mode=mode, dir=str(run_dir), config=asdict(cfg))

    def log(self, metrics: dict):
        if self.wandb is not None:
            self.wandb.log(metrics)

    def log_eval(self, record: dict):
        with open(self.eval_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.eval_lines += 1
        self.log({f"eval/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
        score = record.get("normalized_score", record["return"])
        extra = f", success {record['success_rate']:.2f}" if "success_rate" in record else ""
        print(f"[eval] {record['phase']} updates={record['updates']} env_steps={record['env_steps']}: "
              f"{'normalized score' if 'normalized_score' in record else 'return'} {score:.2f}{extra}", flush=True)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def block_metrics(metrics: dict, n: int, phase: str, updates_before: int) -> dict:
    """Mean of the first n per-update metrics; a NaN/inf stops the run naming the loss and update."""
    host = {k: np.asarray(v)[:n] for k, v in metrics.items()}
    bad = np.zeros(n, bool)
    for v in host.values():
        bad |= ~np.isfinite(v)
    if bad.any():
        i = int(bad.argmax())
        names = ", ".join(f"{phase}/{k} = {v[i]}" for k, v in host.items() if not np.isfinite(v[i]))
        raise FloatingPointError(f"non-finite {names} at update {updates_before + i + 1}; stopping (the last "
                                 "checkpoint is intact)")
    return {f"{phase}/{k}": float(v.mean()) for k, v in host.items()}


# ---------------------------------------------------------------------------------------------- training
def prepare_rewards(cfg: TrainConfig, ds: data.OfflineData):
    """(offline rewards, return scale) with the reward transformation of the config applied."""
    scale = 1.0
    if cfg.normalize_reward_by_returns:
        ends = np.flatnonzero(ds.episode_ends)
        starts = np.concatenate([[0], ends[:-1] + 1])
        returns = np.add.reduceat(ds.rewards.astype(np.float64), starts)
        spread = returns.max() - returns.min()
        if spread <= 0:
            raise data.DatasetError(f"normalize_reward_by_returns: all episodes of {cfg.dataset_id} have the same "
                                    "return")
        scale = 1000.0 / spread
    return (ds.rewards * scale * cfg.reward_scale + cfg.reward_bias).astype(np.float32), scale


def default_run_dir(cfg) -> Path:
    return Path("runs") / "iql" / cfg.dataset_id.replace("/", "_") / f"seed{cfg.seed}"


def _check_resume_config(saved: Path, cfg: TrainConfig):
    with open(saved) as f:
        old = pyrallis.load(TrainConfig, f)
    free = {"resume", "offline_checkpoint", "wandb_mode", "online_steps", "run_dir"}
    diff = {k: (getattr(old, k), getattr(cfg, k)) for k in asdict(cfg) if k not in free
            and getattr(old, k) != getattr(cfg, k)}
    if diff:
        raise ValueError(f"--resume with a config that differs from the checkpoint's ({saved}): "
                         + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))


def train(cfg: TrainConfig) -> dict:
    """Offline pre-training then online fine-tuning; returns the last evaluation record and paths."""
    from tqdm import tqdm

    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    cfg.name = cfg.name or f"iql-{cfg.dataset_id.replace('/', '-')}-seed{cfg.seed}"
    goal_task = "antmaze" in cfg.dataset_id

    # data and envs
    ds = data.load_dataset(cfg.dataset_id, cfg.discount)
    env, eval_env = data.make_env(cfg.dataset_id), data.make_env(cfg.dataset_id)
    obs_dim, act_dim = ds.observations.shape[1], ds.actions.shape[1]
    if env.observation_space.shape != (obs_dim,) or env.action_space.shape != (act_dim,):
        raise data.DatasetError(f"{cfg.dataset_id}: env spaces {env.observation_space.shape}/"
                                f"{env.action_space.shape} do not match the dataset ({obs_dim}, {act_dim})")
    try:
        refs = data.reference_scores(cfg.dataset_id)
    except data.DatasetError as e:
        print(f"warning: {e}; logging raw returns only")
        refs = None
    rewards, return_scale = prepare_rewards(cfg, ds)
    n_off = len(ds)
    h = make_hyper(cfg, obs_dim, act_dim)
    obs_mean = ds.obs_mean if cfg.normalize else np.zeros(obs_dim, np.float32)
    obs_std = ds.obs_std if cfg.normalize else np.ones(obs_dim, np.float32)

    # one device buffer: offline rows [0, n_off), online rows appended after them (+ slack for a full chunk)
    capacity = n_off + cfg.online_steps + cfg.online_block

    def column(x, shape):
        out = np.zeros((capacity,) + shape, np.float32)
        out[:n_off] = x
        return jnp.asarray(out)
    buffer = Buffer(column(ds.observations, (obs_dim,)), column(ds.actions, (act_dim,)), column(rewards, ()),
                    column(ds.next_observations, (obs_dim,)), column(ds.terminals.astype(np.float32), ()))
    del rewards

    state = init_state(h, jax.random.PRNGKey(cfg.seed), obs_mean, obs_std)
    meta = {"phase": "offline", "updates": 0, "env_steps": 0, "online_size": 0, "saved_rows": 0,
            "next_eval": cfg.online_eval_every, "act_key": np.asarray(jax.random.PRNGKey(cfg.seed + 1)),
            "env_rng": None, "eval_lines": 0, "episodes": 0, "wandb_id": None, "last_eval": None}
    latest = find_checkpoint(ckpt_dir / "latest")
    if cfg.resume and latest is not None:
        _check_resume_config(latest / "config.yaml", cfg)
        state, meta = load_checkpoint(latest, state)
        rows = load_buffer_rows(ckpt_dir / "buffer", meta["online_size"])
        if rows is not None:
            buffer = buffer_insert(buffer, Buffer(**{k: jnp.asarray(v) for k, v in rows.items()}), n_off)
        print(f"resumed from {latest}: phase {meta['phase']}, {meta['updates']} updates, "
              f"{meta['env_steps']} online env steps")
    else:
        if cfg.resume:
            print(f"--resume: no checkpoint in {ckpt_dir}, starting a new run")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        (run_dir / "eval.jsonl").unlink(missing_ok=True)
        if cfg.offline_checkpoint:
            src = find_checkpoint(Path(cfg.offline_checkpoint))
            if src is None:
                raise FileNotFoundError(f"--offline_checkpoint {cfg.offline_checkpoint}: no checkpoint there "
                                        "(expected a directory with state.npz and meta.pkl, e.g. "
                                        "<run_dir>/checkpoints/offline)")
            state, src_meta = load_checkpoint(src, state)
            meta.update(updates=src_meta["updates"], act_key=src_meta["act_key"], phase="load_offline")
            print(f"loaded offline state from {src} ({src_meta['updates']} updates)")
    with open(run_dir / "config.yaml", "w") as f:
        pyrallis.dump(cfg, f)
    if meta["wandb_id"] is None:
        meta["wandb_id"] = f"{cfg.name}-{int(time.time())}"
    logger = Logger(cfg, run_dir, meta["wandb_id"], meta["eval_lines"])
    act_key = jnp.asarray(meta["act_key"])
    policy = lambda o: act_deterministic(state.actor.params, state.obs_mean, state.obs_std, o, h)  # noqa: E731

    def run_eval(phase):
        record = {"phase": phase, "updates": int(meta["updates"]), "env_steps": int(meta["env_steps"])}
        record.update(evaluate(eval_env, policy, cfg.eval_episodes, cfg.eval_seed, cfg.terminate_on_success,
                               goal_task, refs))
        logger.log_eval(record)
        meta["eval_lines"], meta["last_eval"] = logger.eval_lines, record

    def checkpoint(name="latest"):
        meta["act_key"] = np.asarray(act_key)
        save_buffer_rows(ckpt_dir / "buffer", buffer, n_off, meta["saved_rows"], meta["online_size"])
        meta["saved_rows"] = meta["online_size"]
        save_checkpoint(ckpt_dir / name, state, meta, cfg)

    def updates(n, size, phase):
        """n updates on buffer rows [0, size): scans of update_block, then one call for the remainder."""
        nonlocal state
        done, sums = 0, {}
        while done < n:
            m = min(cfg.update_block, n - done)
            if m == cfg.update_block:
                state, metrics = update_block(state, buffer, size, h)
            else:
                state, metrics = update_few(state, buffer, size, m, h)
            logged = block_metrics(metrics, m, phase, meta["updates"])
            sums = {k: sums.get(k, 0.0) + v * m for k, v in logged.items()}
            meta["updates"] += m
            done += m
        return {k: v / max(n, 1) for k, v in sums.items()}

    # ---- offline pre-training
    if meta["phase"] == "offline":
        bar = tqdm(total=cfg.offline_updates, initial=meta["updates"], desc="IQL offline", mininterval=5)
        while meta["updates"] < cfg.offline_updates:
            logged = updates(cfg.update_block, n_off, "offline")
            bar.update(cfg.update_block)
            logger.log({**logged, "offline/updates": meta["updates"]})
            if meta["updates"] % cfg.offline_eval_every == 0 or meta["updates"] == cfg.offline_updates:
                run_eval("offline")
                bar.set_postfix(score=meta["last_eval"].get("normalized_score", meta["last_eval"]["return"]))
                if meta["updates"] < cfg.offline_updates:
                    checkpoint()
        bar.close()
        if meta["last_eval"] is None:  # offline_updates == 0: still report the starting policy
            run_eval("offline")
        meta["phase"] = "online"
        checkpoint("offline")
        checkpoint()
    elif meta["phase"] == "load_offline":
        run_eval("offline")  # the score before fine-tuning
        meta["phase"] = "online"
        checkpoint("offline")
        checkpoint()

    # ---- online fine-tuning
    if meta["phase"] == "online":
        if meta["env_rng"] is not None:
            env_rng_restore(env, meta["env_rng"], cfg.seed)
        first_reset = meta["env_rng"] is None
        chunk = {k: np.zeros((cfg.online_block,) + s, np.float32) for k, s in
                 (("obs", (obs_dim,)), ("act", (act_dim,)), ("rew", ()), ("next_obs", (obs_dim,)), ("done", ()))}
        obs, ep_ret, ep_len, recent = None, 0.0, 0, []
        bar = tqdm(total=cfg.online_steps, initial=meta["env_steps"], desc="IQL online", mininterval=5)
        while meta["env_steps"] < cfg.online_steps:
            n = 0
            while n < cfg.online_block and meta["env_steps"] < cfg.online_steps:
                if obs is None:
                    obs, _ = env.reset(seed=cfg.seed if first_reset else None)
                    first_reset, ep_ret, ep_len = False, 0.0, 0
                action, act_key = act_explore(state.actor.params, state.obs_mean, state.obs_std,
                                              np.asarray(obs, np.float32), act_key, h)
                action = np.asarray(action)
                next_obs, r, term, trunc, info = env.step(action)
                term = term or (cfg.terminate_on_success and bool(info.get("success", False)))
                for k, v in (("obs", obs), ("act", action), ("next_obs", next_obs), ("done", float(term)),
                             ("rew", r * return_scale * cfg.reward_scale + cfg.reward_bias)):
                    chunk[k][n] = v
                n, meta["env_steps"] = n + 1, meta["env_steps"] + 1
                ep_ret, ep_len = ep_ret + float(r), ep_len + 1
                obs = next_obs
                if term or trunc:
                    meta["episodes"] += 1
                    recent = (recent + [ep_ret])[-10:]
                    logger.log({"online/episode_return": ep_ret, "online/episode_length": ep_len,
                                "online/env_steps": meta["env_steps"]})
                    obs = None
                    break
            start = n_off + meta["online_size"]
            buffer = buffer_insert(buffer, Buffer(**{k: jnp.asarray(v) for k, v in chunk.items()}), start)
            meta["online_size"] += n
            logged = updates(n, start + n, "online")
            logger.log({**logged, "online/env_steps": meta["env_steps"], "online/updates": meta["updates"]})
            bar.update(n)
            if obs is None and meta["env_steps"] >= meta["next_eval"] and meta["env_steps"] < cfg.online_steps:
                while meta["next_eval"] <= meta["env_steps"]:
                    meta["next_eval"] += cfg.online_eval_every
                run_eval("online")
                bar.set_postfix(score=meta["last_eval"].get("normalized_score", meta["last_eval"]["return"]),
                                train_return=np.mean(recent) if recent else 0.0)
                meta["env_rng"] = env_rng_snapshot(env)
                checkpoint()
        bar.close()
        run_eval("online")
        meta["phase"] = "done"
        checkpoint()
    elif meta["phase"] == "done":
        print(f"run in {run_dir} already finished")
    logger.close()
    env.close()
    eval_env.close()
    summary = summarize(run_dir / "eval.jsonl")
    return {"last_eval": meta["last_eval"], "run_dir": str(run_dir), "updates": meta["updates"],
            "env_steps": meta["env_steps"], **summary}


def summarize(eval_path: Path) -> dict:
    """Score at the end of pre-training vs at the end of fine-tuning (normalised score, else return)."""
    records = [json.loads(line) for line in eval_path.read_text().splitlines()] if eval_path.exists() else []
    key = "normalized_score" if records and "normalized_score" in records[0] else "return"
    offline = [r[key] for r in records if r["phase"] == "offline"]
    online = [r[key] for r in records if r["phase"] == "online"]
    out = {"before_finetuning": offline[-1] if offline else None, "after_finetuning": online[-1] if online else None}
    if offline and online:
        print(f"{key.replace('_', ' ')}: {out['before_finetuning']:.2f} after pre-training -> "
              f"{out['after_finetuning']:.2f} after fine-tuning (eval log: {eval_path})")
    return out


def parse_config(argv=None) -> TrainConfig:
    """pyrallis CLI (`--config_path x.yaml --key value`); a bare `--resume` means `--resume true`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "true")
    return pyrallis.parse(config_class=TrainConfig, args=argv)


if __name__ == "__main__":
    train(parse_config())
