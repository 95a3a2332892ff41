"""PEX (single file, JAX): IQL pre-training on a Minari dataset, then online fine-tuning by Policy Expansion.

Paper:  Zhang, Xu, Yu, "Policy Expansion for Bridging Offline-to-Online Reinforcement Learning", ICLR 2023,
        https://arxiv.org/abs/2302.00935.
Reference implementation followed here: the official code, https://github.com/Haichao-Zhang/PEX @
        b0ae11e17e5fd9ae38840748ce043aff895e952b (`main_offline.py`, `main_online.py --algorithm pex`).
Design notes (the update in detail, networks, reusing an iql.py pre-training, several seeds): docs/pex.md.

What is implemented (official semantics unless listed below):
  * offline: IQL, with the state, networks and parameter names of algorithms/iql.py (an offline checkpoint of
    either file starts the fine-tuning of the other: `--offline_checkpoint`); actor LR cosine-decayed to 0;
  * online: the offline actor pi_off is frozen and a new, randomly initialised Gaussian policy pi added; an action
    is a_w, w ~ softmax_k(inv_temperature * min_i Q_i(s, a_k)) over a1 = mean of pi_off(s) and a2 ~ pi(s);
  * online update (one per env step once `initial_collection_steps` transitions exist): IQL V, Q and target steps
    on `offline_fraction` offline + online rows, then pi by AWR on composite actions re-drawn at the batch states;
    constant LR; Q and V keep their weights with fresh Adam states;
  * evaluation: offline the IQL actor's mean action; online epsilon-greedy (`eval_epsilon`) policy action and
    gate, logging the new policy's action fraction, its gate probability and the candidates' Q;
  * networks: xavier-uniform actor init and log-std clamp [-5, 2] (`actor_init: torch`, `log_std_min: -20` are
    CORL's / iql.py's); data: rewards `reward_scale * r + reward_bias`, no state normalisation by default.

Deviations (and the switch that restores the reference behaviour where one exists):
  1. Evaluation runs on a separate env seeded with `eval_seed` (official: the training env, mid-episode), its
     epsilon/gate key derived from `eval_seed` and the env-step count (reproducible, also after a resume).
  2. Online updates run in jitted blocks: up to `online_block` env steps with a fixed policy, then one update per
     step past the initial collection (official: one update before every env step; `online_block: 1` is close).
  3. Online evaluations and checkpoints happen at the first episode end after every `online_eval_every` env
     steps, so a resumed run reproduces an uninterrupted one bit for bit on CPU.
  4. `clip_actions: true` clips the new policy's action to [-1, 1] before the gate (gated, stored, trained and
     executed action agree); `clip_actions: false` gates and trains on the unclipped sample (official).
  5. The online replay is a device array without eviction, sampled with replacement (official: FIFO of 1e6
     transitions, sampled without replacement within a batch).
  6. `terminate_on_success` (AntMaze configs) ends an episode as terminal when info['success'] is True (D4RL
     AntMaze eval=True semantics on the continuing-task Minari environments).
  7. Datasets are Minari's: AntMaze `D4RL/antmaze/*-v1` (official: antmaze-*-v0) and the local `o2o/...`
     locomotion suite (official: D4RL *-v2); locomotion expectile/beta 0.9/10 are the official README's example.
  8. `reset_optimizers: false` keeps the offline Adam states of Q and V (as iql.py); `normalize` and
     `normalize_reward_by_returns` (off by default, as official) let an iql.py pre-training be reused.
  9. AntMaze configs evaluate offline every 50k updates with `eval_episodes` (100) episodes (official: 10 every 10k
     steps), online every 10k env steps with 100 (official README).
Not implemented: the official baselines `scratch`, `buffer` and `direct` (iql.py covers `direct`-like fine-tuning).

Usage:
    python algorithms/pex.py --config_path configs/pex/quickstart.yaml
    python algorithms/pex.py --config_path configs/pex/quickstart.yaml --resume          # continue a killed run
    python algorithms/pex.py --config_path ... --offline_checkpoint runs/iql/.../checkpoints/offline
Writes to `run_dir`: config.yaml, eval.jsonl (one JSON line per evaluation; seed<S>/eval.jsonl with several
seeds), checkpoints/{latest,offline}, checkpoints/buffer/seed<S>/ (online transitions, appended at each
checkpoint), wandb/ (mode `wandb_mode`, or the WANDB_MODE environment variable when set).
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

LOG_STD_MAX = 2.0  # upper clamp of the state-independent log-std (official PEX and CORL)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    # experiment
    dataset_id: str = "D4RL/antmaze/umaze-v1"  # Minari dataset id (also gives the env), see algorithms/data.py
    seed: int = 0  # seed of networks, sampling, exploration and the training env
    eval_seed: int = 100  # seed of the evaluation env (re-seeded at the start of every evaluation)
    run_dir: str = ""  # output directory; "" = runs/pex/<dataset_id>/seed<seed> (several: seeds<first>-<last>)
    project: str = "o2o-jax"  # wandb project
    group: str = "pex"  # wandb group
    name: str = ""  # wandb run name; "" = pex-<dataset_id>-seed<seed>
    wandb_mode: str = "offline"  # online | offline | disabled (the WANDB_MODE env variable overrides it)
    resume: bool = False  # continue the run in run_dir from its newest intact checkpoint (`--resume` alone works)
    overwrite: bool = False  # delete a previous run in run_dir and start again (without it, a previous run is kept)
    offline_checkpoint: str = ""  # skip pre-training: start from this offline checkpoint dir (iql.py or pex.py)
    num_seeds: int = 1  # train seeds seed..seed+num_seeds-1 together (vmapped); >1: evals in run_dir/seed<S>/
    # schedule
    offline_updates: int = 1_000_000  # gradient steps of IQL pre-training (official --num_steps 1e6)
    online_steps: int = 1_000_000  # env steps of online fine-tuning (official --total_env_steps 1e6)
    initial_collection_steps: int = 5000  # online transitions collected before the first online update
    update_block: int = 1000  # offline updates per jitted lax.scan block
    online_block: int = 50  # max env steps collected with a fixed policy before their updates run
    offline_eval_every: int = 50_000  # offline updates between evaluations (+ checkpoint)
    online_eval_every: int = 10_000  # online env steps between evaluations (+ checkpoint), at episode ends
    eval_episodes: int = 100  # evaluation episodes per evaluation (official README: 100 AntMaze, 10 MuJoCo)
    # data
    batch_size: int = 256  # transitions per gradient step
    offline_fraction: float = 0.5  # online phase: fraction of each batch drawn from the offline data
    discount: float = 0.99  # gamma
    normalize: bool = False  # normalise states with the dataset mean / std (+1e-3) (official PEX: no)
    reward_scale: float = 1.0  # r <- reward_scale * r + reward_bias, offline and online
    reward_bias: float = -1.0  # AntMaze: r - 1 (official `get_env_and_dataset`); MuJoCo: 0
    normalize_reward_by_returns: bool = False  # first scale r by 1000 / (max - min dataset episode return)
    terminate_on_success: bool = True  # end episodes as terminal when info['success'] (D4RL AntMaze eval=True)
    # IQL (offline and online)
    expectile: float = 0.9  # tau of the expectile value loss (official --tau)
    beta: float = 10.0  # inverse temperature of the advantage weights (official --beta)
    exp_adv_max: float = 100.0  # clip of exp(beta * adv)
    tau: float = 0.005  # Polyak rate of the target Q networks (official --target_update_rate)
    actor_lr: float = 3e-4  # Adam LR of the actors (offline: cosine decay, see offline_cosine; online: constant)
    critic_lr: float = 3e-4  # Adam LR of the Q ensemble
    value_lr: float = 3e-4  # Adam LR of V
    offline_cosine: bool = True  # offline actor LR: cosine decay to 0 over offline_updates (official)
    hidden_dims: List[int] = field(default_factory=lambda: [256, 256])  # hidden widths of actor, Q and V MLPs
    n_critics: int = 2  # Q ensemble size (min over members everywhere)
    actor_init: str = "xavier"  # xavier (official PEX) | torch (PyTorch default, CORL / iql.py) actor init
    log_std_min: float = -5.0  # lower clamp of the actors' log-std (official PEX -5; CORL / iql.py -20)
    # PEX (online)
    inv_temperature: float = 10.0  # gate: P(k) = softmax_k(inv_temperature * Q(s, a_k)) (official 10)
    eval_epsilon: float = 0.1  # evaluation: epsilon-greedy policy sample and gate (official 0.1; 0 = greedy)
    clip_actions: bool = True  # clip the new policy's action to [-1, 1] before the gate (deviation 4)
    reset_optimizers: bool = True  # fresh Adam states for Q and V online (official); false keeps them
    precision: str = "float32"  # float32 | bf16: bfloat16 matrix products summed in float32 (params, Adam: float32)

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(f"invalid config: {msg}")
        for name in ("update_block", "online_block", "offline_eval_every", "online_eval_every", "eval_episodes",
                     "batch_size", "n_critics", "num_seeds"):
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(self.offline_updates >= 0 and self.online_steps >= 0, "offline_updates/online_steps must be >= 0")
        need(self.initial_collection_steps >= 0,
             f"initial_collection_steps must be >= 0, got {self.initial_collection_steps}")
        need(self.offline_updates % self.update_block == 0,
             f"offline_updates={self.offline_updates} must be a multiple of update_block={self.update_block}")
        need(self.offline_eval_every % self.update_block == 0,
             f"offline_eval_every={self.offline_eval_every} must be a multiple of update_block={self.update_block}")
        need(self.wandb_mode in ("online", "offline", "disabled"),
             f"wandb_mode must be online|offline|disabled, got {self.wandb_mode!r}")
        need(0.0 < self.expectile < 1.0, f"expectile must be in (0, 1), got {self.expectile}")
        need(0.0 < self.offline_fraction < 1.0, f"offline_fraction must be in (0, 1), got {self.offline_fraction}")
        need(0 < int(self.batch_size * self.offline_fraction) < self.batch_size,
             "batch_size * offline_fraction must leave rows for both offline and online data")
        need(self.actor_init in ("xavier", "torch"), f"actor_init must be xavier|torch, got {self.actor_init!r}")
        need(self.log_std_min < LOG_STD_MAX, f"log_std_min must be < {LOG_STD_MAX}, got {self.log_std_min}")
        need(self.inv_temperature >= 0, f"inv_temperature must be >= 0, got {self.inv_temperature}")
        need(0.0 <= self.eval_epsilon <= 1.0, f"eval_epsilon must be in [0, 1], got {self.eval_epsilon}")
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
    actor_init: str
    log_std_min: float
    batch_size: int
    offline_fraction: float
    update_block: int
    online_block: int
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
    inv_temperature: float
    clip_actions: bool
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
    """Dense layer; PyTorch's default init (weights and biases ~ U(+-1/sqrt(fan_in))) or, with `xavier`,
    xavier-uniform weights and zero biases (official PEX actor). Same parameter names as iql.py's."""
    features: int
    xavier: bool = False
    precision: str = "float32"

    @nn.compact
    def __call__(self, x):
        if self.xavier:
            kernel_init, bias_init = nn.initializers.xavier_uniform(), nn.initializers.zeros
        else:
            bound = 1.0 / math.sqrt(x.shape[-1])
            kernel_init = bias_init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(  # noqa: E731
                key, shape, dtype, -bound, bound)
        kernel = self.param("kernel", kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", bias_init, (self.features,))
        return matmul(x, kernel, self.precision) + bias


class GaussianActor(nn.Module):
    """N(tanh(MLP(s)), exp(log_std)^2) with a learnable state-independent log-std (PEX / CORL GaussianPolicy)."""
    act_dim: int
    hidden: tuple
    log_std_min: float
    xavier: bool
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs):
        x = obs
        for h in self.hidden:
            x = nn.relu(TorchLinear(h, self.xavier, precision=self.precision)(x))
        mean = jnp.tanh(TorchLinear(self.act_dim, self.xavier, precision=self.precision)(x))
        log_std = self.param("log_std", nn.initializers.zeros, (self.act_dim,))
        return mean, jnp.clip(log_std, self.log_std_min, LOG_STD_MAX)


class QNet(nn.Module):
    hidden: tuple
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs, act):
        x = jnp.concatenate([obs, act], -1)
        for h in self.hidden:
            x = nn.relu(TorchLinear(h, precision=self.precision)(x))
        return TorchLinear(1, precision=self.precision)(x)[..., 0]


class VNet(nn.Module):
    hidden: tuple
    precision: str = "float32"

    @nn.compact
    def __call__(self, obs):
        x = obs
        for h in self.hidden:
            x = nn.relu(TorchLinear(h, precision=self.precision)(x))
        return TorchLinear(1, precision=self.precision)(x)[..., 0]


def critic_ensemble(hidden: tuple, n: int, precision: str = "float32") -> nn.Module:
    """`n` Q networks with independent parameters, evaluated on the same inputs: output [n, ...]."""
    return nn.vmap(QNet, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None, out_axes=0,
                   axis_size=n)(hidden=hidden, precision=precision)


def networks(h: Hyper):
    """(actor, Q ensemble, V); the offline and the new policy are two parameter sets of the same actor."""
    actor = GaussianActor(h.act_dim, h.hidden_dims, h.log_std_min, h.actor_init == "xavier", h.precision)
    return actor, critic_ensemble(h.hidden_dims, h.n_critics, h.precision), VNet(h.hidden_dims, h.precision)


# ---------------------------------------------------------------------------------------------- maths
def expectile_loss(u, expectile):
    """|expectile - 1[u < 0]| * u^2, elementwise (u = target - prediction)."""
    return jnp.abs(expectile - (u < 0).astype(u.dtype)) * u ** 2


def gaussian_log_prob(mean, log_std, x):
    """log N(x; mean, exp(log_std)^2) summed over the last axis."""
    z = (x - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z ** 2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), -1)


def awr_weights(adv, beta, exp_adv_max):
    """Advantage weights min(exp(beta * adv), exp_adv_max) (no gradient through adv)."""
    return jnp.minimum(jnp.exp(beta * jax.lax.stop_gradient(adv)), exp_adv_max)


def gate_logits(q, inv_temperature):
    """PEX gate: logits inv_temperature * Q over the candidate axis (last); probabilities = softmax(logits)."""
    return inv_temperature * q


def composite_action(offline_actor_params, actor_params, critic_params, obs, key, epsilon, h: Hyper):
    """PEX action selection at (normalised) states `obs` [..., obs_dim].

    a1 = mean of the frozen offline policy; a2 = the new policy's sample, or its mean with probability
    1 - epsilon; P = softmax(inv_temperature * [min_i Q_i(s, a1), min_i Q_i(s, a2)]); w = a sample of P, or
    argmax P with probability 1 - epsilon. epsilon = 1: training (always sample), epsilon = 0.1: official
    evaluation. Returns (a_w, info) with info = w (1 = new policy), p_new = P(w = 1), q_offline, q_new."""
    actor, critic, _ = networks(h)
    k_sample, k_greedy_a, k_gate, k_greedy_w = jax.random.split(key, 4)
    a1, _ = actor.apply({"params": offline_actor_params}, obs)
    mean, log_std = actor.apply({"params": actor_params}, obs)
    sample = mean + jnp.exp(log_std) * jax.random.normal(k_sample, mean.shape)
    greedy = jax.random.uniform(k_greedy_a, mean.shape[:-1]) >= epsilon  # official: rand > eps -> mode
    a2 = jnp.where(greedy[..., None], mean, sample)
    if h.clip_actions:
        a2 = jnp.clip(a2, -1.0, 1.0)
    q = critic.apply({"params": critic_params}, jnp.stack([obs, obs]), jnp.stack([a1, a2])).min(0)  # [2, ...]
    q = jnp.moveaxis(q, 0, -1)  # [..., 2]: (offline, new)
    logits = gate_logits(q, h.inv_temperature)
    w_sample = jax.random.categorical(k_gate, logits)
    w = jnp.where(jax.random.uniform(k_greedy_w, w_sample.shape) >= epsilon, jnp.argmax(logits, -1), w_sample)
    action = jnp.where((w == 1)[..., None], a2, a1)
    p_new = jax.nn.softmax(logits, -1)[..., 1]
    return action, {"w": w, "p_new": p_new, "q_offline": q[..., 0], "q_new": q[..., 1]}


def actor_lr_schedule(h: Hyper):
    """Offline actor LR as a function of its update count: PyTorch CosineAnnealingLR over offline_updates
    (official `use_lr_scheduler` offline), constant afterwards. Same optimiser-state layout as iql.py."""
    period = max(h.offline_updates, 1)

    def schedule(count):
        cosine = h.actor_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * count / period))
        offline = cosine if h.offline_cosine else h.actor_lr
        return jnp.where(count < h.offline_updates, offline, h.actor_lr)
    return schedule


def optimizers(h: Hyper):
    return {"actor": optax.adam(actor_lr_schedule(h)), "new_actor": optax.adam(h.actor_lr),
            "critic": optax.adam(h.critic_lr), "value": optax.adam(h.value_lr)}


# ---------------------------------------------------------------------------------------------- state
class Trainable(NamedTuple):
    """Parameters and optimiser state (a TrainState without functions, so states stay plain pytrees)."""
    params: Any
    opt_state: Any


class IQLState(NamedTuple):
    """Offline phase; field for field the state of algorithms/iql.py (its checkpoints load here and back)."""
    actor: Trainable
    critic: Trainable  # ensemble, leading axis n_critics
    value: Trainable
    critic_target: Any
    key: jax.Array  # RNG of the updates (batch sampling, composite actions)
    updates: jax.Array  # gradient steps done
    obs_mean: jax.Array
    obs_std: jax.Array


class PEXState(NamedTuple):
    """Online phase: the new policy is trained; the offline policy's parameters are frozen."""
    actor: Trainable  # the NEW policy pi
    offline_actor: Any  # parameters of the frozen offline policy pi_off
    critic: Trainable
    value: Trainable
    critic_target: Any
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


def expand(state: IQLState, h: Hyper, reset_optimizers: bool) -> PEXState:
    """Policy expansion: freeze the offline actor, add a randomly initialised new policy (key from the state)."""
    key, k_new = jax.random.split(state.key)
    txs = optimizers(h)
    new_params = networks(h)[0].init(k_new, jnp.zeros((1, h.obs_dim)))["params"]
    critic, value = state.critic, state.value
    if reset_optimizers:
        critic = Trainable(critic.params, txs["critic"].init(critic.params))
        value = Trainable(value.params, txs["value"].init(value.params))
    return PEXState(Trainable(new_params, txs["new_actor"].init(new_params)), state.actor.params, critic, value,
                    state.critic_target, key, state.updates, state.obs_mean, state.obs_std)


def _step(trainable: Trainable, grads, tx) -> Trainable:
    updates, opt_state = tx.update(grads, trainable.opt_state, trainable.params)
    return Trainable(optax.apply_updates(trainable.params, updates), opt_state)


# ---------------------------------------------------------------------------------------------- update
def value_critic_step(state, obs, next_obs, batch: Buffer, h: Hyper):
    """The IQL V, Q and target steps (either state):
        L_V = mean(|expectile - 1[u < 0]| u^2),  u = min_i Qbar_i(s, a) - V(s);
        L_Q = mean_i mean((Q_i(s, a) - y)^2),    y = r + gamma (1 - d) V(s')  (V before its step);
        Qbar <- tau Q + (1 - tau) Qbar.
    Returns (value, critic, critic_target, adv = u, metrics)."""
    _, critic, value = networks(h)
    txs = optimizers(h)
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
        q = critic.apply({"params": p}, obs, batch.act)  # [n_critics, B]
        return ((q - y) ** 2).mean(1).mean(), q  # official: sum of member MSEs / n_critics

    (q_loss, q), q_grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic.params)
    critic_tr = _step(state.critic, q_grads, txs["critic"])
    critic_target = optax.incremental_update(critic_tr.params, state.critic_target, h.tau)
    metrics = {"value_loss": v_loss, "critic_loss": q_loss, "v": v.mean(), "q": q.mean(), "adv": adv.mean()}
    return value_tr, critic_tr, critic_target, adv, metrics


def awr_actor_step(actor_tr: Trainable, tx, obs, actions, weights, h: Hyper):
    """One AWR step: L_pi = mean(weights * -log pi(actions|s))."""
    actor = networks(h)[0]

    def actor_loss(p):
        mean, log_std = actor.apply({"params": p}, obs)
        return (weights * -gaussian_log_prob(mean, log_std, actions)).mean(), log_std

    (loss, log_std), grads = jax.value_and_grad(actor_loss, has_aux=True)(actor_tr.params)
    return _step(actor_tr, grads, tx), loss, log_std.mean()


def iql_update(state: IQLState, batch: Buffer, key, h: Hyper):
    """One offline IQL step: V, Q, target EMA, then the actor by AWR on the data actions with the V step's
    advantages, weights min(exp(beta * adv), exp_adv_max). Pure."""
    del key  # no randomness inside an offline step (the batch is sampled by the caller)
    obs = (batch.obs - state.obs_mean) / state.obs_std
    next_obs = (batch.next_obs - state.obs_mean) / state.obs_std
    value_tr, critic_tr, critic_target, adv, metrics = value_critic_step(state, obs, next_obs, batch, h)
    weights = awr_weights(adv, h.beta, h.exp_adv_max)
    lr = actor_lr_schedule(h)(state.actor.opt_state[0].count)
    actor_tr, a_loss, log_std = awr_actor_step(state.actor, optimizers(h)["actor"], obs, batch.act, weights, h)
    metrics.update(actor_loss=a_loss, adv_weight=weights.mean(), actor_lr=lr, log_std=log_std)
    return state._replace(actor=actor_tr, critic=critic_tr, value=value_tr, critic_target=critic_target,
                          updates=state.updates + 1), metrics


def pex_update(state: PEXState, batch: Buffer, key, h: Hyper):
    """One online PEX step: V, Q, target EMA on the batch; then the new policy pi by AWR on composite actions
    a_c = composite(s) drawn at the batch states with the updated critic (epsilon 1: sampled):
        adv_c = min_i Qbar_i(s, a_c) - V(s)  (updated target and V),  L_pi = mean(min(exp(beta adv_c), exp_adv_max)
        * -log pi(a_c|s)). Pure."""
    _, critic, value = networks(h)
    obs = (batch.obs - state.obs_mean) / state.obs_std
    next_obs = (batch.next_obs - state.obs_mean) / state.obs_std
    value_tr, critic_tr, critic_target, _, metrics = value_critic_step(state, obs, next_obs, batch, h)
    a_c, info = composite_action(state.offline_actor, state.actor.params, critic_tr.params, obs, key, 1.0, h)
    a_c = jax.lax.stop_gradient(a_c)
    adv_c = (critic.apply({"params": critic_target}, obs, a_c).min(0)
             - value.apply({"params": value_tr.params}, obs))
    weights = awr_weights(adv_c, h.beta, h.exp_adv_max)
    actor_tr, a_loss, log_std = awr_actor_step(state.actor, optimizers(h)["new_actor"], obs, a_c, weights, h)
    metrics.update(actor_loss=a_loss, adv_composite=adv_c.mean(), adv_weight=weights.mean(), log_std=log_std,
                   new_policy_fraction=info["w"].mean(), gate_prob_new=info["p_new"].mean(),
                   q_offline_action=info["q_offline"].mean(), q_new_action=info["q_new"].mean())
    return state._replace(actor=actor_tr, critic=critic_tr, value=value_tr, critic_target=critic_target,
                          updates=state.updates + 1), metrics


def sample_offline_batch(offline: Buffer, offline_size, key, h: Hyper) -> Buffer:
    """Offline phase: a uniform batch of the `offline_size` offline rows (shared by all seeds)."""
    idx = jax.random.randint(key, (h.batch_size,), 0, offline_size)
    return jax.tree.map(lambda x: x[idx], offline)


def sample_mixed_batch(offline: Buffer, offline_size, online: Buffer, online_size, k_off, k_on, h: Hyper):
    """Online phase: int(batch_size * offline_fraction) uniform offline rows, then the rest uniform over this
    seed's `online_size` online rows (official: half and half)."""
    n_off = int(h.batch_size * h.offline_fraction)  # derived: the batch's offline rows
    i_off = jax.random.randint(k_off, (n_off,), 0, offline_size)
    i_on = jax.random.randint(k_on, (h.batch_size - n_off,), 0, jnp.maximum(online_size, 1))
    return jax.tree.map(lambda off, on: jnp.concatenate([off[i_off], on[i_on]]), offline, online)


# Multi-seed: every state leaf, the online buffer and the per-seed counters carry a leading seed axis; the
# offline rows are shared (in_axes None). One seed's numbers equal a single-seed run's up to float32
# round-off (XLA sums batched matmuls in a different order). Each update draws its batch on device first.
# `offline_size` (the offline row count) is an argument, not the static shape: a static bound compiles to another
# program (2.5% slower in one 3-round comparison here, benchmarks/compare_commits.py).
@partial(jax.jit, static_argnames=("h",))
def scan_updates(state: IQLState, offline: Buffer, offline_size, h: Hyper):
    """`h.update_block` offline IQL updates per seed in one lax.scan (vmapped over seeds); metrics
    [seeds, h.update_block]."""
    def one_seed(state):
        def body(s, _):
            key, k_idx, k_upd = jax.random.split(s.key, 3)
            return iql_update(s._replace(key=key), sample_offline_batch(offline, offline_size, k_idx, h), k_upd, h)
        return jax.lax.scan(body, state, None, length=h.update_block)
    return jax.vmap(one_seed)(state)


@partial(jax.jit, static_argnames=("h",))
def update_online(state: PEXState, offline: Buffer, offline_size, online: Buffer, online_size, n, h: Hyper):
    """`n[i]` <= h.online_block PEX updates for seed i (a masked lax.scan of h.online_block steps: a seed with fewer
    updates keeps its state for the remaining steps); metrics [seeds, h.online_block], zero where masked."""
    def one_seed(state, online, online_size, n):
        def body(s, i):
            key, k_off, k_on, k_upd = jax.random.split(s.key, 4)
            batch = sample_mixed_batch(offline, offline_size, online, online_size, k_off, k_on, h)
            new, metrics = pex_update(s._replace(key=key), batch, k_upd, h)
            keep = i < n
            new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, s)
            return new, jax.tree.map(lambda m: jnp.where(keep, m, jnp.zeros_like(m)), metrics)
        return jax.lax.scan(body, state, jnp.arange(h.online_block))
    return jax.vmap(one_seed)(state, online, online_size, n)


@partial(jax.jit, donate_argnums=(0,))
def buffer_insert(online: Buffer, rows: Buffer, starts):
    """Write each seed's `rows[i]` at `starts[i]` of its online rows, in place (the buffer is donated)."""
    put = lambda b, r, s: jax.lax.dynamic_update_slice_in_dim(b, r, s, 0)  # noqa: E731
    return jax.tree.map(lambda b, r: jax.vmap(put)(b, r, starts), online, rows)


# ---------------------------------------------------------------------------------------------- acting
def composite_step(offline_actor_params, actor_params, critic_params, obs_mean, obs_std, obs, key, epsilon,
                   h: Hyper):
    """One seed's PEX action at one state: (action, stats = [w, p_new, q_offline, q_new], next key)."""
    key, sub = jax.random.split(key)
    action, info = composite_action(offline_actor_params, actor_params, critic_params, (obs - obs_mean) / obs_std,
                                    sub, epsilon, h)
    stats = jnp.stack([info["w"].astype(jnp.float32), info["p_new"], info["q_offline"], info["q_new"]])
    return action, stats, key


@partial(jax.jit, static_argnames=("h",))
def act_explore(offline_actor_params, actor_params, critic_params, obs_mean, obs_std, obs, keys, active, h: Hyper):
    """All seeds' training actions (composite, epsilon 1: sampled policy action and sampled gate) in one call per
    env step; a seed's key advances only when it is `active` (so its actions do not depend on the other seeds)."""
    def one(off, params, critic, mean_, std_, o, key, act):
        action, stats, new_key = composite_step(off, params, critic, mean_, std_, o, key, 1.0, h)
        return action, stats, jnp.where(act, new_key, key)
    return jax.vmap(one)(offline_actor_params, actor_params, critic_params, obs_mean, obs_std, obs, keys, active)


@partial(jax.jit, static_argnames=("h",))
def act_composite(offline_actor_params, actor_params, critic_params, obs_mean, obs_std, obs, key, epsilon,
                  h: Hyper):
    """One seed's PEX action (evaluation: epsilon = eval_epsilon); returns (action, stats, next key)."""
    return composite_step(offline_actor_params, actor_params, critic_params, obs_mean, obs_std, obs, key, epsilon, h)


@partial(jax.jit, static_argnames=("h",))
def act_deterministic(actor_params, obs_mean, obs_std, obs, h: Hyper):
    """Mean action of one seed's actor (evaluation)."""
    mean, _ = networks(h)[0].apply({"params": actor_params}, (obs - obs_mean) / obs_std)
    return jnp.clip(mean, -1.0, 1.0)


def evaluate(env, policy, episodes: int, seed: int, terminate_on_success: bool, goal_task: bool, refs):
    """`episodes` episodes of `policy`, the first reset seeded with `seed` (reproducible)."""
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


# ---------------------------------------------------------------------------------------------- offline source
# Fields an offline checkpoint must share with this run: networks and dataset, then what the critic's values mean.
NETWORK_FIELDS = ("dataset_id", "hidden_dims", "n_critics")
DATA_FIELDS = ("discount", "normalize", "reward_scale", "reward_bias", "normalize_reward_by_returns")


def _cli_value(v) -> str:
    """A config value as written on the command line."""
    if isinstance(v, bool):
        return str(v).lower()
    return f'"{json.dumps(v)}"' if isinstance(v, list) else str(v)


def check_offline_source(src: Path, cfg: TrainConfig):
    """Compare the config saved with an intact offline checkpoint (iql.py's or pex.py's, found by Run) and its seed
    count with this run's, before the data is loaded: raise a RunError naming every field that must match and the
    overrides that make it match."""
    import yaml
    saved = yaml.safe_load((src / "config.yaml").read_text()) or {}
    if "hidden_dims" not in saved or "expectile" not in saved:
        raise RunError(f"--offline_checkpoint {src}: not an IQL checkpoint (its config has no hidden_dims/expectile);"
                         " pex.py starts from the offline checkpoints of algorithms/iql.py or algorithms/pex.py")
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in NETWORK_FIELDS + DATA_FIELDS if saved.get(k) != getattr(cfg, k)}
    if diff:
        kinds = [kind for kind, fields in (("network sizes/dataset", NETWORK_FIELDS),
                                           ("state normalisation/reward transformation", DATA_FIELDS))
                 if any(k in fields for k in diff)]
        fix = " ".join(f"--{k} {_cli_value(a)}" for k, (a, _) in diff.items())
        raise RunError(f"--offline_checkpoint {src} was trained with a different {' and '.join(kinds)}: "
                       + ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
                       + f". Run with `{fix}` (or pre-train with this run's values).")
    n = load_meta(src).get("num_seeds", 1)
    if n != cfg.num_seeds:
        raise RunError(f"--offline_checkpoint {src} holds {n} seed(s); run with --num_seeds {n} (or pre-train with "
                       "this run's --num_seeds)")
    notes = [f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in ("expectile", "beta") if saved.get(k) != getattr(cfg, k)]
    if notes:
        print(f"note: the pre-training used other IQL hyper-parameters ({', '.join(notes)}); fine-tuning uses this "
              "run's")
    if saved.get("seed", cfg.seed) != cfg.seed:
        print(f"note: the pre-training ran from seed {saved['seed']}, this run's seeds start at {cfg.seed} (the "
              "fine-tuning's env and exploration seeds; the checkpoint's states and keys are kept)")
    if saved.get("actor_dropout", 0.0):
        print("note: the offline actor was trained with dropout; PEX uses its mean action without dropout")


# ---------------------------------------------------------------------------------------------- training
def train(cfg: TrainConfig) -> dict:
    """IQL pre-training then online policy expansion of `num_seeds` seeds at once; returns the last evaluation
    record(s) and paths."""
    from tqdm import tqdm

    t_start = time.time()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    N = len(seeds)
    cfg.name = cfg.name or f"pex-{cfg.dataset_id.replace('/', '-')}-seed{cfg.seed}" + (f"x{N}" if N > 1 else "")
    with Run(cfg, run_dir) as run:  # checks that need no data, before any slow work; see Run
        if run.offline_from is not None:
            check_offline_source(run.offline_from, cfg)
        world = load_world(cfg, N)
        h = world.h
        state, prog, online = start_or_resume(cfg, run, world, seeds)
        rec = Recorder(cfg, run_dir, seeds, world, prog, t_start)
        act_key = jnp.asarray(prog.act_key)

        # ---- offline pre-training (IQL; all seeds in one vmapped scan per block)
        if prog.phase == "offline":
            bar = tqdm(total=cfg.offline_updates, initial=int(prog.updates[0]), desc="PEX offline (IQL)",
                       mininterval=5)
            while prog.updates[0] < cfg.offline_updates:
                state, metrics = scan_updates(state, world.offline, len(world.offline.rew), h)
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
            prog.phase = "expand"
            rec.checkpoint(state, prog, online, act_key, "offline")  # an IQLState: loadable by iql.py and pex.py

        # ---- policy expansion: freeze the offline actor, add a new policy (also when resumed from `offline`)
        if prog.phase == "expand":
            state = jax.vmap(lambda s: expand(s, h, cfg.reset_optimizers))(state)
            prog.phase = "online"
            rec.checkpoint(state, prog, online, act_key)

        # ---- online fine-tuning. Each seed follows exactly the single-seed schedule: collect up to online_block
        # env steps (a block also ends at an episode end), append them, then one update per step taken after the
        # initial collection. Seeds whose block ended early wait for the others; a seed due for evaluation (first
        # episode end after every online_eval_every steps) waits until every seed is due, so checkpoints fall on
        # episode ends of all seeds.
        if prog.phase == "online":
            ep = Episodes(cfg, h, prog, world.envs, seeds)
            bar = tqdm(total=cfg.online_steps * N, initial=int(prog.env_steps.sum()), desc="PEX online", mininterval=5)
            while prog.env_steps.min() < cfg.online_steps:
                n, act_key, explore = collect(cfg, world, state, prog, ep, act_key, seeds, rec.logger)
                online = buffer_insert(online, Buffer(**{k: jnp.asarray(v) for k, v in ep.chunk.items()}),
                                       jnp.asarray(prog.online_size, jnp.int32))
                n_upd = updates_due(prog.online_size, n, cfg.initial_collection_steps).astype(np.int32)
                prog.online_size += n
                logged = {}
                if n_upd.any():  # nothing to do during the initial collection
                    state, metrics = update_online(state, world.offline, len(world.offline.rew), online,
                                                   jnp.asarray(prog.online_size, jnp.int32), jnp.asarray(n_upd), h)
                    logged = block_metrics(metrics, n_upd, "online", seeds, prog.updates)
                    prog.updates += n_upd
                rec.logger.log({**logged, "online/explore_new_policy_fraction": float(explore[0]),
                                "online/explore_gate_prob_new": float(explore[1]),
                                "online/env_steps": int(prog.env_steps.sum()), "online/updates": int(prog.updates.sum())})
                bar.update(int(n.sum()))
                ep.due |= ((n > 0) & ep.at_start & ((prog.env_steps >= prog.next_eval) | run.stop)
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
        if "new_policy_fraction" in record:
            extra += f", new-policy actions {record['new_policy_fraction']:.2f}"
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
def prepare_rewards(cfg: TrainConfig, ds: data.OfflineData):
    """(offline rewards, return scale) with the reward transformation of the config applied."""
    scale = 1.0
    if cfg.normalize_reward_by_returns:
        returns = data.episode_returns(ds)  # complete episodes only: a cut fragment has no episode return
        spread = returns.max() - returns.min()
        if spread <= 0:
            raise data.DatasetError(f"normalize_reward_by_returns: all episodes of {cfg.dataset_id} have the same "
                                    "return")
        scale = 1000.0 / spread
    return (ds.rewards * scale * cfg.reward_scale + cfg.reward_bias).astype(np.float32), scale


def updates_due(size_before, n, initial: int):
    """Online updates owed for n env steps taken with `size_before` online transitions stored (per seed: numbers or
    arrays): one per step whose replay size before the step exceeds `initial` (official: `if len(memory) >
    initial_collection_steps`)."""
    return np.maximum(0, n - np.maximum(0, initial + 1 - size_before))


def default_run_dir(cfg) -> Path:
    seeds = f"seed{cfg.seed}" if cfg.num_seeds == 1 else f"seeds{cfg.seed}-{cfg.seed + cfg.num_seeds - 1}"
    return Path("runs") / "pex" / cfg.dataset_id.replace("/", "_") / seeds


class World(NamedTuple):
    """What a run trains on: the data on device, the envs (one training env per seed, one evaluation env), the
    static hyper-parameters and the reward transformation."""
    offline: Buffer  # all dataset rows, shared by the seeds
    envs: list
    eval_env: Any
    h: Hyper
    obs_mean: np.ndarray
    obs_std: np.ndarray
    return_scale: float  # 1000 / return range (normalize_reward_by_returns), else 1
    refs: Optional[tuple]  # (ref_min, ref_max) return of the normalised score, None when the dataset has none

    def reward(self, r, cfg):
        return r * self.return_scale * cfg.reward_scale + cfg.reward_bias

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
    rewards, return_scale = prepare_rewards(cfg, ds)
    offline = Buffer(jnp.asarray(ds.observations), jnp.asarray(ds.actions), jnp.asarray(rewards),
                     jnp.asarray(ds.next_observations), jnp.asarray(ds.terminals.astype(np.float32)))
    obs_mean = ds.obs_mean if cfg.normalize else np.zeros(obs_dim, np.float32)
    obs_std = ds.obs_std if cfg.normalize else np.ones(obs_dim, np.float32)
    return World(offline, envs, eval_env, make_hyper(cfg, obs_dim, act_dim), obs_mean, obs_std, return_scale, refs)


@dataclass
class Progress:
    """Per-seed bookkeeping (one entry per seed) and the host state of a run: the checkpoint's meta.json."""
    phase: str  # offline | load_offline | expand | online | done
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
    """(state, progress, online buffer): fresh, or restored from run.resume_from (state, an IQLState before the
    expansion and a PEXState after it, counters, RNG keys, online rows), or the IQL state of run.offline_from."""
    h, N = world.h, len(seeds)
    online = Buffer(*(jnp.zeros((N, cfg.online_steps + cfg.online_block) + shape, jnp.float32) for shape in
                      ((h.obs_dim,), (h.act_dim,), (), (h.obs_dim,), ())))  # per seed, + slack for a full chunk
    state = stack_seeds([init_state(h, jax.random.PRNGKey(s), world.obs_mean, world.obs_std) for s in seeds])
    prog = Progress.start(cfg, seeds)
    if run.resume_from is not None:
        expanded = lambda: jax.vmap(lambda s: expand(s, h, cfg.reset_optimizers))(state)  # noqa: E731
        state, meta = load_state(run.resume_from, lambda meta: expanded() if meta["phase"] in ("online", "done")
                                 else state, cfg)
        prog = Progress.from_meta(meta)
        for i, s in enumerate(seeds):
            rows = load_buffer_rows(run.run_dir / "checkpoints" / "buffer" / f"seed{s}", int(prog.online_size[i]))
            if rows is not None:
                online = online._replace(**{k: getattr(online, k).at[i, :len(v)].set(v) for k, v in rows.items()})
        print(f"resumed from {run.resume_from}: phase {prog.phase}, {prog.updates.tolist()} updates, "
              f"{prog.env_steps.tolist()} online env steps")
    elif run.offline_from is not None:
        try:
            state, src = load_state(run.offline_from, state, cfg)
        except RunError as e:
            raise RunError(f"--offline_checkpoint {run.offline_from}: {e}. pex.py needs an IQL offline checkpoint "
                           "(<run_dir>/checkpoints/offline of iql.py or pex.py) with this run's network sizes and "
                           "dataset") from e
        prog.updates = np.asarray(np.ravel(src["updates"]), np.int64)  # (older one-seed checkpoints: an int)
        prog.act_key, prog.phase = np.asarray(src["act_key"]).reshape(N, -1), "load_offline"
        print(f"loaded offline IQL state from {run.offline_from} ({prog.updates.tolist()} updates)")
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

    def policy(self, state, prog: Progress, i: int, stats: list):
        """Seed i's evaluation policy: an IQLState's mean action (offline); a PEXState's composite policy,
        epsilon-greedy, its key depending only on eval_seed and the seed's env step (gate stats into `stats`)."""
        h = self.world.h
        if isinstance(state, IQLState):
            params, mean_, std_ = seed_slice((state.actor.params, state.obs_mean, state.obs_std), i)
            return lambda o: act_deterministic(params, mean_, std_, o, h)
        one = seed_slice(state, i)
        key = [jax.random.fold_in(jax.random.PRNGKey(self.cfg.eval_seed), int(prog.env_steps[i]))]

        def policy(o):
            a, s, key[0] = act_composite(one.offline_actor, one.actor.params, one.critic.params, one.obs_mean,
                                         one.obs_std, o, key[0], self.cfg.eval_epsilon, h)
            stats.append(np.asarray(s))
            return np.clip(np.asarray(a), -1.0, 1.0)
        return policy

    def evaluate(self, state, prog: Progress, phase: str, which=None):
        cfg, w = self.cfg, self.world
        for i in range(len(self.seeds)) if which is None else which:
            record = {"seed": self.seeds[i], "phase": phase, "updates": int(prog.updates[i]),
                      "env_steps": int(prog.env_steps[i])}
            stats = []
            record.update(evaluate(w.eval_env, self.policy(state, prog, i, stats), cfg.eval_episodes, cfg.eval_seed,
                                   cfg.terminate_on_success, self.goal_task, w.refs))
            if stats:
                s = np.mean(stats, 0)
                record.update(new_policy_fraction=float(s[0]), gate_prob_new=float(s[1]),
                              q_offline_action=float(s[2]), q_new_action=float(s[3]))
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
        self.due = np.zeros(N, bool)  # waiting for the synchronised evaluation + checkpoint


def collect(cfg: TrainConfig, world: World, state, prog: Progress, ep: Episodes, act_key, seeds, logger):
    """Up to online_block env steps per seed with the current composite policy, into ep.chunk (the gated action
    stored, the env given it clipped); a seed's block also ends at an episode end. Returns (steps per seed, the
    advanced exploration keys, the mean gate stats [w, p_new, q_offline, q_new] of the block's actions)."""
    N = len(seeds)
    n, act_stats = np.zeros(N, np.int32), []
    active = ~ep.due & (prog.env_steps < cfg.online_steps)
    while active.any():
        for i in np.flatnonzero(active):
            if ep.at_start[i]:
                ep.obs[i] = world.envs[i].reset(seed=seeds[i] if ep.first_reset[i] else None)[0]
                ep.first_reset[i], ep.at_start[i], ep.ret[i], ep.length[i] = False, False, 0.0, 0
        actions, stats, act_key = act_explore(state.offline_actor, state.actor.params, state.critic.params,
                                              state.obs_mean, state.obs_std, ep.obs, act_key, jnp.asarray(active),
                                              world.h)
        actions, stats = np.asarray(actions), np.asarray(stats)
        for i in np.flatnonzero(active):
            act_stats.append(stats[i])
            next_obs, r, term, trunc, info = world.envs[i].step(np.clip(actions[i], -1.0, 1.0))
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
            if ep.at_start[i] or n[i] == cfg.online_block or prog.env_steps[i] >= cfg.online_steps:
                active[i] = False
    return n, act_key, np.mean(act_stats, 0)


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
