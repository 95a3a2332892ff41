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
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np

from . import common as C

LAYERS = ["TorchLinear_0", "TorchLinear_1", "TorchLinear_2"]
B = C.BATCH


@contextlib.contextmanager
def _ours_hidden():
    """The reference is the package `pex`; our algorithms/pex.py is the module `pex`, found first whenever
    algorithms/ is on sys.path (a namespace package loses to a module), and so is this file when
    parity_refs/run_reference.py runs as a script (its directory first on sys.path). Hide both while the reference
    imports."""
    ours = sys.modules.pop("pex", None)
    hidden = {str(C.REPO_ROOT / "algorithms"), str(Path(__file__).resolve().parent)}
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) not in hidden]
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


# ---------------------------------------------------------------------------------------------- learning runs
class _Finished(Exception):
    """Raised by the evaluation hook after the last online evaluation: the budget is spent (the official loop
    would run on to the end of the episode, updating, with nothing left to evaluate)."""


def learn_pex(cfg, reference_dir, log) -> dict:
    """The official pipeline on our dataset (parity.py learn): `main_offline.py` (IQL pre-training, saves
    <log_dir>/offline_ckpt), then `main_online.py --algorithm pex --ckpt_path` that checkpoint, each run as a
    script (runpy, its own argparse) with every option mapped from our config.

    Adapters only: the gym/d4rl/wandb stand-ins (common.learning_stand_ins); `Tensor.cuda` is the identity (the
    official `sample_batch` moves every offline batch to CUDA; this is a CPU run); the evaluation hook wraps the
    official `eval_policy` (the same episodes on the training env, mid-episode: our deviation 1) and records its
    returns; IQL.update is counted for the `updates` field. Evaluations: offline every `eval_period` updates, online
    every `eval_period` env steps (our offline/online_eval_every: the budgets must be multiples of them); the run
    stops after the evaluation at `online_steps`."""
    C.require(cfg, "official PEX", n_critics=2, offline_fraction=0.5, exp_adv_max=100.0, offline_cosine=True,
              actor_init="xavier", log_std_min=-5.0, eval_epsilon=0.1, reset_optimizers=True, normalize=False,
              normalize_reward_by_returns=False, reward_scale=1.0, reward_bias=-1.0 if "antmaze" in cfg.dataset_id
              else 0.0, terminate_on_success=False, clip_actions=False, num_seeds=1, offline_checkpoint="")
    if not any(s in cfg.dataset_id for s in ("halfcheetah", "hopper", "walker2d", "antmaze")):
        raise ValueError(f"official PEX's get_env_and_dataset knows rewards of halfcheetah/hopper/walker2d/antmaze "
                         f"datasets only, not {cfg.dataset_id}")
    if not cfg.actor_lr == cfg.critic_lr == cfg.value_lr:
        raise ValueError(f"official PEX has one --learning_rate: set actor_lr ({cfg.actor_lr}) = critic_lr "
                         f"({cfg.critic_lr}) = value_lr ({cfg.value_lr})")
    if len(set(cfg.hidden_dims)) != 1:
        raise ValueError(f"official PEX's MLPs have --hidden_num layers of --hidden_dim: hidden_dims "
                         f"{cfg.hidden_dims} must be one width repeated")
    C.require_multiples(cfg, "official PEX (every --eval_period steps)", offline_updates="offline_eval_every",
                             online_steps="online_eval_every")
    if cfg.initial_collection_steps < cfg.batch_size - cfg.batch_size // 2:
        raise ValueError(f"official PEX samples the online half-batch without replacement: initial_collection_steps "
                         f"({cfg.initial_collection_steps}) must be >= {cfg.batch_size - cfg.batch_size // 2}")
    import runpy
    import shutil
    import torch
    import torch._dynamo  # noqa: F401  (torch imports it lazily at the first optimiser, inspecting every loaded
    # module: the reference's namespace package `pex` has no file and would fail that inspection)
    path = C.reference_checkout("pex", reference_dir)
    work = Path(cfg.run_dir) / "reference"
    shutil.rmtree(work, ignore_errors=True)  # the scripts refuse an existing log_dir; a restart starts afresh
    work.mkdir(parents=True)
    common_args = ["--env_name", cfg.dataset_id, "--seed", cfg.seed, "--discount", cfg.discount, "--hidden_dim",
                   cfg.hidden_dims[0], "--hidden_num", len(cfg.hidden_dims), "--batch_size", cfg.batch_size,
                   "--learning_rate", cfg.actor_lr, "--target_update_rate", cfg.tau, "--tau", cfg.expectile,
                   "--beta", cfg.beta, "--eval_episode_num", cfg.eval_episodes]
    argv = {"offline": ["--log_dir", work / "offline", *common_args, "--num_steps", cfg.offline_updates,
                        "--eval_period", cfg.offline_eval_every],
            "online": ["--algorithm", "pex", "--log_dir", work / "online", *common_args, "--ckpt_path",
                       work / "offline" / "offline_ckpt", "--total_env_steps", cfg.online_steps,
                       "--initial_collection_steps", cfg.initial_collection_steps, "--updates_per_step", 1,
                       "--inv_temperature", cfg.inv_temperature, "--eval_period", cfg.online_eval_every]}
    argv = {k: [str(x) for x in v] for k, v in argv.items()}
    run = {"phase": "offline", "updates": 0, "online_evals": 0, "returns": []}
    os.environ.setdefault("TQDM_MININTERVAL", "30")  # the scripts' trange: a line per 30 s in the run's log

    stand_ins = C.learning_stand_ins(cfg.dataset_id, lambda *_: None)
    serve = stand_ins["d4rl"].qlearning_dataset  # D4RL's has no 'timeouts' (main_offline passes every key to update)
    stand_ins["d4rl"].qlearning_dataset = lambda env: {k: v for k, v in serve(env).items() if k != "timeouts"}
    with _ours_hidden(), C.reference_on_path(path, stand_ins):
        from pex.algorithms.iql import IQL
        from pex.utils import util
        evaluate_policy, eval_policy, update = util.evaluate_policy, util.eval_policy, IQL.update

        def counted_update(self, *args, **kwargs):
            run["updates"] += 1
            return update(self, *args, **kwargs)

        def recorded_episode(*args, **kwargs):
            run["returns"].append(evaluate_policy(*args, **kwargs))
            return run["returns"][-1]

        def recorded_eval(env, env_name, alg, max_episode_steps, n_episodes):
            run["returns"] = []
            eval_policy(env, env_name, alg, max_episode_steps, n_episodes)  # prints; its episodes are recorded
            returns = np.asarray(run["returns"])
            scores = 100.0 * sys.modules["d4rl"].get_normalized_score(cfg.dataset_id, returns)
            online = run["phase"] == "online"
            run["online_evals"] += online  # online: called when the env-step count is a multiple of eval_period
            env_steps = run["online_evals"] * cfg.online_eval_every if online else 0
            log(run["phase"], run["updates"], env_steps, float(scores.mean()), float(returns.mean()),
                return_std=float(returns.std()), episodes=len(returns))
            if online and env_steps >= cfg.online_steps:
                raise _Finished

        with mock.patch.object(util, "evaluate_policy", recorded_episode), \
                mock.patch.object(util, "eval_policy", recorded_eval), \
                mock.patch.object(IQL, "update", counted_update), \
                mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):
            for phase, script in (("offline", "main_offline.py"), ("online", "main_online.py")):
                run["phase"] = phase
                with mock.patch.object(sys, "argv", [script] + argv[phase]):
                    try:
                        runpy.run_path(str(path / script), run_name="__main__")
                    except _Finished:
                        pass
    return {"reference_argv": argv, "updates": run["updates"]}
