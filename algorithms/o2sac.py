"""O2SAC (single file, JAX): offline CQL, optimistic critic reconstruction, then constrained SAC fine-tuning.

Paper:  Luo, Xie, Wang, Huang, "Optimistic Critic Reconstruction and Constrained Fine-Tuning for General
        Offline-to-Online RL", NeurIPS 2024, https://arxiv.org/abs/2412.18855.
Reference code: https://github.com/QinwenLuo/OCR-CFT @ 77c49819e0814eb06dccd7f60db06ba58165317c
        (`finetune/O2SAC.py`, `finetune/online_agent/sac.py`, `offline/cql.py`, `net.py`, `config/...`).

Phases (`phase` in eval.jsonl; the maths in the docstrings of the updates below; details in docs/o2sac.md):
  offline       CQL pre-training as OCR's `offline/cql.py` (cql_update); skipped by `--offline_checkpoint`, which
                also takes a cal_ql.py checkpoint's actor.
  reevaluation  policy re-evaluation (PR, `SAC.ope`): fresh critics learn the soft value of the fixed offline actor.
  alignment     value alignment (VA, `SAC.align_value`): frozen targets, critics fitted to optimistic anchors.
  online        constrained fine-tuning (CF, `SAC.update`): `utd` updates per env step on 50/50 offline/online
                batches, KL to the reference policy constrained by a learnt lambda.
Ablation switches (each default true): policy_reevaluation, value_alignment, constrained_finetuning (all false =
load the offline CQL actor and critics, then plain SAC).

Deviations (and the switch that restores the reference behaviour where one exists):
  1. Evaluation on a separate env seeded with `eval_seed` (official: the training env, mid-episode); online
     evaluations at multiples of `online_eval_every` env steps, checkpoints at the next episode end.
  2. `utd` is a config field (official: hard-coded 10).
  3. The offline CQL phase lives in this file with OCR's settings (MuJoCo: `offline/cql.py` defaults; AntMaze:
     `config/offline/cql/antmaze/*.yaml`).
  4. Terminals: true terminations only; `terminate_on_success` (AntMaze) ends an episode as terminal at the goal
     (D4RL's eval=True). Datasets: Minari's `D4RL/antmaze/*-v1` and the local `o2o/...` suite (OCR: D4RL -v2).
  5. `online_block` > 1 collects that many env steps with a fixed policy before their updates run; 1 = official.
  6. Re-evaluation records copy the offline evaluation's score (the actor is unchanged in PR).
  7. `auto_alpha: false` keeps alpha fixed at `alpha` online (the official code would use alpha_multiplier).
  8. `double_critic: false` builds a 1-member ensemble (the official code keeps an unused, untrained Q2).
  9. Not implemented: `refer_with_optimal_pi: false` and buffer_load 'all' / 'part' / 'none' (every official
     config uses the best-policy rule and 'half').
 10. The AntMaze configs evaluate the CQL actor every 50k updates (official: 100 episodes every 5k; logging only).
 11. Orthogonal kernels by Householder QR in jnp ops (the same up to round-off; avoids a jaxlib CPU deadlock).

Several seeds in one process (`--num_seeds N`): seeds seed..seed+N-1 train together, vmapped over a leading seed
axis; each seed follows its single-seed schedule (equal up to float32 round-off). Evaluations: run_dir/seed<S>/.

Usage:
    python algorithms/o2sac.py --config_path configs/o2sac/quickstart.yaml
    python algorithms/o2sac.py --config_path configs/o2sac/quickstart.yaml --resume     # continue a killed run
    python algorithms/o2sac.py --config_path ... --offline_checkpoint runs/.../checkpoints/offline
    python algorithms/o2sac.py --config_path ... --value_alignment false                # an ablation
Writes to `run_dir`: config.yaml, eval.jsonl (seed<S>/eval.jsonl for several seeds), checkpoints/{latest,offline},
checkpoints/buffer/seed<S>/ (online transitions), wandb/.
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

DET_ACTION_CLIP = 0.9999  # deterministic action clip(tanh(mean), +-0.9999) (OCR ReparameterizedTanhGaussian)
LOG_PROB_ACTION_CLIP = 1e-4  # log pi(a|s) of a given action clips a to +-(1 - 1e-4) (OCR TanhGaussianPolicy.log_prob)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    # experiment
    dataset_id: str = "o2o/hopper/medium-v0"  # Minari dataset id (also gives the env), see algorithms/data.py
    seed: int = 0  # seed of networks, sampling, exploration and the training env
    eval_seed: int = 100  # seed of the evaluation env (re-seeded at the start of every evaluation)
    run_dir: str = ""  # output directory; "" = runs/o2sac/<dataset_id>/seed<seed> (several: seeds<first>-<last>)
    project: str = "o2o-jax"  # wandb project
    group: str = "o2sac"  # wandb group
    name: str = ""  # wandb run name; "" = o2sac-<dataset_id>-seed<seed>
    wandb_mode: str = "offline"  # online | offline | disabled (the WANDB_MODE env variable overrides it)
    resume: bool = False  # continue the run in run_dir from its newest intact checkpoint (`--resume` alone works)
    overwrite: bool = False  # delete a previous run in run_dir and start again (without it, a previous run is kept)
    offline_checkpoint: str = ""  # skip CQL: start from an o2sac `checkpoints/offline` or a cal_ql.py checkpoint dir
    num_seeds: int = 1  # train seeds seed..seed+num_seeds-1 together (vmapped); >1: evals in run_dir/seed<S>/
    # ablation switches (paper ablations; all true = O2SAC)
    policy_reevaluation: bool = True  # PR phase with fresh critics; false = keep the offline CQL critics, no PR
    value_alignment: bool = True  # VA phase; false = go from PR (or the offline critics) straight to fine-tuning
    constrained_finetuning: bool = True  # KL-constrained SAC online; false = lambda 0 (plain SAC, no KL term)
    # schedule
    offline_updates: int = 1_000_000  # CQL gradient steps (OCR offline/cql.py max_timesteps)
    ope_steps: int = 500_000  # policy re-evaluation gradient steps (official ope_steps)
    align_steps: int = 500_000  # value alignment gradient steps (official: 500k MuJoCo, 1M AntMaze)
    online_steps: int = 100_000  # fine-tuning env steps (official: 100k MuJoCo, 200k AntMaze)
    utd: int = 10  # gradient steps per env step online (official: hard-coded 10)
    warmup_steps: int = 1000  # online updates start after this many env steps (official: 1000 / 5000 AntMaze)
    update_block: int = 1000  # updates per jitted lax.scan block in the offline / PR / VA phases
    online_block: int = 1  # env steps collected with a fixed policy before their updates (1 = official)
    offline_eval_every: int = 5000  # CQL updates between evaluations (+ checkpoint) (OCR CQL eval_freq)
    reconstruct_eval_every: int = 5000  # PR / VA updates between evaluations (+ checkpoint) (official log_freq)
    online_eval_every: int = 1000  # env steps between online evaluations (official eval_freq; AntMaze 5000)
    eval_episodes: int = 10  # deterministic evaluation episodes (official n_episodes; AntMaze 100)
    eval_batch_size: int = 1000  # dataset states for the logged Q / KL diagnostics (fixed, drawn with eval_seed)
    # data
    batch_size: int = 256  # transitions per gradient step
    mixing_ratio: float = 0.5  # online phase: fraction of each batch from the offline data (buffer_load 'half')
    discount: float = 0.99  # gamma
    normalize: bool = True  # normalise states with the dataset mean / std + 1e-3 (official: MuJoCo yes, AntMaze no)
    reward_scale: float = 1.0  # r <- reward_scale * r + reward_bias, offline and online (AntMaze: 10 r - 5)
    reward_bias: float = 0.0  # see reward_scale
    terminate_on_success: bool = False  # end episodes as terminal when info['success'] (D4RL AntMaze eval=True)
    # networks
    policy_hidden: List[int] = field(default_factory=lambda: [256, 256, 256])  # actor MLP widths (OCR: 3 x 256)
    critic_hidden: List[int] = field(default_factory=lambda: [256, 256, 256])  # fine-tuning Q widths (official 3/5)
    critic_layernorm: bool = True  # LayerNorm after each hidden layer of the fine-tuning critics (official: true)
    n_critics: int = 2  # fine-tuning Q ensemble size (min over members)
    double_critic: bool = True  # false = a single critic (official AntMaze: only Q1 is used and trained)
    log_std_multiplier: float = 1.0  # initial m in log_std = m * raw + b
    log_std_offset: float = -1.0  # initial b in log_std = m * raw + b
    # O2SAC (reconstruction and fine-tuning)
    policy_lr: float = 1e-4  # Adam LR of the actor (VA and online)
    critic_lr: float = 3e-4  # Adam LR of the critics (PR, VA, online)
    alpha_lr: float = 3e-4  # Adam LR of log alpha (online)
    lmbda_lr: float = 5e-5  # Adam LR of log lambda (online, hard-coded in the official code)
    tau: float = 5e-3  # Polyak rate of the target critics (PR and online; VA keeps them frozen)
    alpha: float = 0.2  # entropy temperature of PR / VA and initial alpha online (official `alpha`)
    auto_alpha: bool = True  # tune alpha online towards entropy -|A| (official use_automatic_entropy_tuning)
    lmbda: float = 1.0  # initial lambda (official `lmbda`)
    threshold: float = 0.125  # eps_0: initial KL threshold (official `threshold`)
    end_threshold: float = 2.0  # eps_end: final KL threshold (official `end_threshold`)
    end_steps: int = 100_000  # env steps of the linear eps_0 -> eps_end schedule
    loss_tau: float = 0.7  # asymmetric weight of the lambda loss
    ref_log_prob_min: float = -50.0  # clamp of log pi_ref(a|s) in the KL terms
    # offline CQL (OCR offline/cql.py; MuJoCo defaults, AntMaze in the AntMaze configs)
    cql_policy_lr: float = 3e-5  # Adam LR of the actor and of log alpha during CQL
    cql_critic_lr: float = 3e-4  # Adam LR of the CQL critics and of log alpha'
    cql_critic_hidden: List[int] = field(default_factory=lambda: [256, 256, 256])  # CQL Q widths (no LayerNorm)
    cql_n_critics: int = 2  # CQL Q ensemble size
    cql_weight: float = 10.0  # CQL regulariser weight (official `cql_alpha`)
    cql_n_actions: int = 10  # actions of each kind in the logsumexp (and the max backup)
    cql_importance_sample: bool = True  # importance-weighted logsumexp
    cql_temp: float = 1.0  # logsumexp temperature
    cql_lagrange: bool = False  # tune the CQL weight alpha' to keep the gap at cql_target_action_gap
    cql_target_action_gap: float = -1.0  # Lagrange target (AntMaze 0.8)
    cql_max_target_backup: bool = False  # max over cql_n_actions next actions in the TD target (AntMaze)
    cql_clip_diff_min: float = float("-inf")  # clip of logsumexp - Q(s,a) (AntMaze -200)
    cql_clip_diff_max: float = float("inf")  # clip of logsumexp - Q(s,a)
    cql_backup_entropy: bool = False  # subtract alpha log pi(a'|s') in the CQL TD target
    precision: str = "float32"  # float32 | bf16: bfloat16 matrix products summed in float32 (params, Adam: float32)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid config: {msg}")
        for name in ("num_seeds", "update_block", "online_block", "utd", "offline_eval_every",
                     "reconstruct_eval_every", "online_eval_every", "eval_episodes", "eval_batch_size", "batch_size",
                     "n_critics", "cql_n_critics", "cql_n_actions", "end_steps"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("offline_updates", "ope_steps", "align_steps", "online_steps", "warmup_steps"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("offline_updates", "ope_steps", "align_steps", "offline_eval_every", "reconstruct_eval_every"):
            need(getattr(self, name) % self.update_block == 0,
                 f"{name}={getattr(self, name)} must be a multiple of update_block={self.update_block}")
        need(self.wandb_mode in ("online", "offline", "disabled"),
             f"wandb_mode must be online|offline|disabled, got {self.wandb_mode!r}")
        need(0.0 < self.mixing_ratio < 1.0, f"mixing_ratio must be in (0, 1), got {self.mixing_ratio}")
        need(0 < int(self.batch_size * self.mixing_ratio) < self.batch_size,
             "batch_size * mixing_ratio must leave rows for both offline and online data")
        need(self.alpha > 0 and self.lmbda > 0, f"alpha and lmbda must be > 0 (they are learnt in log space), got "
             f"{self.alpha}, {self.lmbda}")
        need(0.0 < self.loss_tau < 1.0, f"loss_tau must be in (0, 1), got {self.loss_tau}")
        need(self.cql_temp > 0, f"cql_temp must be > 0, got {self.cql_temp}")
        for name in ("policy_hidden", "critic_hidden", "cql_critic_hidden"):
            need(len(getattr(self, name)) > 0 and all(x > 0 for x in getattr(self, name)), f"{name} must be positive")
        if not self.policy_reevaluation:
            need(self.finetune_n_critics <= self.cql_n_critics,
                 f"policy_reevaluation false keeps the offline critics: the {self.finetune_n_critics} fine-tuning "
                 f"critics must come from the cql_n_critics={self.cql_n_critics} offline ones")
        need(self.precision in PRECISIONS, f"precision must be one of {'|'.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def finetune_n_critics(self) -> int:
        return self.n_critics if self.double_critic else 1


RESUME_FREE = {"resume", "overwrite", "offline_checkpoint", "wandb_mode", "online_steps", "run_dir"}  # may change on --resume


class Hyper(NamedTuple):
    """The static (hashable) arguments of the jitted functions: the env's dimensions and the config fields the maths
    reads, under the config's own names (make_hyper copies them from TrainConfig by name)."""
    obs_dim: int
    act_dim: int
    policy_hidden: tuple
    log_std_multiplier: float
    log_std_offset: float
    policy_reevaluation: bool  # false: the fine-tuning critics are the offline CQL critics (see critic_net)
    constrained_finetuning: bool
    critic_hidden: tuple
    critic_layernorm: bool
    finetune_n_critics: int  # derived: n_critics, or 1 when double_critic is false (a TrainConfig property)
    batch_size: int
    mixing_ratio: float
    update_block: int
    online_block: int
    utd: int
    discount: float
    tau: float
    policy_lr: float
    critic_lr: float
    alpha_lr: float
    lmbda_lr: float
    auto_alpha: bool
    threshold: float
    end_threshold: float
    end_steps: int
    loss_tau: float
    ref_log_prob_min: float
    cql_policy_lr: float
    cql_critic_lr: float
    cql_critic_hidden: tuple
    cql_n_critics: int
    cql_weight: float
    cql_n_actions: int
    cql_importance_sample: bool
    cql_temp: float
    cql_lagrange: bool
    cql_target_action_gap: float
    cql_max_target_backup: bool
    cql_clip_diff_min: float
    cql_clip_diff_max: float
    cql_backup_entropy: bool
    precision: str


def make_hyper(cfg: TrainConfig, obs_dim: int, act_dim: int) -> Hyper:
    static = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731 (a list is not hashable)
    return Hyper(obs_dim=obs_dim, act_dim=act_dim, **{k: static(getattr(cfg, k)) for k in Hyper._fields[2:]})


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


def _uniform(bound: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


PRECISIONS = ("float32", "bf16")


def dot_general(precision: str):
    """nn.Dense's product: Flax's float32 one (None), or for "bf16" both operands rounded to bfloat16 and the
    products summed in float32, float32 out (parameters, gradients and optimiser state stay float32)."""
    if precision == "float32":
        return None
    return lambda x, kernel, dims, precision=None, preferred_element_type=None: jax.lax.dot_general(  # noqa: E731
        x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), dims, preferred_element_type=jnp.float32)


class MLP(nn.Module):
    """ReLU MLP as in OCR `net.py`. init 'orthogonal': every kernel orthogonal(1.0), zero biases (CriticFunction);
    init 'torch': PyTorch-default hidden layers (U(+-1/sqrt(fan_in)) kernels and biases) and a xavier-uniform(1e-2)
    output kernel with zero bias (TanhGaussianPolicy). Optional LayerNorm (eps 1e-5) before each ReLU."""
    hidden: tuple
    out_dim: int
    init: str = "orthogonal"
    layer_norm: bool = False
    precision: str = "float32"

    @nn.compact
    def __call__(self, x):
        dot = dot_general(self.precision)
        for width in self.hidden:
            if self.init == "orthogonal":
                dense = nn.Dense(width, kernel_init=orthogonal_kernel_init(1.0), bias_init=nn.initializers.zeros,
                                 dot_general=dot)
            else:
                bound = 1.0 / math.sqrt(x.shape[-1])
                dense = nn.Dense(width, kernel_init=_uniform(bound), bias_init=_uniform(bound), dot_general=dot)
            x = dense(x)
            if self.layer_norm:
                x = nn.LayerNorm(epsilon=1e-5)(x)
            x = nn.relu(x)
        kernel = (orthogonal_kernel_init(1.0) if self.init == "orthogonal"
                  else nn.initializers.variance_scaling(1e-4, "fan_avg", "uniform"))  # xavier_uniform(gain 1e-2)
        return nn.Dense(self.out_dim, kernel_init=kernel, bias_init=nn.initializers.zeros, dot_general=dot)(x)


class TanhGaussianActor(nn.Module):
    """(mean, log_std) of the pre-tanh Gaussian; log_std = clip(m * raw + b, -20, 2) with learnable scalars m, b.
    Parameter names equal cal_ql.py's TanhGaussianActor (MLP_0/Dense_i, log_std_multiplier, log_std_offset)."""
    act_dim: int
    hidden: tuple
    log_std_multiplier: float = 1.0
    log_std_offset: float = -1.0
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs):
        out = MLP(self.hidden, 2 * self.act_dim, init="torch", precision=self.precision)(obs)
        mean, raw = jnp.split(out, 2, axis=-1)
        m = self.param("log_std_multiplier", lambda _: jnp.asarray(self.log_std_multiplier, jnp.float32))
        b = self.param("log_std_offset", lambda _: jnp.asarray(self.log_std_offset, jnp.float32))
        return mean, jnp.clip(m * raw + b, -20.0, 2.0)


class QNet(nn.Module):
    hidden: tuple
    layer_norm: bool
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs, act):
        x = jnp.concatenate([obs, act], -1)
        return MLP(self.hidden, 1, "orthogonal", self.layer_norm, self.precision)(x)[..., 0]


def critic_ensemble(hidden: tuple, n: int, layer_norm: bool, precision: str = "float32") -> nn.Module:
    """`n` Q networks with independent parameters, evaluated on the same inputs: output [n, ...]."""
    return nn.vmap(QNet, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                   axis_size=n)(hidden=hidden, layer_norm=layer_norm, precision=precision)


def actor_net(h) -> TanhGaussianActor:
    return TanhGaussianActor(h.act_dim, h.policy_hidden, h.log_std_multiplier, h.log_std_offset, h.precision)


def cql_critic_net(h: Hyper) -> nn.Module:
    """The offline CQL critics (no LayerNorm)."""
    return critic_ensemble(h.cql_critic_hidden, h.cql_n_critics, False, h.precision)


def critic_net(h: Hyper) -> nn.Module:
    """The fine-tuning critics: fresh ones, or (policy_reevaluation false) the offline CQL critics' form."""
    if h.policy_reevaluation:
        return critic_ensemble(h.critic_hidden, h.finetune_n_critics, h.critic_layernorm, h.precision)
    return critic_ensemble(h.cql_critic_hidden, h.finetune_n_critics, False, h.precision)


# ---------------------------------------------------------------------------------------------- maths
def gaussian_log_prob(mean, log_std, x):
    """log N(x; mean, exp(log_std)^2) summed over the last axis."""
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z ** 2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), -1)


def tanh_log_det(u):
    """log |d tanh(u)/du| = 2 (log 2 - u - softplus(-2u)) summed over the last axis (PyTorch TanhTransform)."""
    return jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), -1)


def tanh_gaussian_sample(mean, log_std, key, n: Optional[int] = None):
    """Reparameterised a = tanh(u), u ~ N(mean, std) (n samples per row -> [..., n, A]); returns (a, log pi(a))
    with the log-prob computed from u (PyTorch's cached TanhTransform)."""
    if n is not None:
        mean, log_std = mean[..., None, :], log_std[..., None, :]
        shape = mean.shape[:-2] + (n, mean.shape[-1])
    else:
        shape = mean.shape
    u = mean + jnp.exp(log_std) * jax.random.normal(key, shape)
    return jnp.tanh(u), gaussian_log_prob(mean, log_std, u) - tanh_log_det(u)


def tanh_gaussian_log_prob(mean, log_std, action, clip=LOG_PROB_ACTION_CLIP):
    """log pi(a|s) of a given action: a clipped to +-(1 - clip), u = atanh(a) (OCR TanhGaussianPolicy.log_prob)."""
    u = jnp.arctanh(jnp.clip(action, -1.0 + clip, 1.0 - clip))
    return gaussian_log_prob(mean, log_std, u) - tanh_log_det(u)


def deterministic_action(mean):
    """The offline policy's 'most likely' action clip(tanh(mean), +-0.9999) (also the evaluation action)."""
    return jnp.clip(jnp.tanh(mean), -DET_ACTION_CLIP, DET_ACTION_CLIP)


def alignment_target(q_star, logp_star, logp_tilde, q_tilde, alpha):
    """VA target of Q(s, a~): min(Q* - alpha (log pi_ref(a*|s) - log pi_ref(a~|s)), min_i Qbar_i(s, a~))."""
    return jnp.minimum(q_star - alpha * (logp_star - logp_tilde), q_tilde)


def epsilon_schedule(t, eps0: float, eps_end: float, end_steps: int):
    """KL threshold at env step t: min(eps_end, eps0 + t (eps_end - eps0) / end_steps) (official formula)."""
    return jnp.minimum(eps_end, eps0 + t * ((eps_end - eps0) / end_steps))


def lambda_loss_weight(u, tau: float):
    """OCR asymmetric_reverse_l2_loss: mean(|tau - 1[u > 0]| * u) with u = eps_t - KL estimate (linear, not squared).
    u < 0 (KL above the threshold) gives a negative weight, so minimising lambda * weight raises lambda."""
    return jnp.mean(jnp.abs(tau - (u > 0).astype(u.dtype)) * u)


def kl_estimate(logp, logp_ref, ref_min: float):
    """Per-sample single-sample KL(pi || pi_ref) estimate log pi(a|s) - max(log pi_ref(a|s), ref_min), a ~ pi."""
    return logp - jnp.maximum(logp_ref, ref_min)


def cql_logsumexp(q_rand, q_next, q_cur, logp_next, logp_cur, act_dim: int, temp: float = 1.0,
                  q_data=None, importance_sample: bool = True):
    """temp * logsumexp over the CQL action set (last axis); importance weights 0.5^-|A| and 1/pi."""
    if importance_sample:
        cat = jnp.concatenate([q_rand - act_dim * jnp.log(0.5), q_next - logp_next, q_cur - logp_cur], -1)
    else:
        cat = jnp.concatenate([q_rand, q_data[..., None], q_next, q_cur], -1)
    return temp * jax.nn.logsumexp(cat / temp, axis=-1)


# ---------------------------------------------------------------------------------------------- state
class Trainable(NamedTuple):
    """Parameters and optimiser state (a TrainState without functions, so states stay plain pytrees)."""
    params: Any
    opt_state: Any


class CQLState(NamedTuple):
    """Offline phase (this is what checkpoints/offline holds)."""
    actor: Trainable
    critic: Trainable  # ensemble, leading axis cql_n_critics
    critic_target: Any
    log_alpha: Trainable
    log_alpha_prime: Trainable
    key: jax.Array
    updates: jax.Array
    obs_mean: jax.Array
    obs_std: jax.Array


class O2State(NamedTuple):
    """Re-evaluation, alignment and fine-tuning."""
    actor: Trainable  # pi (starts as the offline actor)
    critic: Trainable  # ensemble, leading axis n_critics
    critic_target: Any
    log_alpha: Trainable
    log_lmbda: Trainable
    ref_actor: Any  # pi_ref: the offline actor, later the best evaluated policy so far
    offline_actor: Any  # the loaded offline actor, frozen (for the logged Q at its most likely action)
    best_score: jax.Array  # best evaluation score so far (the reference rule)
    key: jax.Array
    updates: jax.Array
    obs_mean: jax.Array
    obs_std: jax.Array


class Buffer(NamedTuple):
    obs: jax.Array
    act: jax.Array
    rew: jax.Array
    next_obs: jax.Array
    done: jax.Array  # 1.0 for true terminations only


def cql_optimizers(h: Hyper):
    return {"actor": optax.adam(h.cql_policy_lr), "critic": optax.adam(h.cql_critic_lr),
            "log_alpha": optax.adam(h.cql_policy_lr), "log_alpha_prime": optax.adam(h.cql_critic_lr)}


def optimizers(h: Hyper):
    return {"actor": optax.adam(h.policy_lr), "critic": optax.adam(h.critic_lr),
            "log_alpha": optax.adam(h.alpha_lr), "log_lmbda": optax.adam(h.lmbda_lr)}


def init_cql_state(h: Hyper, key, obs_mean, obs_std) -> CQLState:
    k_actor, k_critic, key = jax.random.split(key, 3)
    o, a = jnp.zeros((1, h.obs_dim)), jnp.zeros((1, h.act_dim))
    critic = cql_critic_net(h).init(k_critic, o, a)["params"]
    params = {"actor": actor_net(h).init(k_actor, o)["params"], "critic": critic,
              "log_alpha": jnp.zeros((), jnp.float32), "log_alpha_prime": jnp.ones((), jnp.float32)}  # Scalar(1.0)
    txs = cql_optimizers(h)
    tr = {k: Trainable(p, txs[k].init(p)) for k, p in params.items()}
    return CQLState(tr["actor"], tr["critic"], critic, tr["log_alpha"], tr["log_alpha_prime"], key,
                    jnp.zeros((), jnp.int32), jnp.asarray(obs_mean, jnp.float32), jnp.asarray(obs_std, jnp.float32))


def init_o2_state(h: Hyper, seed: int, actor_params, obs_mean, obs_std, alpha: float, lmbda: float,
                  offline_score: float, offline_critic=None, offline_critic_target=None) -> O2State:
    """Fine-tuning state from an offline actor: fresh critics (or the first n_critics offline critics when given),
    fresh Adam states, log alpha = log(alpha), log lambda = log(lmbda), pi_ref = pi = the offline actor."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # independent of how the offline actor was obtained
    k_critic, key = jax.random.split(key)
    if offline_critic is None:
        critic = critic_net(h).init(k_critic, jnp.zeros((1, h.obs_dim)), jnp.zeros((1, h.act_dim)))["params"]
        target = critic
    else:
        critic = jax.tree.map(lambda x: x[:h.finetune_n_critics], offline_critic)
        target = jax.tree.map(lambda x: x[:h.finetune_n_critics], offline_critic_target)
    params = {"actor": actor_params, "critic": critic, "log_alpha": jnp.asarray(math.log(alpha), jnp.float32),
              "log_lmbda": jnp.asarray(math.log(lmbda), jnp.float32)}
    txs = optimizers(h)
    tr = {k: Trainable(p, txs[k].init(p)) for k, p in params.items()}
    return O2State(tr["actor"], tr["critic"], target, tr["log_alpha"], tr["log_lmbda"], actor_params, actor_params,
                   jnp.asarray(offline_score, jnp.float32), key, jnp.zeros((), jnp.int32),
                   jnp.asarray(obs_mean, jnp.float32), jnp.asarray(obs_std, jnp.float32))


def _step(trainable: Trainable, grads, tx) -> Trainable:
    updates, opt_state = tx.update(grads, trainable.opt_state, trainable.params)
    return Trainable(optax.apply_updates(trainable.params, updates), opt_state)


def _norm(state, x):
    return (x - state.obs_mean) / state.obs_std


def sample_batch(key, buffer: Buffer, size, n: int) -> Buffer:
    idx = jax.random.randint(key, (n,), 0, size)
    return jax.tree.map(lambda x: x[idx], buffer)


# ---------------------------------------------------------------------------------------------- offline CQL
def cql_losses(params: dict, state: CQLState, batch: Buffer, key, h: Hyper):
    """All CQL losses from one snapshot (OCR `ContinuousCQL.train`); stop-gradients keep each on its parameters:
        a ~ pi(.|s) (reparam),  L_pi = mean(alpha log pi(a|s) - min_i Q_i(s,a))
        L_alpha = -mean(log alpha (log pi(a|s) - |A|))
        y = r + gamma (1-d) min_i Qbar_i(s', a'),  a' ~ pi(.|s')  (cql_max_target_backup: the best of cql_n_actions)
        L_Q = sum_i [MSE(Q_i(s,a), y) + w (clip(T logsumexp_a~(Q_i(s,a~) / T) - Q_i(s,a)) - gap)],  T = cql_temp
    over a~: cql_n_actions random, pi(.|s) and pi(.|s') actions (all at s; importance-weighted), w = cql_weight
    (times alpha' with cql_lagrange, alpha' tuned to keep the gap at cql_target_action_gap; gap 0 otherwise)."""
    actor, critic = actor_net(h), cql_critic_net(h)
    sg = jax.lax.stop_gradient
    k_pi, k_next, k_rand, k_cur, k_cql_next = jax.random.split(key, 5)
    obs, next_obs = _norm(state, batch.obs), _norm(state, batch.next_obs)
    b, n = obs.shape[0], h.cql_n_actions
    target_entropy = -float(h.act_dim)  # SAC's -|A|
    mean, log_std = actor.apply({"params": params["actor"]}, obs)
    next_mean, next_log_std = actor.apply({"params": sg(params["actor"])}, next_obs)  # feeds detached samples only

    a_pi, logp_pi = tanh_gaussian_sample(mean, log_std, k_pi)
    alpha_loss = -(params["log_alpha"] * sg(logp_pi + target_entropy)).mean()
    alpha = jnp.exp(params["log_alpha"])
    q_pi = critic.apply({"params": sg(params["critic"])}, obs, a_pi).min(0)
    actor_loss = (sg(alpha) * logp_pi - q_pi).mean()

    if h.cql_max_target_backup:
        a_next, logp_next = tanh_gaussian_sample(sg(next_mean), sg(next_log_std), k_next, n)
        next_rep = jnp.broadcast_to(next_obs[:, None], (b, n, next_obs.shape[-1]))
        q_next = critic.apply({"params": state.critic_target}, next_rep, a_next).min(0)  # [B, n]
        best = jnp.argmax(q_next, -1)[:, None]
        q_next = jnp.take_along_axis(q_next, best, -1)[:, 0]
        logp_next = jnp.take_along_axis(logp_next, best, -1)[:, 0]
    else:
        a_next, logp_next = tanh_gaussian_sample(sg(next_mean), sg(next_log_std), k_next)
        q_next = critic.apply({"params": state.critic_target}, next_obs, a_next).min(0)
    if h.cql_backup_entropy:
        q_next = q_next - sg(alpha) * logp_next
    y = sg(batch.rew + h.discount * (1.0 - batch.done) * q_next)

    a_rand = jax.random.uniform(k_rand, (b, n, h.act_dim), minval=-1.0, maxval=1.0)
    a_cur, logp_cur = tanh_gaussian_sample(sg(mean), sg(log_std), k_cur, n)
    a_nxt, logp_nxt = tanh_gaussian_sample(sg(next_mean), sg(next_log_std), k_cql_next, n)
    actions = jnp.concatenate([batch.act[:, None], a_rand, a_nxt, a_cur], 1)  # [B, 1 + 3n, A], all at s
    obs_rep = jnp.broadcast_to(obs[:, None], (b, 1 + 3 * n, obs.shape[-1]))
    q_all = critic.apply({"params": params["critic"]}, obs_rep, actions)  # [E, B, 1 + 3n]
    q_data, q_rand = q_all[..., 0], q_all[..., 1:1 + n]
    q_nxt, q_cur = q_all[..., 1 + n:1 + 2 * n], q_all[..., 1 + 2 * n:]
    ood = cql_logsumexp(q_rand, q_nxt, q_cur, sg(logp_nxt), sg(logp_cur), h.act_dim, h.cql_temp, q_data,
                        h.cql_importance_sample)  # [E, B]
    cql_diff = jnp.clip(ood - q_data, h.cql_clip_diff_min, h.cql_clip_diff_max).mean(-1)  # [E]
    bellman = ((q_data - y) ** 2).mean(-1)  # [E]
    if h.cql_lagrange:
        alpha_prime = jnp.clip(jnp.exp(params["log_alpha_prime"]), 0.0, 1e6)
        cql_loss = sg(alpha_prime) * h.cql_weight * (cql_diff - h.cql_target_action_gap)
        alpha_prime_loss = -(alpha_prime * h.cql_weight * (sg(cql_diff) - h.cql_target_action_gap)).mean()
    else:
        alpha_prime, alpha_prime_loss = jnp.zeros(()), jnp.zeros(())
        cql_loss = h.cql_weight * cql_diff
    critic_loss = (bellman + cql_loss).sum()  # official qf1_loss + qf2_loss + cql terms
    total = critic_loss + actor_loss + alpha_loss + alpha_prime_loss
    metrics = {"critic_loss": critic_loss, "bellman_loss": bellman.mean(), "cql_diff": cql_diff.mean(),
               "actor_loss": actor_loss, "alpha_loss": alpha_loss, "alpha": alpha, "alpha_prime": alpha_prime,
               "log_pi": logp_pi.mean(), "q_data": q_data.mean(), "target_q": y.mean()}
    return total, metrics


def cql_update(state: CQLState, batch: Buffer, key, h: Hyper):
    names = ("actor", "critic", "log_alpha", "log_alpha_prime")
    params = {k: getattr(state, k).params for k in names}
    grads, metrics = jax.grad(cql_losses, has_aux=True)(params, state, batch, key, h)
    txs = cql_optimizers(h)
    new = {k: _step(getattr(state, k), grads[k], txs[k]) for k in names}
    if not h.cql_lagrange:
        new["log_alpha_prime"] = state.log_alpha_prime
    target = optax.incremental_update(new["critic"].params, state.critic_target, h.tau)
    return state._replace(critic_target=target, updates=state.updates + 1, **new), metrics


# Multi-seed: every state leaf, the online buffer and the per-seed counters carry a leading seed axis; the
# offline rows are shared (in_axes None). One seed's numbers equal a single-seed run's up to float32
# round-off (XLA sums batched matmuls in a different order).
@partial(jax.jit, static_argnames=("h",))
def scan_cql_updates(state: CQLState, offline: Buffer, offline_size, h: Hyper):
    """`h.update_block` CQL updates per seed in one lax.scan (vmapped over seeds), batches sampled on device inside the
    scan; metrics of shape [seeds, h.update_block]."""
    def one_seed(state):
        def body(state, _):
            key, k_batch, k_upd = jax.random.split(state.key, 3)
            batch = sample_batch(k_batch, offline, offline_size, h.batch_size)
            return cql_update(state._replace(key=key), batch, k_upd, h)
        return jax.lax.scan(body, state, None, length=h.update_block)
    return jax.vmap(one_seed)(state)


# ---------------------------------------------------------------------------------------------- reconstruction
def pr_update(state: O2State, batch: Buffer, key, h: Hyper):
    """Policy re-evaluation (`SAC.ope`): soft SARSA of the fixed pi_ref, alpha fixed; Polyak targets:
        y = r + gamma (1-d) [min_i Qbar_i(s', a') - alpha log pi_ref(a'|s')],  a' ~ pi_ref(.|s')
        L_Q = sum_i MSE(Q_i(s,a), y)"""
    actor, critic = actor_net(h), critic_net(h)
    obs, next_obs = _norm(state, batch.obs), _norm(state, batch.next_obs)
    alpha = jnp.exp(state.log_alpha.params)  # = `alpha`: log alpha is not trained before the online phase
    mean, log_std = actor.apply({"params": state.ref_actor}, next_obs)
    a_next, logp_next = tanh_gaussian_sample(mean, log_std, key)
    q_next = critic.apply({"params": state.critic_target}, next_obs, a_next).min(0)
    y = batch.rew + h.discount * (1.0 - batch.done) * (q_next - alpha * logp_next)

    def loss(p):
        q = critic.apply({"params": p}, obs, batch.act)
        return ((q - y) ** 2).mean(-1).sum(), q
    (q_loss, q), grads = jax.value_and_grad(loss, has_aux=True)(state.critic.params)
    critic_tr = _step(state.critic, grads, optimizers(h)["critic"])
    target = optax.incremental_update(critic_tr.params, state.critic_target, h.tau)
    metrics = {"critic_loss": q_loss, "q_data": q[0].mean(), "target_q": y.mean()}
    return state._replace(critic=critic_tr, critic_target=target, updates=state.updates + 1), metrics


def alignment_targets(state: O2State, obs, key, h: Hyper):
    """VA anchors and targets on normalised states: (a*, Q*, a~, y~) (all without gradient)."""
    actor, critic = actor_net(h), critic_net(h)
    alpha = jnp.exp(state.log_alpha.params)
    mean_ref, log_std_ref = actor.apply({"params": state.ref_actor}, obs)
    a_star = deterministic_action(mean_ref)
    logp_star = tanh_gaussian_log_prob(mean_ref, log_std_ref, a_star)
    mean, log_std = actor.apply({"params": state.actor.params}, obs)
    a_tilde, _ = tanh_gaussian_sample(mean, log_std, key)
    logp_tilde = tanh_gaussian_log_prob(mean_ref, log_std_ref, a_tilde)
    q_bar = critic.apply({"params": state.critic_target}, jnp.concatenate([obs, obs]),
                         jnp.concatenate([a_star, a_tilde])).min(0)
    b = obs.shape[0]
    q_star, q_tilde = q_bar[:b], q_bar[b:]
    y_tilde = alignment_target(q_star, logp_star, logp_tilde, q_tilde, alpha)
    return jax.lax.stop_gradient((a_star, q_star, a_tilde, y_tilde))


def va_update(state: O2State, batch: Buffer, key, h: Hyper):
    """Value alignment (`SAC.align_value`): critic to the anchors / aligned targets, SAC actor step, targets frozen:
        a* = clip(tanh(mean_ref(s)), +-0.9999),  Q* = min_i Qbar_i(s, a*)                      (anchor)
        a~ ~ pi(.|s),  y~ = min(Q* - alpha (log pi_ref(a*|s) - log pi_ref(a~|s)), min_i Qbar_i(s, a~))
        L_Q = sum_i MSE(Q_i(s,a*), Q*) + sum_i MSE(Q_i(s,a~), y~)
        L_pi = mean(alpha log pi(a|s) - min_i Q_i(s,a)),  a ~ pi (a second, reparameterised sample)"""
    actor, critic = actor_net(h), critic_net(h)
    sg = jax.lax.stop_gradient
    k_tilde, k_pi = jax.random.split(key)
    obs = _norm(state, batch.obs)
    alpha = jnp.exp(state.log_alpha.params)
    a_star, q_star, a_tilde, y_tilde = alignment_targets(state, obs, k_tilde, h)

    def losses(params):
        q = critic.apply({"params": params["critic"]}, jnp.concatenate([obs, obs]),
                         jnp.concatenate([a_star, a_tilde]))  # [E, 2B]
        b = obs.shape[0]
        fixed = ((q[:, :b] - q_star) ** 2).mean(-1).sum()
        predicted = ((q[:, b:] - y_tilde) ** 2).mean(-1).sum()
        mean, log_std = actor.apply({"params": params["actor"]}, obs)
        a_pi, logp_pi = tanh_gaussian_sample(mean, log_std, k_pi)
        q_pi = critic.apply({"params": sg(params["critic"])}, obs, a_pi).min(0)
        actor_loss = (alpha * logp_pi - q_pi).mean()
        metrics = {"critic_loss": fixed + predicted, "fixed_loss": fixed, "predicted_loss": predicted,
                   "actor_loss": actor_loss, "log_pi": logp_pi.mean(), "q_anchor": q_star.mean(),
                   "aligned_target": y_tilde.mean()}
        return fixed + predicted + actor_loss, metrics
    params = {"actor": state.actor.params, "critic": state.critic.params}
    grads, metrics = jax.grad(losses, has_aux=True)(params)
    txs = optimizers(h)
    return state._replace(actor=_step(state.actor, grads["actor"], txs["actor"]),
                          critic=_step(state.critic, grads["critic"], txs["critic"]),
                          updates=state.updates + 1), metrics


@partial(jax.jit, static_argnames=("kind", "h"))
def scan_reconstruction_updates(state: O2State, offline: Buffer, offline_size, kind: str, h: Hyper):
    """`h.update_block` PR (kind 'reevaluation') or VA (kind 'alignment') updates per seed in one lax.scan on offline
    batches (vmapped over seeds); metrics of shape [seeds, h.update_block]."""
    update = pr_update if kind == "reevaluation" else va_update

    def one_seed(state):
        def body(state, _):
            key, k_batch, k_upd = jax.random.split(state.key, 3)
            batch = sample_batch(k_batch, offline, offline_size, h.batch_size)
            return update(state._replace(key=key), batch, k_upd, h)
        return jax.lax.scan(body, state, None, length=h.update_block)
    return jax.vmap(one_seed)(state)


@jax.jit
def hard_copy_targets(state: O2State) -> O2State:
    """Qbar := Q (every seed)."""
    return state._replace(critic_target=state.critic.params)


@jax.jit
def update_reference(state: O2State, scores):
    """Per seed i: pi_ref := pi and best := scores[i] if scores[i] > best (the official refer_with_optimal_pi
    rule); a seed that was not evaluated passes -inf. Returns (state, better [seeds])."""
    def one_seed(state, score):
        better = score > state.best_score
        ref = jax.tree.map(lambda new, old: jnp.where(better, new, old), state.actor.params, state.ref_actor)
        return state._replace(ref_actor=ref, best_score=jnp.where(better, score, state.best_score)), better
    return jax.vmap(one_seed)(state, scores)


# ---------------------------------------------------------------------------------------------- fine-tuning
def cf_losses(params: dict, state: O2State, batch: Buffer, key, t, h: Hyper):
    """Constrained fine-tuning losses (`SAC.update`) from one snapshot; alpha and lambda are constants in the
    actor and critic losses; the lambda loss only moves log lambda:
        a ~ pi(.|s) (reparam), l = log pi(a|s), l_ref = max(log pi_ref(a|s), ref_log_prob_min)
        L_pi = mean(alpha l - min_i Q_i(s,a) + lambda (l - l_ref))
        y = r + gamma (1-d) [min_i Qbar_i(s',a') - alpha l' - lambda (l' - l'_ref)],  a' ~ pi(.|s')
        L_alpha = -mean(log alpha (l - |A|)),  eps_t = min(eps_end, eps_0 + t (eps_end - eps_0) / end_steps)
        L_lambda = lambda * stopgrad(mean(|loss_tau - 1[u > 0]| u)),  u = eps_t - (l - l_ref)
    (constrained_finetuning false: lambda = 0)."""
    actor, critic = actor_net(h), critic_net(h)
    sg = jax.lax.stop_gradient
    k_pi, k_next = jax.random.split(key)
    obs, next_obs = _norm(state, batch.obs), _norm(state, batch.next_obs)
    b, target_entropy = obs.shape[0], -float(h.act_dim)  # SAC's -|A|
    mean, log_std = actor.apply({"params": params["actor"]}, obs)
    next_mean, next_log_std = actor.apply({"params": sg(params["actor"])}, next_obs)  # feeds detached samples only
    ref_mean_all, ref_log_std_all = actor.apply({"params": state.ref_actor}, jnp.concatenate([obs, next_obs]))

    alpha = jnp.exp(params["log_alpha"]) if h.auto_alpha else jnp.exp(sg(params["log_alpha"]))
    lmbda = jnp.exp(params["log_lmbda"]) if h.constrained_finetuning else jnp.zeros(())

    a_pi, logp_pi = tanh_gaussian_sample(mean, log_std, k_pi)
    logp_ref = tanh_gaussian_log_prob(ref_mean_all[:b], ref_log_std_all[:b], a_pi)  # grad through a_pi
    kl = kl_estimate(logp_pi, logp_ref, h.ref_log_prob_min)
    q_pi = critic.apply({"params": sg(params["critic"])}, obs, a_pi).min(0)
    actor_loss = (sg(alpha) * logp_pi - q_pi + sg(lmbda) * kl).mean()
    alpha_loss = -(params["log_alpha"] * sg(logp_pi + target_entropy)).mean() if h.auto_alpha else jnp.zeros(())

    eps_t = epsilon_schedule(t, h.threshold, h.end_threshold, h.end_steps)
    weight = sg(lambda_loss_weight(eps_t - kl, h.loss_tau))
    lmbda_loss = lmbda * weight if h.constrained_finetuning else jnp.zeros(())

    a_next, logp_next = tanh_gaussian_sample(sg(next_mean), sg(next_log_std), k_next)
    next_kl = kl_estimate(logp_next, tanh_gaussian_log_prob(ref_mean_all[b:], ref_log_std_all[b:], a_next),
                          h.ref_log_prob_min)
    q_next = critic.apply({"params": state.critic_target}, next_obs, a_next).min(0)
    y = sg(batch.rew + h.discount * (1.0 - batch.done) * (q_next - alpha * logp_next - lmbda * next_kl))
    q = critic.apply({"params": params["critic"]}, obs, batch.act)
    critic_loss = ((q - y) ** 2).mean(-1).sum()

    total = critic_loss + actor_loss + alpha_loss + lmbda_loss
    metrics = {"critic_loss": critic_loss, "actor_loss": actor_loss, "alpha_loss": alpha_loss,
               "lambda_loss_weight": weight, "alpha": alpha, "lambda": lmbda, "kl": kl.mean(), "epsilon": eps_t,
               "log_pi": logp_pi.mean(), "q_data": q[0].mean(), "target_q": y.mean()}
    return total, metrics


def cf_update(state: O2State, batch: Buffer, key, t, first, h: Hyper):
    """One fine-tuning step; log lambda moves only when `first` (the first of the utd updates of env step t)."""
    names = ("actor", "critic", "log_alpha", "log_lmbda")
    params = {k: getattr(state, k).params for k in names}
    grads, metrics = jax.grad(cf_losses, has_aux=True)(params, state, batch, key, t, h)
    txs = optimizers(h)
    new = {k: _step(getattr(state, k), grads[k], txs[k]) for k in names}
    if not h.auto_alpha:
        new["log_alpha"] = state.log_alpha
    keep = jnp.logical_and(first, h.constrained_finetuning)
    new["log_lmbda"] = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new["log_lmbda"], state.log_lmbda)
    target = optax.incremental_update(new["critic"].params, state.critic_target, h.tau)
    return state._replace(critic_target=target, updates=state.updates + 1, **new), metrics


def sample_online_batch(offline: Buffer, offline_size, online: Buffer, online_size, k_off, k_on, h: Hyper) -> Buffer:
    """int(batch_size * mixing_ratio) offline rows + the rest from online rows [0, online_size) (official buffer_load
    'half'), in the official order: online rows first."""
    offline_rows = int(h.batch_size * h.mixing_ratio)
    off = sample_batch(k_off, offline, offline_size, offline_rows)
    on = sample_batch(k_on, online, online_size, h.batch_size - offline_rows)
    return jax.tree.map(lambda a, b: jnp.concatenate([b, a]), off, on)


@partial(jax.jit, static_argnames=("h",))
def scan_online_updates(state: O2State, offline: Buffer, offline_size, online: Buffer, first_t, k, h: Hyper):
    """Per seed i, the updates of its env steps t = first_t[i], ..., first_t[i] + k[i] - 1 (k[i] <= h.online_block,
    traced): for each, h.utd updates (inner lax.scan, each on a fresh batch sampling the seed's online rows [0, t))
    with lambda stepped on the first. One lax.fori_loop of max(k) env steps, vmapped over seeds; a seed with fewer
    env steps keeps its state (masked). Metrics [seeds, h.online_block, h.utd], rows >= k[i] are zero."""
    def one_seed(state, online, first_t, k_seed):
        def utd_updates(state, t):
            def body(s, j):
                key, k_off, k_on, k_upd = jax.random.split(s.key, 4)
                batch = sample_online_batch(offline, offline_size, online, t, k_off, k_on, h)
                return cf_update(s._replace(key=key), batch, k_upd, t, j == 0, h)
            return jax.lax.scan(body, state, jnp.arange(h.utd))

        def env_step(i, carry):
            state, metrics = carry
            new, m = utd_updates(state, first_t + i)
            keep = i < k_seed
            new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, state)
            return new, jax.tree.map(lambda all_, x: all_.at[i].set(jnp.where(keep, x, 0)), metrics, m)
        shapes = jax.eval_shape(lambda s: utd_updates(s, first_t)[1], state)
        zeros = jax.tree.map(lambda x: jnp.zeros((h.online_block,) + x.shape, x.dtype), shapes)
        return jax.lax.fori_loop(0, jnp.max(k), env_step, (state, zeros))
    return jax.vmap(one_seed)(state, online, first_t, k)


@partial(jax.jit, donate_argnums=(0,))
def buffer_insert(online: Buffer, rows: Buffer, starts):
    """Write each seed's `rows[i]` at `starts[i]` of its online rows, in place (the buffer is donated)."""
    put = lambda b, r, s: jax.lax.dynamic_update_slice_in_dim(b, r, s, 0)  # noqa: E731
    return jax.tree.map(lambda b, r: jax.vmap(put)(b, r, starts), online, rows)


# ---------------------------------------------------------------------------------------------- acting, diagnostics
@partial(jax.jit, static_argnames=("h",))
def act_explore(actor_params, obs_mean, obs_std, obs, keys, active, h):
    """All seeds' actions a ~ pi(.|s) (tanh-Gaussian samples) in one call per env step, keys split inside; a seed's
    key advances only when it is `active` (so its action sequence does not depend on the other seeds)."""
    def one(params, mean_, std_, o, key, act):
        new_key, sub = jax.random.split(key)
        mean, log_std = actor_net(h).apply({"params": params}, (o - mean_) / std_)
        return jnp.clip(tanh_gaussian_sample(mean, log_std, sub)[0], -1.0, 1.0), jnp.where(act, new_key, key)
    return jax.vmap(one)(actor_params, obs_mean, obs_std, obs, keys, active)


@partial(jax.jit, static_argnames=("h",))
def act_deterministic(actor_params, obs_mean, obs_std, obs, h):
    """clip(tanh(mean), +-0.9999) of one seed's actor (evaluation)."""
    mean, _ = actor_net(h).apply({"params": actor_params}, (obs - obs_mean) / obs_std)
    return deterministic_action(mean)


@partial(jax.jit, static_argnames=("h",))
def cql_diagnostics(state: CQLState, raw_obs, h: Hyper):
    """Offline phase (one seed): Q of the CQL critics at the current actor's most likely action, alpha."""
    obs = _norm(state, raw_obs)
    mean, _ = actor_net(h).apply({"params": state.actor.params}, obs)
    q = cql_critic_net(h).apply({"params": state.critic.params}, obs, deterministic_action(mean)).min(0)
    return {"q_offline_mode": q.mean(), "alpha": jnp.exp(state.log_alpha.params)}


@partial(jax.jit, static_argnames=("h",))
def o2_diagnostics(state: O2State, raw_obs, key, env_steps, h: Hyper):
    """One seed's KL(pi || pi_ref) and KL(pi || offline actor) estimates (one sample per state, fixed key), Q at
    the offline policy's and at pi's most likely actions (min over the critics), lambda, alpha, eps at this env
    step."""
    actor, critic = actor_net(h), critic_net(h)
    obs = _norm(state, raw_obs)
    mean, log_std = actor.apply({"params": state.actor.params}, obs)
    ref_mean, ref_log_std = actor.apply({"params": state.ref_actor}, obs)
    off_mean, off_log_std = actor.apply({"params": state.offline_actor}, obs)
    a, logp = tanh_gaussian_sample(mean, log_std, key)
    q = critic.apply({"params": state.critic.params}, jnp.concatenate([obs, obs]),
                     jnp.concatenate([deterministic_action(off_mean), deterministic_action(mean)])).min(0)
    b = obs.shape[0]
    return {"kl_to_reference": kl_estimate(logp, tanh_gaussian_log_prob(ref_mean, ref_log_std, a),
                                           h.ref_log_prob_min).mean(),
            "kl_to_offline": kl_estimate(logp, tanh_gaussian_log_prob(off_mean, off_log_std, a),
                                         h.ref_log_prob_min).mean(),
            "q_offline_mode": q[:b].mean(), "q_policy_mode": q[b:].mean(),
            "lambda": jnp.exp(state.log_lmbda.params) if h.constrained_finetuning else jnp.zeros(()),
            "alpha": jnp.exp(state.log_alpha.params),
            "epsilon": epsilon_schedule(env_steps, h.threshold, h.end_threshold, h.end_steps),
            "best_score": state.best_score}


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


# ---------------------------------------------------------------------------------------------- offline hand-off
class OfflineStart(NamedTuple):
    """Every seed's offline start; array leaves carry a leading seed axis."""
    actor: Any  # actor params in this file's TanhGaussianActor layout
    critic: Any  # offline critic params (None when the source has no usable critics)
    critic_target: Any
    source: str  # "o2sac" | "cal_ql"
    meta: dict
    cql_state: Any = None  # the whole CQLState of an o2sac source


REQUIRED_FORM = ("a tanh-Gaussian actor with a state-dependent log-std head: an MLP with 2|A| outputs (mean, raw "
                 "log-std) and learnable scalars log_std_multiplier / log_std_offset (log_std = m * raw + b), as saved "
                 "in checkpoints/offline of algorithms/o2sac.py or in a checkpoint of algorithms/cal_ql.py")


def _npz_names(path: Path) -> dict:
    """{keystr path without the 4-digit index: array name in the npz} of a save_tree file."""
    with np.load(path) as z:
        return {re.sub(r"^\d{4}", "", name): name for name in z.files}


def _check_obs_stats(src: Path, mean, std, obs_mean, obs_std, cfg: TrainConfig):
    if mean.shape != np.shape(obs_mean):
        raise ValueError(f"--offline_checkpoint {src}: observation dim {mean.shape[0]} != {np.shape(obs_mean)[0]} of "
                         f"{cfg.dataset_id} (a checkpoint of another environment?)")
    if not (np.allclose(mean, obs_mean, rtol=1e-5, atol=1e-5) and np.allclose(std, obs_std, rtol=1e-5, atol=1e-5)):
        src_norm = not (np.all(mean == 0) and np.all(std == 1))
        this = f"normalises with {cfg.dataset_id} statistics" if cfg.normalize else "does not normalise"
        raise ValueError(f"--offline_checkpoint {src}: its actor was trained on observations normalised "
                         f"{'with other dataset statistics' if src_norm else 'not at all'}, this run {this} "
                         f"(normalize={cfg.normalize}); use the checkpoint's dataset and set normalize: {src_norm}")


def load_offline_start(path: Path, cfg: TrainConfig, h: Hyper, obs_mean, obs_std) -> OfflineStart:
    """Read an offline checkpoint of this script or of cal_ql.py into every seed's (actor, critics) (leading seed
    axis, cfg.num_seeds seeds); clear errors otherwise. An o2sac checkpoint must hold cfg.num_seeds seeds; a
    cal_ql.py checkpoint of N seeds gives its i-th actor to the i-th seed, a one-seed one its actor to every seed."""
    n_seeds, src = cfg.num_seeds, Path(path)
    meta = load_meta(src)
    src_n = meta.get("num_seeds", 1)
    if meta.get("algorithm") == "o2sac":
        if meta.get("state_kind") != "cql":
            raise ValueError(f"--offline_checkpoint {src} is an o2sac checkpoint of phase {meta.get('phase')!r}, not "
                             "an offline one: pass <run_dir>/checkpoints/offline, or continue that run with --resume")
        if src_n != n_seeds:
            raise ValueError(f"--offline_checkpoint {src} holds {src_n} seed(s) of o2sac.py, this run trains "
                             f"{n_seeds}; run it with --num_seeds {src_n} (and the same --seed)")
        one = init_cql_state(h, jax.random.PRNGKey(0), obs_mean, obs_std)
        try:  # a one-seed checkpoint has no seed axis
            state = load_tree(src / "state.npz", one if n_seeds == 1 else stack_seeds([one] * n_seeds))
        except RunError as e:
            raise RunError(f"--offline_checkpoint {src}: {e}. Set policy_hidden / cql_critic_hidden / cql_n_critics "
                             f"as in {src / 'config.yaml'}") from e
        state = stack_seeds([state]) if n_seeds == 1 else state
        _check_obs_stats(src, np.asarray(state.obs_mean[0]), np.asarray(state.obs_std[0]), obs_mean, obs_std, cfg)
        return OfflineStart(state.actor.params, state.critic.params, state.critic_target, "o2sac", meta, state)

    names = _npz_names(src / "state.npz")
    src_cfg = {}
    if (src / "config.yaml").exists():
        import yaml
        src_cfg = yaml.safe_load((src / "config.yaml").read_text()) or {}
    actor_keys = {k[len(".actor.params"):]: v for k, v in names.items() if k.startswith(".actor.params")}
    is_cal_ql = "calibration" in src_cfg and ".log_alpha_prime.params" in names and bool(actor_keys)
    if not is_cal_ql:
        what = "an IQL-style Gaussian actor (tanh mean, state-independent log_std; samples are not tanh-squashed)" \
            if "['log_std']" in actor_keys else f"arrays {sorted(names)[:6]}..."
        raise ValueError(f"--offline_checkpoint {src}: unsupported checkpoint form ({what}). O2SAC needs "
                         f"{REQUIRED_FORM}.")
    if src_n not in (1, n_seeds):
        raise ValueError(f"--offline_checkpoint {src} holds {src_n} seeds (a cal_ql.py --num_seeds {src_n} run), this "
                         f"run trains {n_seeds}: run it with --num_seeds {src_n} (seed by seed), or pass the "
                         "checkpoint of a one-seed cal_ql.py run (its actor for every seed)")
    if not cfg.policy_reevaluation:
        raise ValueError(f"--offline_checkpoint {src} is a cal_ql.py checkpoint: only its actor is used (its critics "
                         "have another form), so O2SAC needs fresh critics: set policy_reevaluation: true")
    template = actor_net(h).init(jax.random.PRNGKey(0), jnp.zeros((1, h.obs_dim)))["params"]
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    wanted = [jax.tree_util.keystr(k) for k, _ in flat]
    with np.load(src / "state.npz") as z:  # per seed: a cal_ql.py checkpoint of several seeds has a seed axis
        per_seed = [({k: z[v] if src_n == 1 else z[v][i] for k, v in actor_keys.items()},
                     {k: z[names[k]] if src_n == 1 else z[names[k]][i] for k in (".obs_mean", ".obs_std")
                      if k in names}) for i in range(src_n)]
    arrays, stats = per_seed[0]
    if set(arrays) != set(wanted) or any(arrays[k].shape != np.shape(r) for k, (_, r) in zip(wanted, flat)):
        got = [arrays[k].shape for k in sorted(arrays) if k.endswith("['kernel']")]
        need = [np.shape(r) for k, (_, r) in zip(wanted, flat) if k.endswith("['kernel']")]
        if len(got) != len(need) or any(len(s) != 2 for s in got) or \
                not {"['log_std_multiplier']", "['log_std_offset']"} <= set(arrays):
            raise ValueError(f"--offline_checkpoint {src}: the cal_ql actor has parameters {sorted(arrays)}; O2SAC "
                             f"needs {REQUIRED_FORM} with layers {wanted}")
        hidden_src = [s[1] for s in got[:-1]]
        raise ValueError(f"--offline_checkpoint {src}: the cal_ql actor's layers have kernel shapes {got}, this run "
                         f"needs {need}: set policy_hidden: {hidden_src} (and use the same dataset: obs dim "
                         f"{got[0][0]} vs {h.obs_dim}, action dim {got[-1][1] // 2} vs {h.act_dim})")
    if set(stats) != {".obs_mean", ".obs_std"}:
        raise ValueError(f"--offline_checkpoint {src}: no obs_mean / obs_std in the checkpoint")
    for _, seed_stats in per_seed:
        _check_obs_stats(src, seed_stats[".obs_mean"], seed_stats[".obs_std"], obs_mean, obs_std, cfg)
    if src_cfg.get("dataset_id") not in (None, cfg.dataset_id):
        print(f"note: --offline_checkpoint {src} was trained on {src_cfg['dataset_id']}, fine-tuning on "
              f"{cfg.dataset_id}")
    actors = [jax.tree_util.tree_unflatten(treedef, [jnp.asarray(seed_arrays[k], jnp.float32) for k in wanted])
              for seed_arrays, _ in per_seed]
    return OfflineStart(stack_seeds(actors * n_seeds if src_n == 1 else actors), None, None, "cal_ql", meta)


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig) -> dict:
    """Offline CQL, re-evaluation, alignment and constrained fine-tuning of `num_seeds` seeds at once; returns the
    last evaluation record(s), paths and the before/after scores."""
    from tqdm import tqdm

    t_start = time.time()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    N = len(seeds)
    cfg.name = cfg.name or f"o2sac-{cfg.dataset_id.replace('/', '-')}-seed{cfg.seed}" + (f"x{N}" if N > 1 else "")
    with Run(cfg, run_dir) as run:  # checks that need no data, before any slow work; see Run
        world = load_world(cfg, N)
        h = world.h
        state, prog, online, start = start_or_resume(cfg, run, world, seeds)  # a CQLState until the hand-off
        rec = Recorder(cfg, run_dir, seeds, world, prog, t_start)
        act_key = jnp.asarray(prog.act_key)

        # ---- offline CQL pre-training (all seeds in one vmapped scan per block), or the loaded offline start
        if prog.phase == "offline":
            state = update_phase(cfg, run, rec, state, prog, online, act_key, "offline", cfg.offline_updates,
                                 cfg.offline_eval_every, True,
                                 lambda s: scan_cql_updates(s, world.offline, world.offline_size, h))
            if prog.last_eval[0] is None:  # offline_updates == 0: still report the starting policies
                rec.evaluate(state, prog, "offline")
            prog.offline_eval, prog.phase = list(prog.last_eval), "offline_done"
            rec.checkpoint(state, prog, online, act_key, "offline")  # CQL states, for --offline_checkpoint
        if prog.phase == "offline_done":  # (also a run resumed from its offline checkpoint)
            start = OfflineStart(state.actor.params, state.critic.params, state.critic_target, "o2sac", {})
        elif prog.phase == "load_offline":
            state = evaluate_offline_start(rec, state, prog, start)  # the scores before fine-tuning
            prog.offline_eval = list(prog.last_eval)

        # ---- hand-off: every seed's fine-tuning state from its offline actor (fresh critics unless PR is off)
        if prog.phase in ("offline_done", "load_offline"):
            state = o2_states(cfg, world, seeds, start, [score_of(r) for r in prog.offline_eval])
            prog.enter(next_phase(cfg, "offline"))
            if prog.phase == "online":
                state = transition(cfg, state, prog, seeds)
            rec.checkpoint(state, prog, online, act_key)

        # ---- policy re-evaluation and value alignment (offline data only; all seeds in one vmapped scan per block)
        for phase, steps, rollout in (("reevaluation", cfg.ope_steps, False), ("alignment", cfg.align_steps, True)):
            if prog.phase != phase:
                continue
            state = update_phase(cfg, run, rec, state, prog, online, act_key, phase, steps, cfg.reconstruct_eval_every,
                                 rollout, lambda s: scan_reconstruction_updates(s, world.offline, world.offline_size,
                                                                                phase, h))
            prog.enter(next_phase(cfg, phase))
            if prog.phase == "online":
                state = transition(cfg, state, prog, seeds)  # Qbar := Q, pi_ref := the better actor
            rec.checkpoint(state, prog, online, act_key)

        # ---- online constrained fine-tuning. Each seed follows exactly its single-seed schedule: blocks of up to
        # online_block env steps with a fixed policy (ending at an episode end and at an evaluation step), then their
        # updates (after warm-up), an evaluation every online_eval_every env steps (a better policy becomes that seed's
        # reference). A seed at the first episode end after an evaluation is due for a checkpoint and waits until every
        # seed is due (or finished), so checkpoints fall on episode ends of all seeds.
        if prog.phase == "online":
            ep = Episodes(cfg, h, prog, world.envs, seeds)
            sums, n_sums = {}, 0
            bar = tqdm(total=cfg.online_steps * N, initial=int(prog.env_steps.sum()), desc="O2SAC online",
                       mininterval=5)
            while prog.env_steps.min() < cfg.online_steps:
                n, act_key = collect(cfg, world, state, prog, ep, act_key, seeds, rec.logger)
                online = buffer_insert(online, Buffer(**{k: jnp.asarray(v) for k, v in ep.chunk.items()}),
                                       jnp.asarray(prog.online_size, jnp.int32))
                prog.online_size += n
                # updates of env steps t = first_t .. env_steps once t > warmup_steps (none for a seed that waited)
                first_t = np.maximum(prog.env_steps - n + 1, cfg.warmup_steps + 1)
                k = np.where(n > 0, np.maximum(prog.env_steps - first_t + 1, 0), 0)
                if k.any():
                    state, metrics = scan_online_updates(state, world.offline, world.offline_size, online,
                                                         jnp.asarray(first_t, jnp.int32), jnp.asarray(k, jnp.int32), h)
                    logged = block_metrics(metrics, k, "online", seeds, prog.updates)
                    sums = {key: sums.get(key, 0.0) + v * int(k.sum()) for key, v in logged.items()}
                    n_sums += int(k.sum())
                    prog.count_updates(k * cfg.utd)
                bar.update(int(n.sum()))
                which = [i for i in range(N) if n[i] > 0 and prog.env_steps[i] % cfg.online_eval_every == 0]
                if which:
                    state = rec.evaluate_online(state, prog, which)
                    rec.logger.log({**{key: v / max(n_sums, 1) for key, v in sums.items()},
                                    "online/env_steps": int(prog.env_steps.sum()),
                                    "online/updates": int(prog.updates.sum())})
                    sums, n_sums = {}, 0
                    bar.set_postfix(score=rec.score(prog, which),
                                    train_return=np.mean([np.mean(r) for r in ep.recent if r] or [0.0]))
                    ep.pending[which] = True
                ep.due |= (ep.pending | run.stop) & ep.at_start & (prog.env_steps < cfg.online_steps)  # (a stop:
                if ep.due.any() and (ep.due | (prog.env_steps >= cfg.online_steps)).all():  # every seed's episode end)
                    prog.env_rng = [env_rng_snapshot(env) for env in world.envs]
                    rec.checkpoint(state, prog, online, act_key)
                    ep.pending &= ~ep.due
                    ep.due[:] = False
                    run.interrupt_if_asked(f"at {prog.env_steps.tolist()} online env steps")
            bar.close()
            final = [i for i, r in enumerate(prog.last_eval) if r is None or r["phase"] != "online"
                     or r["env_steps"] != prog.env_steps[i]]
            if final:  # online_steps not a multiple of online_eval_every (or 0)
                state = rec.evaluate_online(state, prog, final)
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
    online/..., eval/...."""

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
        self.log({f"{tag}/{k}": v for k, v in record.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)})
        score = record.get("normalized_score", record["return"])
        extra = "".join(f", {k} {record[k]:.3g}" for k in ("lambda", "kl_to_reference", "q_offline_mode")
                        if record.get(k) is not None)
        print(f"[eval] seed {record['seed']} {record['phase']} updates={record['updates']} "
              f"env_steps={record['env_steps']}: {'normalized score' if 'normalized_score' in record else 'return'} "
              f"{score:.2f}{extra}", flush=True)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def block_metrics(metrics: dict, n, phase: str, seeds: list, updates_before) -> dict:
    """Mean over the seeds of the first n[i] rows of seed i's per-update metrics ([seeds, steps, ...]; trailing
    axes, e.g. the utd updates of an env step, are flattened in update order); a NaN/inf stops the run naming the
    loss, the seed and the update (counted over all phases)."""
    host = {k: np.asarray(v) for k, v in metrics.items()}
    first = next(iter(host.values()))
    per_row = int(np.prod(first.shape[2:], dtype=np.int64))  # updates per row (utd online, else 1)
    host = {k: v.reshape(len(seeds), -1) for k, v in host.items()}
    n = np.broadcast_to(np.asarray(n), (len(seeds),)) * per_row
    valid = np.arange(first.shape[1] * per_row)[None, :] < n[:, None]
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
def default_run_dir(cfg) -> Path:
    seeds = f"seed{cfg.seed}" if cfg.num_seeds == 1 else f"seeds{cfg.seed}-{cfg.seed + cfg.num_seeds - 1}"
    return Path("runs") / "o2sac" / cfg.dataset_id.replace("/", "_") / seeds


def next_phase(cfg: TrainConfig, done: str) -> str:
    order = ["offline", "reevaluation", "alignment", "online"]
    enabled = {"offline": True, "reevaluation": cfg.policy_reevaluation, "alignment": cfg.value_alignment,
               "online": True}
    return next(p for p in order[order.index(done) + 1:] if enabled[p])


def score_of(record: dict) -> float:
    return record.get("normalized_score", record["return"])


class World(NamedTuple):
    """What a run trains on: the data on device, the envs (one training env per seed, one evaluation env), the
    static hyper-parameters and the fixed dataset states of the logged diagnostics."""
    offline: Buffer  # all dataset rows, shared by the seeds
    offline_size: int
    envs: list
    eval_env: Any
    h: Hyper
    obs_mean: np.ndarray
    obs_std: np.ndarray
    refs: Optional[tuple]  # (ref_min, ref_max) return of the normalised score, None when the dataset has none
    eval_obs: jax.Array  # eval_batch_size dataset states (drawn with eval_seed) of the logged Q / KL diagnostics

    def reward(self, r, cfg):
        return r * cfg.reward_scale + cfg.reward_bias

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
    rewards = (ds.rewards * cfg.reward_scale + cfg.reward_bias).astype(np.float32)
    offline = Buffer(*(jnp.asarray(x, jnp.float32) for x in (ds.observations, ds.actions, rewards,
                                                              ds.next_observations, ds.terminals)))
    obs_mean = ds.obs_mean if cfg.normalize else np.zeros(obs_dim, np.float32)
    obs_std = ds.obs_std if cfg.normalize else np.ones(obs_dim, np.float32)
    pick = np.random.default_rng(cfg.eval_seed).choice(len(ds), min(len(ds), cfg.eval_batch_size), replace=False)
    eval_obs = jnp.asarray(ds.observations[np.sort(pick)], jnp.float32)  # the same states for every seed
    return World(offline, len(ds), envs, eval_env, make_hyper(cfg, obs_dim, act_dim), obs_mean, obs_std, refs,
                 eval_obs)


@dataclass
class Progress:
    """Per-seed bookkeeping (one entry per seed) and the host state of a run: the checkpoint's meta.json."""
    algorithm: str  # "o2sac" (load_offline_start recognises its checkpoints by it)
    num_seeds: int
    phase: str  # offline | load_offline | offline_done | reevaluation | alignment | online | done
    state_kind: str  # cql (a CQLState) | o2 (an O2State): the state type of the checkpoint
    updates: np.ndarray  # gradient steps done, all phases
    phase_updates: np.ndarray  # gradient steps of the current phase
    env_steps: np.ndarray  # online env steps done
    online_size: np.ndarray  # online rows in the buffer
    saved_rows: np.ndarray  # online rows already written to checkpoints/buffer
    act_key: np.ndarray  # [seeds, 2] exploration RNG keys
    env_rng: list  # training-env RNG snapshots at the checkpoint (None before the first reset)
    eval_lines: np.ndarray  # lines of each seed's eval.jsonl that this state has logged
    episodes: np.ndarray  # online episodes finished
    wandb_id: Optional[str]
    last_eval: list  # the last evaluation record
    offline_eval: list  # the last offline evaluation record (the score before fine-tuning)
    wall_time: float  # seconds of run time before this attempt

    COUNTERS = ("updates", "phase_updates", "env_steps", "online_size", "saved_rows", "eval_lines", "episodes")

    @classmethod
    def start(cls, seeds: list) -> "Progress":
        zeros, nones = (lambda: np.zeros(len(seeds), np.int64)), (lambda: [None] * len(seeds))  # noqa: E731
        return cls("o2sac", len(seeds), "offline", "cql", zeros(), zeros(), zeros(), zeros(), zeros(),
                   np.stack([np.asarray(jax.random.PRNGKey(s + 1)) for s in seeds]), nones(), zeros(), zeros(), None,
                   nones(), nones(), 0.0)

    @classmethod
    def from_meta(cls, meta: dict) -> "Progress":
        return cls(**{**meta, **{k: np.asarray(meta[k], np.int64) for k in cls.COUNTERS}})

    def meta(self) -> dict:
        return {**asdict(self), **{k: getattr(self, k).tolist() for k in self.COUNTERS}}

    def enter(self, phase: str):
        self.phase, self.phase_updates = phase, np.zeros(self.num_seeds, np.int64)

    def count_updates(self, k):
        self.updates += k
        self.phase_updates += k


def o2_states(cfg: TrainConfig, world: World, seeds: list, start: OfflineStart, offline_scores: list) -> O2State:
    """Every seed's fine-tuning state from its offline actor (and its offline critics when policy_reevaluation is
    false), stacked over seeds."""
    keep_critics = not cfg.policy_reevaluation
    return stack_seeds([
        init_o2_state(world.h, s, seed_slice(start.actor, i), world.obs_mean, world.obs_std, cfg.alpha, cfg.lmbda,
                      offline_scores[i], seed_slice(start.critic, i) if keep_critics else None,
                      seed_slice(start.critic_target, i) if keep_critics else None)
        for i, s in enumerate(seeds)])


def start_or_resume(cfg: TrainConfig, run, world: World, seeds: list):
    """(state, progress, online buffer, offline start): fresh CQL states, or restored from run.resume_from (state,
    counters, RNG keys, online rows), or the offline start read from run.offline_from (phase load_offline)."""
    h, N = world.h, len(seeds)
    online = Buffer(*(jnp.zeros((N, cfg.online_steps + cfg.online_block) + shape, jnp.float32) for shape in
                      ((h.obs_dim,), (h.act_dim,), (), (h.obs_dim,), ())))  # per seed, + slack for a full chunk
    state = stack_seeds([init_cql_state(h, jax.random.PRNGKey(s), world.obs_mean, world.obs_std) for s in seeds])
    prog, start = Progress.start(seeds), None
    if run.resume_from is not None:
        if load_meta(run.resume_from)["state_kind"] != "cql":
            state = o2_states(cfg, world, seeds, OfflineStart(state.actor.params, state.critic.params,
                                                              state.critic_target, "o2sac", {}), [0.0] * N)
        state, meta = load_state(run.resume_from, state, cfg)
        prog = Progress.from_meta(meta)
        for i, s in enumerate(seeds):
            rows = load_buffer_rows(run.run_dir / "checkpoints" / "buffer" / f"seed{s}", int(prog.online_size[i]))
            if rows is not None:
                online = online._replace(**{k: getattr(online, k).at[i, :len(v)].set(v) for k, v in rows.items()})
        print(f"resumed from {run.resume_from}: phase {prog.phase}, {prog.updates.tolist()} updates, "
              f"{prog.env_steps.tolist()} online env steps")
    elif run.offline_from is not None:
        start = load_offline_start(run.offline_from, cfg, h, world.obs_mean, world.obs_std)
        prog.phase = "load_offline"
        print(f"loaded the offline actor{' and critics' if start.critic is not None else ''} from "
              f"{cfg.offline_checkpoint} ({start.source} checkpoint)")
    return state, prog, online, start


class Recorder:
    """Evaluations (eval.jsonl, wandb, console) and checkpoints of a run: `evaluate` and `checkpoint`."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, seeds: list, world: World, prog: Progress, t_start: float):
        self.cfg, self.run_dir, self.seeds, self.world, self.t_start = cfg, run_dir, seeds, world, t_start
        self.wall_before, self.goal_task = prog.wall_time, "antmaze" in cfg.dataset_id
        self.diag_key = jax.random.PRNGKey(cfg.eval_seed)  # fixed: diagnostics never touch the training RNG
        with open(run_dir / "config.yaml", "w") as f:
            pyrallis.dump(cfg, f)
        prog.wandb_id = prog.wandb_id or f"{cfg.name}-{int(time.time())}"
        self.logger = Logger(cfg, run_dir, seeds, prog.wandb_id, prog.eval_lines.tolist())

    def record(self, state, prog: Progress, phase: str, i: int, rollout: bool = True) -> dict:
        """Seed i's evaluation record (not yet logged): a rollout of its deterministic actor, or (re-evaluation) its
        offline evaluation reused, plus the diagnostics (Q / KL / temperatures)."""
        cfg, w, one = self.cfg, self.world, seed_slice(state, i)
        record = {"phase": phase, "seed": self.seeds[i], "updates": int(prog.updates[i]),
                  "phase_updates": int(prog.phase_updates[i]), "env_steps": int(prog.env_steps[i])}
        if rollout:
            record.update(evaluate(w.eval_env, lambda o: act_deterministic(one.actor.params, one.obs_mean,
                                                                           one.obs_std, o, w.h),
                                   cfg.eval_episodes, cfg.eval_seed, cfg.terminate_on_success, self.goal_task, w.refs))
        else:  # re-evaluation: the actor is the offline one, whose evaluation is reused
            record.update({k: v for k, v in prog.offline_eval[i].items() if k in
                           ("return", "return_std", "length", "episodes", "normalized_score", "normalized_score_std",
                            "success_rate")})
            record["score_reused"] = True
        if isinstance(one, CQLState):
            record.update({k: float(v) for k, v in cql_diagnostics(one, w.eval_obs, w.h).items()})
            record.update({"lambda": None, "epsilon": None, "kl_to_reference": None, "kl_to_offline": None})
        else:
            record.update({k: float(v) for k, v in
                           o2_diagnostics(one, w.eval_obs, self.diag_key, int(prog.env_steps[i]), w.h).items()})
        return record

    def log(self, prog: Progress, i: int, record: dict):
        record["wall_time"] = round(self.wall_before + time.time() - self.t_start, 2)  # s since the run started
        self.logger.log_eval(i, record)
        prog.eval_lines[i], prog.last_eval[i] = self.logger.eval_lines[i], record

    def evaluate(self, state, prog: Progress, phase: str, rollout: bool = True):
        for i in range(len(self.seeds)):
            self.log(prog, i, self.record(state, prog, phase, i, rollout))

    def evaluate_online(self, state: O2State, prog: Progress, which: list) -> O2State:
        """Evaluate the seeds in `which`, then each one's reference rule (diagnostics before the update)."""
        records = {i: self.record(state, prog, "online", i) for i in which}
        scores = [score_of(records[i]) if i in records else -np.inf for i in range(len(self.seeds))]
        state, better = update_reference(state, jnp.asarray(scores, jnp.float32))
        better, best = np.asarray(better), np.asarray(state.best_score)
        for i in which:
            records[i]["reference_updated"] = bool(better[i])
            records[i]["best_score"] = float(best[i])
            self.log(prog, i, records[i])
        return state

    def score(self, prog: Progress, which=None) -> float:
        records = [prog.last_eval[i] for i in (range(len(self.seeds)) if which is None else which)]
        return float(np.mean([score_of(r) for r in records if r is not None]))

    def checkpoint(self, state, prog: Progress, online: Buffer, act_key, name: str = "latest"):
        """Online rows appended to checkpoints/buffer, then state + meta atomically into checkpoints/<name>."""
        ckpt_dir = self.run_dir / "checkpoints"
        prog.act_key = np.asarray(act_key)
        for i, s in enumerate(self.seeds):
            save_buffer_rows(ckpt_dir / "buffer" / f"seed{s}", seed_slice(online, i), int(prog.saved_rows[i]),
                             int(prog.online_size[i]))
        prog.saved_rows = prog.online_size.copy()
        prog.wall_time = self.wall_before + time.time() - self.t_start
        prog.state_kind = "cql" if isinstance(state, CQLState) else "o2"
        save_state(ckpt_dir / name, state, prog.meta(), self.cfg)


def update_phase(cfg: TrainConfig, run, rec: Recorder, state, prog: Progress, online: Buffer, act_key, phase: str,
                 steps: int, eval_every: int, rollout: bool, scan):
    """The loop of an update-only phase (offline CQL, re-evaluation, alignment): blocks of update_block updates
    (`scan(state)`: all seeds in one vmapped lax.scan), an evaluation (+ checkpoint) every eval_every updates."""
    from tqdm import tqdm
    bar = tqdm(total=steps, initial=int(prog.phase_updates[0]), desc=f"O2SAC {phase}", mininterval=5)
    while prog.phase_updates[0] < steps:
        state, metrics = scan(state)
        logged = block_metrics(metrics, cfg.update_block, phase, rec.seeds, prog.updates)
        prog.count_updates(cfg.update_block)
        bar.update(cfg.update_block)
        rec.logger.log({**logged, f"{phase}/updates": int(prog.updates[0])})
        if prog.phase_updates[0] % eval_every == 0 or prog.phase_updates[0] == steps:
            rec.evaluate(state, prog, phase, rollout)
            bar.set_postfix(score=rec.score(prog))
            if prog.phase_updates[0] < steps:
                rec.checkpoint(state, prog, online, act_key)
        if run.stop and prog.phase_updates[0] < steps:
            rec.checkpoint(state, prog, online, act_key)
            run.interrupt_if_asked(f"after {int(prog.phase_updates[0])} {phase} updates")
    bar.close()
    return state


def evaluate_offline_start(rec: Recorder, state: CQLState, prog: Progress, start: OfflineStart) -> CQLState:
    """--offline_checkpoint: the source's update counts and every seed's score before fine-tuning."""
    N = len(rec.seeds)
    prog.updates = np.broadcast_to(np.ravel(start.meta.get("updates", 0)).astype(int), (N,)).astype(np.int64)
    prog.phase_updates = prog.updates.copy()  # (one count per source seed)
    if start.cql_state is not None:
        state = start.cql_state
        rec.evaluate(state, prog, "offline")
    else:  # cal_ql actors: no CQL critics of this file's form, so no offline Q diagnostic
        state = state._replace(actor=state.actor._replace(params=start.actor))
        for i in range(N):
            record = rec.record(state, prog, "offline", i)
            record["q_offline_mode"] = None
            rec.log(prog, i, record)
    return state


def transition(cfg: TrainConfig, state: O2State, prog: Progress, seeds: list) -> O2State:
    """After the reconstruction, per seed: Qbar := Q; pi_ref := pi if the aligned actor evaluated better."""
    state = hard_copy_targets(state)
    last = prog.last_eval
    if cfg.value_alignment and all(r is not None and r["phase"] == "alignment" for r in last):
        state, better = update_reference(state, jnp.asarray([score_of(r) for r in last], jnp.float32))
        for i, b in enumerate(np.asarray(better)):
            print(f"transition (seed {seeds[i]}): aligned actor {score_of(last[i]):.2f} vs offline "
                  f"{score_of(prog.offline_eval[i]):.2f}: "
                  f"{'pi_ref := aligned actor' if b else 'pi_ref stays the offline actor'}")
    prog.enter("online")
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
        self.pending = np.zeros(N, bool)  # evaluated since the last checkpoint
        self.due = np.zeros(N, bool)  # at an episode end after an evaluation: waiting for the synchronised checkpoint


def collect(cfg: TrainConfig, world: World, state, prog: Progress, ep: Episodes, act_key, seeds, logger):
    """Up to online_block env steps per seed with the current policy, into ep.chunk; a seed's block also ends at an
    episode end and at an evaluation step. Returns (steps per seed, the advanced exploration keys)."""
    N = len(seeds)
    n = np.zeros(N, np.int64)
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
            j, c = n[i], ep.chunk
            c["obs"][i, j], c["act"][i, j], c["next_obs"][i, j] = ep.obs[i], actions[i], next_obs
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
            if ep.at_start[i] or prog.env_steps[i] % cfg.online_eval_every == 0 or n[i] == cfg.online_block or \
                    prog.env_steps[i] >= cfg.online_steps:
                active[i] = False
    return n, act_key


def summarize(eval_path: Path) -> dict:
    """Score after pre-training, after the reconstruction and at the end of fine-tuning (normalised score,
    else return), plus the lowest online score (the 'dip' at the start of fine-tuning)."""
    records = [json.loads(line) for line in eval_path.read_text().splitlines()] if eval_path.exists() else []
    key = "normalized_score" if records and "normalized_score" in records[0] else "return"
    by_phase = {p: [r[key] for r in records if r["phase"] == p] for p in ("offline", "alignment", "online")}
    out = {"before_finetuning": by_phase["offline"][-1] if by_phase["offline"] else None,
           "after_alignment": by_phase["alignment"][-1] if by_phase["alignment"] else None,
           "after_finetuning": by_phase["online"][-1] if by_phase["online"] else None,
           "min_online": min(by_phase["online"]) if by_phase["online"] else None}
    if by_phase["offline"] and by_phase["online"]:
        aligned = f" -> {out['after_alignment']:.2f} after alignment" if by_phase["alignment"] else ""
        print(f"{key.replace('_', ' ')}: {out['before_finetuning']:.2f} after pre-training{aligned} -> "
              f"{out['after_finetuning']:.2f} after fine-tuning (lowest online {out['min_online']:.2f}; "
              f"eval log: {eval_path})")
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
