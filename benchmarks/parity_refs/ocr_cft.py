"""Step parity of O2SAC, O2TD3 and O2PPO with the official OCR-CFT code (QinwenLuo/OCR-CFT, PyTorch).

Every update of every phase runs once on each side from the same state, and the losses, the gradients (as Adam's
first moments, 0.1 x the gradient) and the updated parameters (targets, alpha, lambda included) are compared:
  O2SAC  offline CQL (`ContinuousCQL.train`), re-evaluation (`SAC.ope`), alignment (`SAC.align_value`), online
         (`SAC.update`: the first of the 10 updates of an env step, which also steps lambda, and a later one)
  O2TD3  offline TD3+BC (`TD3_BC.train`, critic-only and actor steps), re-evaluation (`TD3.ope`), alignment
         (`TD3.align_value`), online (`TD3.update`, critic-only and actor + lambda steps)
  O2PPO  offline IQL (`ImplicitQLearning.train`), the Monte-Carlo returns and reward scaling of the value
         re-evaluation (`OfflineReplayBuffer`), its value step (`ValueLearner.update`), online PPO (`PPO.update`:
         one minibatch, and the official 10 epochs x 16 minibatches of a 2048-step rollout), the hopper-expert std cap
in a MuJoCo (hopper-medium) and an AntMaze (umaze) setting each, through our full update functions.

Same state: the reference's own classes (net.py, ppo_net.py) build the networks; their weights are perturbed
(seeded, so biases, LayerNorm scales, targets, reference actors, alpha and lambda all differ from their initial
values and from each other) and copied into our state (kernel = weight.T). Both Adam states come from
common.preset_adam_*. Same batch: offline updates get one batch (normalised-state scale; our obs mean / std are 0 / 1
so both sides see the same states); online updates sample it from each side's buffers (the reference's
Online_ReplayBuffer, our Buffer) with the same row indices (common.Indices). Same noise: common.Noise arrays drawn
by both sides in the order both codes draw them (sizes are checked). Our update runs eagerly.
Hyper-parameters: ours from configs/<algo>/..., the reference's from its own TrainConfig defaults and config/*.yaml
(read by its own loader), plus what its scripts hard-code (max_action 1, O2SAC's offline 10 r - 5, grad_clip off,
the value re-evaluation's lr 1e-4 and batch 512). Rewards: raw rewards go through each side's own transform (the
reference's modify_reward / modify_reward_online; ours r * reward_scale + reward_bias, as train() applies it), and
AntMaze transitions carry 0/1 rewards with the terminal flag at success (D4RL's done-at-goal, our
terminate_on_success). Deviations that change an update are compared with their switch at the reference
behaviour, and reported at our default too (setting "... default", not counted as failures).

    python benchmarks/parity_refs/ocr_cft.py --algo o2sac --reference_dir /path/holding/ocr_cft
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import io
import os
import sys
import types
from pathlib import Path

import numpy as np

try:
    from . import common
except ImportError:  # run as a script
    import common

REF = "ocr_cft"
# (setting, our config, the reference's config, obs dim, action dim, value offset). The value offset is added to the
# output bias of every critic / value network: a perturbed fresh network outputs values near 0 with mixed signs, whose
# float32 relative error is inflated by cancellation (e.g. the TD3 actor loss -mean Q / mean |Q| differed by 7e-6
# relative with zero-mean Q); real values are far from 0, positive (MuJoCo) or negative (AntMaze: both branches of
# the O2TD3 alignment target).
MUJOCO = ("mujoco", "o2o/hopper/medium-v0.yaml", "hopper/medium_v2.yaml", 11, 3, 5.0)
ANTMAZE = ("antmaze", "D4RL/antmaze/umaze-v1.yaml", "antmaze/umaze_v2.yaml", 29, 8, -5.0)
N_OFFLINE, N_ONLINE = 1000, 300  # dataset rows; online rows (= the env step t of the online updates)
# The official PPO update is 160 sequential Adam steps (10 epochs x 16 minibatches). Over them some ReLU
# pre-activation of the actor lands within float32 round-off of 0 (~10M are evaluated) and takes the other branch
# on one side, which moves that unit's weights by ~1e-5 of their magnitude from then on (seen in one data draw:
# 3.5e-5, and the units that differed most were exactly those with a pre-activation |z| < 2e-7 in the update).
# Its parameter rows use this tolerance; the single-step rows (one minibatch) hold the 1e-5 round-off bound.
PPO_UPDATE_TOL = 1e-4
# Gradient trees are compared leaf by leaf with each leaf's scale at least GRAD_FLOOR x the tree's largest gradient
# (common.compare_trees `floor`): a leaf that is a batch sum cancelling to near 0 carries the round-off of its
# summands (e.g. O2SAC's CQL log-std multiplier gradient 4.9e-5 next to the offset's 0.15: 1.7e-9 apart, 3.6e-5 of
# itself). Parameters, losses and scalars are compared relative to themselves.
GRAD_FLOOR = 1e-2


# ---------------------------------------------------------------------------------------------- both sides
@functools.lru_cache(maxsize=None)
def reference(path: Path) -> types.SimpleNamespace:
    """The reference's modules and its training scripts (for their TrainConfig), imported from the checkout with
    stand-ins for gym, d4rl and tensorboardX; removed from sys.modules (and sys.path restored) afterwards."""
    import pyrallis  # noqa: F401  (the libraries the reference imports stay loaded: imported before)
    import torch  # noqa: F401
    import torch.optim.lr_scheduler  # noqa: F401
    import torch.utils.data  # noqa: F401
    import tqdm  # noqa: F401
    import yaml  # noqa: F401
    names = {"net": "net", "utils": "utils", "dataset_utils": "dataset_utils", "sac": "online_agent.sac",
             "td3": "online_agent.td3", "ppo": "online_agent.ppo.ppo", "ppo_net": "online_agent.ppo.ppo_net",
             "online_buffer": "online_agent.ppo.online_buffer", "offline_buffer": "online_agent.ppo.offline_buffer",
             "cql": "offline_agent.cql", "td3_bc": "offline_agent.td3_bc", "iql": "offline_agent.iql"}
    scripts = {"O2SAC": "finetune/O2SAC.py", "O2TD3": "finetune/O2TD3.py", "cql_script": "offline/cql.py",
               "td3_bc_script": "offline/td3_bc.py", "iql_script": "offline/iql.py"}
    stand_ins = {**common.reference_stand_ins(), "tensorboardX": common.module("tensorboardX", SummaryWriter=object)}
    saved_path, out = list(sys.path), {}
    try:
        with common.reference_on_path(path, stand_ins), common.reference_on_path(path / "finetune", {}), \
                common.reference_on_path(path / "offline", {}):
            import importlib
            for key, name in names.items():
                out[key] = importlib.import_module(name)
                if not Path(out[key].__file__).resolve().is_relative_to(path.resolve()):
                    raise RuntimeError(f"'{name}' resolved to {out[key].__file__}, not to the reference at {path}")
            for key, rel in scripts.items():
                out[key] = common.load_file(path / rel, f"ocr_cft_{key}")
    finally:
        sys.path[:] = saved_path  # the reference appends '..' / '...' to sys.path
    return types.SimpleNamespace(path=path, **out)


def ref_config(R, script, yaml_rel=None):
    """A reference script's TrainConfig: its defaults, overridden by config/<yaml_rel> through its own loader."""
    cfg = script.TrainConfig()
    return R.utils.load_train_config(str(R.path / "config" / yaml_rel), cfg) if yaml_rel else cfg


def our_config(mod, rel: str):
    import yaml
    return mod.TrainConfig(**yaml.safe_load((common.REPO_ROOT / "configs" / mod.__name__ / rel).read_text()))


def perturbed(module, rng, scale=0.05):
    """A copy of a torch module with N(0, scale^2) added to every parameter (seeded by the numpy Generator `rng`)."""
    module = copy.deepcopy(module)
    common.perturb_(module, scale, seed=int(rng.integers(2 ** 31)))
    return module


def shifted(module, offset):
    """`module` (changed in place and returned) with `offset` added to the bias of its last Linear layer."""
    import torch
    with torch.no_grad():
        common.linear_layers(module)[-1].bias.add_(offset)
    return module


def saturated(actor, z):
    """`actor` (changed in place and returned) with its first two action means pushed to +z / -z before the tanh:
    trained policies saturate some action dimensions, which exercises the action clips (O2SAC's +-0.9999 mode and
    +-(1 - 1e-4) log-prob clip, TD3's noisy-action clip, PPO's clipped samples). How far is a float32 matter:
    O2SAC (z = 8) needs its samples far beyond +-0.9999: a sample tanh(u) just inside has log pi_ref =
    f(atanh(tanh(u))), which amplifies the 1-ulp difference of two tanh implementations by 1 / (1 - a^2) ~ 5e3
    (z = 6 gave actor gradients 1e-4 apart). The tanh-mean actors (TD3, PPO / IQL: z = 4, their noisy or sampled
    actions still cross +-1 about half the time) back-propagate through 1 - tanh(z)^2, which float32 resolves only
    to ~1e-7 / (1 - tanh(z)^2) relative (z = 6: gradients 3e-6 apart; z = 8: 25 %, 2e-5 apart)."""
    import torch
    with torch.no_grad():
        common.linear_layers(actor)[-1].bias[:2] += torch.tensor([z, -z])
    return actor


def load(dst, src):
    dst.load_state_dict(src.state_dict())


def net_tree(module, get=None, dense="Dense", prefix="", extras=None) -> dict:
    """Our flax layout of a reference network: its Linear layers as <prefix><dense>_i, its LayerNorms as
    <prefix>LayerNorm_i, and `extras` {name: parameter} (log-std scalars / vectors). `get` maps each parameter
    first (e.g. to its Adam first moment)."""
    import torch
    get = get or (lambda p: p)
    lin = common.linear_layers(module)
    lns = [m for m in module.modules() if isinstance(m, torch.nn.LayerNorm)]
    tree = common.merge_trees(
        common.dense_tree(lin, [f"{prefix}{dense}_{i}" for i in range(len(lin))], get),
        common.layer_norm_tree(lns, [f"{prefix}LayerNorm_{i}" for i in range(len(lns))], get))
    for name, p in (extras or {}).items():
        tree[name] = common.to_numpy(get(p)).astype(np.float32)
    return tree


def ensemble_tree(modules, tree_fn, optimizers=None) -> dict:
    """Our vmapped-ensemble layout of reference networks (member i = modules[i]); with `optimizers` (one per
    module) their Adam first moments."""
    gets = [common.adam_first_moment(o) for o in optimizers] if optimizers else [None] * len(modules)
    return common.stack_members([tree_fn(m, g) for m, g in zip(modules, gets)])


def sac_actor_tree(actor, get=None):  # net.TanhGaussianPolicy -> o2sac.TanhGaussianActor
    return net_tree(actor.base_network, get, prefix="MLP_0/", extras={
        "log_std_multiplier": actor.log_std_multiplier.constant, "log_std_offset": actor.log_std_offset.constant})


def sac_critic_tree(critic, get=None):  # net.CriticFunction -> o2sac.QNet
    return net_tree(critic, get, prefix="MLP_0/")


def td3_tree(module, get=None):  # net.DeterministicPolicy / CriticFunction -> o2td3.DeterministicActor / QNet
    return net_tree(module, get)


def ppo_tree(module, get=None):  # (ppo_)net.GaussianPolicy / TwinQ member / value MLPs -> o2ppo's TorchLinear nets
    extras = {"log_std": module.log_std} if hasattr(module, "log_std") else None
    return net_tree(module, get, dense="TorchLinear", extras=extras)


def fit(template, tree):
    """`tree` (numpy) as jax arrays, after checking it has exactly the structure and shapes of our `template`."""
    import jax
    import jax.numpy as jnp
    if jax.tree.structure(template) != jax.tree.structure(tree):
        raise ValueError(f"weight layout differs:\n ours {jax.tree.structure(template)}\n"
                         f" copy {jax.tree.structure(tree)}")
    bad = [(a.shape, b.shape) for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(tree)) if a.shape != b.shape]
    if bad:
        raise ValueError(f"weight shapes differ (ours, copy): {bad}")
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def trainable(mod, params, tx):
    return mod.Trainable(params, common.preset_adam_optax(tx.init(params)))


def moment(optimizer, param):
    return optimizer.state[param]["exp_avg"]


def adams(*optimizers):
    for o in optimizers:
        common.preset_adam_torch(o)


def run_ours(fn, noise, indices=None):
    """Our update `fn()` with its random draws served from `noise` / `indices` (all must be used). Run eagerly (not
    jitted): jax_noise returns its arrays when the draw executes, which in eager mode is once per draw (our updates
    draw their Gaussian / uniform noise outside lax loops; the PPO minibatch permutations inside lax.scan come
    through jax_indices' callbacks)."""
    indices = indices or common.Indices()
    with common.jax_noise(noise), common.jax_indices(indices):
        out = fn()
    noise.check_used()
    indices.check_used()
    return out


@contextlib.contextmanager
def quiet():
    """Silence the reference's prints and progress bars."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def run_ref(fn, noise, indices=None):
    """The reference's `fn()` with its draws served from `noise` / `indices`; returns (result, losses it
    back-propagated, in call order)."""
    indices = indices or common.Indices()
    with common.torch_noise(noise), common.torch_randn_like(noise), common.torch_indices(indices), \
            common.record_backward() as losses:
        out = fn()
    noise.check_used()
    indices.check_used()
    return out, [float(x) for x in losses]


def noises(rng, *draws):
    """Two Noise objects (one per side) with the same arrays: `draws` = (kind, shape) in draw order."""
    queues = {}
    for kind, shape in draws:
        queues.setdefault(kind, []).append(rng.normal(size=shape) if kind == "normal" else rng.random(shape))
    queues = {k: [a.astype(np.float32) for a in v] for k, v in queues.items()}
    return common.Noise(**queues), common.Noise(**queues)


def index_pair(rng, randint):
    """Two Indices (one per side) with the same `randint` (high, n) draws."""
    draws = [(high, rng.integers(0, high, n)) for high, n in randint]
    return common.Indices(draws), common.Indices(draws)


class Rows:
    """The rows of one compared update (algorithm, phase and setting fixed)."""

    def __init__(self, rows, algo, phase, setting, note=""):
        self.rows, self.head, self.note = rows, (algo, REF, phase, setting), note

    def _note(self, note):
        return "; ".join(x for x in (self.note, note) if x)

    def value(self, quantity, ours, ref, note="", tol=common.TOLERANCE):
        common.compare(self.rows, *self.head, quantity, ours, ref, tol, self._note(note))

    def tree(self, quantity, ours, ref, note="", tol=common.TOLERANCE):
        floor = GRAD_FLOOR if quantity.startswith("grad") else 0.0  # see GRAD_FLOOR
        common.compare_trees(self.rows, *self.head, quantity, ours, ref, tol, self._note(note), floor)


def transitions(rng, n, obs_dim, act_dim, sparse):
    """n raw transitions (D4RL dict keys), states at normalised scale. Sparse (AntMaze): 0/1 rewards with the
    terminal flag at success; else Gaussian rewards and 10 % terminals."""
    obs, next_obs = (rng.normal(size=(n, obs_dim)).astype(np.float32) for _ in range(2))
    act = rng.uniform(-1.0, 1.0, (n, act_dim)).astype(np.float32)
    if sparse:
        rew = (rng.random(n) < 0.3).astype(np.float32)
        term = rew.copy()
    else:
        rew = rng.normal(size=n).astype(np.float32)
        term = (rng.random(n) < 0.1).astype(np.float32)
    return {"observations": obs, "actions": act, "rewards": rew, "next_observations": next_obs, "terminals": term}


def with_rewards(ds, rewards):
    return {**ds, "rewards": np.asarray(rewards, np.float32)}


def torch_batch(ds, rows=slice(None)):
    """The reference's batch layout [s, a, r [B, 1], s', d [B, 1]]."""
    import torch
    t = lambda x: torch.as_tensor(np.asarray(x[rows], np.float32))  # noqa: E731
    return [t(ds["observations"]), t(ds["actions"]), t(ds["rewards"])[:, None], t(ds["next_observations"]),
            t(ds["terminals"])[:, None]]


def our_buffer(mod, ds, rows=slice(None), capacity=None):
    """Our Buffer of `ds` rows (zero-padded to `capacity` rows: an online buffer's unused tail)."""
    import jax.numpy as jnp
    keys = ("observations", "actions", "rewards", "next_observations", "terminals")
    arrays = [np.asarray(ds[k][rows], np.float32) for k in keys]
    if capacity:
        arrays = [np.concatenate([a, np.zeros((capacity - len(a),) + a.shape[1:], np.float32)]) for a in arrays]
    return mod.Buffer(*(jnp.asarray(a) for a in arrays))


def ref_online_buffer(R, ds_off, ds_on, obs_dim, act_dim, on_reward):
    """The reference's Online_ReplayBuffer ('half': offline data in its own buffer) with the online rows added one
    transition at a time, their rewards through `on_reward`."""
    buf = R.dataset_utils.Online_ReplayBuffer(obs_dim, act_dim, N_OFFLINE + N_ONLINE + 10, "cpu")
    with quiet():
        buf.initial("half", {k: v.copy() for k, v in ds_off.items()})
    for i in range(len(ds_on["rewards"])):
        buf.add_transition(ds_on["observations"][i], ds_on["actions"][i], on_reward(float(ds_on["rewards"][i])),
                           ds_on["next_observations"][i], bool(ds_on["terminals"][i]))
    return buf


def online_rows(batch_size):
    """The (high, n) row-index draws of a 50/50 online batch: from the online rows and from the offline rows."""
    half = batch_size // 2
    return [(N_ONLINE, batch_size - half), (N_OFFLINE, half)]


# ---------------------------------------------------------------------------------------------- O2SAC
def step_o2sac(reference_dir=None) -> list:
    path = common.reference_checkout(REF, reference_dir)
    R, o2sac, rows = reference(path), common.ours("o2sac"), []
    for setting in (MUJOCO, ANTMAZE):
        _o2sac_setting(rows, R, o2sac, *setting)
    return rows


def _o2sac_setting(rows, R, o2sac, setting, ours_rel, ref_rel, obs_dim, act_dim, q_offset):
    import jax
    import jax.numpy as jnp
    import torch
    mu = lambda tr: common.optax_first_moment(tr.opt_state)  # noqa: E731
    cfg, rc = our_config(o2sac, ours_rel), ref_config(R, R.O2SAC, f"finetune/O2SAC/{ref_rel}")
    rc_cql = ref_config(R, R.cql_script, f"offline/cql/{ref_rel}" if setting == "antmaze" else None)
    rng, gen = np.random.default_rng(0), np.random.default_rng(10)
    torch.manual_seed(0)
    sparse = setting == "antmaze"
    raw_off = transitions(rng, N_OFFLINE, obs_dim, act_dim, sparse)
    raw_on = transitions(rng, N_ONLINE, obs_dim, act_dim, sparse)
    ours_r = lambda r: r * cfg.reward_scale + cfg.reward_bias  # noqa: E731  (as o2sac.train applies it)
    ds_off, ds_on = with_rewards(raw_off, ours_r(raw_off["rewards"])), with_rewards(raw_on, ours_r(raw_on["rewards"]))
    ref_off = {k: v.copy() for k, v in raw_off.items()}  # O2SAC.py: modify_reward(dataset, env, 10.0, -5.0)
    if rc.normalize_reward:
        R.utils.modify_reward(ref_off, rc.env, 10.0, -5.0)
    ref_on_r = (lambda r: R.utils.modify_reward_online(rc.env, r, rc.reward_scale, rc.reward_bias)) \
        if rc.normalize_reward else (lambda r: r)
    ref_cql = {k: v.copy() for k, v in raw_off.items()}  # offline/cql.py
    if rc_cql.normalize_reward:
        R.utils.modify_reward(ref_cql, rc_cql.env, reward_scale=rc_cql.reward_scale, reward_bias=rc_cql.reward_bias)
    b = cfg.batch_size
    batch = slice(0, b)

    def policy(multiplier, orthogonal):
        return R.net.TanhGaussianPolicy(obs_dim, act_dim, 1.0, log_std_multiplier=multiplier,
                                        orthogonal_init=orthogonal)

    # ---- offline CQL (offline/cql.py + ContinuousCQL.train)
    r = Rows(rows, "o2sac", "offline", setting)
    r.value("rewards (offline transform)", ds_off["rewards"], ref_cql["rewards"])
    h = o2sac.make_hyper(cfg, obs_dim, act_dim)
    actor = saturated(perturbed(policy(rc_cql.policy_log_std_multiplier, rc_cql.orthogonal_init), gen), 8.0)
    critics = [shifted(perturbed(R.net.CriticFunction(obs_dim, act_dim, n_hidden=rc_cql.q_n_hidden_layers), gen),
                       q_offset) for _ in range(2)]
    targets = [perturbed(c, gen) for c in critics]
    opts = [torch.optim.Adam(m.parameters(), lr) for m, lr in
            ((actor, rc_cql.policy_lr), (critics[0], rc_cql.qf_lr), (critics[1], rc_cql.qf_lr))]
    agent = R.cql.ContinuousCQL(
        critic_1=critics[0], critic_2=critics[1], critic_1_optimizer=opts[1], critic_2_optimizer=opts[2], actor=actor,
        actor_optimizer=opts[0], discount=rc_cql.discount, soft_target_update_rate=rc_cql.soft_target_update_rate,
        device="cpu", target_entropy=-float(act_dim), alpha_multiplier=rc_cql.alpha_multiplier,
        use_automatic_entropy_tuning=rc_cql.use_automatic_entropy_tuning, backup_entropy=rc_cql.backup_entropy,
        policy_lr=rc_cql.policy_lr, qf_lr=rc_cql.qf_lr, bc_steps=rc_cql.bc_steps,
        target_update_period=rc_cql.target_update_period, cql_n_actions=rc_cql.cql_n_actions,
        cql_importance_sample=rc_cql.cql_importance_sample, cql_lagrange=rc_cql.cql_lagrange,
        cql_target_action_gap=rc_cql.cql_target_action_gap, cql_temp=rc_cql.cql_temp, cql_alpha=rc_cql.cql_alpha,
        cql_max_target_backup=rc_cql.cql_max_target_backup, cql_clip_diff_min=rc_cql.cql_clip_diff_min,
        cql_clip_diff_max=rc_cql.cql_clip_diff_max)
    for t, c in zip((agent.target_critic_1, agent.target_critic_2), targets):
        load(t, c)
    log_alpha, log_alpha_prime = -0.7, 0.8
    agent.log_alpha.constant.data.fill_(log_alpha)
    agent.log_alpha_prime.constant.data.fill_(log_alpha_prime)
    adams(*opts, agent.alpha_optimizer, agent.alpha_prime_optimizer)
    state = o2sac.init_cql_state(h, jax.random.PRNGKey(0), np.zeros(obs_dim), np.ones(obs_dim))
    txs = o2sac.cql_optimizers(h)
    state = state._replace(
        actor=trainable(o2sac, fit(state.actor.params, sac_actor_tree(actor)), txs["actor"]),
        critic=trainable(o2sac, fit(state.critic.params, ensemble_tree(critics, sac_critic_tree)), txs["critic"]),
        critic_target=fit(state.critic_target, ensemble_tree(targets, sac_critic_tree)),
        log_alpha=trainable(o2sac, jnp.float32(log_alpha), txs["log_alpha"]),
        log_alpha_prime=trainable(o2sac, jnp.float32(log_alpha_prime), txs["log_alpha_prime"]))
    many = (b, h.cql_n_actions, act_dim)  # draws in the order of both codes: pi(s), pi(s') (x n with the max backup),
    n_ours, n_ref = noises(rng, ("normal", (b, act_dim)), ("normal", many if h.cql_max_target_backup else (b, act_dim)),
                           ("uniform", many), ("normal", many), ("normal", many))  # random, current, next actions
    new, m = run_ours(lambda: o2sac.cql_update(state, our_buffer(o2sac, ds_off, batch), jax.random.PRNGKey(1), h),
                      n_ours)
    _, losses = run_ref(lambda: agent.train(torch_batch(ref_cql, batch)), n_ref)
    if h.cql_lagrange:
        r.value("alpha' loss", -m["alpha_prime"] * h.cql_weight * (m["cql_diff"] - h.cql_target_action_gap),
                losses.pop(0),
                note="ours: -alpha' * weight * (metrics cql_diff - gap)")
    for name, loss in zip(("alpha", "actor", "critic"), losses):
        r.value(f"{name} loss", m[f"{name}_loss"], loss)
    r.tree("grad actor (Adam m)", mu(new.actor), sac_actor_tree(actor, common.adam_first_moment(opts[0])))
    r.tree("grad critics (Adam m)", mu(new.critic), ensemble_tree(critics, sac_critic_tree, opts[1:]))
    r.value("grad log alpha (Adam m)", mu(new.log_alpha), moment(agent.alpha_optimizer, agent.log_alpha.constant))
    if h.cql_lagrange:
        r.value("grad log alpha' (Adam m)", mu(new.log_alpha_prime),
                moment(agent.alpha_prime_optimizer, agent.log_alpha_prime.constant))
    r.tree("actor", new.actor.params, sac_actor_tree(actor))
    r.tree("critics", new.critic.params, ensemble_tree(critics, sac_critic_tree))
    r.tree("target critics", new.critic_target,
           ensemble_tree([agent.target_critic_1, agent.target_critic_2], sac_critic_tree))
    r.value("log alpha", new.log_alpha.params, agent.log_alpha.constant)
    r.value("log alpha'", new.log_alpha_prime.params, agent.log_alpha_prime.constant)
    actor_template = state.actor.params

    # ---- re-evaluation, alignment, online (finetune/online_agent/sac.py)
    h = o2sac.make_hyper(cfg, obs_dim, act_dim)
    n_q = h.finetune_n_critics  # AntMaze: double_critic false, only critic_1 is used and trained
    offline_actor = saturated(perturbed(policy(rc.policy_log_std_multiplier, rc.orthogonal_init), gen), 8.0)
    base_critics = [shifted(perturbed(R.net.CriticFunction(obs_dim, act_dim, layer_norm=rc.critic_layernorm,
                                                           n_hidden=rc.q_n_hidden_layers), gen), q_offset)
                    for _ in range(2)]
    base_targets = [perturbed(c, gen) for c in base_critics]

    def sac_pair(actor_, log_alpha_, log_lmbda_):
        """(our O2State, the reference SAC agent) from the same actor pi, pi_ref = offline_actor, critics, targets."""
        actor_, critics_ = copy.deepcopy(actor_), [copy.deepcopy(c) for c in base_critics]
        opts_ = [torch.optim.Adam(m.parameters(), lr) for m, lr in
                 ((actor_, rc.policy_lr), (critics_[0], rc.qf_lr), (critics_[1], rc.qf_lr))]
        agent_ = R.sac.SAC(critics_[0], opts_[1], critics_[1], opts_[2], actor_, opts_[0], -float(act_dim), 1.0,
                           rc.discount, rc.alpha_multiplier, rc.alpha_lr, rc.target_update_period,
                           rc.soft_target_update_rate, rc.use_automatic_entropy_tuning, np.log(rc.alpha),
                           rc.threshold, rc.end_threshold, rc.end_steps, rc.double_critic, np.log(rc.lmbda),
                           rc.loss_tau, "cpu")
        load(agent_.offline_actor, offline_actor)
        for t_, c in zip((agent_.target_critic_1, agent_.target_critic_2), base_targets):
            load(t_, c)
        agent_.log_alpha.constant.data.fill_(log_alpha_)
        agent_.log_lmbda.constant.data.fill_(log_lmbda_)
        adams(*opts_, agent_.alpha_optimizer, agent_.log_lmbda_optimizer)
        st = o2sac.init_o2_state(h, 0, fit(actor_template, sac_actor_tree(actor_)), np.zeros(obs_dim),
                                 np.ones(obs_dim), cfg.alpha, cfg.lmbda, 0.0)
        tx = o2sac.optimizers(h)
        st = st._replace(
            actor=trainable(o2sac, st.actor.params, tx["actor"]),
            critic=trainable(o2sac, fit(st.critic.params, ensemble_tree(critics_[:n_q], sac_critic_tree)),
                             tx["critic"]),
            critic_target=fit(st.critic_target, ensemble_tree(base_targets[:n_q], sac_critic_tree)),
            ref_actor=fit(st.ref_actor, sac_actor_tree(offline_actor)),
            log_alpha=trainable(o2sac, jnp.float32(log_alpha_), tx["log_alpha"]),
            log_lmbda=trainable(o2sac, jnp.float32(log_lmbda_), tx["log_lmbda"]))
        return st, agent_, opts_, critics_

    def compare_sac(r, new, agent_, opts_, critics_):
        r.tree("grad actor (Adam m)", mu(new.actor), sac_actor_tree(agent_.actor, common.adam_first_moment(opts_[0])))
        r.tree("grad critics (Adam m)", mu(new.critic), ensemble_tree(critics_[:n_q], sac_critic_tree, opts_[1:]))
        r.tree("actor", new.actor.params, sac_actor_tree(agent_.actor))
        r.tree("critics", new.critic.params, ensemble_tree(critics_[:n_q], sac_critic_tree))
        r.tree("target critics", new.critic_target,
               ensemble_tree([agent_.target_critic_1, agent_.target_critic_2][:n_q], sac_critic_tree))
        r.value("log alpha", new.log_alpha.params, agent_.log_alpha.constant)
        r.value("log lambda", new.log_lmbda.params, agent_.log_lmbda.constant)

    log_alpha0, key = float(np.log(cfg.alpha)), jax.random.PRNGKey(2)
    # re-evaluation: pi = pi_ref = the offline actor, alpha fixed at `alpha`
    r = Rows(rows, "o2sac", "reevaluation", setting)
    r.value("rewards (offline transform)", ds_off["rewards"], ref_off["rewards"])
    state, agent, opts, critics = sac_pair(offline_actor, log_alpha0, float(np.log(cfg.lmbda)))
    n_ours, n_ref = noises(rng, ("normal", (b, act_dim)))
    new, m = run_ours(lambda: o2sac.pr_update(state, our_buffer(o2sac, ds_off, batch), key, h), n_ours)
    _, losses = run_ref(lambda: agent.ope(torch_batch(ref_off, batch)), n_ref)
    r.value("critic loss", m["critic_loss"], losses[0])
    r.tree("grad critics (Adam m)", mu(new.critic), ensemble_tree(critics[:n_q], sac_critic_tree, opts[1:]))
    r.tree("critics", new.critic.params, ensemble_tree(critics[:n_q], sac_critic_tree))
    r.tree("target critics", new.critic_target,
           ensemble_tree([agent.target_critic_1, agent.target_critic_2][:n_q], sac_critic_tree))

    # alignment: pi already moved away from pi_ref, targets frozen
    actor = perturbed(offline_actor, gen, 0.02)
    r = Rows(rows, "o2sac", "alignment", setting)
    state, agent, opts, critics = sac_pair(actor, log_alpha0, float(np.log(cfg.lmbda)))
    n_ours, n_ref = noises(rng, ("normal", (b, act_dim)), ("normal", (b, act_dim)))
    new, m = run_ours(lambda: o2sac.va_update(state, our_buffer(o2sac, ds_off, batch), key, h), n_ours)
    log, losses = run_ref(lambda: agent.align_value(torch_batch(ref_off, batch)), n_ref)
    r.value("actor loss", m["actor_loss"], losses[0])
    r.value("critic loss", m["critic_loss"], losses[1])
    r.value("fixed (anchor) loss", m["fixed_loss"], log["refine_fixed_loss"])
    r.value("predicted (aligned) loss", m["predicted_loss"], log["refine_predicted_loss"])
    compare_sac(r, new, agent, opts, critics)

    # online: the first update of an env step (lambda stepped) and a later one; alpha, lambda moved from their start
    for first in (True, False):
        r = Rows(rows, "o2sac", "online", f"{setting}, {'first' if first else 'later'} of the utd updates")
        if first:
            r.value("rewards (online transform)", ds_on["rewards"], [ref_on_r(float(x)) for x in raw_on["rewards"]])
        state, agent, opts, critics = sac_pair(actor, log_alpha0 + 0.2, float(np.log(cfg.lmbda)) - 0.3)
        n_ours, n_ref = noises(rng, ("normal", (b, act_dim)), ("normal", (b, act_dim)))
        i_ours, i_ref = index_pair(rng, online_rows(b))
        off, on = our_buffer(o2sac, ds_off), our_buffer(o2sac, ds_on, capacity=N_ONLINE + 44)
        def sampled_update(state=state, first=first):  # the scan body of o2sac.scan_online_updates
            key, k_off, k_on, k_upd = jax.random.split(state.key, 4)
            batch = o2sac.sample_online_batch(off, N_OFFLINE, on, N_ONLINE, k_off, k_on, h)
            return o2sac.cf_update(state._replace(key=key), batch, k_upd, N_ONLINE, first, h)
        new, m = run_ours(sampled_update, n_ours, i_ours)
        buf = ref_online_buffer(R, ref_off, raw_on, obs_dim, act_dim, ref_on_r)
        _, losses = run_ref(lambda: agent.update(buf.sample(rc.batch_size), N_ONLINE, False, 0 if first else 1),
                            n_ref, i_ref)
        if first:
            r.value("lambda loss", m["lambda"] * m["lambda_loss_weight"], losses.pop(0),
                    note="ours: lambda * metrics lambda_loss_weight")
        for name, loss in zip(("alpha", "actor", "critic"), losses):
            r.value(f"{name} loss", m[f"{name}_loss"], loss)
        r.value("grad log alpha (Adam m)", mu(new.log_alpha), moment(agent.alpha_optimizer, agent.log_alpha.constant))
        if first:
            r.value("grad log lambda (Adam m)", mu(new.log_lmbda),
                    moment(agent.log_lmbda_optimizer, agent.log_lmbda.constant))
        compare_sac(r, new, agent, opts, critics)


# ---------------------------------------------------------------------------------------------- O2TD3
def step_o2td3(reference_dir=None) -> list:
    path = common.reference_checkout(REF, reference_dir)
    R, o2td3, rows = reference(path), common.ours("o2td3"), []
    for setting in (MUJOCO, ANTMAZE):
        _o2td3_setting(rows, R, o2td3, *setting)
    return rows


def _o2td3_setting(rows, R, o2td3, setting, ours_rel, ref_rel, obs_dim, act_dim, q_offset):
    import jax
    import jax.numpy as jnp
    import torch
    cfg, rc = our_config(o2td3, ours_rel), ref_config(R, R.O2TD3, f"finetune/O2TD3/{ref_rel}")
    rc_bc = ref_config(R, R.td3_bc_script, f"offline/td3_bc/{ref_rel}" if setting == "antmaze" else None)
    rng, gen = np.random.default_rng(1), np.random.default_rng(11)
    torch.manual_seed(1)
    sparse = setting == "antmaze"
    raw_off = transitions(rng, N_OFFLINE, obs_dim, act_dim, sparse)
    raw_on = transitions(rng, N_ONLINE, obs_dim, act_dim, sparse)
    ours_r = lambda r: r * cfg.reward_scale + cfg.reward_bias  # noqa: E731  (as o2td3.train applies it)
    ds_off, ds_on = with_rewards(raw_off, ours_r(raw_off["rewards"])), with_rewards(raw_on, ours_r(raw_on["rewards"]))
    ref_off, ref_bc = ({k: v.copy() for k, v in raw_off.items()} for _ in range(2))
    if rc.normalize_reward:  # O2TD3.py
        R.utils.modify_reward(ref_off, rc.env)
    if rc_bc.normalize_reward:  # offline/td3_bc.py
        R.utils.modify_reward(ref_bc, rc_bc.env)
    ref_on_r = (lambda r: R.utils.modify_reward_online(rc.env, r)) if rc.normalize_reward else (lambda r: r)
    b, batch, key = cfg.batch_size, slice(0, cfg.batch_size), jax.random.PRNGKey(3)
    mu = lambda tr: common.optax_first_moment(tr.opt_state)  # noqa: E731
    offline_actor = saturated(perturbed(R.net.DeterministicPolicy(obs_dim, act_dim, 1.0), gen), 4.0)
    actor_target = perturbed(offline_actor, gen, 0.02)
    actor_moved = perturbed(offline_actor, gen, 0.02)

    # ---- offline TD3+BC (offline/td3_bc.py + TD3_BC.train): a critic-only step and an actor step
    h_off = o2td3.make_hyper(cfg, obs_dim, act_dim, offline=True)
    bc_critics = [shifted(perturbed(R.net.CriticFunction(obs_dim, act_dim), gen), q_offset) for _ in range(2)]
    bc_targets = [perturbed(c, gen) for c in bc_critics]
    for it in (0, 1):
        r = Rows(rows, "o2td3", "offline", f"{setting}, {'critic' if it == 0 else 'critic + actor'} step")
        if it == 0:
            r.value("rewards (offline transform)", ds_off["rewards"], ref_bc["rewards"])
        actor, critics = copy.deepcopy(actor_moved), [copy.deepcopy(c) for c in bc_critics]
        opts = [torch.optim.Adam(m.parameters(), lr) for m, lr in
                ((actor, rc_bc.actor_lr), (critics[0], rc_bc.qf_lr), (critics[1], rc_bc.qf_lr))]
        agent = R.td3_bc.TD3_BC(max_action=1.0, actor=actor, actor_optimizer=opts[0], critic_1=critics[0],
                                critic_1_optimizer=opts[1], critic_2=critics[1], critic_2_optimizer=opts[2],
                                discount=rc_bc.discount, tau=rc_bc.tau, policy_noise=rc_bc.policy_noise,
                                noise_clip=rc_bc.noise_clip, policy_freq=rc_bc.policy_freq, alpha=rc_bc.alpha,
                                device="cpu")
        load(agent.actor_target, actor_target)
        for t_, c in zip((agent.critic_1_target, agent.critic_2_target), bc_targets):
            load(t_, c)
        agent.total_it = it
        adams(*opts)
        state = o2td3.init_offline_state(h_off, jax.random.PRNGKey(0), np.zeros(obs_dim), np.ones(obs_dim))
        tx = o2td3.optimizers(h_off)
        state = state._replace(
            actor=trainable(o2td3, fit(state.actor.params, td3_tree(actor)), tx["actor"]),
            actor_target=fit(state.actor_target, td3_tree(actor_target)),
            critic=trainable(o2td3, fit(state.critic.params, ensemble_tree(critics, td3_tree)), tx["critic"]),
            critic_target=fit(state.critic_target, ensemble_tree(bc_targets, td3_tree)), it=jnp.int32(it))
        n_ours, n_ref = noises(rng, ("normal", (b, act_dim)))
        new, m = run_ours(lambda: o2td3.td3bc_update(state, our_buffer(o2td3, ds_off, batch), key, 0, h_off), n_ours)
        _, losses = run_ref(lambda: agent.train(torch_batch(ref_bc, batch)), n_ref)
        r.value("critic loss", m["critic_loss"], losses[0])
        if it == 1:
            r.value("actor loss", m["actor_loss"], losses[1])
            r.tree("grad actor (Adam m)", mu(new.actor), td3_tree(actor, common.adam_first_moment(opts[0])))
        r.tree("grad critics (Adam m)", mu(new.critic), ensemble_tree(critics, td3_tree, opts[1:]))
        r.tree("actor", new.actor.params, td3_tree(actor))
        r.tree("target actor", new.actor_target, td3_tree(agent.actor_target))
        r.tree("critics", new.critic.params, ensemble_tree(critics, td3_tree))
        r.tree("target critics", new.critic_target,
               ensemble_tree([agent.critic_1_target, agent.critic_2_target], td3_tree))

    # ---- re-evaluation, alignment, online (finetune/online_agent/td3.py)
    h = o2td3.make_hyper(cfg, obs_dim, act_dim, offline=False)
    base_critics = [shifted(perturbed(R.net.CriticFunction(obs_dim, act_dim, layer_norm=rc.critic_layernorm), gen),
                            q_offset) for _ in range(2)]
    base_targets = [perturbed(c, gen) for c in base_critics]

    def td3_pair(actor_, target_actor_, log_lmbda_, it_):
        actor_, critics_ = copy.deepcopy(actor_), [copy.deepcopy(c) for c in base_critics]
        opts_ = [torch.optim.Adam(m.parameters(), lr) for m, lr in
                 ((actor_, rc.policy_lr), (critics_[0], rc.qf_lr), (critics_[1], rc.qf_lr))]
        agent_ = R.td3.TD3(1.0, actor_, opts_[0], critics_[0], opts_[1], critics_[1], opts_[2], rc.discount, rc.tau,
                           rc.policy_noise, rc.noise_clip, rc.policy_freq, rc.distance_beta, np.log(rc.lmbda),
                           rc.threshold, rc.end_threshold, rc.end_steps, rc.loss_tau, "cpu")
        load(agent_.offline_actor, offline_actor)
        load(agent_.actor_target, target_actor_)
        for t_, c in zip((agent_.critic_1_target, agent_.critic_2_target), base_targets):
            load(t_, c)
        agent_.log_lmbda.constant.data.fill_(log_lmbda_)
        agent_.total_it = it_
        adams(*opts_, agent_.log_lmbda_optimizer)
        off = o2td3.init_offline_state(h, jax.random.PRNGKey(0), np.zeros(obs_dim), np.ones(obs_dim))
        st = o2td3.start_finetuning(off, h, True, cfg.lmbda)
        tx = o2td3.optimizers(h)
        st = st._replace(
            actor=trainable(o2td3, fit(st.actor.params, td3_tree(actor_)), tx["actor"]),
            actor_target=fit(st.actor_target, td3_tree(target_actor_)),
            critic=trainable(o2td3, fit(st.critic.params, ensemble_tree(critics_, td3_tree)), tx["critic"]),
            critic_target=fit(st.critic_target, ensemble_tree(base_targets, td3_tree)),
            ref_actor=fit(st.ref_actor, td3_tree(offline_actor)),
            log_lmbda=trainable(o2td3, jnp.float32(log_lmbda_), tx["log_lmbda"]), it=jnp.int32(it_))
        return st, agent_, opts_, critics_

    def compare_td3(r, new, agent_, opts_, critics_, actor_step=True):
        if actor_step:
            r.tree("grad actor (Adam m)", mu(new.actor), td3_tree(agent_.actor, common.adam_first_moment(opts_[0])))
        r.tree("grad critics (Adam m)", mu(new.critic), ensemble_tree(critics_, td3_tree, opts_[1:]))
        r.tree("actor", new.actor.params, td3_tree(agent_.actor))
        r.tree("target actor", new.actor_target, td3_tree(agent_.actor_target))
        r.tree("critics", new.critic.params, ensemble_tree(critics_, td3_tree))
        r.tree("target critics", new.critic_target,
               ensemble_tree([agent_.critic_1_target, agent_.critic_2_target], td3_tree))
        r.value("log lambda", new.log_lmbda.params, agent_.log_lmbda.constant)

    log_lmbda0 = float(np.log(cfg.lmbda))
    # re-evaluation: the target actor is the offline actor (official load_offline)
    r = Rows(rows, "o2td3", "reevaluation", setting)
    r.value("rewards (offline transform)", ds_off["rewards"], ref_off["rewards"])
    state, agent, opts, critics = td3_pair(offline_actor, offline_actor, log_lmbda0, 0)
    n_ours, n_ref = noises(rng, ("normal", (b, act_dim)))
    new, m = run_ours(lambda: o2td3.ope_update(state, our_buffer(o2td3, ds_off, batch), key, 0, h), n_ours)
    _, losses = run_ref(lambda: agent.ope(torch_batch(ref_off, batch)), n_ref)
    r.value("critic loss", m["critic_loss"], losses[0])
    compare_td3(r, new, agent, opts, critics, actor_step=False)

    # alignment: pi already moved away from pi_ref, targets frozen
    r = Rows(rows, "o2td3", "alignment", setting)
    state, agent, opts, critics = td3_pair(actor_moved, offline_actor, log_lmbda0, 0)
    n_ours, n_ref = noises(rng, ("normal", (b, act_dim)))
    new, m = run_ours(lambda: o2td3.align_update(state, our_buffer(o2td3, ds_off, batch), key, 0, h), n_ours)
    log, losses = run_ref(lambda: agent.align_value(torch_batch(ref_off, batch)), n_ref)
    r.value("actor loss", m["actor_loss"], losses[0])
    r.value("critic loss", m["critic_loss"], losses[1])
    r.value("refine (aligned target) loss", m["refine_loss"], log["refine_loss"])
    r.value("fixed (anchor) loss", m["fixed_loss"], log["refine_fixed_loss"])
    compare_td3(r, new, agent, opts, critics)

    # online: a critic-only update (odd total_it) and a critic + lambda + actor + targets update
    for it in (0, 1):
        r = Rows(rows, "o2td3", "online", f"{setting}, {'critic' if it == 0 else 'critic + actor'} step")
        if it == 0:
            r.value("rewards (online transform)", ds_on["rewards"], [ref_on_r(float(x)) for x in raw_on["rewards"]])
        state, agent, opts, critics = td3_pair(actor_moved, actor_target, log_lmbda0 + 0.3, it)
        n_ours, n_ref = noises(rng, ("normal", (b, act_dim)))
        i_ours, i_ref = index_pair(rng, online_rows(b))
        off, on = our_buffer(o2td3, ds_off), our_buffer(o2td3, ds_on, capacity=N_ONLINE + 44)
        def ours(state=state, off=off, on=on):  # the body of o2td3.update_online's scan
            key, k_off, k_on, k_upd = jax.random.split(state.key, 4)
            return o2td3.online_update(state._replace(key=key), o2td3.sample_mixed(off, on, N_ONLINE, k_off, k_on, h),
                                       k_upd, N_ONLINE, h)
        new, m = run_ours(ours, n_ours, i_ours)
        buf = ref_online_buffer(R, ref_off, raw_on, obs_dim, act_dim, ref_on_r)
        _, losses = run_ref(lambda: agent.update(buf.sample(rc.batch_size), N_ONLINE, False), n_ref, i_ref)
        r.value("critic loss", m["critic_loss"], losses[0])
        if it == 1:
            r.value("lambda loss", m["lambda_loss"], losses[1])
            r.value("actor loss", m["actor_loss"], losses[2])
            r.value("grad log lambda (Adam m)", mu(new.log_lmbda),
                    moment(agent.log_lmbda_optimizer, agent.log_lmbda.constant))
        compare_td3(r, new, agent, opts, critics, actor_step=it == 1)


# ---------------------------------------------------------------------------------------------- O2PPO
def step_o2ppo(reference_dir=None) -> list:
    path = common.reference_checkout(REF, reference_dir)
    R, o2ppo, rows = reference(path), common.ours("o2ppo"), []
    for setting in (MUJOCO, ANTMAZE):
        _o2ppo_setting(rows, R, o2ppo, *setting)
    _o2ppo_returns(rows, R, o2ppo)
    _o2ppo_std_cap(rows, R, o2ppo)
    return rows


def ppo_args(R, ref_rel, obs_dim, act_dim, **overrides):
    """O2PPO.py's args: its config/finetune/O2PPO yaml (which sets every argument the agent reads) + env dims."""
    import yaml
    args = yaml.safe_load((R.path / "config" / "finetune" / "O2PPO" / ref_rel).read_text())
    return types.SimpleNamespace(**{**args, "device": "cpu", "state_dim": obs_dim, "action_dim": act_dim,
                                    "max_action": 1.0, **overrides})


def _o2ppo_setting(rows, R, o2ppo, setting, ours_rel, ref_rel, obs_dim, act_dim, q_offset):
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    cfg = our_config(o2ppo, ours_rel)
    rc_iql = ref_config(R, R.iql_script, f"offline/iql/{ref_rel}" if setting == "antmaze" else None)
    rng, gen = np.random.default_rng(2), np.random.default_rng(12)
    torch.manual_seed(2)
    sparse = setting == "antmaze"
    mu = lambda tr: common.optax_first_moment(tr.opt_state)  # noqa: E731

    # ---- offline IQL (offline/iql.py + ImplicitQLearning.train)
    h = o2ppo.make_hyper(cfg, obs_dim, act_dim)
    r = Rows(rows, "o2ppo", "offline", setting)
    raw = transitions(rng, cfg.iql_batch_size, obs_dim, act_dim, sparse)
    ours_ds = with_rewards(raw, raw["rewards"] * cfg.iql_reward_scale + cfg.iql_reward_bias)  # as o2ppo.train
    ref_ds = {k: v.copy() for k, v in raw.items()}
    if rc_iql.normalize_reward:
        R.utils.modify_reward(ref_ds, rc_iql.env)
    r.value("rewards (offline transform)", ours_ds["rewards"], ref_ds["rewards"])
    actor = saturated(perturbed(R.net.GaussianPolicy(obs_dim, act_dim, 1.0), gen), 4.0)
    q, v = perturbed(R.net.TwinQ(obs_dim, act_dim), gen), perturbed(R.net.ValueFunction(obs_dim), gen)
    for net in (q.q1, q.q2, v):
        shifted(net, q_offset)
    opts = [torch.optim.Adam(m.parameters(), lr) for m, lr in
            ((actor, rc_iql.actor_lr), (q, rc_iql.qf_lr), (v, rc_iql.vf_lr))]
    agent = R.iql.ImplicitQLearning(max_action=1.0, actor=actor, actor_optimizer=opts[0], q_network=q,
                                    q_optimizer=opts[1], v_network=v, v_optimizer=opts[2], discount=rc_iql.discount,
                                    tau=rc_iql.tau, device="cpu", beta=rc_iql.beta, iql_tau=rc_iql.iql_tau,
                                    max_steps=rc_iql.max_timesteps)
    load(agent.q_target, perturbed(q, gen))
    adams(*opts)
    twin = lambda qn, opt=None: ensemble_tree([qn.q1, qn.q2], ppo_tree, [opt, opt] if opt else None)  # noqa: E731
    state = o2ppo.init_iql_state(h, jax.random.PRNGKey(0), np.zeros(obs_dim), np.ones(obs_dim))
    tx = o2ppo.iql_optimizers(h)
    state = state._replace(
        actor=trainable(o2ppo, fit(state.actor.params, ppo_tree(actor)), tx["actor"]),
        critic=trainable(o2ppo, fit(state.critic.params, twin(q)), tx["critic"]),
        value=trainable(o2ppo, fit(state.value.params, ppo_tree(v)), tx["value"]),
        critic_target=fit(state.critic_target, twin(agent.q_target)))
    new, m = run_ours(lambda: o2ppo.iql_update(state, our_buffer(o2ppo, ours_ds), h), common.Noise())
    _, losses = run_ref(lambda: agent.train(torch_batch(ref_ds)), common.Noise())
    for name, key, loss in zip(("value loss", "critic loss", "actor loss"),
                               ("value_loss", "critic_loss", "actor_loss"), losses):
        r.value(name, m[key], loss)
    r.tree("grad value (Adam m)", mu(new.value), ppo_tree(v, common.adam_first_moment(opts[2])))
    r.tree("grad critics (Adam m)", mu(new.critic), twin(q, opts[1]))
    r.tree("grad actor (Adam m)", mu(new.actor), ppo_tree(actor, common.adam_first_moment(opts[0])))
    r.tree("value", new.value.params, ppo_tree(v))
    r.tree("critics", new.critic.params, twin(q))
    r.tree("target critics", new.critic_target, twin(agent.q_target))
    r.tree("actor", new.actor.params, ppo_tree(actor))

    # ---- value re-evaluation step (ValueLearner.update on the OfflineReplayBuffer, lr 1e-4 / batch 512 hard-coded)
    r = Rows(rows, "o2ppo", "reevaluation", setting)
    ds = episodes_dataset(rng, sparse)
    v_dim = ds["observations"].shape[1]
    hv, args = o2ppo.make_hyper(cfg, v_dim, act_dim), ppo_args(R, ref_rel, v_dim, act_dim)
    learner = R.ppo_net.ValueLearner(args, value_lr=1e-4, batch_size=512)
    learner._value = perturbed(learner._value, gen)
    learner._optimizer = torch.optim.Adam(learner._value.parameters(), lr=1e-4)
    adams(learner._optimizer)
    buf, _ = ref_value_buffer(R, ds, args)
    n = buf._size
    st = o2ppo.make_reeval_state(hv, state.actor.params, fit(o2ppo.init_ppo_value(hv, jax.random.PRNGKey(1)),
                                                             ppo_tree(learner._value)),
                                 jax.random.PRNGKey(2), np.zeros(v_dim), np.ones(v_dim))
    st = st._replace(value=trainable(o2ppo, st.value.params, optax.adam(hv.reevaluation_lr)))  # as reeval_update steps
    i_ours, i_ref = index_pair(rng, [(n, hv.reevaluation_batch_size)])
    obs, returns = jnp.asarray(buf._state[:n], jnp.float32), jnp.asarray(buf._return[:n, 0], jnp.float32)
    new, m = run_ours(lambda: o2ppo.reeval_update(st, obs, returns, hv), common.Noise(), i_ours)
    _, losses = run_ref(lambda: learner.update(buf), common.Noise(), i_ref)
    r.value("value loss", m["value_loss"], losses[0])
    r.tree("grad value (Adam m)", mu(new.value), ppo_tree(learner._value, common.adam_first_moment(learner._optimizer)))
    r.tree("value", new.value.params, ppo_tree(learner._value))

    # ---- online PPO (PPO.update): one minibatch (gradients), and the official rollout / epochs / minibatches
    ref_actor = saturated(perturbed(R.ppo_net.GaussianPolicy(obs_dim, act_dim, 1.0), gen), 4.0)
    actor = perturbed(ref_actor, gen, 0.02)
    critic = shifted(perturbed(R.ppo_net.ValueTanhMLP(ppo_args(R, ref_rel, obs_dim, act_dim)), gen), q_offset)
    t = 20 * 2048  # env steps before this update: reference weight w_t = 1 - t / end_steps = 0.84
    actor_template, value_template = state.actor.params, o2ppo.init_ppo_value(h, jax.random.PRNGKey(1))
    for size, mb, epochs in ((128, 128, 1), (cfg.rollout_length, cfg.minibatch_size, cfg.ppo_epochs)):
        roll = _rollout(rng, actor, size, obs_dim, sparse)
        perms = [rng.permutation(size) for _ in range(epochs)]
        for bug in (True, False):
            label = (f"{setting}, {'one minibatch' if epochs == 1 else 'official update'} "
                     f"(N {size}, M {mb}, K {epochs}), {'reference behaviour' if bug else 'default'}")
            r = Rows(rows, "o2ppo", "online", label, "" if bug else
                     "default differs by design: deviation 1 (per-sample reference advantage)")
            c = dataclasses.replace(cfg, rollout_length=size, minibatch_size=mb, ppo_epochs=epochs,
                                    reference_advantage_broadcast_bug=bug)
            new, m, agent, (a_loss, c_loss) = ppo_update_pair(R, o2ppo, c, ref_rel, (actor, ref_actor, critic), roll,
                                                              perms, t, (actor_template, value_template))
            r.value("actor loss (mean over minibatches)", m["actor_loss"], a_loss)
            r.value("critic loss (mean over minibatches)", m["critic_loss"], c_loss)
            if epochs == 1:
                r.tree("grad actor (Adam m, clipped)", mu(new.actor),
                       ppo_tree(agent.actor, common.adam_first_moment(agent.optimizer_actor)))
                r.tree("grad value (Adam m, clipped)", mu(new.value),
                       ppo_tree(agent.critic, common.adam_first_moment(agent.optimizer_critic)))
            tol, note = (common.TOLERANCE, "") if epochs == 1 else (
                PPO_UPDATE_TOL, "tol 1e-4: 160 sequential steps, where a ReLU input within round-off of 0 may take "
                "the other branch on one side (see PPO_UPDATE_TOL)")
            r.tree("actor", new.actor.params, ppo_tree(agent.actor), note, tol)
            r.tree("value", new.value.params, ppo_tree(agent.critic), note, tol)


def ppo_update_pair(R, o2ppo, cfg, ref_rel, nets, roll, perms, t, templates):
    """One PPO update (a rollout, cfg.ppo_epochs epochs of minibatches `perms`) at env step t on each side from the
    same actor, reference actor and value (`nets`, torch). Returns (our new state, our metrics, the reference
    agent after its update, its (mean actor loss, mean critic loss))."""
    import jax
    import jax.numpy as jnp
    actor, ref_actor, critic = nets
    size, obs_dim, act_dim = len(roll["r"]), roll["s"].shape[1], roll["a"].shape[1]
    h = o2ppo.make_hyper(cfg, obs_dim, act_dim)
    agent = R.ppo.PPO(ppo_args(R, ref_rel, obs_dim, act_dim, batch_size=size, mini_batch_size=cfg.minibatch_size,
                               K_epochs=cfg.ppo_epochs), "cpu")
    load(agent.actor, actor)
    load(agent.critic, critic)
    agent.reference_actor = copy.deepcopy(ref_actor)
    agent.lr_decay(t - size)  # what the previous update (at env step t - N) left
    adams(agent.optimizer_actor, agent.optimizer_critic)
    rb = R.online_buffer.ReplayBuffer(agent.args, "cpu")
    keys = ("s", "a", "a_logprob", "r", "s_", "dw", "done")
    for i in range(size):
        rb.store(*(roll[k][i] for k in keys))
    st = o2ppo.make_ppo_state(h, fit(templates[0], ppo_tree(actor)), fit(templates[1], ppo_tree(critic)),
                              jax.random.PRNGKey(3), np.zeros(obs_dim), np.ones(obs_dim))
    tx = o2ppo.ppo_optimizer(h)
    st = st._replace(actor=trainable(o2ppo, st.actor.params, tx), value=trainable(o2ppo, st.value.params, tx),
                     ref_actor=fit(st.ref_actor, ppo_tree(ref_actor)))
    rollout = o2ppo.Rollout(*(jnp.asarray(roll[k], jnp.float32) for k in keys))
    new, m = run_ours(lambda: o2ppo.ppo_update_one(st, rollout, t, h), common.Noise(),
                      common.Indices(permutation=perms))
    losses, _ = run_ref(lambda: agent.update(rb, t), common.Noise(), common.Indices(permutation=perms))
    return new, m, agent, losses


def ref_value_buffer(R, ds, args):
    """The reference's OfflineReplayBuffer as O2PPO.py prepares it for the value re-evaluation (load_dataset with
    clipped actions, reward scaling per its config, compute_return; not shuffled, states not normalised), and the
    reward scaler it hands to the online phase (or None). Its RewardScaling returns a [1] array that reward_normalize
    stores into a float element: fine in the pinned numpy 1.24, an error in numpy >= 2, so here it returns that
    array's single element (the same value)."""
    from unittest import mock

    class RewardScaling(R.offline_buffer.RewardScaling):
        def __call__(self, x):
            return np.ravel(super().__call__(x))[0]

    buf = R.offline_buffer.OfflineReplayBuffer("cpu", ds["observations"].shape[1], ds["actions"].shape[1],
                                               len(ds["actions"]) - 1)
    scaler = None
    with quiet(), mock.patch.object(R.offline_buffer, "RewardScaling", RewardScaling):
        buf.load_dataset(dataset={k: v.copy() for k, v in ds.items()}, clip=True)
        if args.use_reward_scaling:
            scaler = buf.reward_normalize(args.gamma, args.scale_strategy)
        elif args.scale_strategy == "number":
            buf.reward_normalize(args.gamma, args.scale_strategy)
        buf.compute_return(args.gamma)
    return buf, scaler


def episodes_dataset(rng, sparse):
    """A D4RL-style dict (with timeouts) of common's synthetic episodes flattened by data.py: locomotion (terminated
    episodes, a 1000-step time limit, a cut fragment) or AntMaze (0/1 rewards: failures to the 700-step limit, a
    success ending its episode, successes mid-episode and at the limit, a fragment); states standardised."""
    eps = common.antmaze_episodes(rng, 700) if sparse else common.locomotion_episodes(rng)
    ds = common.qlearning_dataset(common.synthetic_data(eps))
    obs = ds["observations"]
    return {**ds, "observations": ((obs - obs.mean(0)) / obs.std(0)).astype(np.float32)}


def _rollout(rng, actor, n, obs_dim, sparse):
    """n on-policy transitions in the reference buffer's per-step format (a ~ clip(N(mu, sigma)), its log-prob per
    dim); episodes end at terminals (dw) or time limits (done only)."""
    import torch
    s = rng.normal(size=(n, obs_dim)).astype(np.float32)
    with torch.no_grad():
        dist = actor.get_dist(torch.as_tensor(s))
        a = torch.clamp(dist.mean + dist.stddev * torch.as_tensor(rng.normal(size=tuple(dist.mean.shape)),
                                                                 dtype=torch.float32), -1.0, 1.0)
        logp = dist.log_prob(a).numpy()
    r = (rng.random(n) < 0.05).astype(np.float32) if sparse else rng.normal(size=n).astype(np.float32)
    ends = rng.random(n) < 0.01
    dw = (r > 0) if sparse else ends & (rng.random(n) < 0.5)
    done = dw | ends
    return {"s": s, "a": a.numpy(), "a_logprob": logp, "r": r, "s_": rng.normal(size=(n, obs_dim)).astype(np.float32),
            "dw": dw.astype(np.float32), "done": done.astype(np.float32)}


def _o2ppo_returns(rows, R, o2ppo):
    """Monte-Carlo returns (and the reward scaler handed to the online phase) of the value re-evaluation: the
    reference's OfflineReplayBuffer (load_dataset, reward_normalize when the config scales rewards, compute_return)
    against our reevaluation_targets on the same transitions (the reference pairs obs[t] with obs[t+1] and drops
    the dataset's last transition, so ours gets the first N-1)."""
    rng = np.random.default_rng(3)
    for setting, ours_rel, ref_rel, sparse in (("hopper", "o2o/hopper/medium-v0.yaml", "hopper/medium_v2.yaml", False),
                                               ("halfcheetah", "o2o/halfcheetah/medium-v0.yaml",
                                                "halfcheetah/medium_v2.yaml", False),
                                               ("antmaze", *ANTMAZE[1:3], True)):
        ds = episodes_dataset(rng, sparse)
        cfg, args = our_config(o2ppo, ours_rel), ppo_args(R, ref_rel, *(ds[k].shape[1] for k in ("observations",
                                                                                                  "actions")))
        buf, scaler = ref_value_buffer(R, ds, args)
        for across in (True, False):
            r = Rows(rows, "o2ppo", "reevaluation", f"{setting} data, {'reference behaviour' if across else 'default'}",
                     "" if across else "default differs by design: deviation 2 (returns end at time limits too)")
            returns, ours_scaler = o2ppo.reevaluation_targets(
                ds["rewards"][:-1], ds["terminals"][:-1], ds["timeouts"][:-1], cfg.discount, across,
                cfg.dynamic_reward_scaling)
            r.value("Monte-Carlo returns", returns, buf._return[:buf._size, 0])
            if scaler is not None:
                ms = scaler.running_ms
                r.value("reward scaler (n, mean, S, std, R)", [ours_scaler.state()[k] for k in ("n", "mean", "S", "std",
                                                                                                "R")],
                        np.concatenate([np.ravel(x) for x in (ms.n, ms.mean, ms.S, ms.std, scaler.R)]))


def _o2ppo_std_cap(rows, R, o2ppo):
    """hopper-*expert*: O2PPO.py caps the actor's and the reference's log-std at log 0.05 (reset_std)."""
    import torch
    cfg = our_config(o2ppo, "o2o/hopper/expert-v0.yaml")
    actor = R.ppo_net.GaussianPolicy(11, 3, 1.0)
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([-3.5, -2.0, 0.3]))
    ours = o2ppo.cap_log_std(ppo_tree(actor), cfg.std_cap)
    actor.reset_std(np.log(0.05))
    Rows(rows, "o2ppo", "online", "hopper expert, start of fine-tuning").value(
        "log std after the std cap", ours["log_std"], actor.log_std)



# ---------------------------------------------------------------------------------------------- learning runs
# `learn_<algo>(cfg, reference_dir, log)` (run_reference.py, parity.py learn): the reference's OWN scripts, offline
# pre-training then fine-tuning, in one process on our dataset (common.learning_stand_ins), every hyper-parameter
# mapped from our config. The scripts write and read their checkpoints relative to the working directory
# ('../offline/model/...', '../finetune/model/...'): they run in <run_dir>/reference/work (cleared first, so a
# restarted run never loads a stale re-evaluation / alignment checkpoint). Their evaluations reach us through their
# tensorboardX add_scalar calls (a stand-in SummaryWriter) and become records (return = the score mapped back
# through the dataset's reference returns). What the adapters change in the reference (nothing that it optimises):
# the per-env config yaml the fine-tuning scripts load over their TrainConfig is not read (our config is the one
# source; `load_train_config_auto` returns the config as given), replay buffers hold the data + online steps
# instead of 2M rows, progress bars refresh every 10 s, O2PPO's hard-coded 1e6 value re-fit steps stop at our
# `reevaluation_updates`, and the run ends at the last online evaluation (the reference would finish that episode
# and save its models, which reaches no record). Not mappable, left as the reference has it: it evaluates with the
# training seed (on the training env mid-episode: O2TD3 / O2SAC; our deviation 1), not with `eval_seed`.
LOCOMOTION = ("halfcheetah", "hopper", "walker2d")


class _Finished(Exception):
    """Raised by the log hook at the last online evaluation: ends the reference's run there."""


def _env_name(cfg) -> str:
    """The env name the reference sees (the stand-ins ignore it): our dataset id without slashes, so its paths work
    and its name tests ('hopper' and 'expert': O2PPO's std cap) see the dataset's env and level."""
    return cfg.dataset_id.replace("/", "-")


def _check_learnable(cfg, script: str, **expected):
    """Refusals common to the three runs: MuJoCo locomotion only (the reference switches its AntMaze settings by
    env name: per-env yaml, rewards r - 1, goal tests), one seed, no offline checkpoint, then `expected`."""
    if not any(e in cfg.dataset_id for e in LOCOMOTION):
        raise ValueError(f"{script}: learning parity runs the MuJoCo locomotion datasets only, not {cfg.dataset_id} "
                         "(the reference selects its AntMaze settings by env name)")
    common.require(cfg, script, num_seeds=1, offline_checkpoint="", terminate_on_success=False, **expected)


def _uniform(cfg, script: str, name: str, width: int = None):
    """(width, depth) of hidden widths `name` (the reference builds equal-width MLPs; `width`: the only one)."""
    dims = list(getattr(cfg, name))
    if len(set(dims)) != 1 or (width is not None and dims[0] != width):
        need = f"{width} x depth" if width is not None else "one width"
        raise ValueError(f"{script} cannot run this config: {name}={dims} (the reference builds {need}); set it in "
                         "the parity protocol")
    return dims[0], len(dims)


def _buffer_size(cfg, online_steps: int) -> int:
    """Rows for the reference's replay buffers: the dataset, or the online steps plus one episode (never wraps)."""
    data = common.ours("data")
    return max(len(data.load_dataset(cfg.dataset_id).rewards), online_steps) + 2000


def _tqdm_stand_in(caps: dict):
    """tqdm whose bars refresh every 10 s; a loop whose bar has a description in `caps` stops after that many
    iterations (O2PPO's hard-coded 1e6 value re-fit steps)."""
    import itertools
    import tqdm as real

    def bar(iterable=None, *args, **kwargs):
        cap = caps.get(kwargs.get("desc"))
        if cap is not None:
            iterable, kwargs["total"] = itertools.islice(iterable, cap), cap
        kwargs.setdefault("mininterval", 10.0)
        return real.tqdm(iterable, *args, **kwargs)
    return common.module("tqdm", tqdm=bar, trange=lambda *a, **k: bar(range(*a), **k))


class _Scalars:
    """tensorboardX stand-in: every add_scalar(tag, value, step) goes to `on_scalar`; records are written through
    `log` with the working directory restored (run_reference's EvalLog may hold a relative path)."""

    def __init__(self, cfg, log):
        self.log, self.on_scalar, self.cwd = log, None, os.getcwd()
        self.lo, self.hi = common.ours("data").reference_scores(cfg.dataset_id)

    def module(self):
        scalars = self

        class SummaryWriter:
            def __init__(self, *_, **__):
                pass

            def add_scalar(self, tag, value, global_step=None, *_, **__):
                scalars.on_scalar(tag, value, global_step)

            def __getattr__(self, _):  # flush, close, add_histogram, ...
                return lambda *a, **k: None
        return common.module("tensorboardX", SummaryWriter=SummaryWriter)

    def record(self, phase, updates, env_steps, score, **extra):
        """One record from a D4RL score (x100) of the reference's evaluation."""
        score = float(score)
        here = os.getcwd()
        os.chdir(self.cwd)
        try:
            self.log(phase, updates, env_steps, score, self.lo + score / 100.0 * (self.hi - self.lo), **extra)
        finally:
            os.chdir(here)


@contextlib.contextmanager
def _learning(cfg, reference_dir, scalars: _Scalars, caps=None):
    """The reference importable (root, finetune/, offline/ on sys.path; learning stand-ins for gym / d4rl /
    tensorboardX / tqdm) with <run_dir>/reference/work (cleared) as the working directory. Yields the checkout."""
    import shutil
    path = common.reference_checkout(REF, reference_dir)
    import pyrallis  # noqa: F401  (libraries the reference imports stay loaded)
    import torch  # noqa: F401
    import torch._inductor.config  # noqa: F401  (set_seed's use_deterministic_algorithms imports it: not under our tqdm)
    import torch.utils.data  # noqa: F401
    import yaml  # noqa: F401
    work = Path(cfg.run_dir).resolve() / "reference" / "work"
    shutil.rmtree(work.parent, ignore_errors=True)
    work.mkdir(parents=True)
    stand_ins = {**common.learning_stand_ins(cfg.dataset_id, lambda *_: None), "tensorboardX": scalars.module(),
                 "tqdm": _tqdm_stand_in(caps or {})}
    saved_path, cwd = list(sys.path), os.getcwd()
    from unittest import mock
    # torch >= 2.6 loads weights only by default; the reference's checkpoints (written by this run) hold modules
    load = functools.partial(torch.load, weights_only=False)
    try:
        with common.reference_on_path(path, stand_ins), common.reference_on_path(path / "finetune", {}), \
                common.reference_on_path(path / "offline", {}), mock.patch.object(torch, "load", load):
            import importlib
            for name in ("net", "utils", "dataset_utils"):
                mod = importlib.import_module(name)
                if not Path(mod.__file__).resolve().is_relative_to(path.resolve()):
                    raise RuntimeError(f"'{name}' resolved to {mod.__file__}, not to the reference at {path}")
            os.chdir(work)
            yield path
    except _Finished:
        pass
    finally:
        os.chdir(cwd)
        sys.path[:] = saved_path  # the scripts append '..' to sys.path


def _script(path: Path, rel: str):
    """A pyrallis script of the reference (its TrainConfig and undecorated train), the per-env yaml loader off."""
    mod = common.load_file(path / rel, "ocr_cft_learn_" + rel.replace("/", "_")[:-3])
    mod.load_train_config_auto = lambda config, *_: config
    return mod


def _run(script, **fields) -> dict:
    """script.train on TrainConfig(**fields) (under @pyrallis.wrap the undecorated function takes the config)."""
    config = script.TrainConfig(**fields)
    script.train.__wrapped__(config)
    return {k: v for k, v in vars(config).items() if not k.startswith("_")}


def _finetune_hook(cfg, rec: _Scalars, updates):
    """The add_scalar hook of offline/{td3_bc,cql}.py + finetune/O2{TD3,SAC}.py. Their logs, in order:
    'eval_normalized_return' (offline eval at step t = update - 1); 'reconstruct_return' first at 0 (the loaded
    offline actor), then at alignment step i (eval after update i + 1); 'ope_target_q' every log_freq re-evaluation
    updates (the re-evaluation record, which reuses the offline actor's score as ours does); 'normalized_return' at
    0 (after alignment: the last alignment eval's actor, not recorded, as ours) and at each online eval step (the
    env step). `updates(phase, k)` = (the record's `updates`, extra fields) after k updates / env steps of a phase."""
    offline_score = []

    def on_scalar(tag, value, step):
        if tag == "eval_normalized_return":
            phase, k, score = "offline", step + 1, value
        elif tag == "reconstruct_return" and not offline_score:
            offline_score.append(float(value))
            return
        elif tag == "ope_target_q":
            phase, k, score = "reevaluation", step + 1, offline_score[0]
        elif tag == "reconstruct_return":
            phase, k, score = "alignment", step + 1, value
        elif tag == "normalized_return" and step > 0:
            phase, k, score = "online", step, value
        else:
            return
        n, extra = updates(phase, k)
        rec.record(phase, n, k if phase == "online" else 0, score, **extra)
        if phase == "online" and k >= cfg.online_steps:
            raise _Finished
    return on_scalar


def learn_o2td3(cfg, reference_dir, log) -> dict:
    """OCR-CFT offline/td3_bc.py, then finetune/O2TD3.py (re-evaluation, alignment, constrained online TD3) on our
    dataset with our config (parity.py learn). Records as ours: `updates` counts the phase's own updates (online:
    env steps - warmup_steps); evaluations every offline_eval_every updates (TD3+BC, alignment: the reference's
    eval_freq / log_freq) and online_eval_every env steps (eval_freq). Networks (256 x 2, 2 critics, no LayerNorm in
    TD3+BC), the lambda LR and the 50/50 batches are hard-coded; it stores the noise-free action (our
    store_executed_action: false)."""
    script = "OCR-CFT O2TD3"
    _check_learnable(cfg, script, actor_hidden=(256, 256), critic_hidden=(256, 256), n_critics=2,
                     offline_critic_layernorm=False, lambda_lr=5e-5, mixing_ratio=0.5, reward_scale=1.0,
                     reward_bias=0.0, store_executed_action=False, policy_reevaluation=True, value_alignment=True,
                     constrained_finetuning=True)
    common.require_multiples(cfg, script, offline_updates="offline_eval_every", ope_updates="offline_eval_every",
             align_updates="offline_eval_every", online_steps="online_eval_every")
    rec = _Scalars(cfg, log)
    rec.on_scalar = _finetune_hook(cfg, rec, lambda phase, k: (
        max(k - cfg.warmup_steps, 0) if phase == "online" else k, {}))
    shared = dict(device="cpu", env=_env_name(cfg), seed=cfg.seed, n_episodes=cfg.eval_episodes,
                  buffer_size=_buffer_size(cfg, cfg.online_steps), batch_size=cfg.batch_size, discount=cfg.discount,
                  tau=cfg.tau, policy_noise=cfg.policy_noise, noise_clip=cfg.noise_clip, policy_freq=cfg.policy_freq,
                  normalize=cfg.normalize, normalize_reward=False)
    with _learning(cfg, reference_dir, rec) as path:
        td3_bc, o2td3 = _script(path, "offline/td3_bc.py"), _script(path, "finetune/O2TD3.py")
        offline = _run(td3_bc, **shared, eval_freq=cfg.offline_eval_every, max_timesteps=cfg.offline_updates,
                       actor_lr=cfg.offline_actor_lr, qf_lr=cfg.offline_critic_lr, alpha=cfg.alpha_bc)
        finetune = dict(**shared, qf_lr=cfg.critic_lr, eval_freq=cfg.online_eval_every,
                        explore_noise=cfg.explore_noise, policy_lr=cfg.actor_lr, critic_layernorm=cfg.critic_layernorm,
                        log_freq=cfg.offline_eval_every, ope_steps=cfg.ope_updates, align_steps=cfg.align_updates,
                        warmup_steps=cfg.warmup_steps, online_steps=cfg.online_steps, threshold=cfg.threshold,
                        end_threshold=cfg.end_threshold, end_steps=cfg.end_steps, distance_beta=cfg.distance_beta,
                        lmbda=cfg.lmbda, loss_tau=cfg.loss_tau, buffer_load="half", offline_alg="TD3_BC",
                        refer_with_optimal_pi=True)
        _run(o2td3, **finetune)
    return {"reference_config": {"offline/td3_bc.py": offline, "finetune/O2TD3.py": finetune},
            "updates": cfg.offline_updates + cfg.ope_updates + cfg.align_updates
            + max(cfg.online_steps - cfg.warmup_steps, 0)}


def learn_o2sac(cfg, reference_dir, log) -> dict:
    """OCR-CFT offline/cql.py, then finetune/O2SAC.py (re-evaluation, alignment, constrained online SAC with 10
    updates per env step) on our dataset with our config (parity.py learn). Records as ours: `updates` counts all
    updates so far (online: utd per env step after warm-up), `phase_updates` the phase's own; evaluations every
    offline_eval_every CQL updates (eval_freq), reconstruct_eval_every re-evaluation / alignment updates (log_freq)
    and online_eval_every env steps (eval_freq). Hard-coded there: the actor (3 x 256, log-std offset -1), critic
    widths 256, 2 critics, 10 updates per env step, the lambda LR, the KL clamp -50, the 50/50 batches."""
    script = "OCR-CFT O2SAC"
    _check_learnable(cfg, script, policy_hidden=(256, 256, 256), n_critics=2, cql_n_critics=2, log_std_offset=-1.0,
                     lmbda_lr=5e-5, ref_log_prob_min=-50.0, utd=10, mixing_ratio=0.5, auto_alpha=True,
                     reward_scale=1.0, reward_bias=0.0, policy_reevaluation=True, value_alignment=True,
                     constrained_finetuning=True)
    _, q_depth = _uniform(cfg, script, "critic_hidden", 256)
    _, cql_depth = _uniform(cfg, script, "cql_critic_hidden", 256)
    common.require_multiples(cfg, script, offline_updates="offline_eval_every", ope_steps="reconstruct_eval_every",
             align_steps="reconstruct_eval_every", online_steps="online_eval_every")
    starts = {"offline": 0, "reevaluation": cfg.offline_updates, "alignment": cfg.offline_updates + cfg.ope_steps,
              "online": cfg.offline_updates + cfg.ope_steps + cfg.align_steps}

    def updates(phase, k):
        own = cfg.utd * max(k - cfg.warmup_steps, 0) if phase == "online" else k
        return starts[phase] + own, {"phase_updates": own}
    rec = _Scalars(cfg, log)
    rec.on_scalar = _finetune_hook(cfg, rec, updates)
    shared = dict(device="cpu", env=_env_name(cfg), seed=cfg.seed, n_episodes=cfg.eval_episodes,
                  buffer_size=_buffer_size(cfg, cfg.online_steps), batch_size=cfg.batch_size, discount=cfg.discount,
                  alpha_multiplier=1.0, use_automatic_entropy_tuning=True, soft_target_update_rate=cfg.tau,
                  target_update_period=1, orthogonal_init=True, normalize=cfg.normalize, normalize_reward=False,
                  policy_log_std_multiplier=cfg.log_std_multiplier, actor_model="tanh")
    with _learning(cfg, reference_dir, rec) as path:
        cql, o2sac = _script(path, "offline/cql.py"), _script(path, "finetune/O2SAC.py")
        offline = _run(cql, **shared, eval_freq=cfg.offline_eval_every, max_timesteps=cfg.offline_updates,
                       backup_entropy=cfg.cql_backup_entropy, policy_lr=cfg.cql_policy_lr, qf_lr=cfg.cql_critic_lr,
                       cql_n_actions=cfg.cql_n_actions, cql_importance_sample=cfg.cql_importance_sample,
                       cql_lagrange=cfg.cql_lagrange, cql_target_action_gap=cfg.cql_target_action_gap,
                       cql_temp=cfg.cql_temp, cql_alpha=cfg.cql_weight, cql_max_target_backup=cfg.cql_max_target_backup,
                       cql_clip_diff_min=cfg.cql_clip_diff_min, cql_clip_diff_max=cfg.cql_clip_diff_max,
                       q_n_hidden_layers=cql_depth, bc_steps=0)
        finetune = dict(**shared, eval_freq=cfg.online_eval_every, q_n_hidden_layers=q_depth, policy_lr=cfg.policy_lr,
                        alpha_lr=cfg.alpha_lr, qf_lr=cfg.critic_lr, critic_layernorm=cfg.critic_layernorm,
                        double_critic=cfg.double_critic, log_freq=cfg.reconstruct_eval_every, ope_steps=cfg.ope_steps,
                        align_steps=cfg.align_steps, warmup_steps=cfg.warmup_steps, online_steps=cfg.online_steps,
                        alpha=cfg.alpha, threshold=cfg.threshold, end_threshold=cfg.end_threshold,
                        end_steps=cfg.end_steps, lmbda=cfg.lmbda, loss_tau=cfg.loss_tau, buffer_load="half",
                        offline_alg="CQL", refer_with_optimal_pi=True)
        _run(o2sac, **finetune)
    return {"reference_config": {"offline/cql.py": offline, "finetune/O2SAC.py": finetune},
            "updates": starts["online"] + cfg.utd * max(cfg.online_steps - cfg.warmup_steps, 0)}


def learn_o2ppo(cfg, reference_dir, log) -> dict:
    """OCR-CFT offline/iql.py, then finetune/O2PPO.py (V re-fit to Monte-Carlo returns, constrained PPO) on our
    dataset with our config (parity.py learn). O2PPO.py is an argparse script that sets its arguments from
    ../config/finetune/O2PPO/<env>.yaml: the adapter writes that file from our config and runs the script as
    __main__. Records as ours: `updates` counts the phase's own gradient steps (online: PPO minibatch steps);
    evaluations every offline_eval_every IQL updates (eval_freq) and evaluate_freq env steps; the re-evaluation
    records (ours: every reevaluation_eval_every updates, the actor is fixed) reuse the reference's evaluation of
    the offline actor after the re-fit. Hard-coded there: actor and IQL nets 256 x 2, the re-fit's lr 1e-4 and batch
    512 (its 1e6 steps stop at our reevaluation_updates), grad clip 0.5, Adam eps 1e-5, the std cap of
    hopper-expert, its [N, 1] + [N] advantage broadcast and its returns across time limits (our switches
    reference_advantage_broadcast_bug / mc_returns_across_timeouts: true)."""
    import runpy
    from unittest import mock
    import yaml
    script = "OCR-CFT O2PPO"
    name = _env_name(cfg)
    _check_learnable(cfg, script, hidden_dims=(256, 256), exp_adv_max=100.0, offline_cosine=True,
                     orthogonal_init=True, iql_reward_scale=1.0, iql_reward_bias=0.0, policy_reevaluation=True,
                     reevaluation_lr=1e-4, reevaluation_batch_size=512, max_grad_norm=0.5, adam_eps=1e-5,
                     reference_advantage_broadcast_bug=True, mc_returns_across_timeouts=True,
                     dynamic_reward_scaling=False, std_cap=0.05 if "hopper" in name and "expert" in name else 0.0)
    v_width, v_depth = _uniform(cfg, script, "value_hidden_dims")
    common.require_multiples(cfg, script, offline_updates="offline_eval_every", online_steps="evaluate_freq")
    per_rollout = cfg.ppo_epochs * (cfg.rollout_length // cfg.minibatch_size)
    reeval = sorted(set(range(cfg.reevaluation_eval_every, cfg.reevaluation_updates + 1,
                              cfg.reevaluation_eval_every)) | {cfg.reevaluation_updates})
    rec = _Scalars(cfg, log)

    def on_scalar(tag, value, step):
        if tag == "eval_normalized_return":  # offline/iql.py at step t = update - 1
            rec.record("offline", step + 1, 0, value)
        elif tag == "normalized_return" and step == 0:  # the offline actor, after the V re-fit
            for k in reeval:
                rec.record("reevaluation", k, 0, value)
        elif tag == "normalized_return" and 0 < step <= cfg.online_steps:
            rec.record("online", step // cfg.rollout_length * per_rollout, step, value)
            if step == cfg.online_steps:
                raise _Finished
    rec.on_scalar = on_scalar
    args = dict(max_train_steps=cfg.online_steps, evaluate_freq=cfg.evaluate_freq, batch_size=cfg.rollout_length,
                mini_batch_size=cfg.minibatch_size, hidden_width=256, v_hidden_width=v_width, v_depth=v_depth,
                lr_a=cfg.ppo_actor_lr, lr_c=cfg.ppo_critic_lr, gamma=cfg.discount, lamda=cfg.gae_lambda,
                epsilon=cfg.clip_ratio, K_epochs=cfg.ppo_epochs, use_adv_norm=cfg.adv_norm,
                use_state_norm=cfg.normalize, use_reward_norm=False, use_reward_scaling=False,
                entropy_coef=cfg.entropy_coef, use_lr_decay=cfg.lr_decay, use_grad_clip=True, set_adam_eps=True,
                use_tanh=False, offline_alg="IQL", is_shuffle=True, r_scale=1.0, is_clip_value=False,
                scale_strategy="normal", is_decay_pi=False, std_upper_bound=0, alpha=cfg.alpha,
                end_steps=cfg.end_steps, use_auxi=cfg.constrained_finetuning,
                refer_with_optimal_pi=cfg.refer_with_optimal_pi, update_n=cfg.update_n,
                eval_episodes=cfg.eval_episodes)
    with _learning(cfg, reference_dir, rec, caps={"value upladating ......": cfg.reevaluation_updates}) as path:
        iql = _script(path, "offline/iql.py")
        offline = _run(iql, device="cpu", env=name, seed=cfg.seed, eval_freq=cfg.offline_eval_every,
                       n_episodes=cfg.eval_episodes, max_timesteps=cfg.offline_updates,
                       buffer_size=_buffer_size(cfg, 0), batch_size=cfg.iql_batch_size, discount=cfg.discount,
                       tau=cfg.tau, beta=cfg.beta, iql_tau=cfg.expectile, normalize=cfg.normalize,
                       normalize_reward=False, vf_lr=cfg.value_lr, qf_lr=cfg.critic_lr, actor_lr=cfg.actor_lr,
                       actor_dropout=None, orthogonal_init=True)
        higher, lower = name.split("-")[0].lower(), "_".join(name.split("-")[1:]).lower()
        config = Path("..") / "config" / "finetune" / "O2PPO" / higher / f"{lower}.yaml"  # where O2PPO.py reads
        config.parent.mkdir(parents=True)
        config.write_text(yaml.safe_dump(args))
        with mock.patch.object(sys, "argv", ["O2PPO.py", "--env_name", name, "--seed", str(cfg.seed)]):
            runpy.run_path(str(path / "finetune" / "O2PPO.py"), run_name="__main__")
    return {"reference_config": {"offline/iql.py": offline, "finetune/O2PPO.py": args},
            "updates": cfg.offline_updates + cfg.reevaluation_updates
            + cfg.online_steps // cfg.rollout_length * per_rollout}


STEPS = {"o2sac": step_o2sac, "o2td3": step_o2td3, "o2ppo": step_o2ppo}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", choices=sorted(STEPS), required=True)
    parser.add_argument("--reference_dir", default=None, help="directory holding the ocr_cft checkout (or it)")
    cli = parser.parse_args()
    result = STEPS[cli.algo](cli.reference_dir)
    for row in result:
        verdict = "ok  " if row["passed"] else "dsgn" if row["note"].startswith("default differs by design") else "FAIL"
        print(f"{verdict} {row['max_rel_diff']:9.2e}  {row['phase']:12s} {row['setting']:62s} {row['quantity']:36s} "
              f"{row['note']}")
    print(f"{sum(r['passed'] for r in result)}/{len(result)} rows within tolerance (dsgn: our default, differs by "
          "design)")
