"""ACA, Actor-Critic Alignment (single file, JAX): SAC+ML pre-training with a calibrated baseline Z(s) on a
Minari dataset, then online fine-tuning of an aligned critic Q = R + w * softclip(log pi0).

Paper:  Yu, Zhang, "Actor-Critic Alignment for Offline-to-Online Reinforcement Learning", ICML 2023,
        PMLR 202:40452-40474, https://proceedings.mlr.press/v202/yu23k.html.
Reference implementation followed here: the official code, https://github.com/ZishunYu/Actor-Critic-Alignment
        @ 3a082bd555bcdb96f262dd3214358403ae03a371 (`run_sacml.py`, `run_aca.py`, `sacml_agent/`, `aca_agent/`,
        `utility.py`, `configs/{offline,online}/`), built on d3rlpy 1.1.0 (networks, loss reductions, online loop).
Design notes (what is implemented in full, the switch, several seeds, checkpoints): docs/aca.md.

What is implemented (official semantics unless listed below; the maths in the update functions' docstrings):
  * offline SAC+ML with a baseline ensemble Z(s) calibrated so that log pi(a|s) + Z(s) satisfies the soft Bellman
    equation on the data (`offline_update`); the switch: T <- 1, pi0 <- frozen pi, R_j <- Z_j (`align`);
  * online ACA on Q = R + w softclip(log pi0), w decaying linearly per update (`interpolation`) (`online_update`);
  * d3rlpy's networks: ReLU MLPs, PyTorch init; a tanh-squashed Gaussian (MuJoCo) or a Gaussian with a std
    parameter (AntMaze) (`squashed_policy`); critic and baseline ensembles of `n_critics` members;
  * online data only online: the buffer starts empty or with the `n_trajs` highest-return offline episodes; one
    update per env step once it holds more than `batch_size` rows; deterministic evaluation on an env seeded with
    `eval_seed`, each record with the temperature, w and value statistics at the evaluation states.

Deviations (and the switch that restores the reference behaviour where one exists):
  1. Online updates run in jitted blocks of up to `online_block` env steps collected with a fixed policy (a block
     also ends at an episode end); official: an update after every env step (`online_block: 1`, slower).
  2. Online evaluation + checkpoint at the first episode end after every `online_eval_every` env steps (official:
     every 1000 steps, mid-episode); offline every `offline_eval_every` updates (official: 1000, logging only).
  3. Only true terminations are terminal, time-limit truncations bootstrap (`d3rlpy_terminals: true`: as d3rlpy
     1.1.0's online buffer, the transition before a termination is terminal too, a time-limited episode's last one
     is dropped, and each transition is stored one env step late).
  4. Updates start when the online buffer holds more than `batch_size` rows (d3rlpy's count lags: reproduced by 3).
  5. w in closed form, max(w0 - n w0 / (k * `interpolation_unit`), w_min) (official: float64 decrements).
  6. Datasets: this project's `o2o/<env>/<level>-v0` (Gymnasium v5) and Minari's `D4RL/antmaze/*-v1` (official:
     D4RL *-v2); `terminate_on_success` (AntMaze) ends an episode as terminal on info['success'] (D4RL eval=True).
  7. AntMaze rewards shift by -1 online only, as the official code (`reward_bias: 0`, `online_reward_bias: -1`);
     set both to -1 for a consistent shift. Seeded offline episodes get the online transformation (as d3rlpy).
  8. `online_reset_optimizers: true` gives fresh Adam states at the switch (official: kept from SAC+ML).
  9. torch's Softplus is the identity above 20; jax.nn.softplus is exact (difference < 1e-8).

Usage:
    python algorithms/aca.py --config_path configs/aca/quickstart.yaml
    python algorithms/aca.py --config_path configs/aca/quickstart.yaml --resume          # continue a killed run
    python algorithms/aca.py --config_path ... --offline_checkpoint runs/.../checkpoints/offline  # aca.py's own
    python algorithms/aca.py --config_path configs/aca/quickstart.yaml --num_seeds 4     # seeds 0..3 at once
Writes to `run_dir`: config.yaml, eval.jsonl (one JSON line per evaluation; seed<S>/eval.jsonl per seed when
num_seeds > 1), checkpoints/{latest,offline}, checkpoints/buffer/seed<S>/ (online transitions), wandb/ (mode
`wandb_mode`, or the WANDB_MODE environment variable when set).
"""

import inspect
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, List, NamedTuple, Optional
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402  (the project's shared dataset utility)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pyrallis  # noqa: E402
from pyrallis.wrappers import docstring as pyrallis_docstring  # noqa: E402

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # d3rlpy SquashedNormalPolicy clamp of the log-std head
PARAM_LOG_STD_MIN, PARAM_LOG_STD_MAX = -5.0, 0.0  # official NonSquashedNormalPolicy (use_std_parameter=True)
ATANH_CLIP = 0.999999  # d3rlpy clamps given actions before atanh
STATS_CHUNK = 1024  # evaluation states per jitted statistics call
OFFLINE_NOISE, ONLINE_NOISE = ("temp", "next", "z_next", "pi"), ("temp", "next", "pi")  # policy samples per update


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    # experiment
    dataset_id: str = "o2o/hopper/medium-v0"  # Minari dataset id (also gives the env), see algorithms/data.py
    seed: int = 0  # seed of networks, sampling, exploration and the training env
    eval_seed: int = 100  # seed of the evaluation env (re-seeded at the start of every evaluation)
    run_dir: str = ""  # output directory; "" = runs/aca/<dataset_id>/seed<seed> (seeds<S>-<S+N-1> for several)
    project: str = "o2o-jax"  # wandb project
    group: str = "aca"  # wandb group
    name: str = ""  # wandb run name; "" = aca-<dataset_id>-seed<seed>
    wandb_mode: str = "offline"  # online | offline | disabled (the WANDB_MODE env variable overrides it)
    resume: bool = False  # continue the run in run_dir from its newest intact checkpoint (`--resume` alone works)
    overwrite: bool = False  # delete a previous run in run_dir and start again (without it, a previous run is kept)
    offline_checkpoint: str = ""  # skip pre-training: start from this script's saved offline checkpoint dir
    num_seeds: int = 1  # train seeds seed..seed+num_seeds-1 together (vmapped); >1: evals in run_dir/seed<S>/
    # schedule
    offline_updates: int = 500_000  # SAC+ML gradient steps (official: 500k)
    online_steps: int = 100_000  # env steps of fine-tuning (official: 100k)
    update_block: int = 1000  # offline updates per jitted lax.scan block
    online_block: int = 50  # max env steps collected with a fixed policy before their updates run (official: 1)
    offline_eval_every: int = 50_000  # offline updates between evaluations (+ checkpoint)
    online_eval_every: int = 1000  # online env steps between evaluations (+ checkpoint), at episode ends
    eval_episodes: int = 10  # deterministic evaluation episodes per evaluation (official: 10)
    # data
    batch_size: int = 256  # transitions per gradient step
    discount: float = 0.99  # gamma
    normalize: bool = False  # normalise states with the dataset mean / std (+1e-3); official: no normalisation
    reward_scale: float = 1.0  # r <- reward_scale * r + reward_bias in the offline phase
    reward_bias: float = 0.0  # offline reward shift (official: 0 everywhere, also AntMaze)
    online_reward_bias: float = 0.0  # online shift, also for seeded offline episodes (official AntMaze: -1)
    terminate_on_success: bool = False  # end episodes as terminal when info['success'] (D4RL AntMaze eval=True)
    n_trajs: int = 0  # seed the online buffer with the n_trajs highest-return offline episodes (0 = empty buffer)
    d3rlpy_terminals: bool = False  # official: the step before a termination is terminal too (deviation 3)
    # networks and optimisers
    hidden_dims: List[int] = field(default_factory=lambda: [256, 256])  # hidden widths of actor, critics, Z
    n_critics: int = 2  # size of the critic ensemble and of the baseline ensemble (min over members)
    squashed_policy: bool = True  # tanh-squashed Gaussian (MuJoCo) | Gaussian with std parameter (AntMaze)
    actor_lr: float = 3e-4  # Adam LR of the actor
    critic_lr: float = 3e-4  # Adam LR of the critic ensemble (Q offline, R online)
    temp_lr: float = 3e-4  # Adam LR of log T
    baseline_lr: float = 3e-4  # Adam LR of the baseline ensemble Z
    tau: float = 0.005  # Polyak rate of the target critics
    # SAC+ML (offline)
    ml_alpha: float = 30.0  # official `alpha`: actor loss = alpha / mean|Q| * SAC loss - mean log pi(a_data|s)
    target_entropy_coef: float = 1.0  # target entropy = -target_entropy_coef * |A| (AntMaze: 0.5), both phases
    initial_temperature: float = 1.0  # T at the start of SAC+ML (reset to 1 at the switch)
    # ACA (online)
    beta: float = 7.0  # soft-clip bound c(s): log pi0 at beta std-devs from its mean (official 7, 15 m-e/e, 3 AntMaze)
    interpolation: List[float] = field(default_factory=lambda: [1.0, 40.0, 0.5])  # [w0, k, w_min], w -= w0/(k*unit)
    interpolation_unit: int = 1000  # the hard-coded 1000 of the official w decay
    actor_grad_clip: float = 0.25  # online actor global grad-norm clip (official 0.25; <= 0 disables)
    online_reset_optimizers: bool = False  # fresh Adam states at the switch (official: keep the SAC+ML ones)
    precision: str = "float32"  # float32 | bf16: bfloat16 matrix products summed in float32 (params, Adam: float32)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid config: {msg}")
        for name in ("update_block", "online_block", "offline_eval_every", "online_eval_every", "eval_episodes",
                     "batch_size", "n_critics", "interpolation_unit", "num_seeds"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.offline_updates >= 0 and self.online_steps >= 0, "offline_updates/online_steps must be >= 0")
        need(self.offline_updates % self.update_block == 0,
             f"offline_updates={self.offline_updates} must be a multiple of update_block={self.update_block}")
        need(self.offline_eval_every % self.update_block == 0,
             f"offline_eval_every={self.offline_eval_every} must be a multiple of update_block={self.update_block}")
        need(self.wandb_mode in ("online", "offline", "disabled"),
             f"wandb_mode must be online|offline|disabled, got {self.wandb_mode!r}")
        need(self.n_trajs >= 0, f"n_trajs must be >= 0, got {self.n_trajs}")
        need(len(self.interpolation) == 3, f"interpolation must be [w0, k, w_min], got {self.interpolation}")
        if len(self.interpolation) == 3:
            w0, k, w_min = self.interpolation
            need(w0 > 0 and k > 0, f"interpolation w0 and k must be > 0 (official assert), got {self.interpolation}")
            need(0 <= w_min <= w0, f"interpolation w_min must be in [0, w0], got {self.interpolation}")
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(self.initial_temperature > 0, f"initial_temperature must be > 0, got {self.initial_temperature}")
        need(len(self.hidden_dims) > 0 and all(h > 0 for h in self.hidden_dims), "hidden_dims must be positive")
        need(self.precision in PRECISIONS, f"precision must be one of {'|'.join(PRECISIONS)}, got {self.precision!r}")


RESUME_FREE = {"resume", "overwrite", "offline_checkpoint", "wandb_mode", "online_steps", "run_dir"}  # may change on --resume


class Hyper(NamedTuple):
    """The static (hashable) arguments of the jitted functions: the env's dimensions and the config fields the maths
    reads, under the config's own names (make_hyper copies them from TrainConfig by name)."""
    obs_dim: int
    act_dim: int
    hidden_dims: tuple
    n_critics: int
    squashed_policy: bool
    batch_size: int
    update_block: int
    online_block: int
    discount: float
    tau: float
    actor_lr: float
    critic_lr: float
    temp_lr: float
    baseline_lr: float
    ml_alpha: float
    target_entropy_coef: float
    beta: float
    interpolation: tuple
    interpolation_unit: int
    actor_grad_clip: float
    precision: str


def make_hyper(cfg: TrainConfig, obs_dim: int, act_dim: int) -> Hyper:
    static = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731 (a list is not hashable)
    return Hyper(obs_dim=obs_dim, act_dim=act_dim, **{k: static(getattr(cfg, k)) for k in Hyper._fields[2:]})


# ---------------------------------------------------------------------------------------------- networks
PRECISIONS = ("float32", "bf16")


def matmul(x, kernel, precision: str):
    """x @ kernel. "bf16": both operands rounded to bfloat16, products summed in float32, float32 out (the
    parameters, gradients and optimiser state stay float32)."""
    if precision == "bf16":
        return jnp.matmul(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return x @ kernel


class TorchLinear(nn.Module):
    """Dense layer with PyTorch's default init: weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    features: int
    precision: str = "float32"

    @nn.compact
    def __call__(self, x):
        bound = 1.0 / math.sqrt(x.shape[-1])
        init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        return matmul(x, kernel, self.precision) + bias


class Actor(nn.Module):
    """d3rlpy NormalPolicy. Returns (loc, log_std) of the Gaussian: squashed -> loc = mu(s) (pre-tanh), log-std
    head clipped to [-20, 2]; not squashed -> loc = tanh(mu(s)), log_std = -5 + 5 sigmoid(theta) (state-independent)."""
    act_dim: int
    hidden: tuple
    squashed: bool
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs):
        x = obs
        for h in self.hidden:
            x = nn.relu(TorchLinear(h, precision=self.precision)(x))
        mu = TorchLinear(self.act_dim, precision=self.precision)(x)
        if self.squashed:
            return mu, jnp.clip(TorchLinear(self.act_dim, precision=self.precision)(x), LOG_STD_MIN, LOG_STD_MAX)
        theta = self.param("log_std_param", nn.initializers.zeros, (self.act_dim,))
        log_std = PARAM_LOG_STD_MIN + (PARAM_LOG_STD_MAX - PARAM_LOG_STD_MIN) * jax.nn.sigmoid(theta)
        return jnp.tanh(mu), jnp.broadcast_to(log_std, mu.shape)


class QNet(nn.Module):
    """Q(s, a) = MLP(concat(s, a)) (d3rlpy VectorEncoderWithAction + Linear(1)); the first layer's kernel rows are
    [state rows; action rows], which the critic-from-Z initialisation relies on."""
    hidden: tuple
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs, act):
        x = jnp.concatenate([obs, act], -1)
        for h in self.hidden:
            x = nn.relu(TorchLinear(h, precision=self.precision)(x))
        return TorchLinear(1, precision=self.precision)(x)[..., 0]


class VNet(nn.Module):
    """Z(s) = MLP(s) (d3rlpy ValueFunction); same layer names as QNet."""
    hidden: tuple
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs):
        x = obs
        for h in self.hidden:
            x = nn.relu(TorchLinear(h, precision=self.precision)(x))
        return TorchLinear(1, precision=self.precision)(x)[..., 0]


def ensemble(module, n: int, n_inputs: int) -> nn.Module:
    """`n` copies of `module` with independent parameters on the same inputs: output [n, ...]."""
    return nn.vmap(module, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(None,) * n_inputs,
                   out_axes=0, axis_size=n)


def networks(h: Hyper):
    """(actor, critic ensemble Q_j(s, a) / R_j(s, a), baseline ensemble Z_j(s))."""
    return (Actor(h.act_dim, h.hidden_dims, h.squashed_policy, h.precision),
            ensemble(QNet, h.n_critics, 2)(hidden=h.hidden_dims, precision=h.precision),
            ensemble(VNet, h.n_critics, 1)(hidden=h.hidden_dims, precision=h.precision))


# ---------------------------------------------------------------------------------------------- maths
def gaussian_log_prob(mean, log_std, x):
    """log N(x; mean, exp(log_std)^2) summed over the last axis."""
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z ** 2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), -1)


def tanh_log_det(u):
    """log |d tanh(u)/du| = 2 (log 2 - u - softplus(-2u)), summed over the last axis (d3rlpy's Jacobian)."""
    return jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), -1)


def log_prob_raw(mean, log_std, u):
    """Squashed policy: log pi(tanh(u)) from the pre-tanh value u (d3rlpy `_log_prob_from_raw_y`)."""
    return gaussian_log_prob(mean, log_std, u) - tanh_log_det(u)


def sample_action(mean, log_std, noise, squashed: bool):
    """Reparameterised sample from unit-normal `noise` and its log-prob: squashed a = tanh(mean + std eps);
    not squashed a = clip(mean + std eps, -1, 1) with the Gaussian log-density of the clipped a (d3rlpy)."""
    x = mean + jnp.exp(log_std) * noise
    if squashed:
        return jnp.tanh(x), log_prob_raw(mean, log_std, x)
    a = jnp.clip(x, -1.0, 1.0)
    return a, gaussian_log_prob(mean, log_std, a)


def log_prob(mean, log_std, action, squashed: bool):
    """log pi(a|s) of a given action (squashed: atanh of a clamped to +-0.999999, as d3rlpy)."""
    if squashed:
        return log_prob_raw(mean, log_std, jnp.arctanh(jnp.clip(action, -ATANH_CLIP, ATANH_CLIP)))
    return gaussian_log_prob(mean, log_std, action)


def deterministic_action(mean, squashed: bool):
    return jnp.tanh(mean) if squashed else mean


def clip_bound(mean, log_std, beta: float, squashed: bool):
    """c(s) = min(log pi0(mu0 - beta sigma0), log pi0(mu0 + beta sigma0)); squashed: on the pre-tanh values."""
    lo, hi = mean - beta * jnp.exp(log_std), mean + beta * jnp.exp(log_std)
    f = (lambda u: log_prob_raw(mean, log_std, u)) if squashed else (lambda u: gaussian_log_prob(mean, log_std, u))
    return jnp.minimum(f(lo), f(hi))


def soft_clip(x, c):
    """softplus(x - c) + c: a smooth max(x, c) (official `clip_log_pi`, before the weight w)."""
    return jax.nn.softplus(x - c) + c


def interpolation_weight(online_updates, h: Hyper):
    """w used by the online update number `online_updates` (0-based): max(w0 - n * w0 / (k * unit), w_min) with
    `interpolation` = [w0, k, w_min] and unit = `interpolation_unit`."""
    w0, k, w_min = (float(x) for x in h.interpolation)
    return jnp.maximum(w0 - online_updates * (w0 / (k * h.interpolation_unit)), w_min)


def soft_bellman_target(rew, done, next_value, logp_next, temp, discount):
    """r + gamma (1 - d) [next_value - T log pi(a'|s')] (critic: next_value = min_j Qbar_j(s', a');
    baseline: next_value = log pi(a'|s') + min_j Z_j(s'))."""
    return rew + discount * (1.0 - done) * (next_value - temp * logp_next)


def critic_from_baseline(z_params, act_dim: int):
    """R_j <- Z_j: copy every layer, the first layer's kernel gets zero rows for the action inputs (so R_j(s, a)
    == Z_j(s)); parameters have the ensemble axis first."""
    first = z_params["TorchLinear_0"]
    kernel = first["kernel"]  # [n, obs_dim, hidden]
    zeros = jnp.zeros((kernel.shape[0], act_dim, kernel.shape[2]), kernel.dtype)
    out = jax.tree.map(lambda x: x, dict(z_params))
    out["TorchLinear_0"] = {"kernel": jnp.concatenate([kernel, zeros], 1), "bias": first["bias"]}
    return out


def clip_grad_norm(grads, max_norm: float):
    """torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1; returns (grads, norm)."""
    norm = optax.tree.norm(grads)
    if max_norm <= 0:
        return grads, norm
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale, grads), norm


def optimizers(h: Hyper):
    return {"actor": optax.adam(h.actor_lr), "critic": optax.adam(h.critic_lr), "baseline": optax.adam(h.baseline_lr),
            "log_temp": optax.adam(h.temp_lr)}


# ---------------------------------------------------------------------------------------------- state
class Trainable(NamedTuple):
    """Parameters and optimiser state (a TrainState without functions, so states stay plain pytrees)."""
    params: Any
    opt_state: Any


class ACAState(NamedTuple):
    actor: Trainable
    critic: Trainable  # ensemble, leading axis n_critics: Q (SAC+ML) offline, R online
    baseline: Trainable  # Z ensemble (trained offline, frozen online)
    log_temp: Trainable
    critic_target: Any
    ref_actor: Any  # pi0 (frozen, set at the switch)
    key: jax.Array  # RNG of the updates
    updates: jax.Array  # gradient steps done (offline + online)
    online_updates: jax.Array  # online gradient steps done (drives w)
    obs_mean: jax.Array
    obs_std: jax.Array


class Buffer(NamedTuple):
    obs: jax.Array
    act: jax.Array
    rew: jax.Array
    next_obs: jax.Array
    done: jax.Array  # 1.0 for true terminations only


def init_state(h: Hyper, key, obs_mean, obs_std, initial_temperature: float = 1.0) -> ACAState:
    actor, critic, baseline = networks(h)
    k_actor, k_critic, k_z, key = jax.random.split(key, 4)
    o, a = jnp.zeros((1, h.obs_dim)), jnp.zeros((1, h.act_dim))
    params = {"actor": actor.init(k_actor, o)["params"], "critic": critic.init(k_critic, o, a)["params"],
              "baseline": baseline.init(k_z, o)["params"],
              "log_temp": jnp.asarray(math.log(initial_temperature), jnp.float32)}
    txs = optimizers(h)
    tr = {k: Trainable(p, txs[k].init(p)) for k, p in params.items()}
    zero = jnp.zeros((), jnp.int32)
    return ACAState(tr["actor"], tr["critic"], tr["baseline"], tr["log_temp"], params["critic"], params["actor"], key,
                    zero, zero, jnp.asarray(obs_mean, jnp.float32), jnp.asarray(obs_std, jnp.float32))


def _step(trainable: Trainable, grads, tx) -> Trainable:
    updates, opt_state = tx.update(grads, trainable.opt_state, trainable.params)
    return Trainable(optax.apply_updates(trainable.params, updates), opt_state)


def _normalized(state: ACAState, batch: Buffer):
    return (batch.obs - state.obs_mean) / state.obs_std, (batch.next_obs - state.obs_mean) / state.obs_std


def _temperature_step(state: ACAState, logp, h: Hyper):
    """L_T = -mean(log T (log pi(a~|s) - H)) with a fresh sample's log-prob (no gradient into the actor)."""
    target = jax.lax.stop_gradient(logp - h.target_entropy_coef * h.act_dim)
    loss_fn = lambda lt: -(lt * target).mean()  # noqa: E731
    loss, grad = jax.value_and_grad(loss_fn)(state.log_temp.params)
    return _step(state.log_temp, grad, optimizers(h)["log_temp"]), loss


# ---------------------------------------------------------------------------------------------- update
def offline_update(state: ACAState, batch: Buffer, noise: dict, h: Hyper):
    """One SAC+ML step; each part sees the previous parts' updates. `noise`: the unit normals of the four policy
    samples ("temp", "next", "z_next", "pi"), each [B, A], giving a~ ~ pi(.|s), a' ~ pi(.|s'), a'' ~ pi(.|s'),
    a^ ~ pi(.|s) (reparameterised). Pure.

      temperature  L_T = -mean(log T (log pi(a~|s) - H)),  H = target_entropy_coef * |A|,  T = exp(log T);
      critic       y = r + gamma (1-d) [min_j Qbar_j(s', a') - T log pi(a'|s')],  L_Q = sum_j mean (Q_j(s,a) - y)^2;
      baseline Z   calibrated so that log pi(a|s) + Z(s) satisfies the soft Bellman equation on the data:
                   y_Z = r + gamma (1-d) [log pi(a''|s') + min_j Z_j(s') - T log pi(a''|s')] (current Z, no target
                   net),  L_Z = sum_j mean (log pi(a|s) + Z_j(s) - y_Z)^2 (log pi(a|s) of the data action detached);
      actor        L_pi = lambda mean(T log pi(a^|s) - min_j Q_j(s, a^)) - mean log pi(a|s),
                   lambda = ml_alpha / stopgrad(mean |min_j Q_j(s, a^)|)  (SAC + max-likelihood, Q normalised);
      target       Qbar <- tau Q + (1 - tau) Qbar.
    """
    actor, critic, baseline = networks(h)
    txs = optimizers(h)
    sg = jax.lax.stop_gradient
    obs, next_obs = _normalized(state, batch)
    # pi(.|s) once: its values serve steps 1-3 and its vjp pulls the actor loss of step 4 back to the parameters
    (mean, log_std), actor_vjp = jax.vjp(lambda p: actor.apply({"params": p}, obs), state.actor.params)
    next_mean, next_log_std = actor.apply({"params": state.actor.params}, next_obs)

    # 1. temperature
    _, logp_t = sample_action(mean, log_std, noise["temp"], h.squashed_policy)
    temp_tr, temp_loss = _temperature_step(state, logp_t, h)
    temp = jnp.exp(temp_tr.params)

    # 2. critic
    a_next, logp_next = sample_action(next_mean, next_log_std, noise["next"], h.squashed_policy)
    q_next = critic.apply({"params": state.critic_target}, next_obs, a_next).min(0)
    y = soft_bellman_target(batch.rew, batch.done, q_next, logp_next, temp, h.discount)

    def critic_loss(p):
        q = critic.apply({"params": p}, obs, batch.act)  # [E, B]
        return ((q - y) ** 2).mean(-1).sum(), q  # d3rlpy: sum over members of each member's MSE

    (q_loss, q_data), q_grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic.params)
    critic_tr = _step(state.critic, q_grads, txs["critic"])

    # 3. baseline Z: log pi(a|s) + Z(s) satisfies the soft Bellman equation (current Z at s', no target net)
    a_z, logp_z = sample_action(next_mean, next_log_std, noise["z_next"], h.squashed_policy)
    z_next = baseline.apply({"params": state.baseline.params}, next_obs).min(0)
    y_z = soft_bellman_target(batch.rew, batch.done, logp_z + z_next, logp_z, temp, h.discount)
    logp_data = log_prob(mean, log_std, batch.act, h.squashed_policy)  # data actions under the current pi (detached)

    def baseline_loss(p):
        z = baseline.apply({"params": p}, obs)  # [E, B]
        return ((logp_data + z - y_z) ** 2).mean(-1).sum(), z

    (z_loss, z), z_grads = jax.value_and_grad(baseline_loss, has_aux=True)(state.baseline.params)
    baseline_tr = _step(state.baseline, z_grads, txs["baseline"])

    # 4. actor: SAC loss normalised by mean |Q| (weight ml_alpha) + max-likelihood of the data actions
    def actor_loss(m, ls):  # of pi(.|s)'s outputs
        a_pi, logp_pi = sample_action(m, ls, noise["pi"], h.squashed_policy)
        q_pi = critic.apply({"params": critic_tr.params}, obs, a_pi).min(0)
        lam = h.ml_alpha / sg(jnp.abs(q_pi).mean())
        ml = -log_prob(m, ls, batch.act, h.squashed_policy).mean()
        return lam * (temp * logp_pi - q_pi).mean() + ml, (lam, ml, logp_pi)

    (a_loss, (lam, ml, logp_pi)), out_grads = jax.value_and_grad(actor_loss, (0, 1), has_aux=True)(mean, log_std)
    (a_grads,) = actor_vjp(out_grads)
    actor_tr = _step(state.actor, a_grads, txs["actor"])

    # 5. targets
    critic_target = optax.incremental_update(critic_tr.params, state.critic_target, h.tau)
    metrics = {"temp_loss": temp_loss, "alpha": temp, "critic_loss": q_loss, "baseline_loss": z_loss,
               "actor_loss": a_loss, "ml_loss": ml, "lambda": lam, "q": q_data.mean(), "z": z.mean(),
               "target_q": y.mean(), "log_pi": logp_pi.mean(), "log_pi_data": logp_data.mean()}
    new = state._replace(actor=actor_tr, critic=critic_tr, baseline=baseline_tr, log_temp=temp_tr,
                         critic_target=critic_target, updates=state.updates + 1)
    return new, metrics


@partial(jax.jit, static_argnames=("h", "reset_optimizers"))
def align(state: ACAState, h: Hyper, reset_optimizers: bool = False) -> ACAState:
    """The switch (official `run_aca.py`, `utility.py::critic_init`): T <- 1; pi0 <- pi (frozen); each R_j <- Z_j
    with every layer copied and zero first-layer rows for the action inputs, so R_j(s, a) == Z_j(s) for every a;
    Rbar <- R. The SAC+ML optimiser states are kept, as d3rlpy's load_model does (`reset_optimizers`: fresh)."""
    txs = optimizers(h)
    r_params = critic_from_baseline(state.baseline.params, h.act_dim)
    log_temp = jnp.zeros((), jnp.float32)
    if reset_optimizers:
        critic = Trainable(r_params, txs["critic"].init(r_params))
        temp = Trainable(log_temp, txs["log_temp"].init(log_temp))
        actor = Trainable(state.actor.params, txs["actor"].init(state.actor.params))
    else:  # official: d3rlpy's load_model restores the SAC+ML optimiser states, the weights are set in place
        critic = state.critic._replace(params=r_params)
        temp = state.log_temp._replace(params=log_temp)
        actor = state.actor
    return state._replace(actor=actor, critic=critic, log_temp=temp, critic_target=r_params,
                          ref_actor=state.actor.params, online_updates=jnp.zeros((), jnp.int32))




def online_update(state: ACAState, batch: Buffer, noise: dict, h: Hyper):
    """One ACA step on the aligned critic Q_j(s, a) = R_j(s, a) + w softclip(log pi0(a|s)), in this order:
    temperature (as offline), critic R, actor, target. w = interpolation_weight(online update count);
    softclip(x) = softplus(x - c(s)) + c(s), a smooth max(x, c(s)), with c(s) = clip_bound of pi0 (`beta`).
    `noise`: the unit normals of the three policy samples ("temp", "next", "pi"), each [B, A]. Pure.

      critic  y = r + gamma (1-d) [min_j Rbar_j(s', a') + w softclip(log pi0(a'|s')) - T log pi(a'|s')],
              L_R = sum_j mean (R_j(s, a) + w softclip(log pi0(a|s)) - y)^2;
      actor   L_pi = mean(T log pi(a^|s) - min_j R_j(s, a^) - w softclip(log pi0(a^|s))) (the gradient also flows
              through a^ into log pi0), global grad-norm clip `actor_grad_clip`;
      target  Rbar <- tau R + (1 - tau) Rbar; the next step's w is max(w - w0 / (k * unit), w_min).
    """
    actor, critic, _ = networks(h)
    txs = optimizers(h)
    sg = jax.lax.stop_gradient
    obs, next_obs = _normalized(state, batch)
    b = obs.shape[0]
    w = interpolation_weight(state.online_updates, h)
    # pi(.|s) once: its values serve steps 1-2 and its vjp pulls the actor loss of step 3 back to the parameters
    (mean, log_std), actor_vjp = jax.vjp(lambda p: actor.apply({"params": p}, obs), state.actor.params)
    next_mean, next_log_std = actor.apply({"params": state.actor.params}, next_obs)
    ref_mean_all, ref_log_std_all = actor.apply({"params": state.ref_actor}, jnp.concatenate([obs, next_obs]))
    ref_mean, ref_log_std = ref_mean_all[:b], ref_log_std_all[:b]
    ref_next_mean, ref_next_log_std = ref_mean_all[b:], ref_log_std_all[b:]
    c = clip_bound(ref_mean, ref_log_std, h.beta, h.squashed_policy)
    c_next = clip_bound(ref_next_mean, ref_next_log_std, h.beta, h.squashed_policy)

    def bonus(m0, ls0, cc, a):  # w * softclip(log pi0(a|s))
        return w * soft_clip(log_prob(m0, ls0, a, h.squashed_policy), cc)

    # 1. temperature
    _, logp_t = sample_action(mean, log_std, noise["temp"], h.squashed_policy)
    temp_tr, temp_loss = _temperature_step(state, logp_t, h)
    temp = jnp.exp(temp_tr.params)

    # 2. critic R: aligned Q = R + w softclip(log pi0) on both sides of the TD error
    a_next, logp_next = sample_action(next_mean, next_log_std, noise["next"], h.squashed_policy)
    r_next = critic.apply({"params": state.critic_target}, next_obs, a_next).min(0)
    y = soft_bellman_target(batch.rew, batch.done, r_next + bonus(ref_next_mean, ref_next_log_std, c_next, a_next),
                            logp_next, temp, h.discount)
    data_bonus = bonus(ref_mean, ref_log_std, c, batch.act)

    def critic_loss(p):
        r = critic.apply({"params": p}, obs, batch.act)  # [E, B]
        return ((r + data_bonus - y) ** 2).mean(-1).sum(), r

    (r_loss, r_data), r_grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic.params)
    critic_tr = _step(state.critic, r_grads, txs["critic"])

    # 3. actor against the aligned Q (gradient also through a~ inside log pi0), grad-norm clip
    def actor_loss(m, ls):  # of pi(.|s)'s outputs
        a_pi, logp_pi = sample_action(m, ls, noise["pi"], h.squashed_policy)
        r_pi = critic.apply({"params": critic_tr.params}, obs, a_pi).min(0)
        q_pi = r_pi + bonus(ref_mean, ref_log_std, c, a_pi)
        return (temp * logp_pi - q_pi).mean(), (logp_pi, r_pi, q_pi)

    (a_loss, (logp_pi, r_pi, q_pi)), out_grads = jax.value_and_grad(actor_loss, (0, 1), has_aux=True)(mean, log_std)
    (a_grads,) = actor_vjp(out_grads)
    a_grads, grad_norm = clip_grad_norm(a_grads, h.actor_grad_clip)
    actor_tr = _step(state.actor, a_grads, txs["actor"])

    # 4. targets
    critic_target = optax.incremental_update(critic_tr.params, state.critic_target, h.tau)
    logp0_data = log_prob(ref_mean, ref_log_std, batch.act, h.squashed_policy)
    metrics = {"temp_loss": temp_loss, "alpha": temp, "critic_loss": r_loss, "actor_loss": a_loss, "w": w,
               "r": r_data.mean(), "q_pi": q_pi.mean(), "r_pi": r_pi.mean(), "target_q": y.mean(),
               "log_pi": logp_pi.mean(), "log_pi0_data": logp0_data.mean(), "clip_bound": c.mean(),
               "clip_active": (logp0_data < c).mean(), "actor_grad_norm": grad_norm}
    new = state._replace(actor=actor_tr, critic=critic_tr, log_temp=temp_tr, critic_target=critic_target,
                         updates=state.updates + 1, online_updates=state.online_updates + 1)
    return new, sg(metrics)




def sample_batch(buffer: Buffer, size, k_idx, k_noise, names: tuple, h: Hyper):
    """(batch, noise) of one seed: a uniform batch of buffer rows [0, size) and the unit normals of the policy
    samples `names`, each [B, A]."""
    idx = jax.random.randint(k_idx, (h.batch_size,), 0, size)
    batch = jax.tree.map(lambda x: x[idx], buffer)
    eps = jax.random.normal(k_noise, (len(names), h.batch_size, h.act_dim))
    return batch, dict(zip(names, eps))


# Multi-seed: every state leaf, the online buffer and the per-seed counters carry a leading seed axis; the
# offline rows are shared (closed over: in_axes None). One seed's numbers equal a single-seed run's up to float32
# round-off (XLA sums batched matmuls in a different order). Each update draws its batch on device first.
@partial(jax.jit, static_argnames=("h",))
def scan_updates(state: ACAState, offline: Buffer, h: Hyper):
    """`h.update_block` SAC+ML updates per seed in one lax.scan (vmapped over seeds), batches drawn from the shared
    offline rows; metrics [seeds, h.update_block]."""
    n_off = offline.rew.shape[0]

    def one_seed(state):
        def body(s, _):
            key, k_idx, k_noise = jax.random.split(s.key, 3)
            batch, noise = sample_batch(offline, n_off, k_idx, k_noise, OFFLINE_NOISE, h)
            return offline_update(s._replace(key=key), batch, noise, h)
        return jax.lax.scan(body, state, None, length=h.update_block)
    return jax.vmap(one_seed)(state)


@partial(jax.jit, static_argnames=("h",))
def update_online(state: ACAState, online: Buffer, online_size, n, h: Hyper):
    """`n[i]` <= h.online_block ACA updates for seed i on its online rows [0, online_size[i]), in one lax.fori_loop
    of max(n) steps (n traced: one compiled program for every count); a seed with fewer updates keeps its state
    (and its w schedule) for the remaining steps; metrics [seeds, h.online_block], zero where unused."""
    def one_seed(state, online, online_size, n_seed):
        def step(s):
            key, k_idx, k_noise = jax.random.split(s.key, 3)
            batch, noise = sample_batch(online, online_size, k_idx, k_noise, ONLINE_NOISE, h)
            return online_update(s._replace(key=key), batch, noise, h)
        shapes = jax.eval_shape(lambda s: step(s)[1], state)

        def body(i, carry):
            new, metrics = step(carry[0])
            keep = i < n_seed
            new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, carry[0])
            return new, jax.tree.map(lambda all_, m: all_.at[i].set(jnp.where(keep, m, 0)), carry[1], metrics)
        zeros = jax.tree.map(lambda x: jnp.zeros((h.online_block,) + x.shape, x.dtype), shapes)
        return jax.lax.fori_loop(0, jnp.max(n), body, (state, zeros))
    return jax.vmap(one_seed)(state, online, online_size, n)


@partial(jax.jit, static_argnames=("h", "reset_optimizers"))
def align_seeds(state: ACAState, h: Hyper, reset_optimizers: bool = False) -> ACAState:
    """The switch for every seed at once (`align` vmapped over the seed axis)."""
    return jax.vmap(lambda s: align(s, h, reset_optimizers))(state)


@partial(jax.jit, donate_argnums=(0,))
def buffer_insert(online: Buffer, rows: Buffer, starts):
    """Write each seed's `rows[i]` at `starts[i]` of its online rows, in place (the buffer is donated)."""
    put = lambda b, r, s: jax.lax.dynamic_update_slice_in_dim(b, r, s, 0)  # noqa: E731
    return jax.tree.map(lambda b, r: jax.vmap(put)(b, r, starts), online, rows)


# ---------------------------------------------------------------------------------------------- acting
@partial(jax.jit, static_argnames=("h",))
def act_explore(actor_params, obs_mean, obs_std, obs, keys, active, h: Hyper):
    """All seeds' actions a ~ pi(.|s) (squashed: tanh; not squashed: clipped) in one call per env step. A seed's
    key advances only when it is `active` (so its action sequence does not depend on the other seeds)."""
    def one(params, mean_, std_, o, key, act):
        new_key, sub = jax.random.split(key)
        mean, log_std = networks(h)[0].apply({"params": params}, (o - mean_) / std_)
        action, _ = sample_action(mean, log_std, jax.random.normal(sub, mean.shape), h.squashed_policy)
        return action, jnp.where(act, new_key, key)
    return jax.vmap(one)(actor_params, obs_mean, obs_std, obs, keys, active)


@partial(jax.jit, static_argnames=("h",))
def act_deterministic(actor_params, obs_mean, obs_std, obs, h: Hyper):
    """Deterministic action of one seed's actor (evaluation)."""
    mean, _ = networks(h)[0].apply({"params": actor_params}, (obs - obs_mean) / obs_std)
    return deterministic_action(mean, h.squashed_policy)


@partial(jax.jit, static_argnames=("h", "online"))
def _state_stats(state: ACAState, obs, mask, h: Hyper, online: bool):
    """Sums over the masked rows of value statistics at states `obs` with the deterministic action."""
    actor, critic, baseline = networks(h)
    x = (obs - state.obs_mean) / state.obs_std
    mean, _ = actor.apply({"params": state.actor.params}, x)
    a = deterministic_action(mean, h.squashed_policy)
    ref_mean, ref_log_std = actor.apply({"params": state.ref_actor if online else state.actor.params}, x)
    c = clip_bound(ref_mean, ref_log_std, h.beta, h.squashed_policy)
    crit = critic.apply({"params": state.critic.params}, x, a).min(0)
    z = baseline.apply({"params": state.baseline.params}, x).min(0)
    out = {"z_mean": z, "clip_low_mean": c}
    if online:
        w = interpolation_weight(state.online_updates, h)
        logp0 = log_prob(ref_mean, ref_log_std, a, h.squashed_policy)
        out.update(r_mean=crit, q_mean=crit + w * soft_clip(logp0, c), log_pi0_mean=logp0)
    else:
        out.update(q_mean=crit)
    sums = {k: jnp.sum(v * mask) for k, v in out.items()}
    big = jnp.finfo(jnp.float32).max
    sums["clip_low_min"] = jnp.min(jnp.where(mask > 0, c, big))
    sums["clip_low_max"] = jnp.max(jnp.where(mask > 0, c, -big))
    return sums


def state_statistics(state: ACAState, observations: np.ndarray, h: Hyper, online: bool) -> dict:
    """Means (and the min/max of the soft-clip bound) over evaluation states, in fixed-size jitted chunks."""
    n = len(observations)
    totals = {}
    for start in range(0, n, STATS_CHUNK):
        part = observations[start:start + STATS_CHUNK]
        pad = np.zeros((STATS_CHUNK, h.obs_dim), np.float32)
        pad[:len(part)] = part
        mask = (np.arange(STATS_CHUNK) < len(part)).astype(np.float32)
        sums = {k: float(v) for k, v in _state_stats(state, jnp.asarray(pad), jnp.asarray(mask), h, online).items()}
        for k, v in sums.items():
            if k == "clip_low_min":
                totals[k] = min(totals.get(k, v), v)
            elif k == "clip_low_max":
                totals[k] = max(totals.get(k, v), v)
            else:
                totals[k] = totals.get(k, 0.0) + v
    return {k: (v if k in ("clip_low_min", "clip_low_max") else v / max(n, 1)) for k, v in totals.items()}


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


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig) -> dict:
    """SAC+ML pre-training, the switch, then ACA fine-tuning of `num_seeds` seeds at once; returns the last
    evaluation record(s) and paths."""
    from tqdm import tqdm

    t_start = time.time()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    N = len(seeds)
    cfg.name = cfg.name or f"aca-{cfg.dataset_id.replace('/', '-')}-seed{cfg.seed}" + (f"x{N}" if N > 1 else "")
    with Run(cfg, run_dir) as run:  # checks that need no data, before any slow work; see Run
        if run.offline_from is not None:
            check_offline_source(run.offline_from, N)
        world = load_world(cfg, N)
        h = world.h
        state, prog, online = start_or_resume(cfg, run, world, seeds)
        rec = Recorder(cfg, run_dir, seeds, world, prog, t_start)
        act_key = jnp.asarray(prog.act_key)

        # ---- offline pre-training: SAC+ML and the baseline Z (all seeds in one vmapped scan per block)
        if prog.phase == "offline":
            bar = tqdm(total=cfg.offline_updates, initial=int(prog.updates[0]), desc="ACA offline (SAC+ML)",
                       mininterval=5)
            while prog.updates[0] < cfg.offline_updates:
                state, metrics = scan_updates(state, world.offline, h)
                logged = block_metrics(metrics, cfg.update_block, "offline", seeds, prog.updates)
                prog.updates += cfg.update_block
                bar.update(cfg.update_block)
                rec.logger.log({**logged, "offline/updates": int(prog.updates[0])})
                if prog.updates[0] % cfg.offline_eval_every == 0 or prog.updates[0] == cfg.offline_updates:
                    rec.evaluate(state, prog, "offline")
                    bar.set_postfix(score=rec.score(prog))
                    if prog.updates[0] < cfg.offline_updates:
                        rec.checkpoint(state, prog, online, act_key)
                if run.stop and prog.updates[0] < cfg.offline_updates:
                    rec.checkpoint(state, prog, online, act_key)
                    run.interrupt_if_asked(f"after {int(prog.updates[0])} offline updates")
            bar.close()
            if prog.last_eval[0] is None:  # offline_updates == 0: still report the starting policy
                rec.evaluate(state, prog, "offline")
        elif prog.phase == "load_offline":
            rec.evaluate(state, prog, "offline")  # the score before fine-tuning

        # ---- the switch: the SAC+ML state is saved as the offline checkpoint (phase "align"), then every seed is
        # aligned (T, pi0, R <- Z). A run resumed from that checkpoint (`latest` was damaged) only aligns.
        if prog.phase in ("offline", "load_offline", "align"):
            if prog.phase != "align":
                prog.phase = "align"
                rec.checkpoint(state, prog, online, act_key, "offline")
            state = align_seeds(state, h, cfg.online_reset_optimizers)
            prog.phase = "online"
            rec.checkpoint(state, prog, online, act_key)

        # ---- online fine-tuning (ACA). Each seed follows exactly the single-seed schedule: collect up to
        # online_block env steps (a block also ends at an episode end), append them, then the updates due for them
        # (one per env step once its buffer holds more than batch_size rows; its own w schedule). Seeds whose block
        # ended early wait for the others; a seed due for evaluation (first episode end after every
        # online_eval_every steps) waits until every seed is due, so checkpoints fall on episode ends of all seeds.
        if prog.phase == "online":
            ep = Episodes(cfg, h, prog, world.envs, seeds)
            bar = tqdm(total=cfg.online_steps * N, initial=int(prog.env_steps.sum()), desc="ACA online", mininterval=5)
            while prog.env_steps.min() < cfg.online_steps:
                n, steps, n_updates, act_key = collect(cfg, world, state, prog, ep, act_key, seeds, rec.logger)
                starts = (world.n_seed + prog.online_size).astype(np.int32)  # buffer rows before this block
                online = buffer_insert(online, Buffer(**{k: jnp.asarray(v) for k, v in ep.chunk.items()}),
                                       jnp.asarray(starts))
                prog.online_size += n
                logged = {}
                if n_updates.any():
                    state, metrics = update_online(state, online, jnp.asarray(starts + n), jnp.asarray(n_updates), h)
                    logged = block_metrics(metrics, n_updates, "online", seeds, prog.updates)
                    prog.updates += n_updates
                rec.logger.log({**logged, "online/env_steps": int(prog.env_steps.sum()),
                                "online/updates": int(prog.updates.sum())})
                bar.update(int(steps.sum()))
                ep.due |= ((steps > 0) & ep.at_start & ((prog.env_steps >= prog.next_eval) | run.stop)
                           & (prog.env_steps < cfg.online_steps))  # (a stop: checkpoint at every seed's episode end)
                if ep.due.any() and (ep.due | (prog.env_steps >= cfg.online_steps)).all():
                    which = [i for i in range(N) if ep.due[i] and prog.env_steps[i] >= prog.next_eval[i]]
                    for i in which:
                        while prog.next_eval[i] <= prog.env_steps[i]:
                            prog.next_eval[i] += cfg.online_eval_every
                    if which:
                        rec.evaluate(state, prog, "online", which)
                        bar.set_postfix(score=rec.score(prog, which),
                                        train_return=np.mean([np.mean(r) for r in ep.recent if r] or [0.0]))
                    prog.env_rng = [env_rng_snapshot(env) for env in world.envs]
                    ep.due[:] = False
                    rec.checkpoint(state, prog, online, act_key)
                    run.interrupt_if_asked(f"at {prog.env_steps.tolist()} online env steps")
            bar.close()
            rec.evaluate(state, prog, "online")
            prog.phase = "done"
            rec.checkpoint(state, prog, online, act_key)
        elif prog.phase == "done":
            print(f"run in {run_dir} already finished")
        rec.logger.close()
        world.close()
        summaries = [summarize(path) for path in rec.logger.eval_paths]
        out = {"run_dir": str(run_dir), "seeds": seeds, "last_eval": prog.last_eval[0],
               "updates": int(prog.updates[0]), "env_steps": int(prog.env_steps[0]),
               "seeded_transitions": world.n_seed, **summaries[0]}
        if N > 1:
            out.update(last_eval=prog.last_eval, updates=prog.updates.tolist(), env_steps=prog.env_steps.tolist(),
                       per_seed=summaries)
        return out


# ---------------------------------------------------------------------------------------------- logging
class Logger:
    """wandb + eval.jsonl (one per seed) + console. Metrics are namespaced offline/..., online/..., eval/...."""

    def __init__(self, cfg, run_dir: Path, seeds: list, wandb_id: str, eval_lines: list):
        # one seed: run_dir/eval.jsonl; several: run_dir/seed<S>/eval.jsonl
        self.eval_paths = [run_dir / "eval.jsonl"] if len(seeds) == 1 else \
            [run_dir / f"seed{s}" / "eval.jsonl" for s in seeds]
        for path, keep in zip(self.eval_paths, eval_lines):
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():  # drop evaluations logged after the checkpoint we resume from
                lines = path.read_text().splitlines()[:keep]
                path.write_text("".join(line + "\n" for line in lines))
        self.eval_lines = list(eval_lines)
        self.seeds = seeds
        mode = os.environ.get("WANDB_MODE", cfg.wandb_mode)
        self.wandb = None
        if mode != "disabled":
            import wandb
            self.wandb = wandb.init(project=cfg.project, group=cfg.group, name=cfg.name, id=wandb_id,
                                    resume="allow", mode=mode, dir=str(run_dir), config=asdict(cfg))

    def log(self, metrics: dict):
        if self.wandb is not None:
            self.wandb.log(metrics)

    def log_eval(self, i: int, record: dict):
        with open(self.eval_paths[i], "a") as f:
            f.write(json.dumps(record) + "\n")
        self.eval_lines[i] += 1
        tag = "eval" if len(self.seeds) == 1 else f"eval/seed{self.seeds[i]}"
        self.log({f"{tag}/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
        score = record.get("normalized_score", record["return"])
        extra = f", success {record['success_rate']:.2f}" if "success_rate" in record else ""
        extra += f", w {record['w']:.3f}" if "w" in record else ""
        print(f"[eval] seed {record['seed']} {record['phase']} updates={record['updates']} "
              f"env_steps={record['env_steps']}: "
              f"{'normalized score' if 'normalized_score' in record else 'return'} {score:.2f}{extra}, "
              f"alpha {record['alpha']:.3g}", flush=True)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def block_metrics(metrics: dict, n, phase: str, seeds: list, updates_before) -> dict:
    """Means of the first n[i] per-update metrics of each seed (then over seeds); a NaN/inf stops the run
    naming the loss, the seed and the update."""
    host = {k: np.asarray(v) for k, v in metrics.items()}  # [seeds, steps]
    n = np.broadcast_to(np.asarray(n), (len(seeds),))
    valid = np.arange(next(iter(host.values())).shape[1])[None, :] < n[:, None]
    bad = valid & np.logical_or.reduce([~np.isfinite(v) for v in host.values()])
    if bad.any():
        j = int(np.flatnonzero(bad.any(0))[0])  # the first update with a non-finite value, over all seeds
        i = int(np.flatnonzero(bad[:, j])[0])
        names = ", ".join(f"{phase}/{k} = {v[i, j]}" for k, v in host.items() if not np.isfinite(v[i, j]))
        raise FloatingPointError(f"non-finite {names} (seed {seeds[i]}) at update "
                                 f"{int(np.asarray(updates_before)[i]) + j + 1}; stopping (the last checkpoint is "
                                 "intact)")
    count = max(int(valid.sum()), 1)
    return {f"{phase}/{k}": float(np.where(valid, v, 0.0).sum() / count) for k, v in host.items()}


# ---------------------------------------------------------------------------------------------- run support
def episode_returns(rewards: np.ndarray, episode_ends: np.ndarray):
    """(start, end) row ranges of the episodes and their undiscounted returns."""
    ends = np.flatnonzero(episode_ends) + 1
    if len(ends) == 0 or ends[-1] != len(rewards):
        ends = np.append(ends, len(rewards))
    starts = np.concatenate([[0], ends[:-1]])
    returns = np.add.reduceat(rewards.astype(np.float64), starts)
    return starts, ends, returns


def top_episode_rows(rewards: np.ndarray, episode_ends: np.ndarray, n: int) -> np.ndarray:
    """Row indices of the n highest-return episodes (official `buffer_init`: argsort of the returns, last n)."""
    if n == 0:
        return np.zeros(0, np.int64)
    starts, ends, returns = episode_returns(rewards, episode_ends)
    if n > len(returns):
        raise ValueError(f"n_trajs={n} but the dataset has only {len(returns)} episodes")
    top = np.argsort(returns, kind="stable")[-n:]
    return np.concatenate([np.arange(starts[i], ends[i]) for i in top])


def default_run_dir(cfg) -> Path:
    seeds = f"seed{cfg.seed}" if cfg.num_seeds == 1 else f"seeds{cfg.seed}-{cfg.seed + cfg.num_seeds - 1}"
    return Path("runs") / "aca" / cfg.dataset_id.replace("/", "_") / seeds


def check_offline_source(src: Path, num_seeds: int):
    """--offline_checkpoint must be an offline (pre-switch) checkpoint of this script (Run has checked that it is
    intact) with this run's number of seeds: a clear error for anything else, before the data is loaded."""
    meta = load_meta(src)
    if meta.get("algo") != "aca":
        other = f" (it looks like a checkpoint of {Path(src).parents[2].name})" if len(Path(src).parents) > 2 else ""
        raise RunError(f"--offline_checkpoint {src} was not written by algorithms/aca.py{other}: ACA starts "
                       "fine-tuning from its own SAC+ML pre-training, whose baseline Z(s) initialises the online "
                       "critic. Pre-train with aca.py (or drop --offline_checkpoint).")
    if meta.get("phase") not in ("offline", "align"):
        raise RunError(f"--offline_checkpoint {src} is an online-phase checkpoint (phase {meta.get('phase')!r}, "
                       "already aligned); pass <run_dir>/checkpoints/offline, or continue that run with --resume")
    n = meta.get("num_seeds", 1)
    if n != num_seeds:
        raise RunError(f"--offline_checkpoint {src} holds {n} seed(s); run with --num_seeds {n}")


class World(NamedTuple):
    """What a run trains on: the data on device, the envs (one training env per seed, one evaluation env), the
    static hyper-parameters and the rows that start every seed's online buffer."""
    offline: Buffer  # all dataset rows with the offline reward transformation, shared by the seeds (SAC+ML only)
    seeded: Buffer  # (numpy) the top-n_trajs offline episodes with the online reward transformation
    envs: list
    eval_env: Any
    h: Hyper
    obs_mean: np.ndarray
    obs_std: np.ndarray
    refs: Optional[tuple]  # (ref_min, ref_max) return of the normalised score, None when the dataset has none

    @property
    def n_seed(self) -> int:
        """Seeded rows at the start of every online buffer (the online transitions follow them)."""
        return len(self.seeded.rew)

    def reward(self, r, cfg):
        return r * cfg.reward_scale + cfg.online_reward_bias

    def close(self):
        for env in self.envs + [self.eval_env]:
            env.close()


def load_world(cfg: TrainConfig, n_seeds: int) -> World:
    ds = data.load_dataset(cfg.dataset_id, cfg.discount)
    envs, eval_env = [data.make_env(cfg.dataset_id) for _ in range(n_seeds)], data.make_env(cfg.dataset_id)
    obs_dim, act_dim = ds.observations.shape[1], ds.actions.shape[1]
    if envs[0].observation_space.shape != (obs_dim,) or envs[0].action_space.shape != (act_dim,):
        raise data.DatasetError(f"{cfg.dataset_id}: env spaces {envs[0].observation_space.shape}/"
                                f"{envs[0].action_space.shape} do not match the dataset ({obs_dim}, {act_dim})")
    try:
        refs = data.reference_scores(cfg.dataset_id)
    except data.DatasetError as e:
        print(f"warning: {e}; logging raw returns only")
        refs = None
    offline = Buffer(*(jnp.asarray(x, jnp.float32) for x in (
        ds.observations, ds.actions, ds.rewards * cfg.reward_scale + cfg.reward_bias, ds.next_observations,
        ds.terminals)))
    rows = top_episode_rows(ds.rewards, ds.episode_ends, cfg.n_trajs)
    seeded = Buffer(*(x[rows] for x in (ds.observations, ds.actions, ds.rewards * cfg.reward_scale
                                        + cfg.online_reward_bias, ds.next_observations,
                                        ds.terminals.astype(np.float32))))
    obs_mean = ds.obs_mean if cfg.normalize else np.zeros(obs_dim, np.float32)
    obs_std = ds.obs_std if cfg.normalize else np.ones(obs_dim, np.float32)
    return World(offline, seeded, envs, eval_env, make_hyper(cfg, obs_dim, act_dim), obs_mean, obs_std, refs)


@dataclass
class Progress:
    """Per-seed bookkeeping (one entry per seed) and the host state of a run: the checkpoint's meta.json."""
    algo: str  # "aca": --offline_checkpoint accepts only this script's checkpoints
    phase: str  # offline | load_offline | align (SAC+ML done, the switch not yet) | online | done
    num_seeds: int
    updates: np.ndarray  # gradient steps done (offline + online)
    env_steps: np.ndarray  # online env steps done
    online_size: np.ndarray  # online rows in the buffer (after the seeded rows)
    saved_rows: np.ndarray  # online rows already written to checkpoints/buffer
    next_eval: np.ndarray  # env step of the next online evaluation
    episodes: np.ndarray  # online episodes finished
    eval_lines: np.ndarray  # lines of each seed's eval.jsonl that this state has logged
    act_key: np.ndarray  # [seeds, 2] exploration RNG keys
    env_rng: list  # training-env RNG snapshots at the checkpoint (None before the first reset)
    last_eval: list  # the last evaluation record
    wandb_id: Optional[str] = None
    wall_time: float = 0.0  # seconds of run time before this attempt

    COUNTERS = ("updates", "env_steps", "online_size", "saved_rows", "next_eval", "episodes", "eval_lines")

    @classmethod
    def start(cls, cfg: TrainConfig, seeds: list) -> "Progress":
        zeros = lambda: np.zeros(len(seeds), np.int64)  # noqa: E731
        return cls("aca", "offline", len(seeds), zeros(), zeros(), zeros(), zeros(),
                   np.full(len(seeds), cfg.online_eval_every, np.int64), zeros(), zeros(),
                   np.stack([np.asarray(jax.random.PRNGKey(s + 1)) for s in seeds]), [None] * len(seeds),
                   [None] * len(seeds))

    @classmethod
    def from_meta(cls, meta: dict) -> "Progress":
        return cls(**{**meta, **{k: np.asarray(meta[k], np.int64) for k in cls.COUNTERS}})

    def meta(self) -> dict:
        return {**asdict(self), **{k: getattr(self, k).tolist() for k in self.COUNTERS}}


def start_or_resume(cfg: TrainConfig, run, world: World, seeds: list):
    """(state, progress, online buffer): fresh, or restored from run.resume_from (state, counters, RNG keys, online
    rows), or the SAC+ML state of run.offline_from to align and fine-tune."""
    h, N, n_seed = world.h, len(seeds), world.n_seed
    capacity = n_seed + cfg.online_steps + cfg.online_block + int(cfg.d3rlpy_terminals)

    def column(x, shape):  # per seed: [seeded rows | online transitions | slack for a full chunk]
        out = np.zeros((N, capacity) + shape, np.float32)
        out[:, :n_seed] = x
        return jnp.asarray(out)
    online = Buffer(*(column(x, shape) for x, shape in
                      zip(world.seeded, ((h.obs_dim,), (h.act_dim,), (), (h.obs_dim,), ()))))
    state = stack_seeds([init_state(h, jax.random.PRNGKey(s), world.obs_mean, world.obs_std, cfg.initial_temperature)
                         for s in seeds])
    prog = Progress.start(cfg, seeds)
    if run.resume_from is not None:
        state, meta = load_state(run.resume_from, state, cfg)
        prog = Progress.from_meta(meta)
        for i, s in enumerate(seeds):
            rows = load_buffer_rows(run.run_dir / "checkpoints" / "buffer" / f"seed{s}", int(prog.online_size[i]))
            if rows is not None:
                online = online._replace(**{k: getattr(online, k).at[i, n_seed:n_seed + len(v)].set(v)
                                            for k, v in rows.items()})
        print(f"resumed from {run.resume_from}: phase {prog.phase}, {prog.updates.tolist()} updates, "
              f"{prog.env_steps.tolist()} online env steps")
    elif run.offline_from is not None:
        state, src = load_state(run.offline_from, state, cfg)
        prog.updates = np.asarray(np.ravel(src["updates"]), np.int64)
        prog.act_key, prog.phase = np.asarray(src["act_key"]).reshape(N, -1), "load_offline"
        print(f"loaded SAC+ML state from {run.offline_from} ({src['updates']} updates)")
    return state, prog, online


class Recorder:
    """Evaluations (eval.jsonl, wandb, console) and checkpoints of a run: `evaluate` and `checkpoint`."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, seeds: list, world: World, prog: Progress, t_start: float):
        self.cfg, self.run_dir, self.seeds, self.world, self.t_start = cfg, run_dir, seeds, world, t_start
        self.wall_before, self.goal_task = prog.wall_time, "antmaze" in cfg.dataset_id
        with open(run_dir / "config.yaml", "w") as f:
            pyrallis.dump(cfg, f)
        prog.wandb_id = prog.wandb_id or f"{cfg.name}-{int(time.time())}"
        self.logger = Logger(cfg, run_dir, seeds, prog.wandb_id, prog.eval_lines.tolist())

    def evaluate(self, state, prog: Progress, phase: str, which=None):
        """The evaluation record also holds T, w (online) and the value statistics at the evaluation states."""
        cfg, w = self.cfg, self.world
        for i in range(len(self.seeds)) if which is None else which:
            one, visited = seed_slice(state, i), []
            record = {"seed": self.seeds[i], "phase": phase, "updates": int(prog.updates[i]),
                      "env_steps": int(prog.env_steps[i])}

            def policy(o, one=one, visited=visited):
                visited.append(o)
                return act_deterministic(one.actor.params, one.obs_mean, one.obs_std, o, w.h)
            record.update(evaluate(w.eval_env, policy, cfg.eval_episodes, cfg.eval_seed, cfg.terminate_on_success,
                                   self.goal_task, w.refs))
            record["alpha"] = float(jnp.exp(one.log_temp.params))
            if phase == "online":
                record["w"] = float(interpolation_weight(one.online_updates, w.h))
            record.update(state_statistics(one, np.stack(visited), w.h, online=phase == "online"))
            record["wall_time"] = round(self.wall_before + time.time() - self.t_start, 2)  # s since the run started
            self.logger.log_eval(i, record)
            prog.eval_lines[i], prog.last_eval[i] = self.logger.eval_lines[i], record

    def score(self, prog: Progress, which=None) -> float:
        records = [prog.last_eval[i] for i in (range(len(self.seeds)) if which is None else which)]
        return float(np.mean([r.get("normalized_score", r["return"]) for r in records]))

    def checkpoint(self, state, prog: Progress, online: Buffer, act_key, name: str = "latest"):
        """Online rows appended to checkpoints/buffer, then state + meta atomically into checkpoints/<name>."""
        ckpt_dir = self.run_dir / "checkpoints"
        prog.act_key = np.asarray(act_key)
        for i, s in enumerate(self.seeds):
            save_buffer_rows(ckpt_dir / "buffer" / f"seed{s}", seed_slice(online, i), int(prog.saved_rows[i]),
                             int(prog.online_size[i]), offset=self.world.n_seed)
        prog.saved_rows = prog.online_size.copy()
        prog.wall_time = self.wall_before + time.time() - self.t_start
        save_state(ckpt_dir / name, state, prog.meta(), self.cfg)


class Episodes:
    """The training envs' current episodes, one entry per seed, and one block of collected transitions."""

    def __init__(self, cfg: TrainConfig, h: Hyper, prog: Progress, envs: list, seeds: list):
        N = len(seeds)
        for i, env in enumerate(envs):
            if prog.env_rng[i] is not None:
                env_rng_restore(env, prog.env_rng[i], seeds[i])
        self.first_reset = np.array([snapshot is None for snapshot in prog.env_rng])
        self.chunk = {k: np.zeros((N, cfg.online_block + int(cfg.d3rlpy_terminals)) + s, np.float32) for k, s in
                      (("obs", (h.obs_dim,)), ("act", (h.act_dim,)), ("rew", ()), ("next_obs", (h.obs_dim,)),
                       ("done", ()))}
        self.obs = np.zeros((N, h.obs_dim), np.float32)
        self.at_start = np.ones(N, bool)
        self.ret, self.length, self.recent = np.zeros(N), np.zeros(N, np.int64), [[] for _ in range(N)]
        self.due = np.zeros(N, bool)  # waiting for the synchronised evaluation + checkpoint
        self.pending = [None] * N  # d3rlpy_terminals: this episode's last transition, stored at the next env step


def collect(cfg: TrainConfig, world: World, state, prog: Progress, ep: Episodes, act_key, seeds, logger):
    """Up to online_block env steps per seed with the current policy, their transitions into ep.chunk; a seed's
    block also ends at an episode end. Returns per seed the transitions, the env steps and the updates due (official
    rule: one per env step after which the buffer holds more than batch_size rows), and the advanced exploration
    keys. d3rlpy_terminals: a transition is stored at the next env step, with that step's termination flag."""
    N = len(seeds)
    n, steps, updates = np.zeros(N, np.int32), np.zeros(N, np.int32), np.zeros(N, np.int32)

    def store(i, row):
        for k, v in zip(("obs", "act", "next_obs", "done", "rew"), row):
            ep.chunk[k][i, n[i]] = v
        n[i] += 1
    active = ~ep.due & (prog.env_steps < cfg.online_steps)
    while active.any():
        for i in np.flatnonzero(active):
            if ep.at_start[i]:
                ep.obs[i] = world.envs[i].reset(seed=seeds[i] if ep.first_reset[i] else None)[0]
                ep.first_reset[i], ep.at_start[i], ep.ret[i], ep.length[i] = False, False, 0.0, 0
        actions, act_key = act_explore(state.actor.params, state.obs_mean, state.obs_std, ep.obs, act_key,
                                       jnp.asarray(active), world.h)
        actions = np.asarray(actions)
        for i in np.flatnonzero(active):
            next_obs, r, term, trunc, info = world.envs[i].step(actions[i])
            term = term or (cfg.terminate_on_success and bool(info.get("success", False)))
            row = (ep.obs[i].copy(), actions[i].copy(), next_obs, float(term), world.reward(r, cfg))
            if not cfg.d3rlpy_terminals:
                store(i, row)
            else:
                if ep.pending[i] is not None:
                    store(i, ep.pending[i][:3] + (float(term),) + ep.pending[i][4:])
                ep.pending[i] = None if term or trunc else row
                if term:
                    store(i, row)
            steps[i], prog.env_steps[i] = steps[i] + 1, prog.env_steps[i] + 1
            updates[i] += world.n_seed + prog.online_size[i] + n[i] > cfg.batch_size
            ep.ret[i], ep.length[i] = ep.ret[i] + float(r), ep.length[i] + 1
            ep.obs[i] = next_obs
            if term or trunc:
                prog.episodes[i] += 1
                ep.recent[i] = (ep.recent[i] + [float(ep.ret[i])])[-10:]
                logger.log({f"online/episode_return{'' if N == 1 else f'/seed{seeds[i]}'}": float(ep.ret[i]),
                            "online/episode_length": int(ep.length[i]), "online/env_steps": int(prog.env_steps[i])})
                ep.at_start[i] = True
            if ep.at_start[i] or steps[i] == cfg.online_block or prog.env_steps[i] >= cfg.online_steps:
                active[i] = False
    return n, steps, updates, act_key


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


# ====================================================================================================
# Run plumbing: checkpoints, resume, run-directory lock, stop on Ctrl-C. The same text in every algorithm file
# (tests/test_plumbing.py checks), so a fix is made once and copied; nothing below is algorithm-specific.
# ====================================================================================================
class RunError(RuntimeError):
    """A problem with the run directory or a checkpoint: reported as one line (`error: ...`), no traceback."""


class Interrupted(RunError):
    """Ctrl-C / SIGTERM: a checkpoint was written; the message says how to continue."""


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
            raise RunError(f"checkpoint {path} does not match this model: missing {missing}, unexpected {unexpected} "
                           "(different network sizes, n_critics, layer norm, policy type or algorithm?)")
        leaves = []
        for name, (k, ref) in zip(expected, flat):
            arr = z[name]
            if arr.shape != np.shape(ref):
                raise RunError(f"checkpoint {path}: {jax.tree_util.keystr(k)} has shape {arr.shape}, this config "
                               f"needs {np.shape(ref)} (different network sizes or dataset?)")
            leaves.append(jnp.asarray(arr, dtype=ref.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _to_json(x):
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype), "shape": list(x.shape)}
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"checkpoint meta: cannot store {type(x).__name__}")


def _from_json(d):
    return np.asarray(d["__ndarray__"], d["dtype"]).reshape(d["shape"]) if "__ndarray__" in d else d


def load_meta(path: Path) -> dict:
    """The host-side state of a checkpoint (counters, RNG states, last evaluations): data-only JSON, never code."""
    if not (path / "meta.json").exists() and (path / "meta.pkl").exists():
        raise RunError(f"checkpoint {path} has the old pickle format (meta.pkl), which this version does not load "
                       "(loading a pickle can run code); re-create it with this version")
    with open(path / "meta.json") as f:
        return json.load(f, object_hook=_from_json)


def save_checkpoint(path: Path, state, meta: dict, cfg):
    """Atomically write state + host meta + resolved config into directory `path` (a kill at any moment leaves
    `path` or `path.old` intact)."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tree(tmp / "state.npz", state)
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, default=_to_json)
    with open(tmp / "config.yaml", "w") as f:
        pyrallis.dump(cfg, f)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint in `path` cannot be loaded (missing or corrupt file), or None when it is intact."""
    if (path / "meta.pkl").is_file() and not (path / "meta.json").is_file():
        return "the old format with meta.pkl, a pickle (not loaded: it can run code); re-create it with this version"
    for name in ("meta.json", "state.npz", "config.yaml"):
        if not (path / name).is_file():
            return f"{name} missing"
    try:
        load_meta(path)
        with np.load(path / "state.npz") as z:
            for name in z.files:
                z[name]  # reads every array: checks the zip's CRCs
    except Exception as e:  # noqa: BLE001 (any failure to read makes it unusable)
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def find_checkpoint(*paths: Path) -> Optional[Path]:
    """The first intact checkpoint among `paths` and their `.old` copies (a kill between the two renames of
    save_checkpoint leaves only `.old`); a damaged one is reported and skipped."""
    for path in paths:
        for p in (path, path.with_name(path.name + ".old")):
            if p.exists():
                problem = checkpoint_problem(p)
                if problem is None:
                    return p
                print(f"warning: checkpoint {p} is not usable ({problem}); trying an older one")
    return None


def load_checkpoint(path: Path, template):
    """(state, meta); `template` is a state or a function meta -> state (when the state type depends on the phase)."""
    meta = load_meta(path)
    return load_tree(path / "state.npz", template(meta) if callable(template) else template), meta


def seed_slice(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def stack_seeds(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def save_state(path: Path, state, meta: dict, cfg):
    """A one-seed run saves the state without the seed axis (the layout other scripts load)."""
    save_checkpoint(path, seed_slice(state, 0) if cfg.num_seeds == 1 else state, meta, cfg)


def load_state(path: Path, template, cfg):
    """(state with a leading seed axis, meta); `template`: a seed-stacked state or a function meta -> one."""
    pick = lambda meta: template(meta) if callable(template) else template  # noqa: E731
    if cfg.num_seeds == 1:
        state, meta = load_checkpoint(path, lambda meta: seed_slice(pick(meta), 0))
        return stack_seeds([state]), meta
    return load_checkpoint(path, pick)


def save_buffer_rows(buffer_dir: Path, online, start: int, end: int, offset: int = 0):
    """Append one seed's online rows [start, end) (`online`: that seed's rows, stored from row `offset`) as one file."""
    if end <= start:
        return
    buffer_dir.mkdir(parents=True, exist_ok=True)
    rows = {k: np.asarray(v[offset + start: offset + end]) for k, v in online._asdict().items()}
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
            raise RunError(f"online buffer files in {buffer_dir} are inconsistent at {f.name} (expected start "
                           f"{pos}, checkpoint size {size})")
        try:
            with np.load(f) as z:
                parts.append({k: z[k] for k in z.files})
        except Exception as e:  # noqa: BLE001
            raise RunError(f"online buffer file {f} is unreadable ({type(e).__name__}); the online phase must restart: "
                           "run again with --overwrite, or with --offline_checkpoint <run_dir>/checkpoints/offline "
                           "and a new run_dir") from e
        pos = end
    if pos != size:
        raise RunError(f"online buffer files in {buffer_dir} hold {pos} rows, the checkpoint needs {size}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


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
        raise RunError(f"env RNG layout changed since the checkpoint: {sorted(gens)} vs {sorted(snapshot)}")
    for k, state in snapshot.items():
        gens[k].bit_generator.state = state


def check_resume_config(saved: Path, cfg):
    """--resume must not change what the checkpoint was trained with (fields in RESUME_FREE may change)."""
    with open(saved) as f:
        old = pyrallis.load(type(cfg), f)
    diff = {k: (getattr(old, k), getattr(cfg, k)) for k in asdict(cfg) if k not in RESUME_FREE
            and getattr(old, k) != getattr(cfg, k)}
    if diff:
        raise RunError(f"--resume with a config that differs from the checkpoint's ({saved}): "
                       + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))


class Run:
    """One training run's hold on its directory, opened before any slow work (data, compilation):

    * a lock (`run_dir/.lock`, an OS file lock: released when the process ends, however it ends, so a lock left by
      a killed process is taken over) refuses a second process on the same directory;
    * a previous run in the directory is continued (`--resume`) or deleted (`--overwrite`), never silently wiped;
    * `resume_from`: the checkpoint to continue from: `latest`, else `latest.old`, else `offline` (the newest
      intact one), its config checked against this one; `offline_from`: the intact --offline_checkpoint to start
      from (the script that loads it checks what it holds);
    * SIGINT (Ctrl-C) and SIGTERM set `stop`; the training loops then write a checkpoint at the next block
      boundary (online: when every seed is at an episode end) and raise Interrupted. A second Ctrl-C stops at once.
    """

    def __init__(self, cfg, run_dir: Path):
        import fcntl
        self.cfg, self.run_dir, self.stop, self.resume_from, self.offline_from = cfg, run_dir, False, None, None
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(run_dir / ".lock", "a+")
        except OSError as e:
            raise RunError(f"run_dir {run_dir} is not writable ({e.strerror}); choose another --run_dir") from e
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "unknown"
            self._lock.close()
            raise RunError(f"run_dir {run_dir} is in use by another process (pid {owner}); wait for it to end or "
                           "stop it, or choose another --run_dir") from None
        self._lock.truncate(0)
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        try:
            self._claim()
        except BaseException:
            self._lock.close()
            raise

    def _claim(self):
        cfg, ckpt_dir = self.cfg, self.run_dir / "checkpoints"
        evals = [self.run_dir / "eval.jsonl"] + sorted(self.run_dir.glob("seed*/eval.jsonl"))
        previous = ckpt_dir.exists() or any(p.exists() and p.stat().st_size > 0 for p in evals)
        if cfg.overwrite and cfg.resume:
            raise RunError("--resume continues the run in run_dir, --overwrite deletes it: pass one of them")
        if cfg.overwrite:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            for path in evals:
                path.unlink(missing_ok=True)
        elif cfg.resume:
            self.resume_from = find_checkpoint(ckpt_dir / "latest", ckpt_dir / "offline")
            if self.resume_from is not None:
                check_resume_config(self.resume_from / "config.yaml", cfg)
            elif ckpt_dir.exists() and any(ckpt_dir.iterdir()):
                raise RunError(f"--resume: no intact checkpoint in {ckpt_dir} (see the warnings above); nothing was "
                               "deleted. Add --overwrite to start the run again from scratch")
            else:
                print(f"--resume: no checkpoint in {ckpt_dir} yet, starting the run from the beginning")
                for path in evals:  # evaluations logged before the first checkpoint are redone
                    path.unlink(missing_ok=True)
        elif previous:
            raise RunError(f"run_dir {self.run_dir} holds a previous run; add --resume to continue it or --overwrite "
                           "to delete it and start again")
        if self.resume_from is None and cfg.offline_checkpoint:
            self.offline_from = find_checkpoint(Path(cfg.offline_checkpoint))
            if self.offline_from is None:
                raise RunError(f"--offline_checkpoint {cfg.offline_checkpoint}: no intact checkpoint there (expected a "
                               "directory with state.npz, meta.json and config.yaml: <run_dir>/checkpoints/offline)")

    def __enter__(self):
        import signal
        import threading
        self._handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        import signal
        if self.stop:  # the second Ctrl-C: stop now, losing the work since the last checkpoint
            raise KeyboardInterrupt
        self.stop = True
        print(f"\n{signal.Signals(signum).name}: stopping at the next checkpoint boundary (again to stop now, losing "
              "the work since the last checkpoint)", flush=True)

    def interrupt_if_asked(self, where: str):
        """Call right after a checkpoint: stop the run there if a signal asked for it."""
        if self.stop:
            raise Interrupted(f"stopped: checkpoint written {where}; continue with the same command and --resume "
                              f"(run_dir {self.run_dir})")

    def __exit__(self, *exc):
        import signal
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        self._lock.close()
        return False


def main(train_fn, cfg):
    """Command-line entry: run problems and interruptions are one line on stderr (its last line), no traceback."""
    import gc
    try:
        train_fn(cfg)
        return
    except Interrupted as e:
        message, code = str(e), 130
    except (RunError, data.DatasetError) as e:
        message, code = f"error: {e}", 1
    gc.collect()  # the failed run's frames go: its progress bars write their last line before ours
    print(message, file=sys.stderr)
    sys.exit(code)


def parse_config(argv=None) -> TrainConfig:
    """pyrallis CLI (`--config_path x.yaml --key value`); a bare `--resume` / `--overwrite` means `... true`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):
        if arg in ("--resume", "--overwrite") and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            argv.insert(i + 1, "true")
    # pyrallis reads each field's comment (its --help text) by re-reading this file's source once per field: ~3 s
    # for ~70 fields; one read serves them all. It also prefers the comment line above a field to the field's
    # inline comment, so a section header ("# IQL") would be the help of the field below it: inline first.
    def inline_first(cls, name, get=pyrallis_docstring.get_attribute_docstring):
        doc = get(cls, name)
        return pyrallis_docstring.AttributeDocString(comment_inline=doc.comment_inline) if doc.comment_inline else doc

    with mock.patch.object(inspect, "getsource", lru_cache(maxsize=None)(inspect.getsource)), \
            mock.patch.object(pyrallis_docstring, "get_attribute_docstring", inline_first):
        return pyrallis.parse(config_class=TrainConfig, args=argv)


if __name__ == "__main__":
    main(train, parse_config())
