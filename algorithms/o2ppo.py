"""O2PPO (single file, JAX): OCR-CFT's PPO route from offline to online RL -- IQL pre-training, value
re-evaluation on Monte-Carlo returns, then PPO fine-tuning constrained towards the best policy so far.

Paper:  Luo, Xie, Wang, Huang, "Optimistic Critic Reconstruction and Constrained Fine-Tuning for General
        Offline-to-Online RL", NeurIPS 2024, https://arxiv.org/abs/2412.18855.
Reference implementation: https://github.com/QinwenLuo/OCR-CFT @ 77c49819e0814eb06dccd7f60db06ba58165317c
        (`finetune/O2PPO.py`, `finetune/online_agent/ppo/*`; the offline IQL is `offline/iql.py` + `net.py`).
Design notes (the three phases in detail, evaluation records, several seeds, hand-offs): docs/o2ppo.md.

What is implemented (official semantics unless listed under "Deviations"):
  1. "offline": IQL pre-training as algorithms/iql.py (expectile V, TD Q to V(s'), Polyak target, AWR actor with
     the LR cosine-decayed over `offline_updates`), networks initialised like OCR's `net.py` (orthogonal weights,
     zero biases; `orthogonal_init: false` = PyTorch default). `--offline_checkpoint` also takes iql.py's.
  2. "reevaluation" (`policy_reevaluation`): a tanh MLP V regressed on the dataset's discounted Monte-Carlo returns.
  3. "online": PPO on rollouts of `rollout_length` steps, GAE, the reference advantage (`constrained_finetuning`)
        A <- (A + w_t A_ref) / (1 + w_t),  A_ref = alpha / d * [softplus(log pi_ref + H(pi_ref) + 4 d) - 4 d] |std(A)|,
     w_t = max(1 - t / end_steps, 0); pi_ref := the evaluated policy whenever it beats the best score so far.
  `value_alignment` exists only for a uniform OCR-CFT interface and HAS NO EFFECT (the official O2PPO has none).

Deviations (and the switch that restores the official behaviour where one exists):
  1. Per-sample reference advantage; the official [N, 1] + [N] broadcast averages the reference term away:
     `reference_advantage_broadcast_bug: true` reproduces it.
  2. Monte-Carlo returns and reward-scaler resets respect every episode end, time limits included (official: only
     terminals, a misspelled 'timesout' key): `mc_returns_across_timeouts: true` reproduces it.
  3. Evaluation on a separate env seeded with `eval_seed`; online checkpoints at the first episode end after an
     evaluation, so a resumed run reproduces an uninterrupted one bit for bit on CPU (no switch).
  4. One state normalisation (dataset mean, std + 1e-3, as IQL was trained) for actor and V (official PPO: + 1e-10).
  5. The run stops after exactly `online_steps` env steps; `rollout_length` must be a multiple of `minibatch_size`.
  6. Minari datasets (AntMaze `D4RL/antmaze/*-v1`, `terminate_on_success` = D4RL's done-at-goal; locomotion: this
     project's `o2o/...` suite).
  7. Not implemented (off in every official config): `is_decay_pi`, `is_clip_value`, `use_reward_norm`, the
     'normal'/'number' reward-scaling strategies, the unused TD(0) `PPO.ope`.

Usage:
    python algorithms/o2ppo.py --config_path configs/o2ppo/quickstart.yaml
    python algorithms/o2ppo.py --config_path configs/o2ppo/quickstart.yaml --resume        # continue a killed run
    python algorithms/o2ppo.py --config_path configs/o2ppo/quickstart.yaml --num_seeds 4   # seeds 0..3 at once
    python algorithms/o2ppo.py --config_path ... --offline_checkpoint runs/iql/.../checkpoints/offline   # IQL actor
    python algorithms/o2ppo.py --config_path ... --policy_reevaluation false --constrained_finetuning false
Writes to `run_dir`: config.yaml, eval.jsonl (one JSON line per evaluation; phase offline/reevaluation/online;
seed<S>/eval.jsonl per seed when num_seeds > 1), checkpoints/{latest,offline}, wandb/ (mode `wandb_mode`, or the
WANDB_MODE environment variable when set).
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

LOG_STD_MAX = 2.0
IQL_LOG_STD_MIN = -20.0  # clamp of the log-std in the IQL phase (OCR net.py / CORL GaussianPolicy)
PPO_LOG_STD_MIN = -10.0  # clamp of the log-std in the PPO phase (OCR ppo_net.py GaussianPolicy)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    # experiment
    dataset_id: str = "o2o/hopper/medium-v0"  # Minari dataset id (also gives the env), see algorithms/data.py
    seed: int = 0  # seed of networks, sampling, exploration and the training env
    eval_seed: int = 100  # seed of the evaluation env (re-seeded at the start of every evaluation)
    run_dir: str = ""  # output directory; "" = runs/o2ppo/<dataset_id>/seed<seed> (seeds<a>-<b> for several)
    project: str = "o2o-jax"  # wandb project
    group: str = "o2ppo"  # wandb group
    name: str = ""  # wandb run name; "" = o2ppo-<dataset_id>-seed<seed>
    wandb_mode: str = "offline"  # online | offline | disabled (the WANDB_MODE env variable overrides it)
    resume: bool = False  # continue the run in run_dir from its newest intact checkpoint (`--resume` alone works)
    overwrite: bool = False  # delete a previous run in run_dir and start again (without it, a previous run is kept)
    offline_checkpoint: str = ""  # skip IQL: start from this checkpoint dir (o2ppo's or iql.py's checkpoints/offline)
    num_seeds: int = 1  # train seeds seed..seed+num_seeds-1 together (vmapped); >1: evals in run_dir/seed<S>/
    # OCR-CFT components
    policy_reevaluation: bool = True  # fit V to the dataset's Monte-Carlo returns before PPO (false: fresh V)
    value_alignment: bool = False  # NO EFFECT in O2PPO (official O2PPO has no alignment); uniform O2 interface
    constrained_finetuning: bool = True  # reference-likelihood advantage bonus with decaying weight (false: PPO)
    # schedule
    offline_updates: int = 1_000_000  # IQL gradient steps of offline pre-training
    reevaluation_updates: int = 1_000_000  # gradient steps fitting V to the Monte-Carlo returns
    online_steps: int = 250_000  # env steps of PPO fine-tuning (official max_train_steps)
    update_block: int = 1000  # IQL / re-evaluation updates per jitted lax.scan block
    offline_eval_every: int = 50_000  # IQL updates between evaluations (+ checkpoint)
    reevaluation_eval_every: int = 100_000  # re-evaluation updates between evaluations (+ checkpoint)
    evaluate_freq: int = 2500  # online env steps between evaluations (+ reference update, checkpoint)
    eval_episodes: int = 10  # deterministic evaluation episodes per evaluation
    # data
    discount: float = 0.99  # gamma (IQL, Monte-Carlo returns, GAE)
    normalize: bool = True  # normalise states with the dataset mean / std (+1e-3)
    terminate_on_success: bool = False  # end episodes as terminal when info['success'] (D4RL AntMaze eval=True)
    # offline IQL
    iql_batch_size: int = 256  # transitions per IQL gradient step
    expectile: float = 0.7  # tau of the expectile value loss (CORL `iql_tau`)
    beta: float = 3.0  # inverse temperature of the advantage weights
    exp_adv_max: float = 100.0  # clip of exp(beta * adv)
    tau: float = 0.005  # Polyak rate of the target Q networks
    actor_lr: float = 3e-4  # IQL Adam LR of the actor (cosine decay to 0 over offline_updates)
    critic_lr: float = 3e-4  # IQL Adam LR of the Q ensemble
    value_lr: float = 3e-4  # IQL Adam LR of its V
    offline_cosine: bool = True  # cosine decay of the IQL actor LR (CORL); false = constant
    hidden_dims: List[int] = field(default_factory=lambda: [256, 256])  # hidden widths of actor and IQL Q / V MLPs
    orthogonal_init: bool = True  # IQL nets: orthogonal weights, zero biases (OCR net.py); false: PyTorch default
    iql_reward_scale: float = 1.0  # IQL rewards: iql_reward_scale * r + iql_reward_bias (AntMaze: r - 1)
    iql_reward_bias: float = 0.0  # (PPO and the value re-evaluation use the raw rewards)
    # value re-evaluation
    reevaluation_batch_size: int = 512  # states per re-evaluation gradient step
    reevaluation_lr: float = 1e-4  # Adam LR of the re-evaluation
    value_hidden_dims: List[int] = field(default_factory=lambda: [256, 256, 256])  # tanh V MLP (official depth 3)
    mc_returns_across_timeouts: bool = False  # official: returns and scaler resets only at terminals (see header)
    dynamic_reward_scaling: bool = False  # divide rewards by the running std of the return (halfcheetah configs)
    # PPO fine-tuning
    rollout_length: int = 2048  # env steps per rollout (official batch_size)
    minibatch_size: int = 128  # transitions per PPO gradient step
    ppo_epochs: int = 10  # passes over each rollout (official K_epochs)
    ppo_actor_lr: float = 3e-5  # Adam LR of the actor (official lr_a)
    ppo_critic_lr: float = 2e-4  # Adam LR of V (official lr_c)
    gae_lambda: float = 0.95  # GAE lambda
    clip_ratio: float = 0.2  # PPO clip epsilon
    entropy_coef: float = 0.01  # entropy bonus weight
    max_grad_norm: float = 0.5  # global grad-norm clip of each optimiser
    adam_eps: float = 1e-5  # Adam epsilon of the PPO optimisers
    lr_decay: bool = True  # PPO LRs decay linearly to 0 over online_steps
    adv_norm: bool = True  # normalise advantages per rollout
    alpha: float = 2.0  # scale of the reference advantage
    end_steps: int = 250_000  # env steps over which the reference weight w_t decays from 1 to 0
    reference_advantage_broadcast_bug: bool = False  # reproduce the official [N,1] + [N] -> [N,N] advantage
    refer_with_optimal_pi: bool = True  # reference := best evaluated policy (false: current one every update_n evals)
    update_n: int = 1  # evaluations between reference updates when refer_with_optimal_pi is false
    std_cap: float = 0.0  # > 0: cap actor / reference std at this value when fine-tuning starts (hopper expert: 0.05)
    precision: str = "float32"  # float32 | bf16: bfloat16 matrix products summed in float32 (params, Adam: float32)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid config: {msg}")
        for name in ("num_seeds", "update_block", "offline_eval_every", "reevaluation_eval_every", "evaluate_freq",
                     "eval_episodes", "iql_batch_size", "reevaluation_batch_size", "rollout_length", "minibatch_size",
                     "ppo_epochs", "end_steps", "update_n"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("offline_updates", "reevaluation_updates", "online_steps"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("offline_updates", "offline_eval_every", "reevaluation_updates", "reevaluation_eval_every"):
            need(getattr(self, name) % self.update_block == 0,
                 f"{name}={getattr(self, name)} must be a multiple of update_block={self.update_block}")
        need(self.rollout_length % self.minibatch_size == 0,
             f"rollout_length={self.rollout_length} must be a multiple of minibatch_size={self.minibatch_size}")
        need(not self.policy_reevaluation or self.reevaluation_updates > 0,
             "policy_reevaluation needs reevaluation_updates > 0 (for a fresh V set policy_reevaluation: false)")
        need(self.wandb_mode in ("online", "offline", "disabled"),
             f"wandb_mode must be online|offline|disabled, got {self.wandb_mode!r}")
        need(0.0 < self.expectile < 1.0, f"expectile must be in (0, 1), got {self.expectile}")
        need(0.0 <= self.gae_lambda <= 1.0, f"gae_lambda must be in [0, 1], got {self.gae_lambda}")
        need(self.clip_ratio > 0, f"clip_ratio must be > 0, got {self.clip_ratio}")
        need(self.std_cap >= 0, f"std_cap must be >= 0 (0 = no cap), got {self.std_cap}")
        for name in ("hidden_dims", "value_hidden_dims"):
            dims = getattr(self, name)
            need(len(dims) > 0 and all(h > 0 for h in dims), f"{name} must be a non-empty list of positive widths")
        need(self.precision in PRECISIONS, f"precision must be one of {'|'.join(PRECISIONS)}, got {self.precision!r}")


RESUME_FREE = {"resume", "overwrite", "offline_checkpoint", "wandb_mode", "run_dir"}  # may change on --resume


class Hyper(NamedTuple):
    """The static (hashable) arguments of the jitted functions: the env's dimensions and the config fields the maths
    reads, under the config's own names (make_hyper copies them from TrainConfig by name)."""
    obs_dim: int
    act_dim: int
    hidden_dims: tuple
    value_hidden_dims: tuple
    orthogonal_init: bool
    update_block: int
    discount: float
    # IQL
    iql_batch_size: int
    tau: float
    expectile: float
    beta: float
    exp_adv_max: float
    actor_lr: float
    critic_lr: float
    value_lr: float
    offline_updates: int
    offline_cosine: bool
    # value re-evaluation
    reevaluation_batch_size: int
    reevaluation_lr: float
    # PPO
    rollout_length: int
    minibatch_size: int
    ppo_epochs: int
    ppo_actor_lr: float
    ppo_critic_lr: float
    gae_lambda: float
    clip_ratio: float
    entropy_coef: float
    max_grad_norm: float
    adam_eps: float
    lr_decay: bool
    adv_norm: bool
    online_steps: int
    alpha: float
    end_steps: int
    constrained_finetuning: bool
    reference_advantage_broadcast_bug: bool
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


PRECISIONS = ("float32", "bf16")


def matmul(x, kernel, precision: str):
    """x @ kernel. "bf16": both operands rounded to bfloat16, products summed in float32, float32 out (the
    parameters, gradients and optimiser state stay float32)."""
    if precision == "bf16":
        return jnp.matmul(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    return x @ kernel


class TorchLinear(nn.Module):
    """Dense layer; init = PyTorch's default U(+-1/sqrt(fan_in)) for weights and biases, or orthogonal weights
    (gain 1) with zero biases (OCR `orthogonal_net`). Same parameter names as algorithms/iql.py's TorchLinear."""
    features: int
    orthogonal: bool = False
    precision: str = "float32"

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        if self.orthogonal:
            kernel = self.param("kernel", orthogonal_kernel_init(1.0), (fan_in, self.features))
            bias = self.param("bias", nn.initializers.zeros, (self.features,))
        else:
            bound = 1.0 / math.sqrt(fan_in)
            init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa
            kernel = self.param("kernel", init, (fan_in, self.features))
            bias = self.param("bias", init, (self.features,))
        return matmul(x, kernel, self.precision) + bias


class GaussianActor(nn.Module):
    """Mean tanh(MLP(s)) and an (unclamped) state-independent log-std; parameter tree = iql.py's GaussianActor."""
    act_dim: int
    hidden: tuple
    orthogonal: bool = False
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs):
        x = obs
        for h in self.hidden:
            x = nn.relu(TorchLinear(h, self.orthogonal, precision=self.precision)(x))
        mean = jnp.tanh(TorchLinear(self.act_dim, self.orthogonal, precision=self.precision)(x))
        log_std = self.param("log_std", nn.initializers.zeros, (self.act_dim,))
        return mean, log_std


class QNet(nn.Module):
    hidden: tuple
    orthogonal: bool = False
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs, act):
        x = jnp.concatenate([obs, act], -1)
        for h in self.hidden:
            x = nn.relu(TorchLinear(h, self.orthogonal, precision=self.precision)(x))
        return TorchLinear(1, self.orthogonal, precision=self.precision)(x)[..., 0]


class VNet(nn.Module):
    """MLP value; ReLU for IQL's V, tanh for the PPO value (official ValueTanhMLP)."""
    hidden: tuple
    orthogonal: bool = False
    activation: str = "relu"
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs):
        act = nn.relu if self.activation == "relu" else jnp.tanh
        x = obs
        for h in self.hidden:
            x = act(TorchLinear(h, self.orthogonal, precision=self.precision)(x))
        return TorchLinear(1, self.orthogonal, precision=self.precision)(x)[..., 0]


def critic_ensemble(hidden: tuple, orthogonal: bool, n: int = 2, precision: str = "float32") -> nn.Module:
    """`n` Q networks with independent parameters (IQL's twin Q), output [n, ...]."""
    return nn.vmap(QNet, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                   axis_size=n)(hidden=hidden, orthogonal=orthogonal, precision=precision)


def actor_net(h: Hyper) -> GaussianActor:
    return GaussianActor(h.act_dim, h.hidden_dims, h.orthogonal_init, h.precision)


def ppo_value_net(h: Hyper) -> VNet:
    return VNet(h.value_hidden_dims, False, "tanh", h.precision)  # PyTorch-default init (official ppo_net.MLP)


def iql_networks(h: Hyper):
    return (actor_net(h), critic_ensemble(h.hidden_dims, h.orthogonal_init, precision=h.precision),
            VNet(h.hidden_dims, h.orthogonal_init, precision=h.precision))


# ---------------------------------------------------------------------------------------------- maths
def expectile_loss(u, expectile):
    """|expectile - 1[u < 0]| * u^2, elementwise (u = target - prediction)."""
    return jnp.abs(expectile - (u < 0).astype(u.dtype)) * u ** 2


def gaussian_log_prob(mean, log_std, x):
    """log N(x; mean, exp(log_std)^2) summed over the last axis."""
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z ** 2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), -1)


def gaussian_entropy(log_std):
    """Entropy of a diagonal Gaussian, summed over the last axis."""
    return jnp.sum(0.5 + 0.5 * jnp.log(2.0 * jnp.pi) + log_std, -1)


def gaussian_kl(mean, log_std, ref_mean, ref_log_std):
    """KL(N(mean, std) || N(ref_mean, ref_std)) of diagonal Gaussians, summed over the last axis."""
    var, ref_var = jnp.exp(2 * log_std), jnp.exp(2 * ref_log_std)
    return jnp.sum(ref_log_std - log_std + (var + (mean - ref_mean) ** 2) / (2 * ref_var) - 0.5, -1)


def gae(rewards, values, next_values, terminals, dones, gamma, lam):
    """Generalised advantage estimates of one rollout (time on axis 0), by a reverse lax.scan.

    delta_t = r_t + gamma (1 - terminal_t) V(s'_t) - V(s_t);  A_t = delta_t + gamma lam (1 - done_t) A_{t+1};
    `terminals` are true terminations (no bootstrap), `dones` every episode end (truncations too), and the
    trace starts from 0 after the last step of the rollout (official)."""
    deltas = rewards + gamma * (1.0 - terminals) * next_values - values

    def step(next_adv, x):
        delta, done = x
        adv = delta + gamma * lam * (1.0 - done) * next_adv
        return adv, adv
    _, adv = jax.lax.scan(step, jnp.zeros((), deltas.dtype), (deltas, dones), reverse=True)
    return adv


def reference_advantage(ref_mean, ref_log_std, actions, alpha):
    """alpha / d * [softplus(log pi_ref(a|s) + H(pi_ref(.|s)) + 4 d) - 4 d], per sample (official
    `get_reference_advantage`, before the |std(A)| factor)."""
    d = actions.shape[-1]
    x = gaussian_log_prob(ref_mean, ref_log_std, actions) + gaussian_entropy(ref_log_std)
    return alpha / d * (jax.nn.softplus(x + 4.0 * d) - 4.0 * d)


def mix_advantages(adv, adv_ref, w, broadcast_bug: bool):
    """(A + w A_ref) / (1 + w) as an [N, C] matrix whose rows belong to the N samples: C = 1 per sample
    (intended), C = N for the official [N, 1] + [N] broadcast (every row holds all N reference terms)."""
    if broadcast_bug:
        return (adv[:, None] + w * adv_ref[None, :]) / (1.0 + w)
    return ((adv + w * adv_ref) / (1.0 + w))[:, None]


def normalize_advantages(adv):
    """(A - mean) / (std + 1e-5) over all entries, std with Bessel's correction (torch.std)."""
    return (adv - adv.mean()) / (jnp.std(adv, ddof=1) + 1e-5)


def ppo_actor_loss(logp, logp_old, adv_rows, entropy, clip_ratio, entropy_coef):
    """Clipped surrogate with entropy bonus; `adv_rows` [M, C] (C = 1, or N for the broadcast variant), the loss
    averages over all M x C entries like the official code. Returns (loss, fraction of clipped ratios)."""
    ratio = jnp.exp(logp - logp_old)[:, None]
    surr1 = ratio * adv_rows
    surr2 = jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio) * adv_rows
    loss = jnp.mean(-jnp.minimum(surr1, surr2) - entropy_coef * entropy[:, None])
    return loss, jnp.mean(jnp.abs(ratio - 1.0) > clip_ratio)


def iql_actor_lr_schedule(h: Hyper):
    """IQL actor LR by update count: PyTorch CosineAnnealingLR over offline_updates (CORL), or constant."""
    period = max(h.offline_updates, 1)

    def schedule(count):
        if not h.offline_cosine:
            return jnp.asarray(h.actor_lr, jnp.float32)
        return h.actor_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(count, period) / period))
    return schedule


def iql_optimizers(h: Hyper):
    return {"actor": optax.adam(iql_actor_lr_schedule(h)), "critic": optax.adam(h.critic_lr),
            "value": optax.adam(h.value_lr)}


def ppo_optimizer(h: Hyper):
    """Global grad-norm clip then Adam (eps 1e-5) without the LR: the (decayed) LR is applied in `adam_step`."""
    return optax.chain(optax.clip_by_global_norm(h.max_grad_norm), optax.scale_by_adam(eps=h.adam_eps))


class RewardScaler:
    """Official RewardScaling: r / (std + 1e-8), std = running std of R <- gamma R + r (RunningMeanStd with its
    quirks: S starts at 1, std stays 1 after the first value). Plain floats on the host; state is a dict."""

    def __init__(self, gamma: float, state: Optional[dict] = None):
        self.gamma = gamma
        self.n, self.mean, self.S, self.std, self.R = 0, 0.0, 1.0, 1.0, 0.0
        if state is not None:
            self.n, self.mean, self.S, self.std, self.R = (state[k] for k in ("n", "mean", "S", "std", "R"))

    def __call__(self, r: float) -> float:
        self.R = self.gamma * self.R + r
        self.n += 1
        if self.n == 1:
            self.mean = self.R
        else:
            old = self.mean
            self.mean = old + (self.R - old) / self.n
            self.S = self.S + (self.R - old) * (self.R - self.mean)
            self.std = math.sqrt(self.S / self.n)
        return r / (self.std + 1e-8)

    def reset(self):
        self.R = 0.0

    def state(self) -> dict:
        return {"n": self.n, "mean": self.mean, "S": self.S, "std": self.std, "R": self.R}


def reevaluation_targets(rewards, terminals, timeouts, gamma: float, across_timeouts: bool, dynamic_scaling: bool):
    """(Monte-Carlo returns the value is re-evaluated on, reward scaler to continue online).

    Default: episodes end at terminals and timeouts; with `dynamic_scaling` every reward is scaled and the
    scaler's return is reset after each episode end. `across_timeouts` is the official processing: only
    terminals end episodes, and a terminal transition resets the scaler and keeps its raw reward."""
    rewards = np.asarray(rewards, np.float64).copy()
    terminals, timeouts = np.asarray(terminals, bool), np.asarray(timeouts, bool)
    ends = terminals if across_timeouts else terminals | timeouts
    scaler = RewardScaler(gamma)
    if dynamic_scaling:
        for i in range(len(rewards)):
            if across_timeouts and ends[i]:
                scaler.reset()
                continue
            rewards[i] = scaler(float(rewards[i]))
            if ends[i]:
                scaler.reset()
    return data.monte_carlo_returns(rewards, ends, gamma), scaler


# ---------------------------------------------------------------------------------------------- state
class Trainable(NamedTuple):
    """Parameters and optimiser state (a TrainState without functions, so states stay plain pytrees)."""
    params: Any
    opt_state: Any


class IQLState(NamedTuple):
    """Phase 1 (same layout as algorithms/iql.py's IQLState)."""
    actor: Trainable
    critic: Trainable  # twin Q, leading axis 2
    value: Trainable
    critic_target: Any
    key: jax.Array  # RNG of the updates (batch sampling)
    updates: jax.Array
    obs_mean: jax.Array
    obs_std: jax.Array


class ReevalState(NamedTuple):
    """Phase 2: the actor is fixed (opt_state empty), V is regressed on Monte-Carlo returns."""
    actor: Trainable
    value: Trainable  # tanh V, Adam(reevaluation_lr)
    key: jax.Array
    obs_mean: jax.Array
    obs_std: jax.Array


class PPOState(NamedTuple):
    """Phase 3."""
    actor: Trainable  # Gaussian actor, clip + Adam(eps 1e-5)
    value: Trainable  # tanh V, clip + Adam(eps 1e-5)
    ref_actor: Any  # reference policy parameters (best evaluated policy so far)
    key: jax.Array  # RNG of the minibatch permutations
    obs_mean: jax.Array
    obs_std: jax.Array


class Buffer(NamedTuple):
    obs: jax.Array
    act: jax.Array
    rew: jax.Array
    next_obs: jax.Array
    done: jax.Array  # 1.0 for true terminations only


class Rollout(NamedTuple):
    obs: jax.Array  # [N, obs_dim] raw states
    act: jax.Array  # [N, act_dim] executed (clipped) actions
    logp: jax.Array  # [N, act_dim] per-dimension log pi_old(a|s)
    rew: jax.Array  # [N] (scaled) rewards
    next_obs: jax.Array  # [N, obs_dim]
    terminal: jax.Array  # [N] true termination (official dw)
    done: jax.Array  # [N] episode end, truncation included


def init_iql_state(h: Hyper, key, obs_mean, obs_std) -> IQLState:
    actor, critic, value = iql_networks(h)
    k_actor, k_critic, k_value, key = jax.random.split(key, 4)
    o, a = jnp.zeros((1, h.obs_dim)), jnp.zeros((1, h.act_dim))
    params = {"actor": actor.init(k_actor, o)["params"], "critic": critic.init(k_critic, o, a)["params"],
              "value": value.init(k_value, o)["params"]}
    txs = iql_optimizers(h)
    tr = {k: Trainable(p, txs[k].init(p)) for k, p in params.items()}
    return IQLState(tr["actor"], tr["critic"], tr["value"], params["critic"], key, jnp.zeros((), jnp.int32),
                    jnp.asarray(obs_mean, jnp.float32), jnp.asarray(obs_std, jnp.float32))


def init_ppo_value(h: Hyper, key):
    return ppo_value_net(h).init(key, jnp.zeros((1, h.obs_dim)))["params"]


def make_reeval_state(h: Hyper, actor_params, value_params, key, obs_mean, obs_std) -> ReevalState:
    value = Trainable(value_params, optax.adam(h.reevaluation_lr).init(value_params))
    return ReevalState(Trainable(actor_params, ()), value, key, jnp.asarray(obs_mean, jnp.float32),
                       jnp.asarray(obs_std, jnp.float32))


def cap_log_std(actor_params, std_cap: float):
    """Official `reset_std`: log_std <- min(log_std, log(std_cap)) elementwise (std_cap 0 = unchanged)."""
    if std_cap <= 0:
        return actor_params
    return {**actor_params, "log_std": jnp.minimum(actor_params["log_std"], math.log(std_cap))}


def make_ppo_state(h: Hyper, actor_params, value_params, key, obs_mean, obs_std) -> PPOState:
    tx = ppo_optimizer(h)
    return PPOState(Trainable(actor_params, tx.init(actor_params)), Trainable(value_params, tx.init(value_params)),
                    actor_params, key, jnp.asarray(obs_mean, jnp.float32), jnp.asarray(obs_std, jnp.float32))


def _step(trainable: Trainable, grads, tx) -> Trainable:
    updates, opt_state = tx.update(grads, trainable.opt_state, trainable.params)
    return Trainable(optax.apply_updates(trainable.params, updates), opt_state)


def adam_step(trainable: Trainable, grads, tx, lr) -> Trainable:
    """One step of `tx` (clip + Adam direction) scaled by the (traced) learning rate `lr`."""
    updates, opt_state = tx.update(grads, trainable.opt_state, trainable.params)
    return Trainable(jax.tree.map(lambda p, u: p - lr * u, trainable.params, updates), opt_state)


# ---------------------------------------------------------------------------------------------- phase 1: IQL
def iql_update(state: IQLState, batch: Buffer, h: Hyper):
    """One IQL step: V (expectile), Q (TD to pre-update V(s')), target EMA, actor (AWR). Pure.

    L_V = mean |expectile - 1[u < 0]| u^2,  u = min_i Qbar_i(s,a) - V(s);
    L_Q = mean_i mean (Q_i(s,a) - r - gamma (1-d) V_old(s'))^2;  Qbar <- tau Q + (1 - tau) Qbar;
    L_pi = mean min(exp(beta u), exp_adv_max) * -log pi(a|s)  (u from the V step, detached)."""
    actor, critic, value = iql_networks(h)
    txs = iql_optimizers(h)
    obs = (batch.obs - state.obs_mean) / state.obs_std
    next_obs = (batch.next_obs - state.obs_mean) / state.obs_std

    target_q = critic.apply({"params": state.critic_target}, obs, batch.act).min(0)
    next_v = value.apply({"params": state.value.params}, next_obs)  # pre-update V(s'), no gradient

    def value_loss(p):
        v = value.apply({"params": p}, obs)
        adv = target_q - v
        return expectile_loss(adv, h.expectile).mean(), (adv, v)

    (v_loss, (adv, v)), v_grads = jax.value_and_grad(value_loss, has_aux=True)(state.value.params)
    value_tr = _step(state.value, v_grads, txs["value"])

    y = batch.rew + h.discount * (1.0 - batch.done) * next_v

    def critic_loss(p):
        q = critic.apply({"params": p}, obs, batch.act)
        return ((q - y) ** 2).mean(1).mean(), q

    (q_loss, q), q_grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic.params)
    critic_tr = _step(state.critic, q_grads, txs["critic"])
    critic_target = optax.incremental_update(critic_tr.params, state.critic_target, h.tau)

    weights = jnp.minimum(jnp.exp(h.beta * jax.lax.stop_gradient(adv)), h.exp_adv_max)

    def actor_loss(p):
        mean, log_std = actor.apply({"params": p}, obs)
        log_std = jnp.clip(log_std, IQL_LOG_STD_MIN, LOG_STD_MAX)
        return (weights * -gaussian_log_prob(mean, log_std, batch.act)).mean()

    a_loss, a_grads = jax.value_and_grad(actor_loss)(state.actor.params)
    lr = iql_actor_lr_schedule(h)(state.actor.opt_state[0].count)
    actor_tr = _step(state.actor, a_grads, txs["actor"])
    metrics = {"value_loss": v_loss, "critic_loss": q_loss, "actor_loss": a_loss, "v": v.mean(), "q": q.mean(),
               "adv": adv.mean(), "adv_weight": weights.mean(), "actor_lr": lr}
    return state._replace(actor=actor_tr, critic=critic_tr, value=value_tr, critic_target=critic_target,
                          updates=state.updates + 1), metrics


# Multi-seed: every state leaf carries a leading seed axis; the dataset rows are shared (in_axes None). One
# seed's numbers equal a single-seed run's up to float32 round-off (XLA sums batched matmuls in another order).
@partial(jax.jit, static_argnames=("h",))
def scan_offline_updates(state: IQLState, buffer: Buffer, h: Hyper):
    """`h.update_block` IQL updates per seed in one lax.scan (vmapped over seeds), batches drawn inside the scan;
    metrics of shape [seeds, h.update_block]."""
    size = buffer.rew.shape[0]

    def one(state, _):
        key, k_idx = jax.random.split(state.key)
        idx = jax.random.randint(k_idx, (h.iql_batch_size,), 0, size)
        return iql_update(state._replace(key=key), jax.tree.map(lambda x: x[idx], buffer), h)

    def one_seed(state):
        return jax.lax.scan(one, state, None, length=h.update_block)
    return jax.vmap(one_seed)(state)


# ---------------------------------------------------------------------------------------------- phase 2: V
def reeval_update(state: ReevalState, obs, returns, h: Hyper):
    """One regression step of V on Monte-Carlo returns: MSE(V(s), G) on a uniform batch."""
    key, k_idx = jax.random.split(state.key)
    idx = jax.random.randint(k_idx, (h.reevaluation_batch_size,), 0, returns.shape[0])
    o = (obs[idx] - state.obs_mean) / state.obs_std
    g = returns[idx]

    def loss(p):
        v = ppo_value_net(h).apply({"params": p}, o)
        return ((v - g) ** 2).mean(), v

    (v_loss, v), grads = jax.value_and_grad(loss, has_aux=True)(state.value.params)
    value_tr = _step(state.value, grads, optax.adam(h.reevaluation_lr))
    return state._replace(value=value_tr, key=key), {"value_loss": v_loss, "v": v.mean(), "mc_return": g.mean()}


@partial(jax.jit, static_argnames=("h",))
def scan_reevaluation_updates(state: ReevalState, obs, returns, h: Hyper):
    """`h.update_block` re-evaluation steps per seed in one lax.scan (vmapped over seeds; the dataset's states and
    Monte-Carlo returns shared); metrics of shape [seeds, h.update_block]."""
    def one_seed(state):
        return jax.lax.scan(lambda s, _: reeval_update(s, obs, returns, h), state, None, length=h.update_block)
    return jax.vmap(one_seed)(state)


# ---------------------------------------------------------------------------------------------- phase 3: PPO
def ppo_dist(actor_params, obs, h: Hyper):
    mean, log_std = actor_net(h).apply({"params": actor_params}, obs)
    return mean, jnp.clip(log_std, PPO_LOG_STD_MIN, LOG_STD_MAX)


def rollout_advantages(state: PPOState, roll: Rollout, env_steps, h: Hyper):
    """(advantage matrix [N, C] after the reference mixing and normalisation, V targets [N], diagnostics)."""
    value = ppo_value_net(h)
    obs = (roll.obs - state.obs_mean) / state.obs_std
    next_obs = (roll.next_obs - state.obs_mean) / state.obs_std
    v = value.apply({"params": state.value.params}, obs)
    v_next = value.apply({"params": state.value.params}, next_obs)
    adv = gae(roll.rew, v, v_next, roll.terminal, roll.done, h.discount, h.gae_lambda)
    v_target = adv + v
    t = jnp.asarray(env_steps, jnp.float32)
    if h.constrained_finetuning:
        w = jnp.maximum(1.0 - t / h.end_steps, 0.0)
        ref_mean, ref_log_std = ppo_dist(state.ref_actor, obs, h)
        adv_ref = reference_advantage(ref_mean, ref_log_std, roll.act, h.alpha) * jnp.abs(jnp.std(adv, ddof=1))
        mixed = mix_advantages(adv, adv_ref, w, h.reference_advantage_broadcast_bug)
    else:
        w, adv_ref, mixed = jnp.zeros(()), jnp.zeros_like(adv), adv[:, None]
    if h.adv_norm:
        mixed = normalize_advantages(mixed)
    info = {"w_t": w, "adv_ref": adv_ref.mean(), "adv_gae": adv.mean(), "adv_gae_std": jnp.std(adv, ddof=1),
            "v": v.mean(), "v_target": v_target.mean()}
    return mixed, v_target, obs, info


def ppo_update_one(state: PPOState, roll: Rollout, env_steps, h: Hyper):
    """One PPO update of one seed on a full rollout collected before env step `env_steps`: advantages, then
    `h.ppo_epochs` epochs of shuffled minibatches (nested lax.scan), actor step then value step per minibatch:

    L_pi = -mean min(rho A, clip(rho, 1 - clip_ratio, 1 + clip_ratio) A) - entropy_coef * H,  rho = pi / pi_old;
    L_V = mean (V target - V(s))^2; clipped Adam steps times lr (1 - (t - rollout_length) / online_steps)."""
    value = ppo_value_net(h)
    tx = ppo_optimizer(h)
    adv, v_target, obs, info = rollout_advantages(state, roll, env_steps, h)
    t = jnp.asarray(env_steps, jnp.float32)
    # official lr_decay(t) runs after each update: the update at env step t uses lr (1 - (t - N) / online_steps)
    frac = jnp.maximum(1.0 - (t - h.rollout_length) / max(h.online_steps, 1), 0.0) if h.lr_decay else jnp.ones(())
    logp_old = roll.logp.sum(-1)

    def minibatch(carry, idx):
        actor_tr, value_tr = carry
        o, a, lo, rows, vt = obs[idx], roll.act[idx], logp_old[idx], adv[idx], v_target[idx]

        def actor_loss(p):
            mean, log_std = ppo_dist(p, o, h)
            logp = gaussian_log_prob(mean, log_std, a)
            entropy = jnp.broadcast_to(gaussian_entropy(log_std), logp.shape)
            loss, clip_frac = ppo_actor_loss(logp, lo, rows, entropy, h.clip_ratio, h.entropy_coef)
            return loss, {"clip_frac": clip_frac, "entropy": entropy.mean(), "approx_kl": (lo - logp).mean()}

        (a_loss, a_info), a_grads = jax.value_and_grad(actor_loss, has_aux=True)(actor_tr.params)
        actor_tr = adam_step(actor_tr, a_grads, tx, h.ppo_actor_lr * frac)

        def critic_loss(p):
            return ((vt - value.apply({"params": p}, o)) ** 2).mean()

        c_loss, c_grads = jax.value_and_grad(critic_loss)(value_tr.params)
        value_tr = adam_step(value_tr, c_grads, tx, h.ppo_critic_lr * frac)
        return (actor_tr, value_tr), {"actor_loss": a_loss, "critic_loss": c_loss, **a_info}

    def epoch(carry, key):
        perm = jax.random.permutation(key, h.rollout_length).reshape(-1, h.minibatch_size)
        return jax.lax.scan(minibatch, carry, perm)

    key, sub = jax.random.split(state.key)
    (actor_tr, value_tr), metrics = jax.lax.scan(epoch, (state.actor, state.value), jax.random.split(sub, h.ppo_epochs))
    mean, log_std = ppo_dist(actor_tr.params, obs, h)
    ref_mean, ref_log_std = ppo_dist(state.ref_actor, obs, h)
    metrics = {k: v.mean() for k, v in metrics.items()}
    metrics.update(info, kl_to_ref=gaussian_kl(mean, log_std, ref_mean, ref_log_std).mean(),
                   std=jnp.exp(log_std).mean(), lr_frac=frac)
    return state._replace(actor=actor_tr, value=value_tr, key=key), metrics


@partial(jax.jit, static_argnames=("h",))
def ppo_update(state: PPOState, rolls: Rollout, env_steps, which, h: Hyper):
    """PPO updates of the seeds `which` (indices into the seed axis; `rolls` and `env_steps` are theirs, in that
    order), vmapped over them; the other seeds keep their state. Metrics of shape [len(which)]. Updating only
    the seeds whose rollout is full (not a masked update of all) saves the compute of the others; the length
    of `which` is static, so there is one compiled program per number of seeds updated together."""
    sub = jax.tree.map(lambda x: x[which], state)
    new, metrics = jax.vmap(lambda s, r, t: ppo_update_one(s, r, t, h))(sub, rolls, env_steps)
    return jax.tree.map(lambda x, y: x.at[which].set(y), state, new), metrics


# ---------------------------------------------------------------------------------------------- acting
@partial(jax.jit, static_argnames=("h",))
def act_explore(actor_params, obs_mean, obs_std, obs, keys, active, h: Hyper):
    """All seeds' actions in one call per env step: a ~ N(mu(s), sigma^2) clipped to [-1, 1] and its
    per-dimension log-prob. A seed's key advances only when it is `active` (so its action sequence does not
    depend on the other seeds)."""
    def one(params, mean_, std_, o, key, act):
        new_key, sub = jax.random.split(key)
        mean, log_std = ppo_dist(params, (o - mean_) / std_, h)
        action = jnp.clip(mean + jnp.exp(log_std) * jax.random.normal(sub, mean.shape), -1.0, 1.0)
        logp = -0.5 * ((action - mean) * jnp.exp(-log_std)) ** 2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi)
        return action, logp, jnp.where(act, new_key, key)
    return jax.vmap(one)(actor_params, obs_mean, obs_std, obs, keys, active)


@partial(jax.jit, static_argnames=("h",))
def act_deterministic(actor_params, obs_mean, obs_std, obs, h: Hyper):
    """Mean action of one seed's actor (evaluation)."""
    mean, _ = actor_net(h).apply({"params": actor_params}, (obs - obs_mean) / obs_std)
    return jnp.clip(mean, -1.0, 1.0)


@partial(jax.jit, static_argnames=("h",))
def act_deterministic_with_value(actor_params, value_params, obs_mean, obs_std, obs, h: Hyper):
    """Mean action and V(s) of one seed (evaluation)."""
    o = (obs - obs_mean) / obs_std
    mean, _ = actor_net(h).apply({"params": actor_params}, o)
    return jnp.clip(mean, -1.0, 1.0), ppo_value_net(h).apply({"params": value_params}, o)


def evaluate(env, policy, episodes: int, seed: int, terminate_on_success: bool, goal_task: bool, refs,
             discount: float):
    """Deterministic evaluation: `episodes` episodes, the first reset seeded with `seed` (reproducible).
    `policy(obs) -> (action, V(obs) or None)`; with values, logs V at the start states and along the episodes."""
    returns, disc_returns, lengths, successes, v_start, v_all = [], [], [], [], [], []
    has_success = goal_task
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed if ep == 0 else None)
        ret, disc, length, success, done = 0.0, 0.0, 0, False, False
        while not done:
            action, value = policy(np.asarray(obs, np.float32))
            if value is not None:
                v_all.append(float(value))
                if length == 0:
                    v_start.append(float(value))
            obs, r, term, trunc, info = env.step(np.asarray(action))
            ret, disc, length = ret + float(r), disc + discount ** length * float(r), length + 1
            if "success" in info:
                has_success = True
                success = success or bool(info["success"])
            if goal_task and r > 0:
                success = True
            done = term or trunc or (terminate_on_success and bool(info.get("success", False)))
        returns.append(ret)
        disc_returns.append(disc)
        lengths.append(length)
        successes.append(success)
    out = {"return": float(np.mean(returns)), "return_std": float(np.std(returns)),
           "discounted_return": float(np.mean(disc_returns)), "length": float(np.mean(lengths)), "episodes": episodes}
    if refs is not None:
        scores = data.normalized_score("", returns, refs)
        out["normalized_score"] = float(np.mean(scores))
        out["normalized_score_std"] = float(np.std(scores))
    if has_success:
        out["success_rate"] = float(np.mean(successes))
    if v_all:
        out["value_start"] = float(np.mean(v_start))
        out["value_mean"] = float(np.mean(v_all))
    return out



# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig) -> dict:
    """IQL pre-training, value re-evaluation, constrained PPO of `num_seeds` seeds at once; returns the last
    evaluation record(s) and paths."""
    from tqdm import tqdm

    t_start = time.time()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    N = len(seeds)
    cfg.name = cfg.name or f"o2ppo-{cfg.dataset_id.replace('/', '-')}-seed{cfg.seed}" + (f"x{N}" if N > 1 else "")
    if cfg.value_alignment:
        print("note: value_alignment has no effect in O2PPO (the official O2PPO has no value-alignment step)")
    with Run(cfg, run_dir) as run:  # checks that need no data, before any slow work; see Run
        if run.offline_from is not None:
            check_offline_source(cfg, run.offline_from, seeds)
        world = load_world(cfg, N)
        h, keys = world.h, seed_keys(seeds)
        state, prog = start_or_resume(cfg, run, world, keys, seeds)
        rec = Recorder(cfg, run_dir, seeds, world, prog, t_start)
        act_key = jnp.asarray(prog.act_key)

        # ---- phase 1: offline IQL pre-training (all seeds in one vmapped scan per block), or a loaded actor
        if prog.phase == "offline":
            rows = world.iql_rows(cfg)
            bar = tqdm(total=cfg.offline_updates, initial=int(prog.updates[0]), desc="O2PPO offline IQL", mininterval=5)
            while prog.updates[0] < cfg.offline_updates:
                state, metrics = scan_offline_updates(state, rows, h)
                logged = block_metrics(metrics, cfg.update_block, "offline", seeds, prog.updates)
                prog.updates += cfg.update_block
                bar.update(cfg.update_block)
                rec.logger.log({**logged, "offline/updates": int(prog.updates[0])})
                if prog.updates[0] % cfg.offline_eval_every == 0 or prog.updates[0] == cfg.offline_updates:
                    rec.evaluate(state, prog, "offline")
                    bar.set_postfix(score=rec.score(prog))
                    if prog.updates[0] < cfg.offline_updates:
                        rec.checkpoint(state, prog, act_key)
                if run.stop and prog.updates[0] < cfg.offline_updates:
                    rec.checkpoint(state, prog, act_key)
                    run.interrupt_if_asked(f"after {int(prog.updates[0])} offline updates")
            bar.close()
            del rows
            if prog.last_eval[0] is None:  # offline_updates == 0: still report the starting policy
                rec.evaluate(state, prog, "offline")
            rec.checkpoint(state, prog, act_key, "offline")
            state = start_finetuning(cfg, world, keys, prog, state.actor.params, state.obs_mean, state.obs_std)
            rec.checkpoint(state, prog, act_key)
            run.interrupt_if_asked("after the offline phase")
        elif prog.phase == "load_offline":
            rec.evaluate(state, prog, "offline")  # the score before fine-tuning (actor only)
            state = start_finetuning(cfg, world, keys, prog, state.actor.params, state.obs_mean, state.obs_std)
            rec.checkpoint(state, prog, act_key)
            run.interrupt_if_asked("after loading the offline actor")

        # ---- phase 2: value re-evaluation on the dataset's Monte-Carlo returns (all seeds in one vmapped scan)
        if prog.phase == "reevaluation":
            obs, returns = jnp.asarray(world.ds.observations, jnp.float32), jnp.asarray(world.mc_targets, jnp.float32)
            bar = tqdm(total=cfg.reevaluation_updates, initial=int(prog.reeval_updates[0]),
                       desc="O2PPO value re-evaluation", mininterval=5)
            while prog.reeval_updates[0] < cfg.reevaluation_updates:
                state, metrics = scan_reevaluation_updates(state, obs, returns, h)
                logged = block_metrics(metrics, cfg.update_block, "reevaluation", seeds, prog.reeval_updates)
                prog.reeval_updates += cfg.update_block
                bar.update(cfg.update_block)
                done = int(prog.reeval_updates[0])
                rec.logger.log({**logged, "reevaluation/updates": done})
                if done % cfg.reevaluation_eval_every == 0 or done == cfg.reevaluation_updates:
                    rec.evaluate(state, prog, "reevaluation", value_loss=np.asarray(metrics["value_loss"]).mean(1))
                    bar.set_postfix(value_loss=logged["reevaluation/value_loss"],
                                    v_start=np.mean([r.get("value_start", np.nan) for r in prog.last_eval]))
                    if done < cfg.reevaluation_updates:
                        rec.checkpoint(state, prog, act_key)
                if run.stop and done < cfg.reevaluation_updates:
                    rec.checkpoint(state, prog, act_key)
                    run.interrupt_if_asked(f"after {done} re-evaluation updates")
            bar.close()
            del obs, returns
            state = start_online(cfg, world, keys, prog, state.actor.params, state.value.params, state.obs_mean,
                                 state.obs_std)
            rec.checkpoint(state, prog, act_key)
            run.interrupt_if_asked("before online fine-tuning")

        # ---- phase 3: constrained PPO fine-tuning, then the final evaluation
        if prog.phase == "online":
            finetune(cfg, world, run, rec, state, prog, act_key, seeds)
        elif prog.phase == "done":
            print(f"run in {run_dir} already finished")
        rec.logger.close()
        world.close()
        summaries = [summarize(path) for path in rec.logger.eval_paths]
        out = {"run_dir": str(run_dir), "seeds": seeds, "last_eval": prog.last_eval[0], "updates": int(prog.updates[0]),
               "reevaluation_updates": int(prog.reeval_updates[0]), "ppo_updates": int(prog.ppo_updates[0]),
               "env_steps": int(prog.env_steps[0]), **summaries[0]}
        if N > 1:
            out.update(last_eval=prog.last_eval, updates=prog.updates.tolist(),
                       reevaluation_updates=prog.reeval_updates.tolist(), ppo_updates=prog.ppo_updates.tolist(),
                       env_steps=prog.env_steps.tolist(), per_seed=summaries)
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
        print(f"[eval] seed {record['seed']} {record['phase']} updates={record['updates']} "
              f"env_steps={record['env_steps']}: "
              f"{'normalized score' if 'normalized_score' in record else 'return'} {score:.2f}{extra}", flush=True)

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


def ppo_metrics(metrics: dict, seeds: list, env_steps: list) -> dict:
    """Means over the updated seeds of one PPO call's metrics ([updated seeds] each); a NaN/inf stops the run
    naming the loss, the seed and the env step of the update."""
    host = {k: np.asarray(v) for k, v in metrics.items()}
    for j, (seed, t) in enumerate(zip(seeds, env_steps)):
        bad = [f"online/{k} = {v[j]}" for k, v in host.items() if not np.isfinite(v[j])]
        if bad:
            raise FloatingPointError(f"non-finite {', '.join(bad)} (seed {seed}) at the PPO update at env step {t}; "
                                     "stopping (the last checkpoint is intact)")
    return {f"online/{k}": float(v.mean()) for k, v in host.items()}



# ---------------------------------------------------------------------------------------------- offline sources
def check_offline_source(cfg: TrainConfig, src: Path, seeds: list):
    """Checks of the intact --offline_checkpoint `src` that need only its meta.json and config.yaml (before any
    data is loaded): a multi-seed checkpoint must hold every seed of this run, and several seeds need a checkpoint
    of as many (one seed may start from any seed of a multi-seed checkpoint: its --seed)."""
    import yaml
    n_src, N = int(load_meta(src).get("num_seeds", 1)), len(seeds)
    if N > 1 and n_src != N:
        raise RunError(f"--offline_checkpoint {src} holds {n_src} seed(s), this run trains {N}; run it with "
                       f"--num_seeds {n_src} (and the same --seed), or one seed with --num_seeds 1")
    src_cfg = yaml.safe_load((src / "config.yaml").read_text()) or {}
    first = int(src_cfg.get("seed", 0))
    if n_src > 1 and not (first <= seeds[0] and seeds[-1] < first + n_src):
        raise RunError(f"--offline_checkpoint {src} holds seeds {first}..{first + n_src - 1} (--num_seeds "
                       f"{n_src}); run O2PPO with --seed (and --num_seeds) among them")
    src_ds = src_cfg.get("dataset_id")
    if src_ds and src_ds != cfg.dataset_id:
        print(f"warning: the offline checkpoint was trained on {src_ds}, fine-tuning on {cfg.dataset_id}")


def load_offline_actor(path: Path, h: Hyper, seed: int):
    """(actor params, obs_mean, obs_std, IQL updates) from an offline checkpoint of this script or of
    algorithms/iql.py (any state with `.actor.params` = a Gaussian actor tree, and `.obs_mean` / `.obs_std`).
    A multi-seed checkpoint (--num_seeds N of either script, leading seed axis) gives the actor of seed `seed`."""
    with np.load(path / "state.npz") as z:
        arrays = {name[4:]: z[name] for name in z.files}  # strip the 4-digit leaf index of save_tree
    meta = load_meta(path)
    n_src, index = int(meta.get("num_seeds", 1)), 0
    if n_src > 1:
        import yaml
        first = int((yaml.safe_load((path / "config.yaml").read_text()) or {}).get("seed", 0))
        index = seed - first
        if not 0 <= index < n_src:
            raise RunError(f"--offline_checkpoint {path} holds seeds {first}..{first + n_src - 1} (--num_seeds "
                           f"{n_src}); run O2PPO with --seed (and --num_seeds) among them")
        arrays = {k: v[index] for k, v in arrays.items()}
        print(f"using seed {seed} of the {n_src}-seed checkpoint {path}")
    prefix = ".actor.params"
    found = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    what = (f"--offline_checkpoint {path}: O2PPO needs a Gaussian actor with a tanh-mean MLP of hidden widths "
            f"{list(h.hidden_dims)} and a state-independent log_std (this script's or algorithms/iql.py's checkpoints)")
    if not found:
        raise RunError(f"{what}, but the checkpoint holds no '.actor.params' (names: {sorted(arrays)[:6]} ...)")
    template = jax.eval_shape(lambda: actor_net(h).init(jax.random.PRNGKey(0), jnp.zeros((1, h.obs_dim)))["params"])
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = {jax.tree_util.keystr(k): ref for k, ref in flat}
    if set(found) != set(expected):
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise RunError(f"{what}; its actor differs: missing {missing}, unexpected {unexpected} (a different actor "
                       "type, e.g. a tanh-Gaussian SAC/CQL actor, or a different number of hidden layers: set "
                       "hidden_dims to the checkpoint's)")
    leaves = []
    for k, ref in flat:
        name = jax.tree_util.keystr(k)
        arr = found[name]
        if arr.shape != ref.shape:
            raise RunError(f"{what}; actor{name} has shape {arr.shape}, this config needs {ref.shape}: the "
                           "checkpoint was trained on other observation/action sizes or other hidden_dims (this "
                           f"dataset: obs {h.obs_dim}, action {h.act_dim}; hidden_dims {list(h.hidden_dims)})")
        leaves.append(jnp.asarray(arr, jnp.float32))
    stats = []
    for name in (".obs_mean", ".obs_std"):
        if name not in arrays:
            raise RunError(f"{what}; the checkpoint has no '{name}' (the state normalisation the actor was "
                           "trained with)")
        if arrays[name].shape != (h.obs_dim,):
            raise RunError(f"{what}; its {name[1:]} has shape {arrays[name].shape}, this dataset has "
                           f"{h.obs_dim}-dimensional observations")
        stats.append(jnp.asarray(arrays[name], jnp.float32))
    updates = np.ravel(meta.get("updates", 0))  # iql.py: one count per seed
    updates = int(updates[index] if updates.size > 1 else updates[0])
    return jax.tree_util.tree_unflatten(treedef, leaves), stats[0], stats[1], updates



# ---------------------------------------------------------------------------------------------- run support
def default_run_dir(cfg) -> Path:
    seeds = f"seed{cfg.seed}" if cfg.num_seeds == 1 else f"seeds{cfg.seed}-{cfg.seed + cfg.num_seeds - 1}"
    return Path("runs") / "o2ppo" / cfg.dataset_id.replace("/", "_") / seeds


def score_of(record: dict) -> float:
    return record.get("normalized_score", record["return"])


def reference_weight(cfg: TrainConfig, env_steps: int) -> float:
    """w_t of the reference advantage at env step t (0 without constrained fine-tuning), as in rollout_advantages."""
    return max(1.0 - env_steps / cfg.end_steps, 0.0) if cfg.constrained_finetuning else 0.0


class World(NamedTuple):
    """What a run trains on: the dataset (host arrays; each phase puts the rows it needs on device), the envs (one
    training env per seed, one evaluation env), the static hyper-parameters and the value re-evaluation's targets."""
    ds: Any  # data.OfflineData
    envs: list
    eval_env: Any
    h: Hyper
    obs_mean: np.ndarray
    obs_std: np.ndarray
    mc_targets: np.ndarray  # Monte-Carlo returns V is re-evaluated on
    dataset_scaler: RewardScaler  # the reward scaler after its pass over the dataset (continued online)
    refs: Optional[tuple]  # (ref_min, ref_max) return of the normalised score, None when the dataset has none

    def iql_rows(self, cfg: TrainConfig) -> Buffer:
        """The dataset on device with the IQL rewards (PPO and the re-evaluation use the raw rewards)."""
        ds = self.ds
        return Buffer(*(jnp.asarray(x, jnp.float32) for x in (
            ds.observations, ds.actions, ds.rewards * cfg.iql_reward_scale + cfg.iql_reward_bias,
            ds.next_observations, ds.terminals)))

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
    obs_mean = ds.obs_mean if cfg.normalize else np.zeros(obs_dim, np.float32)
    obs_std = ds.obs_std if cfg.normalize else np.ones(obs_dim, np.float32)
    mc_targets, dataset_scaler = reevaluation_targets(ds.rewards, ds.terminals, ds.timeouts, cfg.discount,
                                                      cfg.mc_returns_across_timeouts, cfg.dynamic_reward_scaling)
    return World(ds, envs, eval_env, make_hyper(cfg, obs_dim, act_dim), obs_mean, obs_std, mc_targets,
                 dataset_scaler, refs)


class SeedKeys(NamedTuple):
    """Each seed's RNG streams (one entry per seed), those of its single-seed run."""
    iql: tuple  # IQL init and batch sampling
    value_init: tuple  # the PPO V's init
    reeval_updates: tuple  # re-evaluation batch sampling
    ppo: tuple  # PPO minibatch permutations


def seed_keys(seeds: list) -> SeedKeys:
    k_iql, k_reeval, k_ppo = zip(*[[jax.random.fold_in(jax.random.PRNGKey(s), i) for i in range(3)] for s in seeds])
    k_value_init, k_reeval_updates = zip(*[jax.random.split(k) for k in k_reeval])
    return SeedKeys(k_iql, k_value_init, k_reeval_updates, k_ppo)


def phase_template(kind: str, world: World, keys: SeedKeys):
    """A state of type `kind` (iql | reeval | ppo) for every seed (leading seed axis): the fresh IQL state, or the
    structure a checkpoint of a later phase is loaded into."""
    h, N = world.h, len(keys.iql)
    if kind == "iql":
        return stack_seeds([init_iql_state(h, keys.iql[i], world.obs_mean, world.obs_std) for i in range(N)])
    actor = actor_net(h).init(jax.random.PRNGKey(0), jnp.zeros((1, h.obs_dim)))["params"]
    if kind == "reeval":
        return stack_seeds([make_reeval_state(h, actor, init_ppo_value(h, keys.value_init[i]), keys.reeval_updates[i],
                                              world.obs_mean, world.obs_std) for i in range(N)])
    return stack_seeds([make_ppo_state(h, actor, init_ppo_value(h, keys.value_init[i]), keys.ppo[i], world.obs_mean,
                                       world.obs_std) for i in range(N)])


@dataclass
class Progress:
    """Per-seed bookkeeping (one entry per seed) and the host state of a run: the checkpoint's meta.json."""
    phase: str  # offline | load_offline | reevaluation | online | done
    kind: str  # type of the state: iql | reeval | ppo
    num_seeds: int
    updates: np.ndarray  # IQL gradient steps done
    reeval_updates: np.ndarray  # re-evaluation gradient steps done
    ppo_updates: np.ndarray  # PPO minibatch steps done
    env_steps: np.ndarray  # online env steps done
    episodes: np.ndarray  # online episodes finished
    eval_lines: np.ndarray  # lines of each seed's eval.jsonl that this state has logged
    online_evals: np.ndarray  # online evaluations done
    last_eval_step: np.ndarray  # env step of the last online evaluation (-1: none)
    kl_to_ref: np.ndarray  # mean KL(pi || pi_ref) after the last PPO update
    act_key: np.ndarray  # [seeds, 2] exploration RNG keys
    env_rng: list  # training-env RNG snapshots at the checkpoint (None before the first reset)
    last_eval: list  # the last evaluation record
    best_score: list  # best evaluation score so far, the reference policy's (None before fine-tuning)
    scaler: list  # reward-scaler states (None: the scaler after the dataset pass)
    rollout: list  # the partial rollout at an online checkpoint: {"count", "obs", ...} (None: empty)
    wandb_id: Optional[str] = None
    wall_time: float = 0.0  # seconds of run time before this attempt

    COUNTERS = ("updates", "reeval_updates", "ppo_updates", "env_steps", "episodes", "eval_lines", "online_evals",
                "last_eval_step")

    @classmethod
    def start(cls, seeds: list) -> "Progress":
        N = len(seeds)
        zeros, nones = (lambda: np.zeros(N, np.int64)), (lambda: [None] * N)  # noqa: E731
        return cls("offline", "iql", N, zeros(), zeros(), zeros(), zeros(), zeros(), zeros(), zeros(),
                   np.full(N, -1, np.int64), np.zeros(N),
                   np.stack([np.asarray(jax.random.PRNGKey(s + 1)) for s in seeds]), nones(), nones(), nones(), nones(),
                   nones())

    @classmethod
    def from_meta(cls, meta: dict) -> "Progress":
        return cls(**{**meta, **{k: np.asarray(meta[k], np.int64) for k in cls.COUNTERS},
                      "kl_to_ref": np.asarray(meta["kl_to_ref"], np.float64)})

    def meta(self) -> dict:
        return {**asdict(self), **{k: getattr(self, k).tolist() for k in self.COUNTERS + ("kl_to_ref",)}}


def start_or_resume(cfg: TrainConfig, run, world: World, keys: SeedKeys, seeds: list):
    """(state, progress): fresh, or restored from run.resume_from, or the offline actor(s) of run.offline_from to
    fine-tune (in a re-evaluation state, the actor's evaluation needs only its actor and state normalisation)."""
    h, N = world.h, len(seeds)
    prog = Progress.start(seeds)
    if run.resume_from is not None:
        state, meta = load_state(run.resume_from, lambda meta: phase_template(meta["kind"], world, keys), cfg)
        prog = Progress.from_meta(meta)
        print(f"resumed from {run.resume_from}: phase {prog.phase}, {prog.updates.tolist()} IQL updates, "
              f"{prog.reeval_updates.tolist()} re-evaluation updates, {prog.env_steps.tolist()} online env steps")
    elif run.offline_from is not None:
        per_seed = [load_offline_actor(run.offline_from, h, s) for s in seeds]
        actor, om, osd = stack_seeds([(actor_params, om, osd) for actor_params, om, osd, _ in per_seed])
        state = stack_seeds([make_reeval_state(h, seed_slice(actor, i), init_ppo_value(h, keys.value_init[i]),
                                               keys.reeval_updates[i], om[i], osd[i]) for i in range(N)])
        prog.phase, prog.updates = "load_offline", np.asarray([u for *_, u in per_seed], np.int64)
        print(f"loaded the offline actor(s) from {run.offline_from} ({prog.updates.tolist()} updates)")
    else:
        state = phase_template("iql", world, keys)
    return state, prog


def start_finetuning(cfg: TrainConfig, world: World, keys: SeedKeys, prog: Progress, actor_params, om, osd):
    """Hand-off after the offline phase (per-seed arrays): the re-evaluation state, or directly the PPO state."""
    h, N = world.h, prog.num_seeds
    value_params = stack_seeds([init_ppo_value(h, keys.value_init[i]) for i in range(N)])
    if not cfg.policy_reevaluation:
        return start_online(cfg, world, keys, prog, actor_params, value_params, om, osd)
    prog.phase, prog.kind = "reevaluation", "reeval"
    return stack_seeds([make_reeval_state(h, *seed_slice((actor_params, value_params), i), keys.reeval_updates[i],
                                          *seed_slice((om, osd), i)) for i in range(N)])


def start_online(cfg: TrainConfig, world: World, keys: SeedKeys, prog: Progress, actor_params, value_params, om, osd):
    """Hand-off to PPO: log-std cap, PPO optimisers, reference := the actor, best score := the last evaluation's."""
    N = prog.num_seeds
    actor_params = cap_log_std(actor_params, cfg.std_cap)
    prog.phase, prog.kind, prog.best_score = "online", "ppo", [score_of(prog.last_eval[i]) for i in range(N)]
    return stack_seeds([make_ppo_state(world.h, *seed_slice((actor_params, value_params), i), keys.ppo[i],
                                       *seed_slice((om, osd), i)) for i in range(N)])


class Recorder:
    """Evaluations (eval.jsonl, wandb, console) and checkpoints of a run: `evaluate` and `checkpoint`. Also holds the
    reward scalers (host state continued online, saved with every checkpoint)."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, seeds: list, world: World, prog: Progress, t_start: float):
        self.cfg, self.run_dir, self.seeds, self.world, self.t_start = cfg, run_dir, seeds, world, t_start
        self.wall_before, self.goal_task = prog.wall_time, "antmaze" in cfg.dataset_id
        with open(run_dir / "config.yaml", "w") as f:
            pyrallis.dump(cfg, f)
        prog.wandb_id = prog.wandb_id or f"{cfg.name}-{int(time.time())}"
        self.logger = Logger(cfg, run_dir, seeds, prog.wandb_id, prog.eval_lines.tolist())
        self.scalers = [RewardScaler(cfg.discount, st if st is not None else world.dataset_scaler.state())
                        for st in prog.scaler]

    def record(self, state, prog: Progress, phase: str, i: int) -> dict:
        """Deterministic evaluation of seed i's actor (+ its PPO V along the episodes after the offline phase)."""
        cfg, w = self.cfg, self.world
        params, mean_, std_ = seed_slice((state.actor.params, state.obs_mean, state.obs_std), i)
        if phase == "offline":
            def policy(o):
                return act_deterministic(params, mean_, std_, o, w.h), None
        else:
            value_params = seed_slice(state.value.params, i)

            def policy(o):
                return act_deterministic_with_value(params, value_params, mean_, std_, o, w.h)
        updates = {"offline": prog.updates, "reevaluation": prog.reeval_updates, "online": prog.ppo_updates}[phase]
        record = {"seed": self.seeds[i], "phase": phase, "updates": int(updates[i]),
                  "env_steps": int(prog.env_steps[i])}
        record.update(evaluate(w.eval_env, policy, cfg.eval_episodes, cfg.eval_seed, cfg.terminate_on_success,
                               self.goal_task, w.refs, cfg.discount))
        record.update(w_t=reference_weight(cfg, int(prog.env_steps[i])), kl_to_ref=float(prog.kl_to_ref[i]))
        return record

    def log(self, prog: Progress, i: int, record: dict):
        record["wall_time"] = round(self.wall_before + time.time() - self.t_start, 2)  # s since the run started
        self.logger.log_eval(i, record)
        prog.eval_lines[i], prog.last_eval[i] = self.logger.eval_lines[i], record

    def evaluate(self, state, prog: Progress, phase: str, **per_seed):
        """Evaluate and log every seed; `per_seed` values (one per seed) are added to its record."""
        for i in range(len(self.seeds)):
            self.log(prog, i, {**self.record(state, prog, phase, i), **{k: float(v[i]) for k, v in per_seed.items()}})

    def score(self, prog: Progress, which=None) -> float:
        records = [prog.last_eval[i] for i in (range(len(self.seeds)) if which is None else which)]
        return float(np.mean([r.get("normalized_score", r["return"]) for r in records]))

    def checkpoint(self, state, prog: Progress, act_key, name: str = "latest"):
        """State + meta (with the reward scalers) atomically into checkpoints/<name>."""
        prog.act_key, prog.scaler = np.asarray(act_key), [scaler.state() for scaler in self.scalers]
        prog.wall_time = self.wall_before + time.time() - self.t_start
        save_state(self.run_dir / "checkpoints" / name, state, prog.meta(), self.cfg)


class Episodes:
    """The training envs' current episodes and each seed's rollout in progress (restored from a checkpoint's)."""

    def __init__(self, cfg: TrainConfig, h: Hyper, prog: Progress, envs: list, seeds: list):
        N = len(seeds)
        for i, env in enumerate(envs):
            if prog.env_rng[i] is not None:
                env_rng_restore(env, prog.env_rng[i], seeds[i])
        self.first_reset = np.array([snapshot is None for snapshot in prog.env_rng])
        self.roll = {k: np.zeros((N, cfg.rollout_length) + s, np.float32) for k, s in
                     (("obs", (h.obs_dim,)), ("act", (h.act_dim,)), ("logp", (h.act_dim,)), ("rew", ()),
                      ("next_obs", (h.obs_dim,)), ("terminal", ()), ("done", ()))}
        self.count = np.zeros(N, np.int64)  # each seed's steps in its current rollout
        for i, saved in enumerate(prog.rollout):
            if saved is not None:
                self.count[i] = saved["count"]
                for k in self.roll:
                    self.roll[k][i, :saved["count"]] = saved[k]
        self.obs = np.zeros((N, h.obs_dim), np.float32)
        self.at_start = np.ones(N, bool)
        self.ret, self.length, self.recent = np.zeros(N), np.zeros(N, np.int64), [[] for _ in range(N)]
        self.pending = np.zeros(N, bool)  # evaluated since the last checkpoint: checkpoint at the next episode end
        self.due = np.zeros(N, bool)  # at that episode end, waiting for the joint checkpoint

    def saved_rollouts(self) -> list:
        return [{"count": int(c), **{k: v[i, :c].copy() for k, v in self.roll.items()}}
                for i, c in enumerate(self.count)]


def collect(cfg: TrainConfig, world: World, state, prog: Progress, ep: Episodes, scalers, act_key, seeds, logger):
    """One env step of every active seed (not finished, not waiting for the joint checkpoint) with the current policy,
    into its rollout. Returns (the active seeds, the advanced exploration keys)."""
    N = len(seeds)
    active = ~ep.due & (prog.env_steps < cfg.online_steps)
    for i in np.flatnonzero(active):
        if ep.at_start[i]:
            ep.obs[i] = world.envs[i].reset(seed=seeds[i] if ep.first_reset[i] else None)[0]
            ep.first_reset[i], ep.at_start[i], ep.ret[i], ep.length[i] = False, False, 0.0, 0
            scalers[i].reset()
    actions, logps, act_key = act_explore(state.actor.params, state.obs_mean, state.obs_std, ep.obs, act_key,
                                          jnp.asarray(active), world.h)
    actions, logps = np.asarray(actions), np.asarray(logps)
    for i in np.flatnonzero(active):
        next_obs, r, term, trunc, info = world.envs[i].step(actions[i])
        term = term or (cfg.terminate_on_success and bool(info.get("success", False)))
        done = term or trunc
        j, roll = ep.count[i], ep.roll
        roll["obs"][i, j], roll["act"][i, j], roll["logp"][i, j] = ep.obs[i], actions[i], logps[i]
        roll["rew"][i, j] = scalers[i](float(r)) if cfg.dynamic_reward_scaling else float(r)
        roll["next_obs"][i, j], roll["terminal"][i, j], roll["done"][i, j] = next_obs, float(term), float(done)
        ep.count[i], prog.env_steps[i] = j + 1, prog.env_steps[i] + 1
        ep.ret[i], ep.length[i], ep.obs[i] = ep.ret[i] + float(r), ep.length[i] + 1, next_obs
        if done:
            prog.episodes[i] += 1
            ep.recent[i] = (ep.recent[i] + [float(ep.ret[i])])[-10:]
            logger.log({f"online/episode_return{'' if N == 1 else f'/seed{seeds[i]}'}": float(ep.ret[i]),
                        "online/episode_length": int(ep.length[i]), "online/env_steps": int(prog.env_steps[i])})
            ep.at_start[i] = True
    return active, act_key


def evaluate_online(cfg: TrainConfig, rec: Recorder, state, prog: Progress, i: int):
    """Seed i's evaluation at an evaluate_freq step; the reference becomes the evaluated policy if it beats the best
    score so far (official default), else every update_n evaluations. Returns the state."""
    record = rec.record(state, prog, "online", i)
    prog.online_evals[i] += 1
    score = score_of(record)
    updated = bool(score > prog.best_score[i] if cfg.refer_with_optimal_pi
                   else prog.online_evals[i] % cfg.update_n == 0)
    prog.best_score[i] = max(prog.best_score[i], score)
    if updated:
        state = state._replace(ref_actor=jax.tree.map(lambda ref, a: ref.at[i].set(a[i]), state.ref_actor,
                                                      state.actor.params))
    record.update(best_score=prog.best_score[i], reference_updated=updated)
    rec.log(prog, i, record)
    prog.last_eval_step[i] = prog.env_steps[i]
    return state


def finetune(cfg: TrainConfig, world: World, run, rec: Recorder, state, prog: Progress, act_key, seeds: list):
    """Phase 3, constrained PPO, to the end of the run. Each seed follows exactly its single-seed schedule: its env
    steps, a PPO update whenever its rollout is full, an evaluation (+ reference update) exactly every evaluate_freq
    of its env steps, a checkpoint at its first episode end after an evaluation, jointly with the other seeds (a seed
    due waits there until every seed is due or finished; docs/o2ppo.md, "Several seeds in one process")."""
    from tqdm import tqdm
    N, n = len(seeds), cfg.rollout_length
    ep = Episodes(cfg, world.h, prog, world.envs, seeds)
    bar = tqdm(total=cfg.online_steps * N, initial=int(prog.env_steps.sum()), desc="O2PPO online", mininterval=5)
    while prog.env_steps.min() < cfg.online_steps:
        active, act_key = collect(cfg, world, state, prog, ep, rec.scalers, act_key, seeds, rec.logger)
        bar.update(int(active.sum()))
        full = [i for i in np.flatnonzero(active) if ep.count[i] == n]  # PPO updates of these seeds, one call
        if full:
            steps = [int(prog.env_steps[i]) for i in full]
            batch = Rollout(**{k: jnp.asarray(v[full]) for k, v in ep.roll.items()})
            state, metrics = ppo_update(state, batch, jnp.asarray(steps, jnp.int32), jnp.asarray(full), world.h)
            logged = ppo_metrics(metrics, [seeds[i] for i in full], steps)
            ep.count[full] = 0
            prog.ppo_updates[full] += cfg.ppo_epochs * (n // cfg.minibatch_size)
            prog.kl_to_ref[full] = np.asarray(metrics["kl_to_ref"])
            rec.logger.log({**logged, "online/env_steps": int(prog.env_steps.sum()),
                            "online/updates": int(prog.ppo_updates.sum())})
        for i in np.flatnonzero(active & (prog.env_steps % cfg.evaluate_freq == 0)):
            state = evaluate_online(cfg, rec, state, prog, i)
            bar.set_postfix(score=score_of(prog.last_eval[i]),
                            train_return=np.mean([np.mean(r) for r in ep.recent if r] or [0.0]))
            ep.pending[i] = True
        # the joint checkpoint; a stop request waits for it (docs/o2ppo.md, "Several seeds in one process")
        ep.due |= active & ep.at_start & ep.pending & (prog.env_steps < cfg.online_steps)
        if ep.due.any() and (ep.due | (prog.env_steps >= cfg.online_steps)).all():
            prog.env_rng, prog.rollout = [env_rng_snapshot(env) for env in world.envs], ep.saved_rollouts()
            rec.checkpoint(state, prog, act_key)
            ep.pending &= ~ep.due
            ep.due[:] = False
            run.interrupt_if_asked(f"at {prog.env_steps.tolist()} online env steps")
    bar.close()
    for i in range(N):
        if prog.last_eval_step[i] != prog.env_steps[i]:
            record = rec.record(state, prog, "online", i)
            record.update(best_score=max(prog.best_score[i], score_of(record)), reference_updated=False)
            rec.log(prog, i, record)
    prog.phase, prog.rollout = "done", [None] * N
    rec.checkpoint(state, prog, act_key)


def summarize(eval_path: Path) -> dict:
    """Score at the end of pre-training vs at the end of fine-tuning (normalised score, else return)."""
    records = [json.loads(line) for line in eval_path.read_text().splitlines()] if eval_path.exists() else []
    key = "normalized_score" if records and "normalized_score" in records[0] else "return"
    offline = [r[key] for r in records if r["phase"] == "offline"]
    online = [r[key] for r in records if r["phase"] == "online"]
    out = {"before_finetuning": offline[-1] if offline else None, "after_finetuning": online[-1] if online else None,
           "best_online": max(online) if online else None}
    if offline and online:
        print(f"{key.replace('_', ' ')}: {out['before_finetuning']:.2f} after pre-training -> "
              f"{out['after_finetuning']:.2f} after fine-tuning (best {out['best_online']:.2f}; eval log: {eval_path})")
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

