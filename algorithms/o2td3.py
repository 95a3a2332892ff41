"""O2TD3 (single file, JAX): TD3+BC pre-training, then OCR-CFT's re-evaluation, alignment and constrained online
fine-tuning with TD3.

Paper:  Luo, Xie, Wang, Huang, "Optimistic Critic Reconstruction and Constrained Fine-Tuning for General
        Offline-to-Online RL", NeurIPS 2024, https://arxiv.org/abs/2412.18855.
Official code: https://github.com/QinwenLuo/OCR-CFT @ 77c49819e0814eb06dccd7f60db06ba58165317c (PyTorch;
        `finetune/O2TD3.py`, `finetune/online_agent/td3.py`, `offline/td3_bc.py`, `net.py`).

What is implemented (official semantics unless listed below; the maths in the update functions' docstrings).
Phases, in order (`phase` in eval.jsonl):
  0. "offline": TD3+BC pre-training (`td3bc_update`); skipped with `--offline_checkpoint`;
  1. "reevaluation": fresh critics evaluate the fixed offline actor with TD3's backup (`ope_update`);
  2. "alignment": critics aligned with the actor, targets frozen; actor by DPG (`align_update`). Then Qbar := Q,
     pibar := pi, and pi_ref := pi if the aligned actor evaluates better than the offline one;
  3. "online": TD3 with a lambda-constrained actor towards pi_ref, the best evaluated policy so far
     (`online_update`), UTD 1 after `warmup_steps`, batches `mixing_ratio` offline + the rest online,
     exploration pi(s) + N(0, explore_noise^2).
Switches (each default true; all three false = naive TD3 fine-tuning of the offline TD3+BC actor and critics):
`policy_reevaluation` (phase 1 and fresh critics), `value_alignment` (phase 2), `constrained_finetuning` (the
lambda terms of phase 3). Networks: deterministic tanh actor, vmapped critic ensemble (`n_critics`, optional
LayerNorm), orthogonal init with zero biases (`net.py`); states normalised with the dataset mean / std.
Design notes (the switches in detail, several seeds in one process, offline sources, the orthogonal init):
docs/o2td3.md.

Deviations (and the switch that restores the reference behaviour where one exists):
  1. Evaluation runs on a separate env seeded with `eval_seed` (official: the training env, mid-episode), every
     `online_eval_every` env steps as officially; checkpoints at the first episode end after an evaluation.
  2. The replay buffer stores the executed (noisy) action; `store_executed_action: false` stores pi(s) (official).
  3. Executed actions are clipped to [-1, 1] (official: unclipped; the MuJoCo envs clamp them to that range).
  4. Online updates run in jitted blocks of up to `online_block` env steps collected with a fixed policy;
     `online_block: 1` (default) is the official update-after-every-step order.
  5. Pre-training lives in this file (official: a separate script); any phase can start from
     `--offline_checkpoint`: this script's checkpoints/offline or an iql.py checkpoint (its tanh-mean actor).
  6. Re-evaluation records reuse the offline actor's score (the actor is fixed, the evaluation deterministic).
  7. `terminate_on_success` (AntMaze configs) ends an episode as terminal at success (D4RL's eval=True). Data:
     Minari's `D4RL/antmaze/*-v1` and the local `o2o/...` suite, every transition kept; time-limit ends bootstrap.
  8. The official `refer_with_optimal_pi: false` variant is not implemented.

Usage:
    python algorithms/o2td3.py --config_path configs/o2td3/quickstart.yaml
    python algorithms/o2td3.py --config_path configs/o2td3/quickstart.yaml --resume       # continue a killed run
    python algorithms/o2td3.py --config_path ... --offline_checkpoint runs/.../checkpoints/offline   # or iql.py's
    python algorithms/o2td3.py --config_path ... --policy_reevaluation false --value_alignment false \\
        --constrained_finetuning false                                                  # naive TD3 baseline
    python algorithms/o2td3.py --config_path configs/o2td3/quickstart.yaml --num_seeds 4   # seeds 0..3 at once
Writes to `run_dir`: config.yaml, eval.jsonl (seed<S>/eval.jsonl for several seeds), checkpoints/{latest,offline},
checkpoints/buffer/seed<S>/ (online transitions), wandb/ (mode `wandb_mode`, or the WANDB_MODE environment variable).
"""
import inspect
import json
import math
import os
import re
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

PHASES = ("offline", "reevaluation", "alignment", "online")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    # experiment
    dataset_id: str = "o2o/hopper/medium-v0"  # Minari dataset id (also gives the env), see algorithms/data.py
    seed: int = 0  # seed of networks, sampling, exploration and the training env
    eval_seed: int = 100  # seed of the evaluation env (re-seeded at the start of every evaluation)
    run_dir: str = ""  # output directory; "" = runs/o2td3/<dataset_id>/seed<seed> (several: seeds<first>-<last>)
    project: str = "o2o-jax"  # wandb project
    group: str = "o2td3"  # wandb group
    name: str = ""  # wandb run name; "" = o2td3-<dataset_id>-seed<seed>
    wandb_mode: str = "offline"  # online | offline | disabled (the WANDB_MODE env variable overrides it)
    resume: bool = False  # continue the run in run_dir from its newest intact checkpoint (`--resume` alone works)
    overwrite: bool = False  # delete a previous run in run_dir and start again (without it, a previous run is kept)
    offline_checkpoint: str = ""  # skip pre-training: o2td3.py checkpoints/offline or an iql.py checkpoint dir
    num_seeds: int = 1  # train seeds seed..seed+num_seeds-1 together (vmapped); >1: evals in run_dir/seed<S>/
    # OCR-CFT phases (all false = naive TD3 fine-tuning of the offline actor and critics)
    policy_reevaluation: bool = True  # phase 1: fresh critics evaluate the offline actor (OPE)
    value_alignment: bool = True  # phase 2: align the critics with the offline actor, actor trained by DPG
    constrained_finetuning: bool = True  # phase 3: lambda-constrained TD3 towards the best policy so far
    # schedule
    offline_updates: int = 1_000_000  # TD3+BC gradient steps of pre-training
    ope_updates: int = 500_000  # gradient steps of policy re-evaluation (official ope_steps)
    align_updates: int = 500_000  # gradient steps of value alignment (official align_steps)
    online_steps: int = 100_000  # env steps of online fine-tuning
    warmup_steps: int = 1000  # online env steps before the first update (then one update per env step)
    update_block: int = 1000  # updates per jitted lax.scan block in the offline / OPE / alignment phases
    online_block: int = 1  # max env steps collected with a fixed policy before their updates run (1 = official)
    offline_eval_every: int = 50_000  # updates between evaluations (+ checkpoint) in the three offline phases
    online_eval_every: int = 1000  # env steps between online evaluations (official eval_freq)
    eval_episodes: int = 10  # deterministic evaluation episodes per evaluation
    probe_states: int = 1000  # fixed dataset states on which the logged Q / MSE-to-reference are averaged
    # data
    batch_size: int = 256  # transitions per gradient step
    mixing_ratio: float = 0.5  # online phase: fraction of each batch drawn from the offline data ('half')
    discount: float = 0.99  # gamma
    normalize: bool = True  # normalise states with the dataset mean / std (+1e-3)
    reward_scale: float = 1.0  # r <- reward_scale * r + reward_bias, offline and online
    reward_bias: float = 0.0  # AntMaze: r - 1
    terminate_on_success: bool = False  # end episodes as terminal when info['success'] (D4RL AntMaze eval=True)
    store_executed_action: bool = True  # buffer keeps the executed noisy action (false: noise-free, official)
    # networks
    actor_hidden: List[int] = field(default_factory=lambda: [256, 256])  # actor MLP widths
    critic_hidden: List[int] = field(default_factory=lambda: [256, 256])  # critic MLP widths
    n_critics: int = 2  # critic ensemble size (min over members in targets)
    critic_layernorm: bool = True  # LayerNorm in the fresh critics of phases 1-3 (official: MuJoCo true, AntMaze false)
    offline_critic_layernorm: bool = False  # LayerNorm in the TD3+BC critics (official: false)
    # TD3+BC pre-training
    offline_actor_lr: float = 3e-4  # Adam LR of the TD3+BC actor
    offline_critic_lr: float = 3e-4  # Adam LR of the TD3+BC critics
    alpha_bc: float = 2.5  # TD3+BC Q weight alpha
    # TD3 (phases 1-3)
    actor_lr: float = 1e-4  # Adam LR of the actor (official policy_lr)
    critic_lr: float = 3e-4  # Adam LR of the critics (official qf_lr)
    tau: float = 0.005  # Polyak rate of the target critics and target actor
    policy_noise: float = 0.2  # std of the target-policy smoothing noise (also the alignment noise and distance clip)
    noise_clip: float = 0.5  # clip of the target-policy smoothing noise
    policy_freq: int = 2  # actor (+ lambda + target) update every policy_freq critic updates
    explore_noise: float = 0.1  # std of the Gaussian exploration noise
    # OCR-CFT
    distance_beta: float = 1.0  # beta of the distance-shrunk alignment target
    lmbda: float = 1.0  # initial Lagrange multiplier lambda
    lambda_lr: float = 5e-5  # Adam LR of log lambda
    loss_tau: float = 0.7  # asymmetry of the multiplier loss
    threshold: float = 0.0025  # eps_0 of the MSE-to-reference threshold schedule
    end_threshold: float = 0.04  # eps_end of the threshold schedule
    end_steps: int = 100_000  # env steps over which eps_t rises from eps_0 to eps_end
    precision: str = "float32"  # float32 | bf16: bfloat16 matrix products summed in float32 (params, Adam: float32)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid config: {msg}")
        for name in ("num_seeds", "update_block", "online_block", "offline_eval_every", "online_eval_every",
                     "eval_episodes", "probe_states", "batch_size", "n_critics", "policy_freq", "end_steps"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("offline_updates", "ope_updates", "align_updates", "online_steps", "warmup_steps"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("offline_updates", "ope_updates", "align_updates", "offline_eval_every"):
            need(getattr(self, name) % self.update_block == 0,
                 f"{name}={getattr(self, name)} must be a multiple of update_block={self.update_block}")
        need(self.wandb_mode in ("online", "offline", "disabled"),
             f"wandb_mode must be online|offline|disabled, got {self.wandb_mode!r}")
        need(0.0 < self.mixing_ratio < 1.0, f"mixing_ratio must be in (0, 1), got {self.mixing_ratio}")
        need(0 < int(self.batch_size * self.mixing_ratio) < self.batch_size,
             "batch_size * mixing_ratio must leave rows for both offline and online data")
        need(0.0 < self.loss_tau < 1.0, f"loss_tau must be in (0, 1), got {self.loss_tau}")
        need(self.lmbda > 0, f"lmbda must be > 0 (it is learned as log lambda), got {self.lmbda}")
        for name in ("policy_noise", "noise_clip", "explore_noise", "threshold", "end_threshold", "distance_beta"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("actor_hidden", "critic_hidden"):
            need(len(getattr(self, name)) > 0 and all(x > 0 for x in getattr(self, name)), f"{name} must be positive")
        need(self.precision in PRECISIONS, f"precision must be one of {'|'.join(PRECISIONS)}, got {self.precision!r}")


RESUME_FREE = {"resume", "overwrite", "offline_checkpoint", "wandb_mode", "online_steps", "run_dir"}  # may change on --resume


class Hyper(NamedTuple):
    """The static (hashable) arguments of the jitted functions: the env's dimensions, the config fields the maths
    reads under the config's own names (make_hyper copies them from TrainConfig by name) and two derived fields."""
    obs_dim: int
    act_dim: int
    actor_hidden: tuple
    critic_hidden: tuple
    n_critics: int
    batch_size: int
    mixing_ratio: float
    update_block: int
    online_block: int
    discount: float
    tau: float
    policy_noise: float
    noise_clip: float
    policy_freq: int
    offline_actor_lr: float
    offline_critic_lr: float
    alpha_bc: float
    actor_lr: float
    critic_lr: float
    lambda_lr: float
    distance_beta: float
    loss_tau: float
    threshold: float
    end_threshold: float
    end_steps: int
    constrained_finetuning: bool
    precision: str
    # derived (make_hyper)
    pretraining: bool  # the functions of the TD3+BC pre-training (its learning rates and critic architecture)
    layernorm: bool  # LayerNorm in the critics of the state these functions get


def make_hyper(cfg: TrainConfig, obs_dim: int, act_dim: int, offline: bool) -> Hyper:
    """`offline`: the TD3+BC pre-training; else phases 1-3, whose critics are fresh (critic_layernorm) or, without
    re-evaluation, the TD3+BC ones (offline_critic_layernorm)."""
    static = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731 (a list is not hashable)
    layernorm = cfg.offline_critic_layernorm if offline or not cfg.policy_reevaluation else cfg.critic_layernorm
    return Hyper(obs_dim=obs_dim, act_dim=act_dim, **{k: static(getattr(cfg, k)) for k in Hyper._fields[2:-2]},
                 pretraining=offline, layernorm=layernorm)


# ---------------------------------------------------------------------------------------------- networks
@partial(jax.jit, static_argnums=(1, 2, 3))
def householder_q(key, m: int, n: int, dtype=jnp.float32):
    """Q (m x n, m >= n) of the QR decomposition of an m x n standard normal draw, with R's diagonal made positive:
    what jax.random.orthogonal computes with LAPACK, here by Householder reflections in jnp ops (see
    orthogonal_kernel_init). Jitted: one compilation per shape, also when an init runs eagerly."""
    rows = jnp.arange(m)

    def reflect(j, carry):  # reflection j zeroes column j of r below the diagonal; its vector is kept
        r, vs = carry
        x = jnp.where(rows >= j, r[:, j], 0.0)
        alpha = -jnp.where(r[j, j] >= 0, 1.0, -1.0) * jnp.sqrt(jnp.sum(x * x))
        v = x - alpha * (rows == j)
        v = v / jnp.sqrt(jnp.sum(v * v))
        return r - 2.0 * jnp.outer(v, v @ r), vs.at[j].set(v)
    r, vs = jax.lax.fori_loop(0, n, reflect, (jax.random.normal(key, (m, n), dtype), jnp.zeros((n, m), dtype)))
    q = jax.lax.fori_loop(0, n, lambda i, q: q - 2.0 * jnp.outer(vs[n - 1 - i], vs[n - 1 - i] @ q),
                          jnp.eye(m, n, dtype=dtype))  # Q = H_0 H_1 ... H_{n-1} applied to the first n columns of I
    return q * jnp.sign(jnp.diagonal(r))


def orthogonal_kernel_init(scale: float):
    """nn.initializers.orthogonal(scale) for a 2-D kernel without LAPACK (householder_q): the same matrix up to
    float round-off. jaxlib 0.10.2's CPU LAPACK QR deadlocks XLA's thread pool when a program runs several batched
    QRs at once, as the init of a vmapped ensemble (or of several seeds) does; on 2 cores it hung runs at start-up."""
    def init(key, shape, dtype=jnp.float32):
        n_rows, n_cols = shape
        q = householder_q(key, max(n_rows, n_cols), min(n_rows, n_cols), dtype)
        return scale * (q if n_rows >= n_cols else q.T)
    return init


PRECISIONS = ("float32", "bf16")


def dot_general(precision: str):
    """nn.Dense's product: Flax's float32 one (None), or for "bf16" both operands rounded to bfloat16 and the
    products summed in float32, float32 out (parameters, gradients and optimiser state stay float32)."""
    if precision == "float32":
        return None
    return lambda x, kernel, dims, precision=None, preferred_element_type=None: jax.lax.dot_general(  # noqa: E731
        x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), dims, preferred_element_type=jnp.float32)


def dense(features: int, precision: str) -> nn.Dense:
    """Linear layer with OCR's `orthogonal_net` init: orthogonal weights (gain 1), zero bias."""
    return nn.Dense(features, kernel_init=orthogonal_kernel_init(1.0), bias_init=nn.initializers.zeros,
                    dot_general=dot_general(precision))


class DeterministicActor(nn.Module):
    """pi(s) = tanh(MLP(s)) (OCR `DeterministicPolicy`)."""
    act_dim: int
    hidden: tuple
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs):
        x = obs
        for h in self.hidden:
            x = nn.relu(dense(h, self.precision)(x))
        return jnp.tanh(dense(self.act_dim, self.precision)(x))


class QNet(nn.Module):
    """Q(s, a): [Linear -> LayerNorm (optional, PyTorch eps 1e-5) -> ReLU]* -> Linear (OCR `CriticFunction`)."""
    hidden: tuple
    layernorm: bool
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs, act):
        x = jnp.concatenate([obs, act], -1)
        for h in self.hidden:
            x = dense(h, self.precision)(x)
            if self.layernorm:
                x = nn.LayerNorm(epsilon=1e-5)(x)
            x = nn.relu(x)
        return dense(1, self.precision)(x)[..., 0]


def critic_ensemble(hidden: tuple, layernorm: bool, n: int, precision: str = "float32") -> nn.Module:
    """`n` Q networks with independent parameters, evaluated on the same inputs: output [n, ...]."""
    return nn.vmap(QNet, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                   axis_size=n)(hidden=hidden, layernorm=layernorm, precision=precision)


def networks(h: Hyper):
    return (DeterministicActor(h.act_dim, h.actor_hidden, h.precision),
            critic_ensemble(h.critic_hidden, h.layernorm, h.n_critics, h.precision))


def q_first(critic_params, obs, act, h: Hyper):
    """Q_1(s, a) alone (the member the actor losses use), without evaluating the other members."""
    member = jax.tree.map(lambda x: x[0], critic_params)
    return QNet(h.critic_hidden, h.layernorm, h.precision).apply({"params": member}, obs, act)


# ---------------------------------------------------------------------------------------------- maths
def smoothed_action(mean_action, normal, sigma, noise_clip):
    """TD3 target-policy smoothing: clip(a + clip(sigma * N(0,1), -c, c), -1, 1)."""
    return jnp.clip(mean_action + jnp.clip(sigma * normal, -noise_clip, noise_clip), -1.0, 1.0)


def alignment_target(q_ref, noisy_action, ref_action, beta, max_distance):
    """Distance-shrunk alignment target (OCR `TD3.align_value`): d = min(||a~ - a_ref||_2 / sqrt|A|, max_distance),
    T = Q_ref (1 + beta d^2) if Q_ref < 0 else Q_ref / (1 + beta d^2); returns (T, d)."""
    act_dim = noisy_action.shape[-1]
    d = jnp.minimum(jnp.linalg.norm(noisy_action - ref_action, axis=-1) / math.sqrt(act_dim), max_distance)
    grow = 1.0 + beta * d ** 2
    return jnp.where(q_ref < 0, q_ref * grow, q_ref / grow), d


def asymmetric_weight(u, tau):
    """OCR `asymmetric_reverse_l2_loss`: mean(|tau - 1[u > 0]| * u) (linear in u)."""
    return jnp.mean(jnp.abs(tau - (u > 0).astype(u.dtype)) * u)


def epsilon_schedule(t, threshold, end_threshold, end_steps):
    """eps_t = min(eps_end, eps_0 + t (eps_end - eps_0) / end_steps), t = online env steps."""
    return jnp.minimum(end_threshold, threshold + t * (end_threshold - threshold) / end_steps)


def optimizers(h: Hyper):
    """Adam for each trained part; the pre-training has learning rates of its own."""
    actor_lr, critic_lr = (h.offline_actor_lr, h.offline_critic_lr) if h.pretraining else (h.actor_lr, h.critic_lr)
    return {"actor": optax.adam(actor_lr), "critic": optax.adam(critic_lr), "log_lmbda": optax.adam(h.lambda_lr)}


# ---------------------------------------------------------------------------------------------- state
class Trainable(NamedTuple):
    """Parameters and optimiser state (a TrainState without functions, so states stay plain pytrees)."""
    params: Any
    opt_state: Any


class TD3BCState(NamedTuple):
    """Pre-training state (saved as checkpoints/offline)."""
    actor: Trainable
    actor_target: Any
    critic: Trainable  # ensemble, leading axis n_critics
    critic_target: Any
    key: jax.Array  # RNG of the updates
    it: jax.Array  # updates done (the policy delay counts these)
    obs_mean: jax.Array
    obs_std: jax.Array


class O2TD3State(NamedTuple):
    """State of phases 1-3."""
    actor: Trainable
    actor_target: Any
    critic: Trainable
    critic_target: Any
    ref_actor: Any  # pi_ref: the best evaluated policy so far
    offline_actor: Any  # the offline actor, kept for logging Q at its actions
    log_lmbda: Trainable
    key: jax.Array
    it: jax.Array  # alignment + online updates (official total_it; the policy delay counts these)
    obs_mean: jax.Array
    obs_std: jax.Array


class Buffer(NamedTuple):
    obs: jax.Array
    act: jax.Array
    rew: jax.Array
    next_obs: jax.Array
    done: jax.Array  # 1.0 for true terminations only


def init_offline_state(h: Hyper, key, obs_mean, obs_std) -> TD3BCState:
    actor, critic = networks(h)
    k_actor, k_critic, key = jax.random.split(key, 3)
    o, a = jnp.zeros((1, h.obs_dim)), jnp.zeros((1, h.act_dim))
    actor_params, critic_params = actor.init(k_actor, o)["params"], critic.init(k_critic, o, a)["params"]
    txs = optimizers(h)
    return TD3BCState(Trainable(actor_params, txs["actor"].init(actor_params)), actor_params,
                      Trainable(critic_params, txs["critic"].init(critic_params)), critic_params, key,
                      jnp.zeros((), jnp.int32), jnp.asarray(obs_mean, jnp.float32), jnp.asarray(obs_std, jnp.float32))


def start_finetuning(off: TD3BCState, h: Hyper, fresh_critics: bool, lmbda: float) -> O2TD3State:
    """Phases 1-3 start from the offline actor (pi = pibar = pi_ref), fresh Adam states and, with re-evaluation,
    fresh critics (official `load_offline`); without it, the TD3+BC critics. Deterministic in `off`."""
    _, critic = networks(h)
    k_critic, key = jax.random.split(off.key)
    if fresh_critics:
        critic_params = critic.init(k_critic, jnp.zeros((1, h.obs_dim)), jnp.zeros((1, h.act_dim)))["params"]
        critic_target = critic_params
    else:
        critic_params, critic_target = off.critic.params, off.critic_target
    txs = optimizers(h)
    actor_params = off.actor.params
    log_lmbda = jnp.asarray(math.log(lmbda), jnp.float32)
    return O2TD3State(Trainable(actor_params, txs["actor"].init(actor_params)), actor_params,
                      Trainable(critic_params, txs["critic"].init(critic_params)), critic_target, actor_params,
                      actor_params, Trainable(log_lmbda, txs["log_lmbda"].init(log_lmbda)), key,
                      jnp.zeros((), jnp.int32), off.obs_mean, off.obs_std)


def _step(trainable: Trainable, grads, tx) -> Trainable:
    updates, opt_state = tx.update(grads, trainable.opt_state, trainable.params)
    return Trainable(optax.apply_updates(trainable.params, updates), opt_state)


# ---------------------------------------------------------------------------------------------- updates
def _normalised(state, batch: Buffer):
    return (batch.obs - state.obs_mean) / state.obs_std, (batch.next_obs - state.obs_mean) / state.obs_std


def _critic_step(state, obs, act, y, h: Hyper):
    """One Adam step on sum_i MSE(Q_i(s, a), y) (official: one MSE per critic, summed)."""
    _, critic = networks(h)

    def loss(p):
        q = critic.apply({"params": p}, obs, act)
        return ((q - y) ** 2).mean(-1).sum(), q
    (value, q), grads = jax.value_and_grad(loss, has_aux=True)(state.critic.params)
    return _step(state.critic, grads, optimizers(h)["critic"]), value, q


def _td3_target(state, next_obs, key, h: Hyper):
    """min_i Qbar_i(s', a') with a' the smoothed target-actor action."""
    actor, critic = networks(h)
    noise = jax.random.normal(key, (next_obs.shape[0], h.act_dim))
    next_action = smoothed_action(actor.apply({"params": state.actor_target}, next_obs), noise, h.policy_noise,
                                  h.noise_clip)
    return critic.apply({"params": state.critic_target}, next_obs, next_action).min(0)


def _zeros(keys):
    return {k: jnp.zeros((), jnp.float32) for k in keys}


TD3BC_ACTOR_KEYS = ("actor_loss", "actor_q", "bc_mse")
ONLINE_ACTOR_KEYS = ("actor_loss", "actor_q", "lambda_loss", "mse_to_reference", "epsilon")


def td3bc_update(state: TD3BCState, batch: Buffer, key, t, h: Hyper):
    """One TD3+BC step (Fujimoto & Gu 2021, as in CORL). Critic: sum_i MSE(Q_i(s, a), y) with
        y = r + gamma (1-d) min_i Qbar_i(s', a'),  a' = clip(pibar(s') + clip(N(0, policy_noise^2), +-noise_clip), +-1);
    every policy_freq-th update the actor loss, with the just-updated critic,
        -(alpha_bc / stopgrad(mean|Q_1(s, pi(s))|)) mean Q_1(s, pi(s)) + MSE(pi(s), a),
    then Polyak updates (rate tau) of the target critics and the target actor. Pure."""
    actor, _ = networks(h)
    obs, next_obs = _normalised(state, batch)
    it = state.it + 1
    y = jax.lax.stop_gradient(batch.rew + h.discount * (1.0 - batch.done) * _td3_target(state, next_obs, key, h))
    critic_tr, critic_loss, q = _critic_step(state, obs, batch.act, y, h)

    def actor_step(_):
        def loss(p):
            pi = actor.apply({"params": p}, obs)
            q_pi = q_first(critic_tr.params, obs, pi, h)
            bc = ((pi - batch.act) ** 2).mean()
            return -(h.alpha_bc / jax.lax.stop_gradient(jnp.abs(q_pi).mean())) * q_pi.mean() + bc, (q_pi.mean(), bc)
        (value, (q_pi, bc)), grads = jax.value_and_grad(loss, has_aux=True)(state.actor.params)
        actor_tr = _step(state.actor, grads, optimizers(h)["actor"])
        return (actor_tr, optax.incremental_update(actor_tr.params, state.actor_target, h.tau),
                optax.incremental_update(critic_tr.params, state.critic_target, h.tau),
                {"actor_loss": value, "actor_q": q_pi, "bc_mse": bc})

    def no_actor_step(_):
        return state.actor, state.actor_target, state.critic_target, _zeros(TD3BC_ACTOR_KEYS)

    actor_step_now = it % h.policy_freq == 0
    actor_tr, actor_target, critic_target, actor_metrics = jax.lax.cond(actor_step_now, actor_step, no_actor_step,
                                                                        None)
    metrics = {"critic_loss": critic_loss, "q": q.mean(), "target_q": y.mean(),
               "actor_step": actor_step_now.astype(jnp.float32), **actor_metrics}
    return state._replace(actor=actor_tr, actor_target=actor_target, critic=critic_tr, critic_target=critic_target,
                          it=it), metrics


def ope_update(state: O2TD3State, batch: Buffer, key, t, h: Hyper):
    """Policy re-evaluation (OPE): fresh critics, the TD3+BC critic step with the fixed offline actor as pibar
    (a' = clip(pibar(s') + clip(N(0, policy_noise^2), +-noise_clip), +-1)); Polyak target update every step. Pure."""
    obs, next_obs = _normalised(state, batch)
    y = jax.lax.stop_gradient(batch.rew + h.discount * (1.0 - batch.done) * _td3_target(state, next_obs, key, h))
    critic_tr, critic_loss, q = _critic_step(state, obs, batch.act, y, h)
    critic_target = optax.incremental_update(critic_tr.params, state.critic_target, h.tau)
    return state._replace(critic=critic_tr, critic_target=critic_target), \
        {"critic_loss": critic_loss, "q": q.mean(), "target_q": y.mean()}


def align_update(state: O2TD3State, batch: Buffer, key, t, h: Hyper):
    """Value alignment, targets frozen. With a_ref = pi_ref(s), Q_ref = min_i Qbar_i(s, a_ref),
    a~ = clip(pi(s) + clip(N(0, policy_noise^2), +-noise_clip), +-1), d = min(||a~ - a_ref|| / sqrt|A|, policy_noise):
        T = Q_ref (1 + distance_beta d^2) if Q_ref < 0 else Q_ref / (1 + distance_beta d^2)     (always <= Q_ref)
        L_Q = sum_i MSE(Q_i(s, a~), min(T, Qbar_i(s, a~))) + sum_i MSE(Q_i(s, a_ref), Q_ref)
    and the actor takes a DPG step on -mean Q_1(s, pi(s)) with the pre-step critic (one parameter snapshot). Pure."""
    actor, critic = networks(h)
    sg = jax.lax.stop_gradient
    obs, _ = _normalised(state, batch)
    b = obs.shape[0]
    a_ref = actor.apply({"params": state.ref_actor}, obs)
    a_pi = actor.apply({"params": state.actor.params}, obs)
    q_ref = critic.apply({"params": state.critic_target}, obs, a_ref).min(0)
    a_noisy = smoothed_action(a_pi, jax.random.normal(key, a_pi.shape), h.policy_noise, h.noise_clip)
    target, distance = alignment_target(q_ref, a_noisy, a_ref, h.distance_beta, h.policy_noise)
    y_noisy = sg(jnp.minimum(target[None], critic.apply({"params": state.critic_target}, obs, a_noisy)))  # [E, B]
    q_ref = sg(q_ref)

    def critic_loss(p):
        q = critic.apply({"params": p}, jnp.concatenate([obs, obs]), jnp.concatenate([a_noisy, a_ref]))
        refine = ((q[:, :b] - y_noisy) ** 2).mean(-1).sum()
        fixed = ((q[:, b:] - q_ref) ** 2).mean(-1).sum()
        return refine + fixed, (refine, fixed, q[:, :b].mean())
    (c_loss, (refine, fixed, q_noisy)), c_grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic.params)

    def actor_loss(p):
        q_pi = q_first(state.critic.params, obs, actor.apply({"params": p}, obs), h)
        return -q_pi.mean()
    a_loss, a_grads = jax.value_and_grad(actor_loss)(state.actor.params)
    txs = optimizers(h)
    new = state._replace(actor=_step(state.actor, a_grads, txs["actor"]),
                         critic=_step(state.critic, c_grads, txs["critic"]), it=state.it + 1)
    return new, {"critic_loss": c_loss, "refine_loss": refine, "fixed_loss": fixed, "align_target": target.mean(),
                 "q_noisy": q_noisy, "q_ref": q_ref.mean(), "distance": distance.mean(), "actor_loss": a_loss,
                 "actor_q": -a_loss}


def online_update(state: O2TD3State, batch: Buffer, key, t, h: Hyper):
    """Constrained fine-tuning step at env step t. Critic towards
        y = r + gamma (1-d) [min_i Qbar_i(s', a') - lambda P'],  P' = mean((pi(s') - pi_ref(s'))^2) (a batch scalar);
    then on every policy_freq-th update (`it` also counts the alignment steps, as the official `total_it`):
      * lambda: Adam (lambda_lr) on log lambda, loss exp(log lambda) * stopgrad(mean(|loss_tau - 1[u > 0]| u)),
        u = eps_t - (pi_ref(s) - pi(s))^2 elementwise, eps_t = epsilon_schedule(t) (t = env steps);
      * actor: -mean q / stopgrad(mean|q|) + lambda MSE(pi_ref(s), pi(s)), q = Q_1(s, pi(s)) of the updated critic;
      * Polyak updates of Qbar and pibar.
    `constrained_finetuning: false` is plain TD3: no lambda P' term, actor loss -mean q, lambda frozen. Pure."""
    actor, _ = networks(h)
    sg = jax.lax.stop_gradient
    obs, next_obs = _normalised(state, batch)
    it = state.it + 1
    lmbda = jnp.exp(state.log_lmbda.params)
    q_next = _td3_target(state, next_obs, key, h)
    if h.constrained_finetuning:
        gap_next = (actor.apply({"params": state.actor.params}, next_obs)
                    - actor.apply({"params": state.ref_actor}, next_obs))
        penalty = (gap_next ** 2).mean()  # scalar over batch and action dims (official F.mse_loss)
    else:
        penalty = jnp.zeros(())
    y = sg(batch.rew + h.discount * (1.0 - batch.done) * (q_next - lmbda * penalty))
    critic_tr, critic_loss, q = _critic_step(state, obs, batch.act, y, h)

    def actor_step(_):
        txs = optimizers(h)
        a_ref = actor.apply({"params": state.ref_actor}, obs)
        a_pi = actor.apply({"params": state.actor.params}, obs)
        eps = epsilon_schedule(t, h.threshold, h.end_threshold, h.end_steps)
        if h.constrained_finetuning:
            weight = sg(asymmetric_weight(eps - (a_ref - a_pi) ** 2, h.loss_tau))
            lambda_loss, l_grads = jax.value_and_grad(lambda p: jnp.exp(p) * weight)(state.log_lmbda.params)
            log_lmbda = _step(state.log_lmbda, l_grads, txs["log_lmbda"])
        else:
            lambda_loss, log_lmbda = jnp.zeros(()), state.log_lmbda

        def loss(p):
            pi = actor.apply({"params": p}, obs)
            q_pi = q_first(critic_tr.params, obs, pi, h)
            if h.constrained_finetuning:
                return -q_pi.mean() / sg(jnp.abs(q_pi).mean()) + lmbda * ((a_ref - pi) ** 2).mean(), q_pi.mean()
            return -q_pi.mean(), q_pi.mean()
        (value, q_pi), grads = jax.value_and_grad(loss, has_aux=True)(state.actor.params)
        actor_tr = _step(state.actor, grads, txs["actor"])
        return (actor_tr, optax.incremental_update(actor_tr.params, state.actor_target, h.tau),
                optax.incremental_update(critic_tr.params, state.critic_target, h.tau), log_lmbda,
                {"actor_loss": value, "actor_q": q_pi, "lambda_loss": lambda_loss,
                 "mse_to_reference": ((a_ref - a_pi) ** 2).mean(), "epsilon": eps.astype(jnp.float32)})

    def no_actor_step(_):
        return state.actor, state.actor_target, state.critic_target, state.log_lmbda, _zeros(ONLINE_ACTOR_KEYS)

    actor_step_now = it % h.policy_freq == 0
    actor_tr, actor_target, critic_target, log_lmbda, actor_metrics = jax.lax.cond(
        actor_step_now, actor_step, no_actor_step, None)
    metrics = {"critic_loss": critic_loss, "q": q.mean(), "target_q": y.mean(), "penalty_next": penalty,
               "lambda": lmbda, "actor_step": actor_step_now.astype(jnp.float32), **actor_metrics}
    return state._replace(actor=actor_tr, actor_target=actor_target, critic=critic_tr, critic_target=critic_target,
                          log_lmbda=log_lmbda, it=it), metrics


UPDATES = {"offline": td3bc_update, "reevaluation": ope_update, "alignment": align_update, "online": online_update}


def sample_offline(offline: Buffer, key, h: Hyper) -> Buffer:
    """A uniform batch of the offline rows (phases 0-2)."""
    idx = jax.random.randint(key, (h.batch_size,), 0, offline.rew.shape[0])
    return jax.tree.map(lambda x: x[idx], offline)


def sample_mixed(offline: Buffer, online: Buffer, online_size, k_off, k_on, h: Hyper) -> Buffer:
    """An online-phase batch: int(batch_size * mixing_ratio) uniform offline rows (shared by all seeds) and the
    rest from this seed's `online_size` online rows, online rows first (the official 'half' batches)."""
    offline_rows = int(h.batch_size * h.mixing_ratio)
    i_off = jax.random.randint(k_off, (offline_rows,), 0, offline.rew.shape[0])
    i_on = jax.random.randint(k_on, (h.batch_size - offline_rows,), 0, jnp.maximum(online_size, 1))
    return jax.tree.map(lambda on, off: jnp.concatenate([on[i_on], off[i_off]]), online, offline)


# Multi-seed: every state leaf, the online buffer and the per-seed counters carry a leading seed axis; the
# offline rows are shared (in_axes None). One seed's numbers equal a single-seed run's up to float32
# round-off (XLA sums batched matmuls in a different order). Each update draws its batch on device first.
def over_seeds(f, *args):
    """jax.vmap(f) over the leading seed axis of every argument; with one seed, f on the arguments without it (the
    axis put back on the results). Under vmap the policy_freq lax.cond has a per-seed predicate and becomes a select
    that computes the delayed actor step at every update; unbatched it stays a branch."""
    if jax.tree.leaves(args)[0].shape[0] > 1:
        return jax.vmap(f)(*args)
    out = f(*jax.tree.map(lambda x: x[0], args))
    return jax.tree.map(lambda x: x[None], out)


@partial(jax.jit, static_argnames=("phase", "h"))
def scan_updates(state, offline: Buffer, phase: str, h: Hyper):
    """`h.update_block` updates of an offline-data `phase` (offline | reevaluation | alignment) per seed in one
    lax.scan (vmapped over seeds); metrics [seeds, h.update_block]."""
    def one_seed(state):
        def body(s, i):
            key, k_off, _, k_upd = jax.random.split(s.key, 4)
            return UPDATES[phase](s._replace(key=key), sample_offline(offline, k_off, h), k_upd, i, h)
        return jax.lax.scan(body, state, jnp.arange(h.update_block))
    return over_seeds(one_seed, state)


@partial(jax.jit, static_argnames=("h",))
def update_online(state: O2TD3State, offline: Buffer, online: Buffer, online_size, t_first, n, h: Hyper):
    """`n[i]` <= h.online_block online updates of seed i for its env steps t_first[i], t_first[i] + 1, ... in one
    masked lax.scan of h.online_block steps (vmapped over seeds; steps >= n[i] keep the state); metrics
    [seeds, h.online_block], zero where masked."""
    def one_seed(state, online, online_size, t_first, n):
        def body(s, i):
            key, k_off, k_on, k_upd = jax.random.split(s.key, 4)
            new, metrics = online_update(s._replace(key=key), sample_mixed(offline, online, online_size, k_off, k_on,
                                                                           h), k_upd, t_first + i, h)
            keep = i < n
            new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, s)
            return new, jax.tree.map(lambda m: jnp.where(keep, m, jnp.zeros_like(m)), metrics)
        return jax.lax.scan(body, state, jnp.arange(h.online_block))
    return over_seeds(one_seed, state, online, online_size, t_first, n)


@partial(jax.jit, donate_argnums=(0,))
def buffer_insert(online: Buffer, rows: Buffer, starts):
    """Write each seed's `rows[i]` at `starts[i]` of its online rows, in place (the buffer is donated)."""
    put = lambda b, r, s: jax.lax.dynamic_update_slice_in_dim(b, r, s, 0)  # noqa: E731
    return jax.tree.map(lambda b, r: jax.vmap(put)(b, r, starts), online, rows)


@partial(jax.jit, static_argnames=("h",))
def probe(state, probe_obs, h: Hyper):
    """Logged per evaluation of one seed, averaged over fixed dataset states: min_i Q_i(s, pi_offline(s))
    (pre-training: the actor being trained), lambda and MSE(pi(s), pi_ref(s)) (phases 1-3)."""
    actor, critic = networks(h)
    obs = (probe_obs - state.obs_mean) / state.obs_std
    offline_params = state.offline_actor if isinstance(state, O2TD3State) else state.actor.params
    a_off = actor.apply({"params": offline_params}, obs)
    out = {"q_offline_action": critic.apply({"params": state.critic.params}, obs, a_off).min(0).mean()}
    if isinstance(state, O2TD3State):
        a_pi = actor.apply({"params": state.actor.params}, obs)
        a_ref = actor.apply({"params": state.ref_actor}, obs)
        out.update(mse_to_reference=((a_pi - a_ref) ** 2).mean(), **{"lambda": jnp.exp(state.log_lmbda.params)})
    return out


# ---------------------------------------------------------------------------------------------- acting
@partial(jax.jit, static_argnames=("h",))
def act_explore(actor_params, obs_mean, obs_std, obs, keys, active, noise_std, h: Hyper):
    """All seeds' (executed action clip(pi(s) + N(0, noise_std^2), -1, 1), noise-free pi(s), next key) in one call
    per env step. A seed's key advances only when it is `active` (its actions do not depend on the other seeds)."""
    def one(params, mean_, std_, o, key, act):
        new_key, sub = jax.random.split(key)
        action = networks(h)[0].apply({"params": params}, (o - mean_) / std_)
        executed = jnp.clip(action + noise_std * jax.random.normal(sub, action.shape), -1.0, 1.0)
        return executed, action, jnp.where(act, new_key, key)
    return jax.vmap(one)(actor_params, obs_mean, obs_std, obs, keys, active)


@partial(jax.jit, static_argnames=("h",))
def act_deterministic(actor_params, obs_mean, obs_std, obs, h: Hyper):
    """pi(s) of one seed's actor (evaluation)."""
    return networks(h)[0].apply({"params": actor_params}, (obs - obs_mean) / obs_std)


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


# ---------------------------------------------------------------------------------------------- seeds
def where_seeds(mask, new, old):
    """Per seed: `new` where mask[i], else `old` (trees with a leading seed axis)."""
    mask = jnp.asarray(mask)
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


# ---------------------------------------------------------------------------------------------- offline sources
_IQL_ACTOR = re.compile(r"^(\d{4})\.actor\.params\['TorchLinear_(\d+)'\]\['(kernel|bias)'\]$")


def _check_normalisation(what: str, mean, std, run_mean, run_std, cfg: TrainConfig):
    if not (np.allclose(mean, run_mean, rtol=1e-4, atol=1e-5) and np.allclose(std, run_std, rtol=1e-4, atol=1e-5)):
        raise RunError(
            f"--offline_checkpoint {cfg.offline_checkpoint}: {what} normalises observations differently from this run "
            f"(dataset_id={cfg.dataset_id}, normalize={cfg.normalize}): max |mean difference| = "
            f"{np.max(np.abs(np.asarray(mean) - run_mean)):.4g}, max |std difference| = "
            f"{np.max(np.abs(np.asarray(std) - run_std)):.4g}. Fine-tune on the dataset the actor was trained on, "
            "with the same `normalize` setting.")


def check_offline_source(cfg: TrainConfig, src: Path, seeds: list) -> dict:
    """What the intact --offline_checkpoint `src` is, checked from its meta.json and config.yaml alone (before any
    data is loaded): {"kind": "o2td3" | "iql", "meta", "config"}. Accepted: this script's offline checkpoint with
    the same number of seeds, or an iql.py checkpoint (a multi-seed one must hold every seed of this run)."""
    import yaml
    where = f"--offline_checkpoint {cfg.offline_checkpoint}"
    meta = load_meta(src)
    raw_cfg = yaml.safe_load((src / "config.yaml").read_text()) or {}
    N = len(seeds)
    if meta.get("algorithm") == "o2td3":
        if meta.get("state_form") != "offline":
            raise RunError(f"{where} is a fine-tuning checkpoint of o2td3.py (phase {meta.get('phase')!r}); pass "
                           "the pre-training checkpoint <run_dir>/checkpoints/offline, or continue that run with "
                           "--resume --run_dir <run_dir>")
        src_n = meta.get("num_seeds", 1)
        if src_n != N:
            raise RunError(f"{where} holds {src_n} seed(s) of o2td3.py, this run trains {N}; run it with "
                           f"--num_seeds {src_n} (and the same --seed)")
        return {"kind": "o2td3", "meta": meta, "config": raw_cfg}
    if {"expectile", "beta", "hidden_dims"} <= set(raw_cfg):  # iql.py
        if not cfg.policy_reevaluation:
            raise RunError(f"{where} is an iql.py checkpoint: it has no TD3 critics, which policy_reevaluation=false "
                           "would fine-tune; keep policy_reevaluation=true (fresh critics re-evaluate the actor)")
        first, count = int(raw_cfg.get("seed", 0)), int(meta.get("num_seeds", 1))
        if count > 1 and not (first <= seeds[0] and seeds[-1] < first + count):
            raise RunError(f"{where} holds iql.py seeds {first}..{first + count - 1}; set --seed / --num_seeds "
                           f"to seeds among them (this run: {seeds[0]}..{seeds[-1]})")
        return {"kind": "iql", "meta": meta, "config": raw_cfg}
    raise RunError(f"{where}: not a checkpoint o2td3.py can start from. Accepted: o2td3.py's "
                   "<run_dir>/checkpoints/offline, or an iql.py checkpoint (its Gaussian actor's tanh mean network "
                   f"is a deterministic actor). Found config keys {sorted(raw_cfg)[:12]}...")


def load_offline_source(cfg: TrainConfig, src: Path, source: dict, template: TD3BCState, h_off: Hyper, seeds: list):
    """Offline state of every seed (leading seed axis, as `template`) from the checkpoint `src` that
    check_offline_source described as `source`: this script's offline checkpoint, or an iql.py checkpoint whose
    Gaussian actor's tanh mean network becomes the deterministic actor (a multi-seed iql.py run gives each seed its
    own actor; a one-seed one is every seed's, as in the one-seed runs). Returns (state, info) with per-seed info
    lists."""
    where = f"--offline_checkpoint {cfg.offline_checkpoint}"
    meta, raw_cfg = source["meta"], source["config"]
    N = len(seeds)
    run_mean, run_std = np.asarray(template.obs_mean[0]), np.asarray(template.obs_std[0])

    if source["kind"] == "o2td3":
        try:  # a one-seed checkpoint has no seed axis
            state = load_tree(src / "state.npz", seed_slice(template, 0) if N == 1 else template)
        except RunError as e:
            raise RunError(f"{where}: {e}") from None
        state = stack_seeds([state]) if N == 1 else state
        _check_normalisation("the o2td3.py checkpoint", state.obs_mean[0], state.obs_std[0], run_mean, run_std, cfg)
        return state, {"source": "o2td3.py", "updates": [int(u) for u in np.ravel(meta["updates"])],
                       "act_key": np.asarray(meta["act_key"]).reshape(N, -1)}

    layers, stats = {}, {}
    with np.load(src / "state.npz") as z:
        for name in z.files:
            m = _IQL_ACTOR.match(name)
            if m:
                layers.setdefault(int(m[2]), {})[m[3]] = z[name]
            elif re.fullmatch(r"\d{4}\.obs_(mean|std)", name):
                stats[name[5:]] = z[name]
    if not layers or set(stats) != {"obs_mean", "obs_std"}:
        raise RunError(f"{where}: its config.yaml is iql.py's but state.npz has no actor parameters "
                       f"('.actor.params['TorchLinear_<i>']') and observation statistics")
    depth = max(layers) + 1
    per_seed = [(layers, stats)] * N  # a one-seed iql.py run: its actor for every seed
    if layers[0]["kernel"].ndim == 3:  # a multi-seed iql.py run: each seed takes its own actor
        first, count = int(raw_cfg.get("seed", 0)), layers[0]["kernel"].shape[0]
        if not (first <= seeds[0] and seeds[-1] < first + count):
            raise RunError(f"{where} holds iql.py seeds {first}..{first + count - 1}; set --seed / --num_seeds "
                           f"to seeds among them (this run: {seeds[0]}..{seeds[-1]})")
        per_seed = [({i: {k: v[s - first] for k, v in layer.items()} for i, layer in layers.items()},
                     {k: v[s - first] for k, v in stats.items()}) for s in seeds]
    kernels = [per_seed[0][0][i]["kernel"] for i in range(depth)]
    in_dim, out_dim = kernels[0].shape[0], kernels[-1].shape[1]
    hidden = [k.shape[1] for k in kernels[:-1]]
    if in_dim != h_off.obs_dim:
        raise RunError(f"{where}: the iql.py actor takes {in_dim}-dim observations, {cfg.dataset_id} has "
                       f"{h_off.obs_dim} (a checkpoint of another environment?)")
    if out_dim != h_off.act_dim:
        raise RunError(f"{where}: the iql.py actor outputs {out_dim}-dim actions, {cfg.dataset_id} has "
                       f"{h_off.act_dim} (a checkpoint of another environment?)")
    if hidden != list(h_off.actor_hidden):
        raise RunError(f"{where}: the iql.py actor's hidden sizes are {hidden}, this config's actor_hidden is "
                       f"{list(h_off.actor_hidden)}; set --actor_hidden '{hidden}' to load it")
    if raw_cfg.get("dataset_id") != cfg.dataset_id:
        print(f"note: the iql.py actor was trained on {raw_cfg.get('dataset_id')}, fine-tuning on {cfg.dataset_id}")
    states = []
    for i, (seed_layers, seed_stats) in enumerate(per_seed):
        _check_normalisation("the iql.py checkpoint", seed_stats["obs_mean"], seed_stats["obs_std"], run_mean,
                             run_std, cfg)
        actor_params = {f"Dense_{j}": {"kernel": jnp.asarray(seed_layers[j]["kernel"], jnp.float32),
                                       "bias": jnp.asarray(seed_layers[j]["bias"], jnp.float32)}
                        for j in range(depth)}
        one = seed_slice(template, i)
        if jax.tree.structure(actor_params) != jax.tree.structure(one.actor.params):
            raise RunError(f"{where}: cannot map the iql.py actor onto this actor")
        states.append(one._replace(actor=Trainable(actor_params, optimizers(h_off)["actor"].init(actor_params)),
                                   actor_target=actor_params))
    updates = meta.get("updates", 0)
    return stack_seeds(states), {"source": "iql.py", "updates": [int(np.ravel(updates)[0])] * N, "act_key": None}


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig) -> dict:
    """TD3+BC pre-training (or a loaded offline actor), re-evaluation, alignment, fine-tuning of `num_seeds` seeds
    at once; returns the last evaluation record(s), paths and the before/after scores."""
    from tqdm import tqdm

    t_start = time.time()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    N = len(seeds)
    cfg.name = cfg.name or f"o2td3-{cfg.dataset_id.replace('/', '-')}-seed{cfg.seed}" + (f"x{N}" if N > 1 else "")
    with Run(cfg, run_dir) as run:  # checks that need no data, before any slow work; see Run
        source = check_offline_source(cfg, run.offline_from, seeds) if run.offline_from is not None else None
        world = load_world(cfg, seeds)
        h = world.h
        state, prog, online = start_or_resume(cfg, run, world, seeds, source)
        rec = Recorder(cfg, run_dir, seeds, world, prog, t_start)
        act_key = jnp.asarray(prog.act_key)
        save = lambda state, name="latest": rec.checkpoint(state, prog, online, act_key, name)  # noqa: E731

        # ---- 0. offline pre-training (TD3+BC) or a loaded offline actor
        if prog.phase == "offline":
            state = update_phase(cfg, run, world, rec, state, prog, save, "offline", cfg.offline_updates,
                                 "TD3+BC offline")
            if prog.last_eval[0] is None:  # offline_updates == 0: still report the starting policy
                rec.evaluate(state, prog, "offline")
        elif prog.phase == "load_offline":
            rec.evaluate(state, prog, "offline")  # the score of the loaded actor
        if prog.phase in ("offline", "load_offline"):
            kept = ("return", "return_std", "length", "episodes", "normalized_score", "normalized_score_std",
                    "success_rate")
            prog.offline_outcome = [{k: v for k, v in r.items() if k in kept} for r in prog.last_eval]
            prog.offline_score = [score_of(r) for r in prog.last_eval]
            prog.best_score = list(prog.offline_score)
            prog.phase = "to_finetune"
            save(state, "offline")
        if prog.phase == "to_finetune":  # (also where a resume from checkpoints/offline continues)
            state = finetuning_states(state, h, cfg)
            prog.phase, prog.updates = "reevaluation", np.zeros(N, np.int64)
            save(state)
            run.interrupt_if_asked("after the offline phase")

        # ---- 1. policy re-evaluation (actor fixed: its evaluation is reused)
        if prog.phase == "reevaluation":
            if cfg.policy_reevaluation:
                state = update_phase(cfg, run, world, rec, state, prog, save, "reevaluation", cfg.ope_updates,
                                     "O2TD3 re-evaluation", reuse_outcome=True)
            prog.phase, prog.updates = "alignment", np.zeros(N, np.int64)
            if run.stop:
                save(state)
                run.interrupt_if_asked("after the re-evaluation phase")

        # ---- 2. value alignment, then the transition to fine-tuning (per seed: the reference becomes the aligned
        # actor if it evaluates better than the offline one)
        if prog.phase == "alignment":
            if cfg.value_alignment:
                state = update_phase(cfg, run, world, rec, state, prog, save, "alignment", cfg.align_updates,
                                     "O2TD3 alignment")
            state = state._replace(critic_target=state.critic.params, actor_target=state.actor.params)
            aligned = [score_of(r) for r in prog.last_eval]  # aligned actors' scores (offline ones if no alignment)
            better = [a > o for a, o in zip(aligned, prog.offline_score)]
            state = state._replace(ref_actor=where_seeds(better, state.actor.params, state.ref_actor))
            prog.best_score = [max(a, o) for a, o in zip(aligned, prog.offline_score)]
            prog.phase, prog.updates = "online", np.zeros(N, np.int64)
            save(state)
            run.interrupt_if_asked("before online fine-tuning")

        # ---- 3. online fine-tuning (constrained unless switched off). Each seed follows exactly its single-seed
        # schedule: collect up to online_block env steps (a block also ends at an episode end and at an evaluation
        # step), append them, then their updates (after warm-up); an evaluation every online_eval_every env steps
        # (a better policy becomes that seed's reference). A seed at the first episode end after an evaluation (or
        # a stop request) is due for a checkpoint and waits until every seed is due (or finished), so checkpoints
        # fall on episode ends of all seeds.
        if prog.phase == "online":
            ep, acc = Episodes(cfg, h, prog, world.envs, seeds), Metrics()
            bar = tqdm(total=cfg.online_steps * N, initial=int(prog.env_steps.sum()), desc="O2TD3 online",
                       mininterval=5)
            while prog.env_steps.min() < cfg.online_steps:
                n, act_key = collect(cfg, world, state, prog, ep, act_key, seeds, rec.logger)
                online = buffer_insert(online, Buffer(**{k: jnp.asarray(v) for k, v in ep.chunk.items()}),
                                       jnp.asarray(prog.online_size, jnp.int32))
                prog.online_size += n
                first = np.maximum(prog.env_steps - n, cfg.warmup_steps)  # updates after env steps warmup_steps + 1..
                n_upd = np.maximum(prog.env_steps - first, 0).astype(np.int32)
                if n_upd.any():
                    state, metrics = update_online(state, world.offline, online, jnp.asarray(prog.online_size,
                                                   jnp.int32), jnp.asarray(first, jnp.int32) + 1, jnp.asarray(n_upd), h)
                    acc.add(metrics, n_upd, "online", seeds, prog.updates, ONLINE_ACTOR_KEYS)
                    prog.updates += n_upd
                bar.update(int(n.sum()))
                which = [i for i in range(N) if n[i] > 0 and (prog.env_steps[i] % cfg.online_eval_every == 0
                                                               or prog.env_steps[i] == cfg.online_steps)]
                if which:
                    rec.logger.log({**acc.flush(), "online/env_steps": int(prog.env_steps.sum()),
                                    "online/updates": int(prog.updates.sum())})
                    rec.evaluate(state, prog, "online", which)
                    better = [i in which and score_of(prog.last_eval[i]) > prog.best_score[i] for i in range(N)]
                    for i in np.flatnonzero(better):  # the best policy so far becomes the seed's reference
                        prog.best_score[i] = score_of(prog.last_eval[i])
                    if any(better):
                        state = state._replace(ref_actor=where_seeds(better, state.actor.params, state.ref_actor))
                    bar.set_postfix(score=rec.score(prog, which),
                                    train_return=np.mean([np.mean(r) for r in ep.recent if r] or [0.0]))
                    ep.evaluated[which] = True
                ep.due |= ((ep.evaluated | run.stop) & ep.at_start
                           & (prog.env_steps < cfg.online_steps))  # (a stop: checkpoint at every seed's episode end)
                if ep.due.any() and (ep.due | (prog.env_steps >= cfg.online_steps)).all():
                    prog.env_rng = [env_rng_snapshot(env) for env in world.envs]
                    rec.checkpoint(state, prog, online, act_key)
                    ep.evaluated[:], ep.due[:] = False, False
                    run.interrupt_if_asked(f"at {prog.env_steps.tolist()} online env steps")
            bar.close()
            for i in range(N):
                if prog.last_eval[i] is None or prog.last_eval[i]["phase"] != "online":  # online_steps == 0
                    rec.evaluate(state, prog, "online", [i])
            prog.phase = "done"
            rec.checkpoint(state, prog, online, act_key)
        elif prog.phase == "done":
            print(f"run in {run_dir} already finished")
        rec.logger.close()
        world.close()
        summaries = [summarize(path) for path in rec.logger.eval_paths]
        out = {"run_dir": str(run_dir), "seeds": seeds, "last_eval": prog.last_eval[0],
               "updates": int(prog.updates[0]), "env_steps": int(prog.env_steps[0]), **summaries[0]}
        if N > 1:
            out.update(last_eval=prog.last_eval, updates=prog.updates.tolist(), env_steps=prog.env_steps.tolist(),
                       per_seed=summaries)
        return out


# ---------------------------------------------------------------------------------------------- logging
class Logger:
    """wandb + eval.jsonl (one per seed) + console. Metrics are namespaced offline/..., reevaluation/...,
    alignment/..., online/..., eval/...."""

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
        if self.wandb is not None and metrics:
            self.wandb.log(metrics)

    def log_eval(self, i: int, record: dict):
        with open(self.eval_paths[i], "a") as f:
            f.write(json.dumps(record) + "\n")
        self.eval_lines[i] += 1
        tag = "eval" if len(self.seeds) == 1 else f"eval/seed{self.seeds[i]}"
        self.log({f"{tag}/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
        score = record.get("normalized_score", record["return"])
        extra = f", success {record['success_rate']:.2f}" if "success_rate" in record else ""
        lam = f", lambda {record['lambda']:.3g}" if record.get("lambda") is not None else ""
        print(f"[eval] seed {record['seed']} {record['phase']} updates={record['updates']} "
              f"env_steps={record['env_steps']}: {'normalized score' if 'normalized_score' in record else 'return'} "
              f"{score:.2f}{extra}{lam}, Q(s, pi_off(s)) {record['q_offline_action']:.2f}", flush=True)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


class Metrics:
    """Host-side running means of per-update metrics over the seeds; actor metrics average over the updates with
    an actor step. A NaN/inf stops the run naming the loss, the seed and the update."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, metrics: dict, n, phase: str, seeds: list, updates_before, actor_keys=()):
        """`metrics` of shape [seeds, steps]; the first n[i] steps of seed i are real updates."""
        host = {k: np.asarray(v) for k, v in metrics.items()}
        n = np.broadcast_to(np.asarray(n), (len(seeds),))
        valid = np.arange(next(iter(host.values())).shape[1])[None, :] < n[:, None]
        bad = valid & np.logical_or.reduce([~np.isfinite(v) for v in host.values()])
        if bad.any():
            j = int(np.flatnonzero(bad.any(0))[0])  # the first update with a non-finite value, over all seeds
            i = int(np.flatnonzero(bad[:, j])[0])
            names = ", ".join(f"{phase}/{k} = {v[i, j]}" for k, v in host.items() if not np.isfinite(v[i, j]))
            raise FloatingPointError(f"non-finite {names} (seed {seeds[i]}) at update "
                                     f"{int(np.asarray(updates_before)[i]) + j + 1} of phase {phase}; stopping (the "
                                     "last checkpoint is intact)")
        actor_rows = valid & (host["actor_step"] > 0) if "actor_step" in host else valid
        for k, v in host.items():
            rows = actor_rows if k in actor_keys else valid
            key = f"{phase}/{k}"
            self.sums[key] = self.sums.get(key, 0.0) + float(v[rows].sum())
            self.counts[key] = self.counts.get(key, 0) + int(rows.sum())

    def flush(self) -> dict:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}
        self.sums, self.counts = {}, {}
        return out


# ---------------------------------------------------------------------------------------------- run support
def default_run_dir(cfg) -> Path:
    seeds = f"seed{cfg.seed}" if cfg.num_seeds == 1 else f"seeds{cfg.seed}-{cfg.seed + cfg.num_seeds - 1}"
    return Path("runs") / "o2td3" / cfg.dataset_id.replace("/", "_") / seeds


def score_of(record: dict) -> float:
    return record.get("normalized_score", record["return"])


class World(NamedTuple):
    """What a run trains on: the data on device, the envs (one training env per seed, one evaluation env), the
    static hyper-parameters of the pre-training and of phases 1-3, and the probe states."""
    offline: Buffer  # all dataset rows (rewards transformed), shared by the seeds
    envs: list
    eval_env: Any
    h_off: Hyper  # TD3+BC pre-training
    h: Hyper  # phases 1-3
    obs_mean: np.ndarray
    obs_std: np.ndarray
    refs: Optional[tuple]  # (ref_min, ref_max) return of the normalised score, None when the dataset has none
    probe_obs: list  # per seed: the fixed dataset states on which the logged Q / MSE-to-reference are averaged

    def reward(self, r, cfg):
        return r * cfg.reward_scale + cfg.reward_bias

    def hyper(self, state) -> Hyper:
        return self.h_off if isinstance(state, TD3BCState) else self.h

    def close(self):
        for env in self.envs + [self.eval_env]:
            env.close()


def load_world(cfg: TrainConfig, seeds: list) -> World:
    ds = data.load_dataset(cfg.dataset_id, cfg.discount)
    envs, eval_env = [data.make_env(cfg.dataset_id) for _ in seeds], data.make_env(cfg.dataset_id)
    obs_dim, act_dim = ds.observations.shape[1], ds.actions.shape[1]
    if envs[0].observation_space.shape != (obs_dim,) or envs[0].action_space.shape != (act_dim,):
        raise data.DatasetError(f"{cfg.dataset_id}: env spaces {envs[0].observation_space.shape}/"
                                f"{envs[0].action_space.shape} do not match the dataset ({obs_dim}, {act_dim})")
    try:
        refs = data.reference_scores(cfg.dataset_id)
    except data.DatasetError as e:
        print(f"warning: {e}; logging raw returns only")
        refs = None
    rewards = (ds.rewards * cfg.reward_scale + cfg.reward_bias).astype(np.float32)
    offline = Buffer(*(jnp.asarray(x, jnp.float32) for x in (ds.observations, ds.actions, rewards,
                                                              ds.next_observations, ds.terminals)))
    obs_mean = ds.obs_mean if cfg.normalize else np.zeros(obs_dim, np.float32)
    obs_std = ds.obs_std if cfg.normalize else np.ones(obs_dim, np.float32)
    n_off = len(ds)
    probe_rows = [np.sort(np.random.default_rng(s).choice(n_off, min(n_off, cfg.probe_states), replace=False))
                  for s in seeds]  # each seed's probe states are those of its one-seed run
    return World(offline, envs, eval_env, make_hyper(cfg, obs_dim, act_dim, True),
                 make_hyper(cfg, obs_dim, act_dim, False), obs_mean, obs_std, refs,
                 [jnp.asarray(ds.observations[rows]) for rows in probe_rows])


@dataclass
class Progress:
    """Per-seed bookkeeping (one entry per seed) and the host state of a run: the checkpoint's meta.json."""
    algorithm: str  # "o2td3" (how check_offline_source recognises this script's checkpoints)
    num_seeds: int
    state_form: str  # offline (TD3BCState) | finetune (O2TD3State): the type of the saved state
    phase: str  # offline | load_offline | to_finetune | reevaluation | alignment | online | done
    updates: np.ndarray  # gradient steps done in the current phase
    env_steps: np.ndarray  # online env steps done
    online_size: np.ndarray  # online rows in the buffer
    saved_rows: np.ndarray  # online rows already written to checkpoints/buffer
    act_key: np.ndarray  # [seeds, 2] exploration RNG keys
    env_rng: list  # training-env RNG snapshots at the checkpoint (None before the first reset)
    eval_lines: np.ndarray  # lines of each seed's eval.jsonl that this state has logged
    episodes: np.ndarray  # online episodes finished
    wandb_id: Optional[str]
    last_eval: list  # the last evaluation record
    offline_outcome: list  # the offline actor's evaluation (reused by the re-evaluation records)
    offline_score: list  # the offline actor's score
    best_score: list  # the score of the reference policy pi_ref
    wall_time: float  # seconds of run time before this attempt

    COUNTERS = ("updates", "env_steps", "online_size", "saved_rows", "eval_lines", "episodes")

    @classmethod
    def start(cls, cfg: TrainConfig, seeds: list) -> "Progress":
        N = len(seeds)
        zeros = lambda: np.zeros(N, np.int64)  # noqa: E731
        return cls("o2td3", N, "offline", "offline", zeros(), zeros(), zeros(), zeros(),
                   np.stack([np.asarray(jax.random.PRNGKey(s + 1)) for s in seeds]), [None] * N, zeros(), zeros(),
                   None, [None] * N, [None] * N, [None] * N, [None] * N, 0.0)

    @classmethod
    def from_meta(cls, meta: dict) -> "Progress":
        return cls(**{**meta, **{k: np.asarray(meta[k], np.int64) for k in cls.COUNTERS}})

    def meta(self) -> dict:
        return {**asdict(self), **{k: getattr(self, k).tolist() for k in self.COUNTERS}}


def finetuning_states(state: TD3BCState, h: Hyper, cfg: TrainConfig) -> O2TD3State:
    """Every seed's start of phases 1-3 (start_finetuning) from its offline state."""
    return stack_seeds([start_finetuning(seed_slice(state, i), h, cfg.policy_reevaluation, cfg.lmbda)
                        for i in range(cfg.num_seeds)])


def start_or_resume(cfg: TrainConfig, run, world: World, seeds: list, source: Optional[dict]):
    """(state, progress, online buffer): fresh, or restored from run.resume_from (state, counters, RNG keys, online
    rows), or the offline state of run.offline_from (`source`: check_offline_source's description) to fine-tune."""
    h, N = world.h, len(seeds)
    online = Buffer(*(jnp.zeros((N, cfg.online_steps + cfg.online_block) + shape, jnp.float32) for shape in
                      ((h.obs_dim,), (h.act_dim,), (), (h.obs_dim,), ())))  # per seed, + slack for a full chunk
    fresh = stack_seeds([init_offline_state(world.h_off, jax.random.PRNGKey(s), world.obs_mean, world.obs_std)
                         for s in seeds])
    state, prog = fresh, Progress.start(cfg, seeds)
    if run.resume_from is not None:
        template = lambda meta: fresh if meta["state_form"] == "offline" else finetuning_states(fresh, h, cfg)  # noqa
        state, meta = load_state(run.resume_from, template, cfg)
        prog = Progress.from_meta(meta)
        for i, s in enumerate(seeds):
            rows = load_buffer_rows(run.run_dir / "checkpoints" / "buffer" / f"seed{s}", int(prog.online_size[i]))
            if rows is not None:
                online = online._replace(**{k: getattr(online, k).at[i, :len(v)].set(v) for k, v in rows.items()})
        print(f"resumed from {run.resume_from}: phase {prog.phase}, {prog.updates.tolist()} updates, "
              f"{prog.env_steps.tolist()} online env steps")
    elif run.offline_from is not None:
        state, info = load_offline_source(cfg, run.offline_from, source, fresh, world.h_off, seeds)
        prog.updates, prog.phase = np.asarray(info["updates"], np.int64), "load_offline"
        if info["act_key"] is not None:
            prog.act_key = info["act_key"]
        print(f"loaded the offline actor from {run.offline_from} ({info['source']}, {info['updates'][0]} updates)")
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

    def evaluate(self, state, prog: Progress, phase: str, which=None, reuse_outcome: bool = False):
        """Evaluate each seed's current actor (`reuse_outcome`: reuse its offline actor's outcome), add the probes."""
        cfg, w = self.cfg, self.world
        h = w.hyper(state)
        for i in range(len(self.seeds)) if which is None else which:
            one = seed_slice(state, i)
            if reuse_outcome:
                outcome = prog.offline_outcome[i]
            else:
                policy = lambda o: act_deterministic(one.actor.params, one.obs_mean, one.obs_std, o, h)  # noqa: E731
                outcome = evaluate(w.eval_env, policy, cfg.eval_episodes, cfg.eval_seed, cfg.terminate_on_success,
                                   self.goal_task, w.refs)
            record = {"seed": self.seeds[i], "phase": phase, "updates": int(prog.updates[i]),
                      "env_steps": int(prog.env_steps[i]), **outcome}
            probes = {k: float(v) for k, v in probe(one, w.probe_obs[i], h).items()}
            record.update(q_offline_action=probes["q_offline_action"], **{"lambda": probes.get("lambda")},
                          mse_to_reference=probes.get("mse_to_reference"))
            record["epsilon_t"] = float(epsilon_schedule(int(prog.env_steps[i]), cfg.threshold, cfg.end_threshold,
                                                         cfg.end_steps)) if isinstance(state, O2TD3State) else None
            record["reference_score"] = prog.best_score[i]
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
        prog.state_form = "offline" if isinstance(state, TD3BCState) else "finetune"
        for i, s in enumerate(self.seeds):
            save_buffer_rows(ckpt_dir / "buffer" / f"seed{s}", seed_slice(online, i), int(prog.saved_rows[i]),
                             int(prog.online_size[i]))
        prog.saved_rows = prog.online_size.copy()
        prog.wall_time = self.wall_before + time.time() - self.t_start
        save_state(ckpt_dir / name, state, prog.meta(), self.cfg)


def update_phase(cfg: TrainConfig, run, world: World, rec: Recorder, state, prog: Progress, save, phase: str,
                 total: int, desc: str, reuse_outcome: bool = False):
    """Phases 0-2: blocks of `phase` updates on the offline data until `total` (all seeds in one vmapped scan per
    block); an evaluation every offline_eval_every updates and at the end, each followed by a checkpoint
    (`save(state)`; pre-training's last one is written by train as checkpoints/offline)."""
    from tqdm import tqdm
    acc = Metrics()
    bar = tqdm(total=total, initial=int(prog.updates[0]), desc=desc, mininterval=5)
    while prog.updates[0] < total:
        state, metrics = scan_updates(state, world.offline, phase, world.hyper(state))
        acc.add(metrics, cfg.update_block, phase, rec.seeds, prog.updates, TD3BC_ACTOR_KEYS if phase == "offline"
                else ())
        prog.updates += cfg.update_block
        bar.update(cfg.update_block)
        rec.logger.log({**acc.flush(), f"{phase}/updates": int(prog.updates[0])})
        if prog.updates[0] % cfg.offline_eval_every == 0 or prog.updates[0] == total:
            rec.evaluate(state, prog, phase, reuse_outcome=reuse_outcome)
            bar.set_postfix(score=rec.score(prog))
            if phase != "offline" or prog.updates[0] < total:
                save(state)
        if run.stop and prog.updates[0] < total:
            save(state)
            run.interrupt_if_asked(f"after {int(prog.updates[0])} {phase} updates")
    bar.close()
    return state


class Episodes:
    """The training envs' current episodes, one entry per seed, and one block of collected transitions."""

    def __init__(self, cfg: TrainConfig, h: Hyper, prog: Progress, envs: list, seeds: list):
        N = len(seeds)
        for i, env in enumerate(envs):
            if prog.env_rng[i] is not None:
                env_rng_restore(env, prog.env_rng[i], seeds[i])
        self.first_reset = np.array([snapshot is None for snapshot in prog.env_rng])
        self.chunk = {k: np.zeros((N, cfg.online_block) + s, np.float32) for k, s in
                      (("obs", (h.obs_dim,)), ("act", (h.act_dim,)), ("rew", ()), ("next_obs", (h.obs_dim,)),
                       ("done", ()))}
        self.obs = np.zeros((N, h.obs_dim), np.float32)
        self.at_start = np.ones(N, bool)
        self.ret, self.length, self.recent = np.zeros(N), np.zeros(N, np.int64), [[] for _ in range(N)]
        self.evaluated = np.zeros(N, bool)  # evaluated since the last checkpoint
        self.due = np.zeros(N, bool)  # at an episode end after an evaluation: waiting for the synchronised checkpoint


def collect(cfg: TrainConfig, world: World, state, prog: Progress, ep: Episodes, act_key, seeds, logger):
    """Up to online_block env steps per seed with the current policy, into ep.chunk; a seed's block also ends at an
    episode end and at its next evaluation step. Returns (steps per seed, the advanced exploration keys)."""
    N = len(seeds)
    n = np.zeros(N, np.int32)
    next_eval = (prog.env_steps // cfg.online_eval_every + 1) * cfg.online_eval_every
    limit = np.minimum(np.minimum(next_eval, cfg.online_steps) - prog.env_steps, cfg.online_block)
    limit[ep.due | (prog.env_steps >= cfg.online_steps)] = 0  # waiting or finished
    active = limit > 0
    while active.any():
        for i in np.flatnonzero(active):
            if ep.at_start[i]:
                ep.obs[i] = world.envs[i].reset(seed=seeds[i] if ep.first_reset[i] else None)[0]
                ep.first_reset[i], ep.at_start[i], ep.ret[i], ep.length[i] = False, False, 0.0, 0
        executed, clean, act_key = act_explore(state.actor.params, state.obs_mean, state.obs_std, ep.obs, act_key,
                                               jnp.asarray(active), cfg.explore_noise, world.h)
        executed, clean = np.asarray(executed), np.asarray(clean)
        for i in np.flatnonzero(active):
            next_obs, r, term, trunc, info = world.envs[i].step(executed[i])
            term = term or (cfg.terminate_on_success and bool(info.get("success", False)))
            j, c = n[i], ep.chunk
            c["obs"][i, j], c["next_obs"][i, j] = ep.obs[i], next_obs
            c["act"][i, j] = executed[i] if cfg.store_executed_action else clean[i]
            c["done"][i, j], c["rew"][i, j] = float(term), world.reward(r, cfg)
            n[i], prog.env_steps[i] = j + 1, prog.env_steps[i] + 1
            ep.ret[i], ep.length[i] = ep.ret[i] + float(r), ep.length[i] + 1
            ep.obs[i] = next_obs
            if term or trunc:
                prog.episodes[i] += 1
                ep.recent[i] = (ep.recent[i] + [float(ep.ret[i])])[-10:]
                logger.log({f"online/episode_return{'' if N == 1 else f'/seed{seeds[i]}'}": float(ep.ret[i]),
                            "online/episode_length": int(ep.length[i]), "online/env_steps": int(prog.env_steps[i])})
                ep.at_start[i] = True
            if ep.at_start[i] or n[i] == limit[i]:
                active[i] = False
    return n, act_key


def summarize(eval_path: Path) -> dict:
    """Scores after pre-training, after alignment and at the end of fine-tuning (normalised score, else return)."""
    records = [json.loads(line) for line in eval_path.read_text().splitlines()] if eval_path.exists() else []
    key = "normalized_score" if records and "normalized_score" in records[0] else "return"
    last = {p: [r[key] for r in records if r["phase"] == p] for p in PHASES}
    out = {"before_finetuning": last["offline"][-1] if last["offline"] else None,
           "after_alignment": last["alignment"][-1] if last["alignment"] else None,
           "after_finetuning": last["online"][-1] if last["online"] else None}
    if out["before_finetuning"] is not None and out["after_finetuning"] is not None:
        aligned = f" -> {out['after_alignment']:.2f} after alignment" if out["after_alignment"] is not None else ""
        print(f"{key.replace('_', ' ')}: {out['before_finetuning']:.2f} after pre-training{aligned} -> "
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

