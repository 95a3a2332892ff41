"""Cal-QL (single file, JAX): calibrated CQL pre-training on a Minari dataset, then online fine-tuning.

Paper:  Nakamoto, Zhai, Singh, Sobol Mark, Ma, Finn, Kumar, Levine, "Cal-QL: Calibrated Offline RL
        Pre-Training for Efficient Online Fine-Tuning", NeurIPS 2023, https://arxiv.org/abs/2303.05479.
Reference implementation followed here: the official code, https://github.com/nakamotoo/Cal-QL @
        ac6eafec22e8d60836573e1f488c7f626ce8a77e (JAX, `JaxCQL/conservative_sac.py`, `conservative_sac_main.py`).
Also compared: CORL `algorithms/finetune/cal_ql.py`, https://github.com/tinkoff-ai/CORL @
        6afec90484bbf47dee05fdf525e26a3ebe028e9b.

What is implemented (official semantics unless listed below; the losses in calql_losses' docstring):
  * tanh-Gaussian actor (log_std = m * raw + b, learnable m, b) and a vmapped Q ensemble (`n_critics`), orthogonal
    init; SAC actor loss with automatic entropy (target -|A|);
  * critic: TD target with a max over `cql_n_actions` next actions (no entropy term), plus the CQL regulariser whose
    two policy-action terms are lower-bounded by the Monte-Carlo return-to-go G of the data transition (Cal-QL);
    Lagrange CQL weight (`cql_lagrange`, AntMaze) or a fixed `cql_weight`; one gradient call per update;
  * MC returns per episode without bootstrap, "failed" episodes (`mc_failure_rule`) get r_fail / (1 - gamma);
  * online: one whole trajectory with the stochastic policy, its MC returns, then len(trajectory) * `online_utd`
    updates on batches of `mixing_ratio` offline + the rest online rows; calibration and CQL stay on; evaluation
    whenever the env-step count crosses a multiple of `online_eval_every`.
Design notes (the full list, several seeds at once, orthogonal init, checkpoints): docs/cal_ql.md.

Deviations (and the switch that restores the reference behaviour where one exists):
  1. `online_calibration: false` gives CORL's variant (calibration switched off for the online phase).
  2. Evaluation runs on a separate env seeded with `eval_seed` (official: a second env too).
  3. `terminate_on_success` (AntMaze configs) ends an episode as terminal when info['success'] is True,
     reproducing D4RL's AntMaze `eval=True` done-at-goal semantics on the continuing-task Minari envs.
  4. Adroit: Minari's dense `D4RL/<task>/cloned-v2` data with raw rewards (as CORL), not the official binary
     `*-binary-v0` tasks (not in Minari); the official Adroit network sizes and schedule.
  5. Updates run in jitted lax.scan blocks of `update_block` updates (a smaller remainder in one masked
     lax.fori_loop): the same sequence of updates as the official loop.
  6. States are normalised with the dataset mean/std when `normalize` is on (off in the AntMaze/Adroit configs, as
     in the official code; on for the locomotion configs).
  7. MuJoCo-locomotion hyper-parameters are not in the official repository (issue nakamotoo/Cal-QL#5): the
     locomotion configs use CQL's MuJoCo settings (fixed weight 5, 256-256 networks) and are unverified.
  8. One set of sampled actions per update serves every loss (official: fresh draws in each loss's pass): the
     same expected gradient, less noise between the critics (no switch).
  9. Orthogonal kernels by Householder QR in jnp ops (orthogonal_kernel_init): the official init up to float
     round-off, without jaxlib 0.10.2's CPU LAPACK QR deadlock (no switch).

Several seeds in one process (`--num_seeds N`): seeds seed..seed+N-1 train together, vmapped over a leading seed
axis, each on its single-seed schedule; evaluations go to run_dir/seed<S>/eval.jsonl.

Usage:
    python algorithms/cal_ql.py --config_path configs/cal_ql/quickstart.yaml
    python algorithms/cal_ql.py --config_path configs/cal_ql/quickstart.yaml --resume    # continue a killed run
    python algorithms/cal_ql.py --config_path ... --offline_checkpoint runs/.../checkpoints/offline
Writes to `run_dir`: config.yaml, eval.jsonl, checkpoints/{latest,offline}, checkpoints/buffer/, wandb/.
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


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    # experiment
    dataset_id: str = "D4RL/antmaze/medium-diverse-v1"  # Minari dataset id (also gives the env)
    seed: int = 0  # seed of networks, sampling, exploration and the training env
    eval_seed: int = 100  # seed of the evaluation env (re-seeded at the start of every evaluation)
    run_dir: str = ""  # output directory; "" = runs/cal_ql/<dataset_id>/seed<seed>
    project: str = "o2o-jax"  # wandb project
    group: str = "cal_ql"  # wandb group
    name: str = ""  # wandb run name; "" = cal_ql-<dataset_id>-seed<seed>
    wandb_mode: str = "offline"  # online | offline | disabled (the WANDB_MODE env variable overrides it)
    resume: bool = False  # continue the run in run_dir from its newest intact checkpoint (`--resume` alone works)
    overwrite: bool = False  # delete a previous run in run_dir and start again (without it, a previous run is kept)
    offline_checkpoint: str = ""  # skip pre-training: start fine-tuning from this saved offline checkpoint dir
    num_seeds: int = 1  # train seeds seed..seed+num_seeds-1 together (vmapped); >1: evals in run_dir/seed<S>/
    # schedule
    offline_updates: int = 1_000_000  # gradient steps of pre-training (official: 1000 epochs x 1000)
    online_steps: int = 1_000_000  # env steps of fine-tuning (whole trajectories: the last one may overshoot)
    update_block: int = 1000  # updates per jitted lax.scan block (a smaller remainder runs in one fori_loop)
    online_utd: int = 1  # gradient steps per collected env step (official `online_utd_ratio`)
    offline_eval_every: int = 50_000  # offline updates between evaluations (+ checkpoint)
    online_eval_every: int = 2000  # evaluate (+ checkpoint) when env steps cross a multiple of this
    eval_episodes: int = 20  # deterministic evaluation episodes per evaluation
    # data
    batch_size: int = 256  # transitions per gradient step
    mixing_ratio: float = 0.5  # online phase: fraction of each batch drawn from the offline data
    discount: float = 0.99  # gamma
    normalize: bool = False  # normalise states with the dataset mean / std (official: no normalisation)
    reward_scale: float = 10.0  # r <- reward_scale * r + reward_bias, offline and online
    reward_bias: float = -5.0  # AntMaze: 10 r - 5
    clip_action: float = 0.99999  # dataset actions clipped to +-clip_action (tanh policy)
    mc_failure_rule: str = "all"  # none | all (official) | last (CORL): which episodes count as failed
    mc_failure_raw_reward: float = 0.0  # raw reward meaning failure (its transformed value is r_fail)
    terminate_on_success: bool = True  # end episodes as terminal when info['success'] (D4RL AntMaze eval=True)
    # networks and optimisers
    policy_hidden: List[int] = field(default_factory=lambda: [256, 256])  # actor MLP widths
    critic_hidden: List[int] = field(default_factory=lambda: [256, 256, 256, 256])  # Q MLP widths
    n_critics: int = 2  # Q ensemble size (min over members in targets and the actor loss)
    orthogonal_init: bool = True  # orthogonal(sqrt 2) hidden / orthogonal(1e-2) output kernels, zero biases
    policy_lr: float = 1e-4  # Adam LR of the actor and of log alpha
    critic_lr: float = 3e-4  # Adam LR of the Q ensemble and of log alpha'
    tau: float = 5e-3  # Polyak rate of the target Q networks (every update)
    log_std_multiplier: float = 1.0  # initial m in log_std = m * raw + b
    log_std_offset: float = -1.0  # initial b in log_std = m * raw + b
    # SAC / CQL / Cal-QL
    auto_alpha: bool = True  # learn the entropy temperature (log alpha initialised to 0)
    alpha_multiplier: float = 1.0  # alpha = alpha_multiplier * exp(log alpha) (or alone if auto_alpha false)
    target_entropy: float = 0.0  # entropy target; a value >= 0 means -|A| (official convention)
    backup_entropy: bool = False  # subtract alpha log pi(a'|s') in the TD target
    cql_n_actions: int = 10  # actions of each kind (random, current, next) in the CQL logsumexp and backup
    cql_weight: float = 5.0  # CQL regulariser weight (official `cql_min_q_weight`)
    cql_weight_online: float = -1.0  # weight online; < 0 keeps cql_weight (official)
    cql_importance_sample: bool = True  # importance-weighted logsumexp (else the plain CQL(H) form)
    cql_temp: float = 1.0  # logsumexp temperature
    cql_max_target_backup: bool = True  # max over cql_n_actions next actions in the TD target
    cql_clip_diff_min: float = float("-inf")  # clip of logsumexp - Q(s,a) (CORL: -200)
    cql_clip_diff_max: float = float("inf")  # clip of logsumexp - Q(s,a)
    cql_lagrange: bool = True  # tune the CQL weight alpha' to keep the gap at cql_target_action_gap
    cql_target_action_gap: float = 0.8  # Lagrange target of logsumexp - Q(s,a)
    log_alpha_prime_init: float = 1.0  # initial log alpha' (official Scalar(1.0))
    calibration: bool = True  # Cal-QL: lower-bound policy-action Q values by the MC return (False = CQL)
    online_calibration: bool = True  # keep the calibration online (official); false = CORL's variant
    precision: str = "float32"  # float32 | bf16: bfloat16 matrix products summed in float32 (params, Adam: float32)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid config: {msg}")
        for name in ("num_seeds", "update_block", "online_utd", "offline_eval_every", "online_eval_every", "eval_episodes",
                     "batch_size", "n_critics", "cql_n_actions"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.offline_updates >= 0 and self.online_steps >= 0, "offline_updates/online_steps must be >= 0")
        need(self.offline_updates % self.update_block == 0,
             f"offline_updates={self.offline_updates} must be a multiple of update_block={self.update_block}")
        need(self.offline_eval_every % self.update_block == 0,
             f"offline_eval_every={self.offline_eval_every} must be a multiple of update_block={self.update_block}")
        need(self.wandb_mode in ("online", "offline", "disabled"),
             f"wandb_mode must be online|offline|disabled, got {self.wandb_mode!r}")
        need(self.mc_failure_rule in ("none", "all", "last"),
             f"mc_failure_rule must be none|all|last, got {self.mc_failure_rule!r}")
        need(0.0 < self.mixing_ratio < 1.0, f"mixing_ratio must be in (0, 1), got {self.mixing_ratio}")
        need(0 < int(self.batch_size * self.mixing_ratio) < self.batch_size,
             "batch_size * mixing_ratio must leave rows for both offline and online data")
        need(0.0 < self.clip_action <= 1.0, f"clip_action must be in (0, 1], got {self.clip_action}")
        need(self.cql_temp > 0, f"cql_temp must be > 0, got {self.cql_temp}")
        for name in ("policy_hidden", "critic_hidden"):
            need(len(getattr(self, name)) > 0 and all(x > 0 for x in getattr(self, name)), f"{name} must be positive")
        need(self.precision in PRECISIONS, f"precision must be one of {'|'.join(PRECISIONS)}, got {self.precision!r}")


RESUME_FREE = {"resume", "overwrite", "offline_checkpoint", "wandb_mode", "online_steps", "run_dir"}  # may change on --resume


class Hyper(NamedTuple):
    """The static (hashable) arguments of the jitted functions: the env's dimensions and the config fields the maths
    reads, under the config's own names (make_hyper copies them from TrainConfig by name)."""
    obs_dim: int
    act_dim: int
    policy_hidden: tuple
    critic_hidden: tuple
    n_critics: int
    orthogonal_init: bool
    log_std_multiplier: float
    log_std_offset: float
    batch_size: int
    mixing_ratio: float
    update_block: int
    discount: float
    tau: float
    policy_lr: float
    critic_lr: float
    auto_alpha: bool
    alpha_multiplier: float
    target_entropy: float  # as configured: >= 0 means -act_dim (resolved in calql_losses)
    backup_entropy: bool
    cql_n_actions: int
    cql_importance_sample: bool
    cql_temp: float
    cql_max_target_backup: bool
    cql_clip_diff_min: float
    cql_clip_diff_max: float
    cql_lagrange: bool
    cql_target_action_gap: float
    precision: str


def make_hyper(cfg: TrainConfig, obs_dim: int, act_dim: int) -> Hyper:
    static = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731 (a list is not hashable)
    return Hyper(obs_dim=obs_dim, act_dim=act_dim, **{k: static(getattr(cfg, k)) for k in Hyper._fields[2:]})


def offline_rows(h: Hyper) -> int:
    """Rows of an online-phase batch drawn from the offline data (the rest from the online rows)."""
    return int(h.batch_size * h.mixing_ratio)


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


class MLP(nn.Module):
    """ReLU MLP; orthogonal(sqrt 2) hidden and orthogonal(1e-2) output kernels with zero biases (official
    `orthogonal_init`), else Flax's default hidden init and a variance-scaling(1e-2) output kernel."""
    hidden: tuple
    out_dim: int
    orthogonal_init: bool
    precision: str = "float32"

    @nn.compact
    def __call__(self, x):
        zeros, dot = nn.initializers.zeros, dot_general(self.precision)
        for h in self.hidden:
            kernel = (orthogonal_kernel_init(math.sqrt(2.0)) if self.orthogonal_init
                      else nn.initializers.lecun_normal())
            x = nn.relu(nn.Dense(h, kernel_init=kernel, bias_init=zeros, dot_general=dot)(x))
        kernel = (orthogonal_kernel_init(1e-2) if self.orthogonal_init
                  else nn.initializers.variance_scaling(1e-2, "fan_in", "uniform"))
        return nn.Dense(self.out_dim, kernel_init=kernel, bias_init=zeros, dot_general=dot)(x)


class TanhGaussianActor(nn.Module):
    """Returns (mean, log_std) of the pre-tanh Gaussian; log_std = m * raw + b, clipped to [-20, 2]."""
    act_dim: int
    hidden: tuple
    orthogonal_init: bool
    log_std_multiplier: float
    log_std_offset: float
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs):
        out = MLP(self.hidden, 2 * self.act_dim, self.orthogonal_init, self.precision)(obs)
        mean, raw = jnp.split(out, 2, axis=-1)
        m = self.param("log_std_multiplier", lambda _: jnp.asarray(self.log_std_multiplier, jnp.float32))
        b = self.param("log_std_offset", lambda _: jnp.asarray(self.log_std_offset, jnp.float32))
        return mean, jnp.clip(m * raw + b, -20.0, 2.0)


class QNet(nn.Module):
    hidden: tuple
    orthogonal_init: bool
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs, act):
        return MLP(self.hidden, 1, self.orthogonal_init, self.precision)(jnp.concatenate([obs, act], -1))[..., 0]


def critic_ensemble(hidden: tuple, n: int, orthogonal_init: bool, precision: str = "float32") -> nn.Module:
    """`n` Q networks with independent parameters, evaluated on the same inputs: output [n, ...]."""
    return nn.vmap(QNet, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                   axis_size=n)(hidden=hidden, orthogonal_init=orthogonal_init, precision=precision)


def networks(h: Hyper):
    actor = TanhGaussianActor(h.act_dim, h.policy_hidden, h.orthogonal_init, h.log_std_multiplier, h.log_std_offset,
                              h.precision)
    return actor, critic_ensemble(h.critic_hidden, h.n_critics, h.orthogonal_init, h.precision)


# ---------------------------------------------------------------------------------------------- maths
def gaussian_log_prob(mean, log_std, x):
    """log N(x; mean, exp(log_std)^2) summed over the last axis."""
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z ** 2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), -1)


def tanh_log_det(u):
    """log |d tanh(u)/du| = log(1 - tanh(u)^2) in the stable form 2 (log 2 - u - softplus(-2u)), summed."""
    return jnp.sum(2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u)), -1)


def tanh_gaussian_sample(mean, log_std, key, n: Optional[int] = None):
    """Reparameterised a = tanh(u), u ~ N(mean, std); `n` samples per row -> [..., n, A]; returns (a, log pi(a))."""
    if n is not None:
        mean, log_std = mean[..., None, :], log_std[..., None, :]
        shape = mean.shape[:-2] + (n, mean.shape[-1])
    else:
        shape = mean.shape
    u = mean + jnp.exp(log_std) * jax.random.normal(key, shape)
    return jnp.tanh(u), gaussian_log_prob(mean, log_std, u) - tanh_log_det(u)


def tanh_gaussian_log_prob(mean, log_std, action, eps=1e-6):
    """log pi(a|s) of a tanh-Gaussian for a given action in (-1, 1)."""
    u = jnp.arctanh(jnp.clip(action, -1.0 + eps, 1.0 - eps))
    return gaussian_log_prob(mean, log_std, u) - tanh_log_det(u)


def calibrated(q, mc_return, on):
    """Cal-QL lower bound: max(Q, G) where `on` (G broadcast over the action axis), else Q."""
    return jnp.where(on, jnp.maximum(q, mc_return), q)


def cql_logsumexp(q_rand, q_next, q_cur, logp_next, logp_cur, act_dim: int, temp: float = 1.0,
                  q_data=None, importance_sample: bool = True):
    """temp * logsumexp over the CQL action set (last axis); importance weights 0.5^-|A| and 1/pi."""
    if importance_sample:
        cat = jnp.concatenate([q_rand - act_dim * jnp.log(0.5), q_next - logp_next, q_cur - logp_cur], -1)
    else:
        cat = jnp.concatenate([q_rand, q_data[..., None], q_next, q_cur], -1)
    return temp * jax.nn.logsumexp(cat / temp, axis=-1)


def optimizers(h: Hyper):
    return {"actor": optax.adam(h.policy_lr), "critic": optax.adam(h.critic_lr),
            "log_alpha": optax.adam(h.policy_lr), "log_alpha_prime": optax.adam(h.critic_lr)}


# ---------------------------------------------------------------------------------------------- state
class Trainable(NamedTuple):
    """Parameters and optimiser state (a TrainState without functions, so states stay plain pytrees)."""
    params: Any
    opt_state: Any


class CalQLState(NamedTuple):
    actor: Trainable
    critic: Trainable  # ensemble, leading axis n_critics
    log_alpha: Trainable
    log_alpha_prime: Trainable
    critic_target: Any
    key: jax.Array  # RNG of the updates
    updates: jax.Array  # gradient steps done
    obs_mean: jax.Array
    obs_std: jax.Array


class Buffer(NamedTuple):
    obs: jax.Array
    act: jax.Array
    rew: jax.Array
    next_obs: jax.Array
    done: jax.Array  # 1.0 for true terminations only
    mc: jax.Array  # Monte-Carlo return-to-go of the transition


def init_state(h: Hyper, key, obs_mean, obs_std, log_alpha_prime_init: float) -> CalQLState:
    actor, critic = networks(h)
    k_actor, k_critic, key = jax.random.split(key, 3)
    o, a = jnp.zeros((1, h.obs_dim)), jnp.zeros((1, h.act_dim))
    params = {"actor": actor.init(k_actor, o)["params"], "critic": critic.init(k_critic, o, a)["params"],
              "log_alpha": jnp.zeros((), jnp.float32),
              "log_alpha_prime": jnp.asarray(log_alpha_prime_init, jnp.float32)}
    txs = optimizers(h)
    tr = {k: Trainable(p, txs[k].init(p)) for k, p in params.items()}
    return CalQLState(tr["actor"], tr["critic"], tr["log_alpha"], tr["log_alpha_prime"], params["critic"], key,
                      jnp.zeros((), jnp.int32), jnp.asarray(obs_mean, jnp.float32), jnp.asarray(obs_std, jnp.float32))


def _step(trainable: Trainable, grads, tx) -> Trainable:
    updates, opt_state = tx.update(grads, trainable.opt_state, trainable.params)
    return Trainable(optax.apply_updates(trainable.params, updates), opt_state)


# ---------------------------------------------------------------------------------------------- update
def calql_losses(params: dict, state: CalQLState, batch: Buffer, key, calibrate, cql_weight, h: Hyper):
    """Sum of all Cal-QL losses from one parameter snapshot (stop-gradients keep each loss on its own parameters, as
    the official per-loss gradients do) and the metrics. With a~ ~ pi(.|s), alpha = alpha_multiplier exp(log alpha):
        alpha loss   -log alpha * (log pi(a~|s) + target entropy)                                  (auto_alpha)
        actor loss   alpha log pi(a~|s) - min_i Q_i(s, a~)
        TD target    y = r + gamma (1-d) max_k min_i Qbar_i(s', a'_k),  a'_k ~ pi(.|s'), k = 1..cql_n_actions
                     (one a' without cql_max_target_backup; minus alpha log pi(a'|s') with backup_entropy)
        CQL gap      D_i = logsumexp [Q_i(s, a_rand) - log 0.5^|A|,  C(Q_i(s, a_next)) - log pi(a_next|s'),
                                      C(Q_i(s, a_cur)) - log pi(a_cur|s)]  -  Q_i(s, a)    (cql_n_actions each)
                     a_rand ~ U[-1, 1], a_next ~ pi(.|s') evaluated at s (as official), a_cur ~ pi(.|s);
                     Cal-QL: C(q) = max(q, G) with G the MC return-to-go of (s, a) when `calibrate`, else q
                     (temperature cql_temp; cql_importance_sample false: logsumexp of the plain Q values, Q(s, a) too)
        critic loss  sum_i [mean_B (Q_i(s, a) - y)^2 + alpha' w (mean_B clip(D_i) - cql_target_action_gap)]
                     (cql_lagrange; else + w mean_B clip(D_i)),  w = cql_weight, alpha' = clip(exp(log alpha'), 0, 1e6)
        alpha' loss  -mean_i alpha' w (mean_B clip(D_i) - cql_target_action_gap)                  (cql_lagrange)"""
    actor, critic = networks(h)
    sg = jax.lax.stop_gradient
    k_pi, k_next, k_rand, k_cur, k_cql_next = jax.random.split(key, 5)
    obs = (batch.obs - state.obs_mean) / state.obs_std
    next_obs = (batch.next_obs - state.obs_mean) / state.obs_std
    b, n = obs.shape[0], h.cql_n_actions

    mean, log_std = actor.apply({"params": params["actor"]}, obs)
    next_mean, next_log_std = actor.apply({"params": sg(params["actor"])}, next_obs)  # feeds detached samples only

    # temperature and actor
    a_pi, logp_pi = tanh_gaussian_sample(mean, log_std, k_pi)
    if h.auto_alpha:
        target_entropy = -float(h.act_dim) if h.target_entropy >= 0 else float(h.target_entropy)  # >= 0: -|A|
        alpha_loss = -params["log_alpha"] * sg(logp_pi + target_entropy).mean()
        alpha = jnp.exp(params["log_alpha"]) * h.alpha_multiplier
    else:
        alpha_loss, alpha = jnp.zeros(()), jnp.asarray(h.alpha_multiplier)
    q_pi = critic.apply({"params": sg(params["critic"])}, obs, a_pi).min(0)
    actor_loss = (sg(alpha) * logp_pi - q_pi).mean()

    # TD target (max-backup over n next actions, no entropy term by default)
    a_next, logp_next = tanh_gaussian_sample(sg(next_mean), sg(next_log_std), k_next,
                                             n if h.cql_max_target_backup else None)
    if h.cql_max_target_backup:
        next_rep = jnp.broadcast_to(next_obs[:, None], (b, n, next_obs.shape[-1]))
        q_next = critic.apply({"params": state.critic_target}, next_rep, a_next).min(0)  # [B, n]
        best = jnp.argmax(q_next, -1)[:, None]
        q_next = jnp.take_along_axis(q_next, best, -1)[:, 0]
        logp_next = jnp.take_along_axis(logp_next, best, -1)[:, 0]
    else:
        q_next = critic.apply({"params": state.critic_target}, next_obs, a_next).min(0)
    if h.backup_entropy:
        q_next = q_next - sg(alpha) * logp_next
    y = sg(batch.rew + h.discount * (1.0 - batch.done) * q_next)

    # all Q(s, .) values of the critic loss in one ensemble forward: data, random, next-state and current actions
    a_rand = jax.random.uniform(k_rand, (b, n, h.act_dim), minval=-1.0, maxval=1.0)
    a_cur, logp_cur = tanh_gaussian_sample(sg(mean), sg(log_std), k_cur, n)
    a_nxt, logp_nxt = tanh_gaussian_sample(sg(next_mean), sg(next_log_std), k_cql_next, n)
    actions = jnp.concatenate([batch.act[:, None], a_rand, a_nxt, a_cur], 1)  # [B, 1 + 3n, A]
    obs_rep = jnp.broadcast_to(obs[:, None], (b, 1 + 3 * n, obs.shape[-1]))
    q_all = critic.apply({"params": params["critic"]}, obs_rep, actions)  # [E, B, 1 + 3n]
    q_data, q_rand = q_all[..., 0], q_all[..., 1:1 + n]
    q_nxt, q_cur = q_all[..., 1 + n:1 + 2 * n], q_all[..., 1 + 2 * n:]
    g = batch.mc[None, :, None]
    bound_rate = 0.5 * ((q_cur < g).mean() + (q_nxt < g).mean())
    q_nxt, q_cur = calibrated(q_nxt, g, calibrate), calibrated(q_cur, g, calibrate)
    ood = cql_logsumexp(q_rand, q_nxt, q_cur, sg(logp_nxt), sg(logp_cur), h.act_dim, h.cql_temp, q_data,
                        h.cql_importance_sample)  # [E, B]
    cql_diff = jnp.clip(ood - q_data, h.cql_clip_diff_min, h.cql_clip_diff_max).mean(-1)  # [E]
    bellman = ((q_data - y) ** 2).mean(-1)  # [E]
    if h.cql_lagrange:
        alpha_prime = jnp.clip(jnp.exp(params["log_alpha_prime"]), 0.0, 1e6)
        cql_loss = sg(alpha_prime) * cql_weight * (cql_diff - h.cql_target_action_gap)
        alpha_prime_loss = -(alpha_prime * cql_weight * (sg(cql_diff) - h.cql_target_action_gap)).mean()
    else:
        alpha_prime, alpha_prime_loss = jnp.zeros(()), jnp.zeros(())
        cql_loss = cql_weight * cql_diff
    critic_loss = (bellman + cql_loss).sum()  # each member's own loss; sum = independent gradients

    total = critic_loss + actor_loss + alpha_loss + alpha_prime_loss
    metrics = {"critic_loss": critic_loss / h.n_critics, "bellman_loss": bellman.mean(), "cql_diff": cql_diff.mean(),
               "actor_loss": actor_loss, "alpha_loss": alpha_loss, "alpha": alpha, "alpha_prime": alpha_prime,
               "alpha_prime_loss": alpha_prime_loss, "log_pi": logp_pi.mean(), "q_data": q_data.mean(),
               "q_rand": q_rand.mean(), "target_q": y.mean(), "mc_return": batch.mc.mean(),
               "bound_rate": bound_rate}
    return total, metrics


def calql_update(state: CalQLState, batch: Buffer, key, calibrate, cql_weight, h: Hyper):
    """One Cal-QL step: one value_and_grad over {actor, critic, log_alpha, log_alpha_prime}, then Adam + EMA."""
    params = {"actor": state.actor.params, "critic": state.critic.params, "log_alpha": state.log_alpha.params,
              "log_alpha_prime": state.log_alpha_prime.params}
    grads, metrics = jax.grad(calql_losses, has_aux=True)(params, state, batch, key, calibrate, cql_weight, h)
    txs = optimizers(h)
    new = {k: _step(getattr(state, k), grads[k], txs[k]) for k in params}
    critic_target = optax.incremental_update(new["critic"].params, state.critic_target, h.tau)
    return state._replace(critic_target=critic_target, updates=state.updates + 1, **new), metrics


def sample_batch(offline: Buffer, offline_size, online: Buffer, online_size, k_off, k_on, h: Hyper) -> Buffer:
    """A batch drawn on device: online_size == 0 (offline phase): all rows uniform over the `offline_size` offline
    rows; else offline_rows(h) offline rows followed by uniform draws from this seed's online rows."""
    n_off = offline_rows(h)
    i_off = jax.random.randint(k_off, (h.batch_size,), 0, offline_size)
    i_on = jax.random.randint(k_on, (h.batch_size - n_off,), 0, jnp.maximum(online_size, 1))
    return jax.tree.map(lambda off, on: jnp.where(online_size > 0, jnp.concatenate([off[i_off[:n_off]], on[i_on]]),
                                                  off[i_off]), offline, online)


# Multi-seed: every state leaf, the online buffer and the per-seed counters carry a leading seed axis; the
# offline rows are shared (in_axes None). One seed's numbers equal a single-seed run's up to float32
# round-off (XLA sums batched matmuls in a different order). Each update draws its batch on device first.
@partial(jax.jit, static_argnames=("h",))
def scan_updates(state: CalQLState, offline: Buffer, offline_size, online: Buffer, online_size, calibrate,
                 cql_weight, h: Hyper):
    """`h.update_block` updates per seed in one lax.scan (vmapped over seeds); metrics [seeds, h.update_block]."""
    def one_seed(state, online, online_size):
        def body(s, _):
            key, k_off, k_on, k_upd = jax.random.split(s.key, 4)
            batch = sample_batch(offline, offline_size, online, online_size, k_off, k_on, h)
            return calql_update(s._replace(key=key), batch, k_upd, calibrate, cql_weight, h)
        return jax.lax.scan(body, state, None, length=h.update_block)
    return jax.vmap(one_seed)(state, online, online_size)


@partial(jax.jit, static_argnames=("h",))
def update_few(state: CalQLState, offline: Buffer, offline_size, online: Buffer, online_size, n, calibrate,
               cql_weight, h: Hyper):
    """`n[i]` <= h.update_block updates for seed i in one lax.fori_loop of max(n) steps (n traced: one compiled
    program for every count); a seed with fewer updates keeps its state; metrics [seeds, h.update_block], zero
    where unused."""
    def one_seed(state, online, online_size, n_seed):
        def update(s):
            key, k_off, k_on, k_upd = jax.random.split(s.key, 4)
            batch = sample_batch(offline, offline_size, online, online_size, k_off, k_on, h)
            return calql_update(s._replace(key=key), batch, k_upd, calibrate, cql_weight, h)

        shapes = jax.eval_shape(lambda s: update(s)[1], state)

        def body(i, carry):
            new, metrics = update(carry[0])
            keep = i < n_seed
            new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, carry[0])
            return new, jax.tree.map(lambda all_, m: all_.at[i].set(jnp.where(keep, m, 0)), carry[1], metrics)
        zeros = jax.tree.map(lambda x: jnp.zeros((h.update_block,) + x.shape, x.dtype), shapes)
        return jax.lax.fori_loop(0, jnp.max(n), body, (state, zeros))
    return jax.vmap(one_seed)(state, online, online_size, n)


@partial(jax.jit, donate_argnums=(0,))
def buffer_insert(online: Buffer, rows: Buffer, starts):
    """Write each seed's `rows[i]` at `starts[i]` of its online rows, in place (the buffer is donated)."""
    put = lambda b, r, s: jax.lax.dynamic_update_slice_in_dim(b, r, s, 0)  # noqa: E731
    return jax.tree.map(lambda b, r: jax.vmap(put)(b, r, starts), online, rows)


# ---------------------------------------------------------------------------------------------- acting
@partial(jax.jit, static_argnames=("h",))
def act_explore(actor_params, obs_mean, obs_std, obs, keys, active, h: Hyper):
    """All seeds' actions a ~ tanh-Gaussian policy in one call per env step, keys split inside; a seed's key
    advances only when it is `active` (so its action sequence does not depend on the other seeds)."""
    def one(params, mean_, std_, o, key, act):
        new_key, sub = jax.random.split(key)
        mean, log_std = networks(h)[0].apply({"params": params}, (o - mean_) / std_)
        return tanh_gaussian_sample(mean, log_std, sub)[0], jnp.where(act, new_key, key)
    return jax.vmap(one)(actor_params, obs_mean, obs_std, obs, keys, active)


@partial(jax.jit, static_argnames=("h",))
def act_deterministic(actor_params, obs_mean, obs_std, obs, h: Hyper):
    """tanh(mean) of one seed's actor (evaluation)."""
    mean, _ = networks(h)[0].apply({"params": actor_params}, (obs - obs_mean) / obs_std)
    return jnp.tanh(mean)


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
    """Offline pre-training then online fine-tuning of `num_seeds` seeds at once; returns the last evaluation
    record(s) and paths."""
    from tqdm import tqdm

    t_start = time.time()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    N = len(seeds)
    cfg.name = cfg.name or f"cal_ql-{cfg.dataset_id.replace('/', '-')}-seed{cfg.seed}" + (f"x{N}" if N > 1 else "")
    with Run(cfg, run_dir) as run:  # checks that need no data, before any slow work; see Run
        src_seeds = load_meta(run.offline_from).get("num_seeds", 1) if run.offline_from else N
        if src_seeds != N:
            raise RunError(f"--offline_checkpoint {run.offline_from} holds {src_seeds} seed(s); run with --num_seeds "
                           f"{src_seeds}")
        world = load_world(cfg, N)
        h, n_data = world.h, world.offline.rew.shape[0]  # dataset rows, shared by the seeds
        state, prog, online = start_or_resume(cfg, run, world, seeds)
        rec = Recorder(cfg, run_dir, seeds, world, prog, t_start)
        act_key = jnp.asarray(prog.act_key)

        # ---- offline pre-training (all seeds in one vmapped scan per block)
        if prog.phase == "offline":
            bar = tqdm(total=cfg.offline_updates, initial=int(prog.updates[0]), desc="Cal-QL offline", mininterval=5)
            while prog.updates[0] < cfg.offline_updates:
                state, metrics = scan_updates(state, world.offline, n_data, online, jnp.asarray(prog.online_size,
                                              jnp.int32), cfg.calibration, cfg.cql_weight, h)
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
        if prog.phase in ("offline", "load_offline"):
            prog.phase = "online"
            rec.checkpoint(state, prog, online, act_key, "offline")
            rec.checkpoint(state, prog, online, act_key)

        # ---- online fine-tuning: each seed collects one trajectory, its MC returns, then len(trajectory) *
        # online_utd updates (the single-seed schedule). A seed due for evaluation waits until every seed is due
        # (or finished), so checkpoints fall on episode ends of all seeds.
        if prog.phase == "online":
            ep = Episodes(world, prog, seeds)
            weight = cfg.cql_weight if cfg.cql_weight_online < 0 else cfg.cql_weight_online
            calibrate = cfg.calibration and cfg.online_calibration
            bar = tqdm(total=cfg.online_steps * N, initial=int(prog.env_steps.sum()), desc="Cal-QL online",
                       mininterval=5)
            while prog.env_steps.min() < cfg.online_steps:
                n, returns, act_key = collect(cfg, world, state, prog, ep, act_key, seeds)
                online = buffer_insert(online, Buffer(**{k: jnp.asarray(v) for k, v in ep.chunk.items()}),
                                       jnp.asarray(prog.online_size, jnp.int32))
                prog.online_size += n
                # n[i] * online_utd updates for seed i: whole blocks, then the remainder in one masked loop
                todo, sums, sizes = np.asarray(n * cfg.online_utd, np.int64), {}, jnp.asarray(prog.online_size,
                                                                                              jnp.int32)
                while todo.max() > 0:
                    m = np.minimum(todo, cfg.update_block)
                    if (m == cfg.update_block).all():
                        state, metrics = scan_updates(state, world.offline, n_data, online, sizes, calibrate, weight, h)
                    else:
                        state, metrics = update_few(state, world.offline, n_data, online, sizes,
                                                    jnp.asarray(m, jnp.int32), calibrate, weight, h)
                    logged = block_metrics(metrics, m, "online", seeds, prog.updates)
                    sums = {k: sums.get(k, 0.0) + v * m.sum() for k, v in logged.items()}
                    prog.updates += m
                    todo -= m
                logged = {k: v / max(int((n * cfg.online_utd).sum()), 1) for k, v in sums.items()}
                rec.logger.log({**logged, **returns, "online/env_steps": int(prog.env_steps.sum()),
                                "online/updates": int(prog.updates.sum())})
                bar.update(int(n.sum()))
                ep.due |= ((n > 0) & ((prog.env_steps >= prog.next_eval) | run.stop)
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
               "updates": int(prog.updates[0]), "env_steps": int(prog.env_steps[0]), **summaries[0]}
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


# ---------------------------------------------------------------------------------------------- run support
def mc_returns(rewards, episode_ends, discount: float, rule: str, failure_reward: float):
    """Discounted return-to-go per episode (no bootstrap); with `rule` 'all' ('last') an episode whose
    rewards all equal (whose last reward equals) `failure_reward` gets failure_reward / (1 - discount)."""
    g = data.monte_carlo_returns(rewards, episode_ends, discount)
    if rule == "none" or len(rewards) == 0:
        return g
    ends = np.flatnonzero(episode_ends)
    if len(ends) == 0 or ends[-1] != len(rewards) - 1:
        ends = np.append(ends, len(rewards) - 1)
    starts = np.concatenate([[0], ends[:-1] + 1])
    is_fail = np.isclose(rewards, failure_reward)
    if rule == "all":
        failed = np.logical_and.reduceat(is_fail, starts)
    else:
        failed = is_fail[ends]
    per_row = np.repeat(failed, ends - starts + 1)
    return np.where(per_row, failure_reward / (1.0 - discount), g).astype(np.float32)


def r_fail(cfg: TrainConfig) -> float:
    """The transformed reward of `mc_failure_raw_reward` (the failure reward of the MC returns' failure rule)."""
    return cfg.mc_failure_raw_reward * cfg.reward_scale + cfg.reward_bias


def prepare_offline(cfg: TrainConfig, ds: data.OfflineData):
    """Transformed rewards, clipped actions and MC returns (with the failure rule) of the dataset."""
    rewards = (ds.rewards * cfg.reward_scale + cfg.reward_bias).astype(np.float32)
    mc = mc_returns(rewards, ds.episode_ends, cfg.discount, cfg.mc_failure_rule, r_fail(cfg))
    actions = np.clip(ds.actions, -cfg.clip_action, cfg.clip_action)
    return rewards, actions, mc


def default_run_dir(cfg) -> Path:
    seeds = f"seed{cfg.seed}" if cfg.num_seeds == 1 else f"seeds{cfg.seed}-{cfg.seed + cfg.num_seeds - 1}"
    return Path("runs") / "cal_ql" / cfg.dataset_id.replace("/", "_") / seeds


class World(NamedTuple):
    """What a run trains on: the data on device, the envs (one training env per seed, one evaluation env), the
    static hyper-parameters and the reward transformation."""
    offline: Buffer  # all dataset rows (transformed rewards, clipped actions, MC returns), shared by the seeds
    envs: list
    eval_env: Any
    h: Hyper
    obs_mean: np.ndarray
    obs_std: np.ndarray
    max_len: int  # the env's time limit: the longest trajectory
    refs: Optional[tuple]  # (ref_min, ref_max) return of the normalised score, None when the dataset has none

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
    max_len = envs[0].spec.max_episode_steps if envs[0].spec is not None else None
    if not max_len:
        raise data.DatasetError(f"{cfg.dataset_id}: the env has no time limit; Cal-QL collects whole trajectories")
    try:
        refs = data.reference_scores(cfg.dataset_id)
    except data.DatasetError as e:
        print(f"warning: {e}; logging raw returns only")
        refs = None
    rewards, actions, mc = prepare_offline(cfg, ds)
    offline = Buffer(*(jnp.asarray(x, jnp.float32) for x in (ds.observations, actions, rewards, ds.next_observations,
                                                              ds.terminals, mc)))
    obs_mean = ds.obs_mean if cfg.normalize else np.zeros(obs_dim, np.float32)
    obs_std = ds.obs_std if cfg.normalize else np.ones(obs_dim, np.float32)
    return World(offline, envs, eval_env, make_hyper(cfg, obs_dim, act_dim), obs_mean, obs_std, max_len, refs)


@dataclass
class Progress:
    """Per-seed bookkeeping (one entry per seed) and the host state of a run: the checkpoint's meta.json."""
    phase: str  # offline | load_offline | online | done
    num_seeds: int
    updates: np.ndarray  # gradient steps done
    env_steps: np.ndarray  # online env steps done
    online_size: np.ndarray  # online rows in the buffer
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
        return cls("offline", len(seeds), zeros(), zeros(), zeros(), zeros(),
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
    rows), or the offline state of run.offline_from to fine-tune."""
    h, N = world.h, len(seeds)
    online = Buffer(*(jnp.zeros((N, cfg.online_steps + world.max_len) + shape, jnp.float32) for shape in
                      ((h.obs_dim,), (h.act_dim,), (), (h.obs_dim,), (), ())))  # the last trajectory may overshoot
    state = stack_seeds([init_state(h, jax.random.PRNGKey(s), world.obs_mean, world.obs_std, cfg.log_alpha_prime_init)
                         for s in seeds])
    prog = Progress.start(cfg, seeds)
    if run.resume_from is not None:
        state, meta = load_state(run.resume_from, state, cfg)
        prog = Progress.from_meta(meta)
        for i, s in enumerate(seeds):
            rows = load_buffer_rows(run.run_dir / "checkpoints" / "buffer" / f"seed{s}", int(prog.online_size[i]))
            if rows is not None:
                online = online._replace(**{k: getattr(online, k).at[i, :len(v)].set(v) for k, v in rows.items()})
        print(f"resumed from {run.resume_from}: phase {prog.phase}, {prog.updates.tolist()} updates, "
              f"{prog.env_steps.tolist()} online env steps")
    elif run.offline_from is not None:
        state, src = load_state(run.offline_from, state, cfg)
        prog.updates = np.asarray(src["updates"] if N > 1 else np.ravel(src["updates"])[:1], np.int64)
        prog.act_key, prog.phase = np.asarray(src["act_key"]).reshape(N, -1), "load_offline"
        print(f"loaded offline state from {run.offline_from} ({src['updates']} updates)")
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
        cfg, w = self.cfg, self.world
        for i in range(len(self.seeds)) if which is None else which:
            params, mean_, std_ = seed_slice((state.actor.params, state.obs_mean, state.obs_std), i)
            record = {"seed": self.seeds[i], "phase": phase, "updates": int(prog.updates[i]),
                      "env_steps": int(prog.env_steps[i])}
            record.update(evaluate(w.eval_env, lambda o: act_deterministic(params, mean_, std_, o, w.h),
                                   cfg.eval_episodes, cfg.eval_seed, cfg.terminate_on_success, self.goal_task, w.refs))
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
                             int(prog.online_size[i]))
        prog.saved_rows = prog.online_size.copy()
        prog.wall_time = self.wall_before + time.time() - self.t_start
        save_state(ckpt_dir / name, state, prog.meta(), self.cfg)


class Episodes:
    """The training envs, one entry per seed, between trajectories, and the chunk holding each seed's last one."""

    def __init__(self, world: World, prog: Progress, seeds: list):
        N, h = len(seeds), world.h
        for i, env in enumerate(world.envs):
            if prog.env_rng[i] is not None:
                env_rng_restore(env, prog.env_rng[i], seeds[i])
        self.first_reset = np.array([snapshot is None for snapshot in prog.env_rng])
        self.chunk = {k: np.zeros((N, world.max_len) + s, np.float32) for k, s in
                      (("obs", (h.obs_dim,)), ("act", (h.act_dim,)), ("rew", ()), ("next_obs", (h.obs_dim,)),
                       ("done", ()), ("mc", ()))}
        self.obs = np.zeros((N, h.obs_dim), np.float32)
        self.recent = [[] for _ in range(N)]
        self.due = np.zeros(N, bool)  # waiting for the synchronised evaluation + checkpoint


def collect(cfg: TrainConfig, world: World, state, prog: Progress, ep: Episodes, act_key, seeds):
    """One whole trajectory with the stochastic policy for each seed that is neither due nor finished, into
    ep.chunk with its MC returns. Returns (steps per seed, their episode returns to log, the advanced keys)."""
    N = len(seeds)
    n, ret = np.zeros(N, np.int32), [0.0] * N
    active = ~ep.due & (prog.env_steps < cfg.online_steps)
    collected = np.flatnonzero(active)
    for i in collected:
        ep.obs[i] = world.envs[i].reset(seed=seeds[i] if ep.first_reset[i] else None)[0]
        ep.first_reset[i] = False
    while active.any():
        actions, act_key = act_explore(state.actor.params, state.obs_mean, state.obs_std, ep.obs, act_key,
                                       jnp.asarray(active), world.h)
        actions = np.asarray(actions)
        for i in np.flatnonzero(active):
            next_obs, r, term, trunc, info = world.envs[i].step(actions[i])
            term = term or (cfg.terminate_on_success and bool(info.get("success", False)))
            j, c = n[i], ep.chunk
            c["obs"][i, j], c["act"][i, j], c["next_obs"][i, j] = ep.obs[i], actions[i], next_obs
            c["done"][i, j], c["rew"][i, j] = float(term), world.reward(r, cfg)
            n[i], ret[i], ep.obs[i] = j + 1, ret[i] + float(r), next_obs
            if term or trunc:
                active[i] = False
    for i in collected:
        ends = np.zeros(n[i], bool)
        ends[-1] = True
        ep.chunk["mc"][i, :n[i]] = mc_returns(ep.chunk["rew"][i, :n[i]], ends, cfg.discount, cfg.mc_failure_rule,
                                              r_fail(cfg))
        prog.episodes[i] += 1
        ep.recent[i] = (ep.recent[i] + [ret[i]])[-10:]
    prog.env_steps += n
    return n, {f"online/episode_return{'' if N == 1 else f'/seed{seeds[i]}'}": ret[i] for i in collected}, act_key


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
