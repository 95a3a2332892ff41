"""O2SAC (single file, JAX): offline CQL, optimistic critic reconstruction, then constrained SAC fine-tuning.

Paper:  Luo, Xie, Wang, Huang, "Optimistic Critic Reconstruction and Constrained Fine-Tuning for General
        Offline-to-Online RL", NeurIPS 2024, https://arxiv.org/abs/2412.18855.
Official code: https://github.com/QinwenLuo/OCR-CFT @ 77c49819e0814eb06dccd7f60db06ba58165317c
        (`finetune/O2SAC.py`, `finetune/online_agent/sac.py`, `offline/cql.py`, `offline/offline_agent/cql.py`,
        `net.py`, `config/finetune/O2SAC/*`, `config/offline/cql/antmaze/*`).

What is implemented (official semantics unless listed below), phase by phase (`phase` in eval.jsonl):
  offline       CQL pre-training exactly as OCR's (CORL-derived) `offline/cql.py`: tanh-Gaussian actor, two
                critics without LayerNorm, SAC actor loss mean(alpha log pi - min Q) from step 1 (bc_steps 0),
                auto-entropy (log alpha from 0), TD target min_i Qbar_i(s', a'~pi) (AntMaze: max over 10 samples),
                CQL(H) importance-sampled logsumexp over random / current-state / next-state policy actions (the
                next-state actions evaluated at s, as in the code), fixed weight or Lagrange (AntMaze).
                Skipped by `--offline_checkpoint` (see "General O2O hand-off").
  reevaluation  policy re-evaluation (PR, `SAC.ope`): FRESH critics (LayerNorm MLPs, orthogonal init) learn the
                soft value of the fixed offline actor pi_ref with SAC's backup
                    y = r + gamma (1-d) [min_i Qbar_i(s', a') - alpha log pi_ref(a'|s')],  a' ~ pi_ref(.|s'),
                alpha fixed at `alpha`, Polyak target update every step. The actor is not updated.
  alignment     value alignment (VA, `SAC.align_value`), target critics FROZEN, actor updated:
                    a* = clip(tanh(mean_ref(s)), +-0.9999),  Q* = min_i Qbar_i(s, a*)         (anchor)
                    a~ ~ pi(.|s) (no grad),  y~ = min(Q* - alpha (log pi_ref(a*|s) - log pi_ref(a~|s)),
                                                      min_i Qbar_i(s, a~))
                    L_Q = sum_i MSE(Q_i(s,a*), Q*) + sum_i MSE(Q_i(s,a~), y~)
                    L_pi = mean(alpha log pi(a|s) - min_i Q_i(s,a)),  a ~ pi (a second, reparameterised sample)
                then the transition: Qbar := Q (hard copy); pi_ref := pi if the aligned actor evaluates better
                than the offline one; best score := max of both.
  online        constrained fine-tuning (CF, `SAC.update`): per env step `utd` updates (official: 10) on batches
                of 50 % offline + 50 % online rows (`mixing_ratio`, official buffer_load 'half'):
                    a ~ pi(.|s) (reparam), l = log pi(a|s), l_ref = max(log pi_ref(a|s), -50)
                    L_pi = mean(alpha l - min_i Q_i(s,a) + lambda (l - l_ref))        (alpha, lambda constants)
                    y = r + gamma (1-d) [min_i Qbar_i(s',a') - alpha l' - lambda (l' - l'_ref)],  a' ~ pi(.|s')
                    L_alpha = -mean(log alpha (l - |A|)),  eps_t = min(eps_end, eps_0 + t (eps_end-eps_0)/end_steps)
                    L_lambda = lambda * stopgrad(mean(|0.7 - 1[u > 0]| u)),  u = eps_t - (l - l_ref)
                lambda is stepped only on the first of the `utd` updates of an env step (t = env step); Polyak
                targets every update; after each evaluation pi_ref := pi if the score beats the best so far.
  All losses of one update come from one parameter snapshot (one jax.grad over all trainable parameters with
  stop-gradients, as the official per-loss backward passes do). Networks as in OCR `net.py`: critics
  [Linear -> LayerNorm (fine-tuning only) -> ReLU] x n -> Linear(1), orthogonal(1.0) kernels, zero biases, as a
  vmapped ensemble (`n_critics`; `double_critic: false` = the official single-Q1 AntMaze setting); actor MLP
  (3 x 256) -> 2|A| outputs split into mean and raw log-std, log_std = clip(m * raw + b, -20, 2) with learnable
  scalars m (init 1) and b (init -1), PyTorch-default init (OCR's `net.py` ignores `orthogonal_init` for the
  actor) and a xavier(1e-2) output layer; deterministic action clip(tanh(mean), +-0.9999); log pi_ref(a|s) of a
  given action first clips a to +-(1-1e-4).

Ablation switches (the paper's ablations run from configs; each default true):
  policy_reevaluation    false: no PR phase and NO fresh critics: fine-tuning keeps the offline CQL critics and
                         their targets (their architecture: `cql_critic_hidden`, no LayerNorm; with
                         double_critic false only the first one), i.e. the naive "offline actor + critic" start.
  value_alignment        false: no VA phase (the actor leaves reconstruction unchanged); the transition still
                         hard-copies Qbar := Q.
  constrained_finetuning false: lambda is 0 in the actor loss and the target (no KL term) and never updated: plain
                         SAC with auto-entropy on the 50/50 batches (pi_ref is still tracked for the logged KL).
  All three false: "load the offline CQL actor and critics, then run SAC" (the naive baseline).

General O2O hand-off (`--offline_checkpoint DIR`): DIR is either (a) this script's `checkpoints/offline` (the
full CQL state: actor, critics, temperatures), or (b) a checkpoint of `algorithms/cal_ql.py` (`offline` or
`latest`), whose TanhGaussianActor has exactly this actor's form (MLP -> 2|A| mean / raw log-std, scalars
`log_std_multiplier`, `log_std_offset`): its `actor.params` subtree is copied one to one (same Flax names); the
hidden sizes must equal `policy_hidden` (else a clear error). Cal-QL critics are not used, so (b) needs
`policy_reevaluation: true`. Both checks: observation / action dims and the normalisation stats stored in the
checkpoint must equal this run's (same dataset and `normalize`). IQL-style Gaussian actors (tanh mean,
state-independent log-std) are a different distribution and are rejected with a message saying so. Seeds: an
o2sac checkpoint must hold this run's number of seeds; a cal_ql.py checkpoint of N seeds starts an N-seed run seed
by seed (its i-th actor for this run's i-th seed), a one-seed one gives its actor to every seed.

Deviations (and the switch that restores the reference behaviour where one exists):
  1. Evaluation runs on a separate env seeded with `eval_seed` (the official code evaluates on the
     training env mid-episode and also runs unlogged stochastic episodes). Online evaluations happen at exact
     multiples of `online_eval_every` env steps as in the official loop; checkpoints at the first episode end
     after an evaluation (so a resumed run restores the training env exactly at an episode boundary).
  2. `utd` is a config field (official: hard-coded 10).
  3. The offline CQL phase lives in this file with OCR's settings: MuJoCo = `offline/cql.py`
     defaults (policy lr 3e-5, weight 10, 3 x 256 critics), AntMaze = `config/offline/cql/antmaze/*.yaml`.
  4. Terminals: true terminations only; `terminate_on_success` (AntMaze configs) ends an episode as terminal at
     the goal, reproducing D4RL's AntMaze `eval=True` semantics on Minari's continuing-task envs. Datasets are
     Minari's `D4RL/antmaze/*-v1` and this project's local `o2o/...` locomotion suite (OCR: D4RL -v2).
  5. `online_block` > 1 collects that many env steps with a fixed policy before their updates run (the updates
     of env step t still sample the online rows [0, t) and use eps_t, as the official loop does); 1 = official.
  6. Re-evaluation records in eval.jsonl copy the score of the offline evaluation (the actor is unchanged in PR,
     so a rollout would repeat it); their Q / KL diagnostics are computed fresh.
  7. `auto_alpha: false` keeps alpha fixed at `alpha` online (the official code would use alpha_multiplier).
  8. `double_critic: false` builds a 1-member ensemble (the official code keeps an unused, untrained Q2).
  9. Not implemented: `refer_with_optimal_pi: false` (periodic reference copies, /4 threshold, hopper-expert grad
     clip) and buffer_load 'all' / 'part' / 'none' (all official configs use the best-policy rule and 'half').
 10. The AntMaze configs evaluate the CQL actor every 50k updates (official: 100 episodes every 5k; logging only).

Logged per evaluation (eval.jsonl + wandb eval/...): phase (offline | reevaluation | alignment | online), updates,
phase_updates, env_steps, return, normalized_score (+ success_rate on goal tasks), lambda, alpha, epsilon (eps_t),
kl_to_reference / kl_to_offline (mean single-sample KL(pi || pi_ref) estimate, as in the lambda loss, over
`eval_batch_size` fixed dataset states), q_offline_mode (min_i Q_i at the loaded offline actor's most likely action,
same states), q_policy_mode, best_score, reference_updated (online), seed, wall_time (seconds since the run
started, accumulated over resumes). The score before fine-tuning is the last 'offline' record; a dip at the start
of fine-tuning shows as 'alignment' / first 'online' records below it.

Several seeds in one process (`--num_seeds N`): seeds seed..seed+N-1 train together, the whole train state
vmapped over a leading seed axis (offline rows shared on device, online rows per seed) and one training env
per seed, acted for in one jitted call per env step. Every phase runs vmapped (CQL, re-evaluation, alignment:
update-only blocks; fine-tuning: each seed's utd updates per env step in one masked loop); each seed keeps its own
reference policy, best score, lambda, alpha and eps_t and follows exactly its single-seed schedule (blocks,
warm-up, updates, evaluations, reference updates), so its numbers equal the single-seed run's up to float32
round-off (XLA's batched matmuls sum in another order). A seed due for a checkpoint (at the first episode end
after an evaluation) waits until every seed is due (or finished). Evaluations go to run_dir/seed<S>/eval.jsonl.

Orthogonal kernels come from `orthogonal_kernel_init` (Householder QR in jnp ops), not nn.initializers.orthogonal:
the same kernels up to float round-off, without jaxlib 0.10.2's CPU LAPACK QR, whose batched form (vmapped
ensembles, several seeds) can deadlock XLA's thread pool (docs/testing.md, "A jaxlib 0.10.2 deadlock on CPU").

Usage:
    python algorithms/o2sac.py --config_path configs/o2sac/quickstart.yaml
    python algorithms/o2sac.py --config_path configs/o2sac/quickstart.yaml --resume     # continue a killed run
    python algorithms/o2sac.py --config_path ... --offline_checkpoint runs/.../checkpoints/offline
    python algorithms/o2sac.py --config_path ... --value_alignment false                # an ablation
    python algorithms/o2sac.py --config_path configs/o2sac/quickstart.yaml --num_seeds 4   # seeds 0..3 at once
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

    @property
    def finetune_n_critics(self) -> int:
        return self.n_critics if self.double_critic else 1


RESUME_FREE = {"resume", "overwrite", "offline_checkpoint", "wandb_mode", "online_steps", "run_dir"}  # may change on --resume


class CQLHyper(NamedTuple):
    """Static hyper-parameters of the offline CQL phase."""
    obs_dim: int
    act_dim: int
    policy_hidden: tuple
    log_std_multiplier: float
    log_std_offset: float
    critic_hidden: tuple
    n_critics: int
    batch_size: int
    block: int
    discount: float
    tau: float
    policy_lr: float
    critic_lr: float
    target_entropy: float
    weight: float
    n_actions: int
    importance_sample: bool
    temp: float
    lagrange: bool
    target_action_gap: float
    max_target_backup: bool
    clip_diff_min: float
    clip_diff_max: float
    backup_entropy: bool


class Hyper(NamedTuple):
    """Static hyper-parameters of re-evaluation, alignment and fine-tuning."""
    obs_dim: int
    act_dim: int
    policy_hidden: tuple
    log_std_multiplier: float
    log_std_offset: float
    critic_hidden: tuple  # fine-tuning critics: fresh ones, or the offline CQL critics when PR is off
    critic_layernorm: bool
    n_critics: int  # effective (1 when double_critic is false)
    batch_size: int
    offline_rows: int  # rows of an online-phase batch drawn from the offline data
    block: int
    online_block: int
    utd: int
    discount: float
    tau: float
    policy_lr: float
    critic_lr: float
    alpha_lr: float
    lmbda_lr: float
    auto_alpha: bool
    target_entropy: float
    constrained: bool
    threshold: float
    end_threshold: float
    end_steps: int
    loss_tau: float
    ref_log_prob_min: float


def make_cql_hyper(cfg: TrainConfig, obs_dim: int, act_dim: int) -> CQLHyper:
    return CQLHyper(obs_dim, act_dim, tuple(cfg.policy_hidden), cfg.log_std_multiplier, cfg.log_std_offset,
                    tuple(cfg.cql_critic_hidden), cfg.cql_n_critics, cfg.batch_size, cfg.update_block, cfg.discount,
                    cfg.tau, cfg.cql_policy_lr, cfg.cql_critic_lr, -float(act_dim), cfg.cql_weight, cfg.cql_n_actions,
                    cfg.cql_importance_sample, cfg.cql_temp, cfg.cql_lagrange, cfg.cql_target_action_gap,
                    cfg.cql_max_target_backup, cfg.cql_clip_diff_min, cfg.cql_clip_diff_max, cfg.cql_backup_entropy)


def make_hyper(cfg: TrainConfig, obs_dim: int, act_dim: int) -> Hyper:
    fresh = cfg.policy_reevaluation  # PR off: the fine-tuning critics ARE the offline CQL critics
    return Hyper(obs_dim, act_dim, tuple(cfg.policy_hidden), cfg.log_std_multiplier, cfg.log_std_offset,
                 tuple(cfg.critic_hidden if fresh else cfg.cql_critic_hidden), cfg.critic_layernorm and fresh,
                 cfg.finetune_n_critics, cfg.batch_size, int(cfg.batch_size * cfg.mixing_ratio), cfg.update_block,
                 cfg.online_block, cfg.utd, cfg.discount, cfg.tau, cfg.policy_lr, cfg.critic_lr, cfg.alpha_lr,
                 cfg.lmbda_lr, cfg.auto_alpha, -float(act_dim), cfg.constrained_finetuning, cfg.threshold,
                 cfg.end_threshold, cfg.end_steps, cfg.loss_tau, cfg.ref_log_prob_min)


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


class MLP(nn.Module):
    """ReLU MLP as in OCR `net.py`. init 'orthogonal': every kernel orthogonal(1.0), zero biases (CriticFunction);
    init 'torch': PyTorch-default hidden layers (U(+-1/sqrt(fan_in)) kernels and biases) and a xavier-uniform(1e-2)
    output kernel with zero bias (TanhGaussianPolicy). Optional LayerNorm (eps 1e-5) before each ReLU."""
    hidden: tuple
    out_dim: int
    init: str = "orthogonal"
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            if self.init == "orthogonal":
                dense = nn.Dense(width, kernel_init=orthogonal_kernel_init(1.0), bias_init=nn.initializers.zeros)
            else:
                bound = 1.0 / math.sqrt(x.shape[-1])
                dense = nn.Dense(width, kernel_init=_uniform(bound), bias_init=_uniform(bound))
            x = dense(x)
            if self.layer_norm:
                x = nn.LayerNorm(epsilon=1e-5)(x)
            x = nn.relu(x)
        kernel = (orthogonal_kernel_init(1.0) if self.init == "orthogonal"
                  else nn.initializers.variance_scaling(1e-4, "fan_avg", "uniform"))  # xavier_uniform(gain 1e-2)
        return nn.Dense(self.out_dim, kernel_init=kernel, bias_init=nn.initializers.zeros)(x)


class TanhGaussianActor(nn.Module):
    """(mean, log_std) of the pre-tanh Gaussian; log_std = clip(m * raw + b, -20, 2) with learnable scalars m, b.
    Parameter names equal cal_ql.py's TanhGaussianActor (MLP_0/Dense_i, log_std_multiplier, log_std_offset)."""
    act_dim: int
    hidden: tuple
    log_std_multiplier: float = 1.0
    log_std_offset: float = -1.0

    @nn.compact
    def __call__(self, obs):
        out = MLP(self.hidden, 2 * self.act_dim, init="torch")(obs)
        mean, raw = jnp.split(out, 2, axis=-1)
        m = self.param("log_std_multiplier", lambda _: jnp.asarray(self.log_std_multiplier, jnp.float32))
        b = self.param("log_std_offset", lambda _: jnp.asarray(self.log_std_offset, jnp.float32))
        return mean, jnp.clip(m * raw + b, -20.0, 2.0)


class QNet(nn.Module):
    hidden: tuple
    layer_norm: bool

    @nn.compact
    def __call__(self, obs, act):
        return MLP(self.hidden, 1, "orthogonal", self.layer_norm)(jnp.concatenate([obs, act], -1))[..., 0]


def critic_ensemble(hidden: tuple, n: int, layer_norm: bool) -> nn.Module:
    """`n` Q networks with independent parameters, evaluated on the same inputs: output [n, ...]."""
    return nn.vmap(QNet, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                   axis_size=n)(hidden=hidden, layer_norm=layer_norm)


def actor_net(h) -> TanhGaussianActor:
    return TanhGaussianActor(h.act_dim, h.policy_hidden, h.log_std_multiplier, h.log_std_offset)


def cql_critic_net(h: CQLHyper) -> nn.Module:
    return critic_ensemble(h.critic_hidden, h.n_critics, False)


def critic_net(h: Hyper) -> nn.Module:
    return critic_ensemble(h.critic_hidden, h.n_critics, h.critic_layernorm)


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


def cql_optimizers(h: CQLHyper):
    return {"actor": optax.adam(h.policy_lr), "critic": optax.adam(h.critic_lr),
            "log_alpha": optax.adam(h.policy_lr), "log_alpha_prime": optax.adam(h.critic_lr)}


def optimizers(h: Hyper):
    return {"actor": optax.adam(h.policy_lr), "critic": optax.adam(h.critic_lr),
            "log_alpha": optax.adam(h.alpha_lr), "log_lmbda": optax.adam(h.lmbda_lr)}


def init_cql_state(h: CQLHyper, key, obs_mean, obs_std) -> CQLState:
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
        critic = jax.tree.map(lambda x: x[:h.n_critics], offline_critic)
        target = jax.tree.map(lambda x: x[:h.n_critics], offline_critic_target)
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
def cql_losses(params: dict, state: CQLState, batch: Buffer, key, h: CQLHyper):
    """All CQL losses from one snapshot (OCR `ContinuousCQL.train`); stop-gradients keep each on its parameters."""
    actor, critic = actor_net(h), cql_critic_net(h)
    sg = jax.lax.stop_gradient
    k_pi, k_next, k_rand, k_cur, k_cql_next = jax.random.split(key, 5)
    obs, next_obs = _norm(state, batch.obs), _norm(state, batch.next_obs)
    b, n = obs.shape[0], h.n_actions
    mean_all, log_std_all = actor.apply({"params": params["actor"]}, jnp.concatenate([obs, next_obs]))
    mean, log_std, next_mean, next_log_std = mean_all[:b], log_std_all[:b], mean_all[b:], log_std_all[b:]

    a_pi, logp_pi = tanh_gaussian_sample(mean, log_std, k_pi)
    alpha_loss = -(params["log_alpha"] * sg(logp_pi + h.target_entropy)).mean()
    alpha = jnp.exp(params["log_alpha"])
    q_pi = critic.apply({"params": sg(params["critic"])}, obs, a_pi).min(0)
    actor_loss = (sg(alpha) * logp_pi - q_pi).mean()

    if h.max_target_backup:
        a_next, logp_next = tanh_gaussian_sample(sg(next_mean), sg(next_log_std), k_next, n)
        next_rep = jnp.broadcast_to(next_obs[:, None], (b, n, next_obs.shape[-1]))
        q_next = critic.apply({"params": state.critic_target}, next_rep, a_next).min(0)  # [B, n]
        best = jnp.argmax(q_next, -1)[:, None]
        q_next = jnp.take_along_axis(q_next, best, -1)[:, 0]
        logp_next = jnp.take_along_axis(logp_next, best, -1)[:, 0]
    else:
        a_next, logp_next = tanh_gaussian_sample(sg(next_mean), sg(next_log_std), k_next)
        q_next = critic.apply({"params": state.critic_target}, next_obs, a_next).min(0)
    if h.backup_entropy:
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
    ood = cql_logsumexp(q_rand, q_nxt, q_cur, sg(logp_nxt), sg(logp_cur), h.act_dim, h.temp, q_data,
                        h.importance_sample)  # [E, B]
    cql_diff = jnp.clip(ood - q_data, h.clip_diff_min, h.clip_diff_max).mean(-1)  # [E]
    bellman = ((q_data - y) ** 2).mean(-1)  # [E]
    if h.lagrange:
        alpha_prime = jnp.clip(jnp.exp(params["log_alpha_prime"]), 0.0, 1e6)
        cql_loss = sg(alpha_prime) * h.weight * (cql_diff - h.target_action_gap)
        alpha_prime_loss = -(alpha_prime * h.weight * (sg(cql_diff) - h.target_action_gap)).mean()
    else:
        alpha_prime, alpha_prime_loss = jnp.zeros(()), jnp.zeros(())
        cql_loss = h.weight * cql_diff
    critic_loss = (bellman + cql_loss).sum()  # official qf1_loss + qf2_loss + cql terms
    total = critic_loss + actor_loss + alpha_loss + alpha_prime_loss
    metrics = {"critic_loss": critic_loss, "bellman_loss": bellman.mean(), "cql_diff": cql_diff.mean(),
               "actor_loss": actor_loss, "alpha_loss": alpha_loss, "alpha": alpha, "alpha_prime": alpha_prime,
               "log_pi": logp_pi.mean(), "q_data": q_data.mean(), "target_q": y.mean()}
    return total, metrics


def cql_update(state: CQLState, batch: Buffer, key, h: CQLHyper):
    names = ("actor", "critic", "log_alpha", "log_alpha_prime")
    params = {k: getattr(state, k).params for k in names}
    grads, metrics = jax.grad(cql_losses, has_aux=True)(params, state, batch, key, h)
    txs = cql_optimizers(h)
    new = {k: _step(getattr(state, k), grads[k], txs[k]) for k in names}
    if not h.lagrange:
        new["log_alpha_prime"] = state.log_alpha_prime
    target = optax.incremental_update(new["critic"].params, state.critic_target, h.tau)
    return state._replace(critic_target=target, updates=state.updates + 1, **new), metrics


# Multi-seed: every state leaf, the online buffer and the per-seed counters carry a leading seed axis; the
# offline rows are shared (in_axes None). One seed's numbers equal a single-seed run's up to float32
# round-off (XLA sums batched matmuls in a different order).
@partial(jax.jit, static_argnames=("h",))
def cql_block(state: CQLState, offline: Buffer, offline_size, h: CQLHyper):
    """`h.block` CQL updates per seed in one lax.scan (vmapped over seeds), batches sampled on device inside the
    scan; metrics of shape [seeds, h.block]."""
    def one_seed(state):
        def body(state, _):
            key, k_batch, k_upd = jax.random.split(state.key, 3)
            batch = sample_batch(k_batch, offline, offline_size, h.batch_size)
            return cql_update(state._replace(key=key), batch, k_upd, h)
        return jax.lax.scan(body, state, None, length=h.block)
    return jax.vmap(one_seed)(state)


# ---------------------------------------------------------------------------------------------- reconstruction
def pr_update(state: O2State, batch: Buffer, key, h: Hyper):
    """Policy re-evaluation (`SAC.ope`): soft SARSA of the fixed pi_ref, alpha fixed; Polyak targets."""
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
    """Value alignment (`SAC.align_value`): critic to the anchors / aligned targets, SAC actor step, targets frozen."""
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
def reconstruct_block(state: O2State, offline: Buffer, offline_size, kind: str, h: Hyper):
    """`h.block` PR (kind 'reevaluation') or VA (kind 'alignment') updates per seed in one lax.scan on offline
    batches (vmapped over seeds); metrics of shape [seeds, h.block]."""
    update = pr_update if kind == "reevaluation" else va_update

    def one_seed(state):
        def body(state, _):
            key, k_batch, k_upd = jax.random.split(state.key, 3)
            batch = sample_batch(k_batch, offline, offline_size, h.batch_size)
            return update(state._replace(key=key), batch, k_upd, h)
        return jax.lax.scan(body, state, None, length=h.block)
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
    actor and critic losses; the lambda loss only moves log lambda."""
    actor, critic = actor_net(h), critic_net(h)
    sg = jax.lax.stop_gradient
    k_pi, k_next = jax.random.split(key)
    obs, next_obs = _norm(state, batch.obs), _norm(state, batch.next_obs)
    b = obs.shape[0]
    both = jnp.concatenate([obs, next_obs])
    mean_all, log_std_all = actor.apply({"params": params["actor"]}, both)
    ref_mean_all, ref_log_std_all = actor.apply({"params": state.ref_actor}, both)
    mean, log_std, next_mean, next_log_std = mean_all[:b], log_std_all[:b], mean_all[b:], log_std_all[b:]

    alpha = jnp.exp(params["log_alpha"]) if h.auto_alpha else jnp.exp(sg(params["log_alpha"]))
    lmbda = jnp.exp(params["log_lmbda"]) if h.constrained else jnp.zeros(())

    a_pi, logp_pi = tanh_gaussian_sample(mean, log_std, k_pi)
    logp_ref = tanh_gaussian_log_prob(ref_mean_all[:b], ref_log_std_all[:b], a_pi)  # grad through a_pi
    kl = kl_estimate(logp_pi, logp_ref, h.ref_log_prob_min)
    q_pi = critic.apply({"params": sg(params["critic"])}, obs, a_pi).min(0)
    actor_loss = (sg(alpha) * logp_pi - q_pi + sg(lmbda) * kl).mean()
    alpha_loss = -(params["log_alpha"] * sg(logp_pi + h.target_entropy)).mean() if h.auto_alpha else jnp.zeros(())

    eps_t = epsilon_schedule(t, h.threshold, h.end_threshold, h.end_steps)
    weight = sg(lambda_loss_weight(eps_t - kl, h.loss_tau))
    lmbda_loss = lmbda * weight if h.constrained else jnp.zeros(())

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
    keep = jnp.logical_and(first, h.constrained)
    new["log_lmbda"] = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new["log_lmbda"], state.log_lmbda)
    target = optax.incremental_update(new["critic"].params, state.critic_target, h.tau)
    return state._replace(critic_target=target, updates=state.updates + 1, **new), metrics


def cf_sampled_update(state: O2State, offline: Buffer, offline_size, online: Buffer, online_size, t, first,
                      h: Hyper):
    """Batch of h.offline_rows offline rows + the rest from online rows [0, online_size), then one update."""
    key, k_off, k_on, k_upd = jax.random.split(state.key, 4)
    off = sample_batch(k_off, offline, offline_size, h.offline_rows)
    on = sample_batch(k_on, online, online_size, h.batch_size - h.offline_rows)
    batch = jax.tree.map(lambda a, b: jnp.concatenate([b, a]), off, on)  # official order: online then offline
    return cf_update(state._replace(key=key), batch, k_upd, t, first, h)


@partial(jax.jit, static_argnames=("h",))
def online_updates(state: O2State, offline: Buffer, offline_size, online: Buffer, first_t, k, h: Hyper):
    """Per seed i, the updates of its env steps t = first_t[i], ..., first_t[i] + k[i] - 1 (k[i] <= h.online_block,
    traced): for each, h.utd updates (inner lax.scan) sampling the seed's online rows [0, t) with lambda stepped on
    the first. One lax.fori_loop of max(k) env steps, vmapped over seeds; a seed with fewer env steps keeps its
    state (masked). Metrics [seeds, h.online_block, h.utd], rows >= k[i] are zero."""
    def one_seed(state, online, first_t, k_seed):
        def utd_updates(state, t):
            return jax.lax.scan(lambda s, j: cf_sampled_update(s, offline, offline_size, online, t, t, j == 0, h),
                                state, jnp.arange(h.utd))

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
def cql_diagnostics(state: CQLState, raw_obs, h: CQLHyper):
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
            "lambda": jnp.exp(state.log_lmbda.params) if h.constrained else jnp.zeros(()),
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


def load_offline_start(path: Path, cfg: TrainConfig, cql_h: CQLHyper, obs_mean, obs_std) -> OfflineStart:
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
        one = init_cql_state(cql_h, jax.random.PRNGKey(0), obs_mean, obs_std)
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
    template = actor_net(cql_h).init(jax.random.PRNGKey(0), jnp.zeros((1, cql_h.obs_dim)))["params"]
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
                         f"{got[0][0]} vs {cql_h.obs_dim}, action dim {got[-1][1] // 2} vs {cql_h.act_dim})")
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


# ---------------------------------------------------------------------------------------------- training
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


def train(cfg: TrainConfig) -> dict:
    """Offline CQL, re-evaluation, alignment and constrained fine-tuning of `num_seeds` seeds at once; returns the
    last evaluation record(s), paths and the before/after scores."""
    from tqdm import tqdm

    t_start = time.time()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    N = len(seeds)
    cfg.name = cfg.name or f"o2sac-{cfg.dataset_id.replace('/', '-')}-seed{cfg.seed}" + (f"x{N}" if N > 1 else "")
    goal_task = "antmaze" in cfg.dataset_id
    with Run(cfg, run_dir) as run:  # checks that need no data, before any slow work; see Run
        # data and envs (one training env per seed, one evaluation env)
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
        n_off = len(ds)
        cql_h, h = make_cql_hyper(cfg, obs_dim, act_dim), make_hyper(cfg, obs_dim, act_dim)
        obs_mean = ds.obs_mean if cfg.normalize else np.zeros(obs_dim, np.float32)
        obs_std = ds.obs_std if cfg.normalize else np.ones(obs_dim, np.float32)
        rewards = (ds.rewards * cfg.reward_scale + cfg.reward_bias).astype(np.float32)
        # offline rows on device, shared by the seeds; online rows per seed (+ slack for a full chunk of online_block)
        offline = Buffer(*(jnp.asarray(x, jnp.float32) for x in (ds.observations, ds.actions, rewards,
                                                                  ds.next_observations, ds.terminals)))
        capacity = cfg.online_steps + cfg.online_block
        online = Buffer(*(jnp.zeros((N, capacity) + s, jnp.float32) for s in
                          ((obs_dim,), (act_dim,), (), (obs_dim,), ())))
        pick = np.random.default_rng(cfg.eval_seed).choice(n_off, min(n_off, cfg.eval_batch_size), replace=False)
        eval_obs = jnp.asarray(ds.observations[np.sort(pick)], jnp.float32)  # the same states for every seed
        diag_key = jax.random.PRNGKey(cfg.eval_seed)  # fixed: diagnostics never touch the training RNG
        del rewards

        cql_state = stack_seeds([init_cql_state(cql_h, jax.random.PRNGKey(s), obs_mean, obs_std) for s in seeds])
        state = None  # O2State (leading seed axis) once the reconstruction starts

        def o2_from(start: OfflineStart, offline_scores: list) -> O2State:
            keep_critics = not cfg.policy_reevaluation
            return stack_seeds([
                init_o2_state(h, s, seed_slice(start.actor, i), obs_mean, obs_std, cfg.alpha, cfg.lmbda, offline_scores[i],
                              seed_slice(start.critic, i) if keep_critics else None,
                              seed_slice(start.critic_target, i) if keep_critics else None)
                for i, s in enumerate(seeds)])

        meta = {"algorithm": "o2sac", "num_seeds": N, "phase": "offline", "state_kind": "cql", "updates": [0] * N,
                "phase_updates": [0] * N, "env_steps": [0] * N, "online_size": [0] * N, "saved_rows": [0] * N,
                "act_key": np.stack([np.asarray(jax.random.PRNGKey(s + 1)) for s in seeds]), "env_rng": [None] * N,
                "eval_lines": [0] * N, "episodes": [0] * N, "wandb_id": None, "last_eval": [None] * N,
                "offline_eval": [None] * N, "wall_time": 0.0}
        resumed = run.resume_from is not None
        if resumed:
            if load_meta(run.resume_from)["state_kind"] == "cql":
                cql_state, meta = load_state(run.resume_from, cql_state, cfg)
            else:
                template = o2_from(OfflineStart(cql_state.actor.params, cql_state.critic.params,
                                                cql_state.critic_target, "o2sac", {}), [0.0] * N)
                state, meta = load_state(run.resume_from, template, cfg)
            for i, s in enumerate(seeds):
                rows = load_buffer_rows(ckpt_dir / "buffer" / f"seed{s}", meta["online_size"][i])
                if rows is not None:
                    online = online._replace(**{k: getattr(online, k).at[i, :len(v)].set(v) for k, v in rows.items()})
            print(f"resumed from {run.resume_from}: phase {meta['phase']}, {meta['updates']} updates, "
                  f"{meta['env_steps']} online env steps")
        start = None
        if meta["phase"] == "offline" and run.offline_from is not None and not resumed:
            start = load_offline_start(run.offline_from, cfg, cql_h, obs_mean, obs_std)
            meta["phase"] = "load_offline"
            print(f"loaded the offline actor{' and critics' if start.critic is not None else ''} from "
                  f"{cfg.offline_checkpoint} ({start.source} checkpoint)")
        with open(run_dir / "config.yaml", "w") as f:
            pyrallis.dump(cfg, f)
        if meta["wandb_id"] is None:
            meta["wandb_id"] = f"{cfg.name}-{int(time.time())}"
        logger = Logger(cfg, run_dir, seeds, meta["wandb_id"], meta["eval_lines"])
        act_key = jnp.asarray(meta["act_key"])
        wall_before = meta["wall_time"]

        def record_base(phase, i):
            return {"phase": phase, "seed": seeds[i], "updates": int(meta["updates"][i]),
                    "phase_updates": int(meta["phase_updates"][i]), "env_steps": int(meta["env_steps"][i])}

        def finish_record(i, record):
            record["wall_time"] = round(wall_before + time.time() - t_start, 2)  # s since the run started
            logger.log_eval(i, record)
            meta["eval_lines"][i], meta["last_eval"][i] = logger.eval_lines[i], record
            return record

        def diagnostics(one, i):
            """The logged Q / KL / temperatures of seed i (`one`: its slice of the current state)."""
            if state is None:
                d = cql_diagnostics(one, eval_obs, cql_h)
                out = {k: float(v) for k, v in d.items()}
                out.update({"lambda": None, "epsilon": None, "kl_to_reference": None, "kl_to_offline": None})
                return out
            return {k: float(v) for k, v in o2_diagnostics(one, eval_obs, diag_key, meta["env_steps"][i], h).items()}

        def run_eval(phase, i, rollout=True):
            """Seed i's evaluation record (not yet logged): a rollout of its deterministic actor, or (re-evaluation)
            its offline evaluation reused, plus the diagnostics."""
            one = seed_slice(cql_state if state is None else state, i)
            policy = lambda o: act_deterministic(one.actor.params, one.obs_mean, one.obs_std, o, h)  # noqa: E731
            record = record_base(phase, i)
            if rollout:
                record.update(evaluate(eval_env, policy, cfg.eval_episodes, cfg.eval_seed, cfg.terminate_on_success,
                                       goal_task, refs))
            else:  # re-evaluation: the actor is the offline one, whose evaluation is reused
                record.update({k: v for k, v in meta["offline_eval"][i].items() if k in
                               ("return", "return_std", "length", "episodes", "normalized_score", "normalized_score_std",
                                "success_rate")})
                record["score_reused"] = True
            record.update(diagnostics(one, i))
            return record

        def eval_all(phase, rollout=True):
            for i in range(N):
                finish_record(i, run_eval(phase, i, rollout))

        def mean_score():
            return float(np.mean([score_of(r) for r in meta["last_eval"] if r is not None]))

        def checkpoint(name="latest"):
            meta["act_key"] = np.asarray(act_key)
            meta["wall_time"] = wall_before + time.time() - t_start
            for i, s in enumerate(seeds):
                save_buffer_rows(ckpt_dir / "buffer" / f"seed{s}", seed_slice(online, i), meta["saved_rows"][i],
                                 meta["online_size"][i])
            meta["saved_rows"] = list(meta["online_size"])
            meta["state_kind"] = "cql" if state is None else "o2"
            save_state(ckpt_dir / name, cql_state if state is None else state, meta, cfg)

        def count_updates(k: list):
            meta["updates"] = [u + int(x) for u, x in zip(meta["updates"], k)]
            meta["phase_updates"] = [u + int(x) for u, x in zip(meta["phase_updates"], k)]

        def enter(phase):
            meta["phase"], meta["phase_updates"] = phase, [0] * N

        def start_reconstruction(start_: OfflineStart):
            """The offline scores are in meta['offline_eval']: build the fine-tuning states, go to the next phase."""
            nonlocal state
            state = o2_from(start_, [score_of(r) for r in meta["offline_eval"]])
            enter(next_phase(cfg, "offline"))
            if meta["phase"] == "online":
                transition()
            checkpoint()

        def transition():
            """After the reconstruction, per seed: Qbar := Q; pi_ref := pi if the aligned actor evaluated better."""
            nonlocal state
            state = hard_copy_targets(state)
            last = meta["last_eval"]
            if cfg.value_alignment and all(r is not None and r["phase"] == "alignment" for r in last):
                state, better = update_reference(state, jnp.asarray([score_of(r) for r in last], jnp.float32))
                for i, b in enumerate(np.asarray(better)):
                    print(f"transition (seed {seeds[i]}): aligned actor {score_of(last[i]):.2f} vs offline "
                          f"{score_of(meta['offline_eval'][i]):.2f}: "
                          f"{'pi_ref := aligned actor' if b else 'pi_ref stays the offline actor'}")
            enter("online")

        # ---- offline CQL pre-training (all seeds in one vmapped scan per block)
        if meta["phase"] == "offline":
            bar = tqdm(total=cfg.offline_updates, initial=meta["updates"][0], desc="O2SAC offline CQL", mininterval=5)
            while meta["phase_updates"][0] < cfg.offline_updates:
                cql_state, metrics = cql_block(cql_state, offline, n_off, cql_h)
                logged = block_metrics(metrics, cfg.update_block, "offline", seeds, meta["updates"])
                count_updates([cfg.update_block] * N)
                bar.update(cfg.update_block)
                logger.log({**logged, "offline/updates": meta["updates"][0]})
                if meta["phase_updates"][0] % cfg.offline_eval_every == 0 or \
                        meta["phase_updates"][0] == cfg.offline_updates:
                    eval_all("offline")
                    bar.set_postfix(score=mean_score())
                    if meta["phase_updates"][0] < cfg.offline_updates:
                        checkpoint()
                if run.stop and meta["phase_updates"][0] < cfg.offline_updates:
                    checkpoint()
                    run.interrupt_if_asked(f"after {meta['phase_updates'][0]} offline updates")
            bar.close()
            if meta["last_eval"][0] is None:  # offline_updates == 0: still report the starting policies
                eval_all("offline")
            meta["offline_eval"] = list(meta["last_eval"])
            meta["phase"] = "offline_done"
            checkpoint("offline")  # the CQL states: reusable with --offline_checkpoint
        if meta["phase"] == "offline_done":  # (also a run resumed from its offline checkpoint)
            start_reconstruction(OfflineStart(cql_state.actor.params, cql_state.critic.params, cql_state.critic_target,
                                              "o2sac", {}))
        elif meta["phase"] == "load_offline":
            src_updates = np.ravel(start.meta.get("updates", 0)).astype(int)  # one count per source seed
            meta["updates"] = [int(u) for u in np.broadcast_to(src_updates, (N,))]
            meta["phase_updates"] = list(meta["updates"])
            if start.cql_state is not None:
                cql_state = start.cql_state
                eval_all("offline")  # the scores before fine-tuning
            else:  # cal_ql actors: no CQL critics of this file's form, so no offline Q diagnostic
                cql_state = cql_state._replace(actor=cql_state.actor._replace(params=start.actor))
                for i in range(N):
                    record = run_eval("offline", i)
                    record["q_offline_mode"] = None
                    finish_record(i, record)
            meta["offline_eval"] = list(meta["last_eval"])
            start_reconstruction(start)

        # ---- policy re-evaluation and value alignment (offline data only; all seeds in one vmapped scan per block)
        for phase, steps, rollout in (("reevaluation", cfg.ope_steps, False), ("alignment", cfg.align_steps, True)):
            if meta["phase"] != phase:
                continue
            bar = tqdm(total=steps, initial=meta["phase_updates"][0], desc=f"O2SAC {phase}", mininterval=5)
            while meta["phase_updates"][0] < steps:
                state, metrics = reconstruct_block(state, offline, n_off, phase, h)
                logged = block_metrics(metrics, cfg.update_block, phase, seeds, meta["updates"])
                count_updates([cfg.update_block] * N)
                bar.update(cfg.update_block)
                logger.log({**logged, f"{phase}/updates": meta["updates"][0]})
                if meta["phase_updates"][0] % cfg.reconstruct_eval_every == 0 or meta["phase_updates"][0] == steps:
                    eval_all(phase, rollout)
                    bar.set_postfix(score=mean_score())
                    if meta["phase_updates"][0] < steps:
                        checkpoint()
                if run.stop and meta["phase_updates"][0] < steps:
                    checkpoint()
                    run.interrupt_if_asked(f"after {meta['phase_updates'][0]} {phase} updates")
            bar.close()
            enter(next_phase(cfg, phase))
            if meta["phase"] == "online":
                transition()
            checkpoint()

        # ---- online constrained fine-tuning. Each seed follows exactly its single-seed schedule: blocks of up to
        # online_block env steps with a fixed policy (ending at an episode end and at an evaluation step), then their
        # updates (after warm-up), an evaluation every online_eval_every env steps (a better policy becomes that seed's
        # reference). A seed at the first episode end after an evaluation is due for a checkpoint and waits until every
        # seed is due (or finished), so checkpoints fall on episode ends of all seeds.
        def online_eval(which):
            """Evaluate the seeds in `which`, then each one's reference rule (diagnostics before the update)."""
            nonlocal state
            records = {i: run_eval("online", i) for i in which}
            scores = [score_of(records[i]) if i in records else -np.inf for i in range(N)]
            state, better = update_reference(state, jnp.asarray(scores, jnp.float32))
            better, best = np.asarray(better), np.asarray(state.best_score)
            for i in which:
                records[i]["reference_updated"] = bool(better[i])
                records[i]["best_score"] = float(best[i])
                finish_record(i, records[i])

        if meta["phase"] == "online":
            for i, env in enumerate(envs):
                if meta["env_rng"][i] is not None:
                    env_rng_restore(env, meta["env_rng"][i], seeds[i])
            first_reset = [meta["env_rng"][i] is None for i in range(N)]
            chunk = {k: np.zeros((N, cfg.online_block) + s, np.float32) for k, s in
                     (("obs", (obs_dim,)), ("act", (act_dim,)), ("rew", ()), ("next_obs", (obs_dim,)), ("done", ()))}
            obs = np.zeros((N, obs_dim), np.float32)
            at_episode_start = [True] * N
            ep_ret, ep_len, recent = [0.0] * N, [0] * N, [[] for _ in range(N)]
            pending = [False] * N  # evaluated since the last checkpoint
            due = [False] * N  # at an episode end after an evaluation: waiting for the synchronised checkpoint
            sums, n_sums = {}, 0
            bar = tqdm(total=cfg.online_steps * N, initial=sum(meta["env_steps"]), desc="O2SAC online", mininterval=5)
            while min(meta["env_steps"]) < cfg.online_steps:
                active = np.array([not due[i] and meta["env_steps"][i] < cfg.online_steps for i in range(N)])
                n = np.zeros(N, np.int64)  # this block's env steps per seed (0: waiting or finished)
                while active.any():
                    for i in np.flatnonzero(active):
                        if at_episode_start[i]:
                            obs[i] = envs[i].reset(seed=seeds[i] if first_reset[i] else None)[0]
                            first_reset[i], at_episode_start[i], ep_ret[i], ep_len[i] = False, False, 0.0, 0
                    actions, act_key = act_explore(state.actor.params, state.obs_mean, state.obs_std, obs, act_key,
                                                   jnp.asarray(active), h)
                    actions = np.asarray(actions)
                    for i in np.flatnonzero(active):
                        next_obs, r, term, trunc, info = envs[i].step(actions[i])
                        term = term or (cfg.terminate_on_success and bool(info.get("success", False)))
                        j = n[i]
                        chunk["obs"][i, j], chunk["act"][i, j], chunk["next_obs"][i, j] = obs[i], actions[i], next_obs
                        chunk["done"][i, j], chunk["rew"][i, j] = float(term), r * cfg.reward_scale + cfg.reward_bias
                        n[i], meta["env_steps"][i] = j + 1, meta["env_steps"][i] + 1
                        ep_ret[i], ep_len[i], obs[i] = ep_ret[i] + float(r), ep_len[i] + 1, next_obs
                        if term or trunc:
                            meta["episodes"][i] += 1
                            recent[i] = (recent[i] + [ep_ret[i]])[-10:]
                            logger.log({f"online/episode_return{'' if N == 1 else f'/seed{seeds[i]}'}": ep_ret[i],
                                        "online/episode_length": ep_len[i], "online/env_steps": meta["env_steps"][i]})
                            at_episode_start[i] = True
                        if at_episode_start[i] or meta["env_steps"][i] % cfg.online_eval_every == 0 or \
                                n[i] == cfg.online_block or meta["env_steps"][i] >= cfg.online_steps:
                            active[i] = False
                online = buffer_insert(online, Buffer(**{k: jnp.asarray(v) for k, v in chunk.items()}),
                                       jnp.asarray(meta["online_size"], jnp.int32))
                meta["online_size"] = [a + int(b) for a, b in zip(meta["online_size"], n)]
                # updates of env steps t = first_t .. env_steps once t > warmup_steps (none for a seed that waited)
                first_t = np.array([max(meta["env_steps"][i] - n[i] + 1, cfg.warmup_steps + 1) for i in range(N)])
                k = np.array([max(meta["env_steps"][i] - first_t[i] + 1, 0) if n[i] > 0 else 0 for i in range(N)])
                if k.any():
                    state, metrics = online_updates(state, offline, n_off, online, jnp.asarray(first_t, jnp.int32),
                                                    jnp.asarray(k, jnp.int32), h)
                    logged = block_metrics(metrics, k, "online", seeds, meta["updates"])
                    sums = {key: sums.get(key, 0.0) + v * int(k.sum()) for key, v in logged.items()}
                    n_sums += int(k.sum())
                    count_updates(k * cfg.utd)
                bar.update(int(n.sum()))
                which = [i for i in range(N) if n[i] > 0 and meta["env_steps"][i] % cfg.online_eval_every == 0]
                if which:
                    online_eval(which)
                    logger.log({**{key: v / max(n_sums, 1) for key, v in sums.items()},
                                "online/env_steps": sum(meta["env_steps"]), "online/updates": sum(meta["updates"])})
                    sums, n_sums = {}, 0
                    bar.set_postfix(score=np.mean([score_of(meta["last_eval"][i]) for i in which]),
                                    train_return=np.mean([np.mean(r) for r in recent if r] or [0.0]))
                    for i in which:
                        pending[i] = True
                for i in range(N):
                    if (pending[i] or run.stop) and at_episode_start[i] and meta["env_steps"][i] < cfg.online_steps:
                        due[i] = True  # (a stop request: checkpoint at every seed's next episode end)
                if any(due) and all(due[i] or meta["env_steps"][i] >= cfg.online_steps for i in range(N)):
                    meta["env_rng"] = [env_rng_snapshot(env) for env in envs]
                    checkpoint()
                    pending = [p and not d for p, d in zip(pending, due)]
                    due = [False] * N
                    run.interrupt_if_asked(f"at {meta['env_steps']} online env steps")
            bar.close()
            final = [i for i in range(N) if meta["last_eval"][i] is None or meta["last_eval"][i]["phase"] != "online"
                     or meta["last_eval"][i]["env_steps"] != meta["env_steps"][i]]
            if final:  # online_steps not a multiple of online_eval_every (or 0)
                online_eval(final)
            meta["phase"] = "done"
            checkpoint()
        elif meta["phase"] == "done":
            print(f"run in {run_dir} already finished")
        logger.close()
        for env in envs + [eval_env]:
            env.close()
        summaries = [summarize(path) for path in logger.eval_paths]
        out = {"run_dir": str(run_dir), "seeds": seeds, "last_eval": meta["last_eval"][0], "updates": meta["updates"][0],
               "env_steps": meta["env_steps"][0], **summaries[0]}
        if N > 1:
            out.update(last_eval=meta["last_eval"], updates=meta["updates"], env_steps=meta["env_steps"],
                       per_seed=summaries)
        return out


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
