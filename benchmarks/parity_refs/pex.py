"""PEX against the official code (Haichao-Zhang/PEX at the pinned commit): its IQL for the offline phase
(`pex/algorithms/iql.py`), the policy-expansion update online (`pex/algorithms/pex.py`), networks `pex/networks/*`,
data `pex/utils/util.py::get_env_and_dataset` (served our synthetic AntMaze data by the d4rl stand-in).

One update on each side from the same weights (the reference's torch networks copied into our flax trees; target
critic perturbed; online, a frozen offline policy different from the new one), the same batch and the same noise
(the new policy's Gaussian sample and the gate's categorical draw come from one set of arrays); Adam states preset
alike on both sides (as in corl.py). The reference returns no losses: they are recorded at its backward() calls
(V, Q, policy, in that order).
"""
import contextlib
import sys
from unittest import mock

import numpy as np

from . import common as C

LAYERS = ["TorchLinear_0", "TorchLinear_1", "TorchLinear_2"]
B = C.BATCH


@contextlib.contextmanager
def _ours_hidden():
    """The reference is the package `pex`; our algorithms/pex.py is the module `pex`, found first whenever
    algorithms/ is on sys.path (a namespace package loses to a module). Hide ours while the reference imports."""
    ours = sys.modules.pop("pex", None)
    path = str(C.REPO_ROOT / "algorithms")
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if p != path]
    try:
        yield
    finally:
        sys.path[:] = saved
        if ours is not None:
            sys.modules["pex"] = ours


def _reference(reference_dir, ds):
    """(IQL, PEX, GaussianPolicy, DoubleCriticNetwork, ValueNetwork, get_env_and_dataset) of the checkout."""
    path = C.reference_checkout("pex", reference_dir)
    import torch  # noqa: F401  (imported before reference_on_path so it stays loaded afterwards)
    with _ours_hidden(), C.reference_on_path(path, C.reference_stand_ins(ds)):
        from pex.algorithms.iql import IQL
        from pex.algorithms.pex import PEX
        from pex.networks.policy import GaussianPolicy
        from pex.networks.value_functions import DoubleCriticNetwork, ValueNetwork
        from pex.utils.util import get_env_and_dataset
    return IQL, PEX, GaussianPolicy, DoubleCriticNetwork, ValueNetwork, get_env_and_dataset


def _step(ref, pex, cfg, batch, online: bool):
    """One update of the reference (IQL.update offline, PEX.update online) and of ours (iql_update / pex_update)
    from the same weights, batch and noise. Returns {quantity: (ours, reference)}."""
    import jax
    import torch
    IQL, PEX, GaussianPolicy, DoubleCriticNetwork, ValueNetwork, _ = ref
    obs_dim, act_dim = batch["obs"].shape[1], batch["act"].shape[1]
    torch.manual_seed(0)
    policy = GaussianPolicy(obs_dim, act_dim, hidden_dim=256, n_hidden=2)
    critic, vf = DoubleCriticNetwork(obs_dim, act_dim, 256, 2), ValueNetwork(obs_dim, 256, 2)
    kwargs = dict(critic=critic, vf=vf, policy=policy, tau=cfg.expectile, beta=cfg.beta, discount=cfg.discount,
                  target_update_rate=cfg.tau, optimizer_ctor=lambda p: torch.optim.Adam(p, lr=cfg.actor_lr))
    if online:
        alg = PEX(**kwargs, ckpt_path=None, inv_temperature=cfg.inv_temperature)
        alg.policy_offline.load_state_dict(GaussianPolicy(obs_dim, act_dim, hidden_dim=256, n_hidden=2).state_dict())
    else:
        alg = IQL(**kwargs, max_steps=cfg.offline_updates)
    C.perturb_(alg.target_critic)
    for opt in (alg.policy_optimizer, alg.q_optimizer, alg.v_optimizer):
        C.preset_adam_torch(opt, C.ADAM_NU0_LINEAR, C.ADAM_LATE_STEP)

    nets = {"actor": ([C.linear_layers(policy)], LAYERS), "value": ([C.linear_layers(vf.v)], LAYERS),
            "critic": ([C.linear_layers(critic.q1), C.linear_layers(critic.q2)], LAYERS),
            "target": ([C.linear_layers(alg.target_critic.q1), C.linear_layers(alg.target_critic.q2)], LAYERS)}
    scalars = {"actor": {"log_std": policy.log_std}}
    if online:
        nets["offline_actor"] = ([C.linear_layers(alg.policy_offline)], LAYERS)
        scalars["offline_actor"] = {"log_std": alg.policy_offline.log_std}
    before = C.torch_trees(nets, scalars)
    h = pex.make_hyper(cfg, obs_dim, act_dim)
    txs = pex.optimizers(h)
    late = lambda k, p: C.preset_adam_optax(txs[k].init(p), C.ADAM_NU0_LINEAR, C.ADAM_LATE_STEP)  # noqa: E731
    tr = {k: pex.Trainable(before[k], late(k, before[k])) for k in ("critic", "value")}
    actor = pex.Trainable(before["actor"], late("new_actor" if online else "actor", before["actor"]))
    zeros, ones = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)  # official PEX: no normalisation
    key = jax.random.PRNGKey(0)
    if online:
        state = pex.PEXState(actor, before["offline_actor"], tr["critic"], tr["value"], before["target"], key,
                             np.int32(0), zeros, ones)
    else:
        state = pex.IQLState(actor, tr["critic"], tr["value"], before["target"], key, np.int32(0), zeros, ones)

    rng = np.random.default_rng(3)
    eps, u_gate = rng.normal(size=(B, act_dim)), rng.random(B)
    composite = {}
    if online:
        select = alg.select_action
        alg.select_action = lambda *a, **k: composite.setdefault("ref", select(*a, **k))
    with C.torch_noise(C.Noise(normal=[eps] if online else [], categorical=[u_gate] if online else [])) as noise, \
            C.record_backward() as losses:
        alg.update(*(C.torch_f32(batch[k]) for k in ("obs", "act", "next_obs", "rew", "done")))
        noise.check_used()
    ours_batch = pex.Buffer(*(batch[k] for k in ("obs", "act", "rew", "next_obs", "done")))
    # our composite_action also draws the epsilon-greedy coins (epsilon 1 in training: never greedy)
    draws = dict(normal=[eps], uniform=[rng.random(B), rng.random(B)], categorical=[u_gate]) if online else {}
    action = pex.composite_action

    def recorded(*args, **kwargs):
        out = action(*args, **kwargs)
        composite["ours"] = out[0]
        return out
    with C.jax_noise(C.Noise(**draws)) as noise, mock.patch.object(pex, "composite_action", recorded):
        new, metrics = (pex.pex_update if online else pex.iql_update)(state, ours_batch, jax.random.PRNGKey(1), h)
        noise.check_used()

    after = C.torch_trees(nets, scalars)
    m_ref = {k: C.torch_trees({k: nets[k]}, scalars, C.adam_first_moment(o))[k]
             for k, o in (("actor", alg.policy_optimizer), ("critic", alg.q_optimizer), ("value", alg.v_optimizer))}
    if len(losses) != 3:
        raise RuntimeError(f"expected 3 backward() calls (V, Q, policy) in the reference update, got {len(losses)}")
    q = {"value loss": (metrics["value_loss"], losses[0]), "critic loss": (metrics["critic_loss"], losses[1]),
         "actor loss": (metrics["actor_loss"], losses[2])}
    if online:
        q["composite actions (gated)"] = (composite["ours"], composite["ref"])
    for k, net in (("value", "V"), ("critic", "Q"), ("actor", "actor")):
        q[f"{net} Adam m (grad)"] = (getattr(new, k).opt_state[0].mu, m_ref[k])
    for k, net in (("value", "V"), ("critic", "Q"), ("actor", "actor")):
        q[f"{net} params after"] = (getattr(new, k).params, after[k])
    q["target Q after"] = (new.critic_target, after["target"])
    return q


def step_pex(reference_dir=None) -> list:
    """PEX (algorithms/pex.py) vs the official PEX code: AntMaze data row (r - 1), the offline IQL update and the
    online policy-expansion update (README AntMaze hyper-parameters: expectile 0.9, beta 10, inverse temperature
    10)."""
    rng = np.random.default_rng(2)
    ds = C.synthetic_data(C.antmaze_episodes(rng, 100), 100)
    ref = _reference(reference_dir, ds)
    pex = C.ours("pex")
    rows = []
    cmp = lambda *a, **k: C.compare_all(rows, "pex", "PEX", *a, **k)  # noqa: E731

    _, d, _ = ref[-1]("antmaze-umaze-v2", 1000)
    cmp("data", "AntMaze: r - 1 (get_env_and_dataset on our data)", {
        "rewards": (pex.prepare_rewards(pex.TrainConfig(reward_bias=-1.0), ds)[0], d["rewards"])})
    base = dict(expectile=0.9, beta=10.0, offline_updates=1000, clip_actions=False)
    cmp("offline", "AntMaze (expectile 0.9, beta 10, r - 1, PEX's own IQL)",
        _step(ref, pex, pex.TrainConfig(**base), C.random_batch(rng, 29, 8, True), online=False))
    online = C.random_batch(rng, 29, 8, True, online_rows=128)
    setting = "AntMaze online (128 offline + 128 online rows), new policy vs frozen offline policy"
    cmp("online", setting + ", clip_actions false", _step(ref, pex, pex.TrainConfig(**base), online, online=True))
    cmp("online", setting + ", default", _step(ref, pex, pex.TrainConfig(**{**base, "clip_actions": True}), online,
                                               online=True),
        by_design="deviation 4 (the new policy's action is clipped to [-1, 1] before the gate and AWR)")
    return rows
