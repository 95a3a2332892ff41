"""Step parity of algorithms/cal_ql.py against the official Cal-QL (nakamotoo/Cal-QL, JAX/Flax); learning
parity (`learn_cal_ql`, the official training main() on our data) at the bottom.

The official `JaxCQL/conservative_sac.py` and `JaxCQL/model.py` run unmodified, imported from the checkout into
this process (this repository's JAX and Flax), with three adapters and nothing else:
  * `ml_collections` is not installed here: a stand-in module whose ConfigDict is an attribute dict with the
    two methods the code calls (`update`, `copy_and_resolve_references`);
  * `jnp.clip` accepts the `a_min=`/`a_max=` keywords during the official step: the official Lagrange branch
    passes them, and current JAX fails on them ("TypeError: clip() got an unexpected keyword argument 'a_max'");
  * the official networks are built with orthogonal_init=False: only their initialisers differ, and the
    weights of both sides are overwritten with ours before the update (this also keeps LAPACK's QR out).
`JaxCQL/replay_buffer.py` (the Monte-Carlo returns and the AntMaze dataset preparation) is imported with empty
`gym`/`d4rl` stand-ins and given a stand-in env whose `get_dataset()` returns a synthetic D4RL-style dataset.

Same weights, batch and noise on both sides: during each update `jax.random.normal` / `jax.random.uniform` hand
out fixed arrays in call order (policy sample at s, the n next-state samples of the max-backup, the random CQL
actions, the n current and n next-state CQL samples); the call order and shapes are checked. The official step
differentiates each loss (policy, qf1, qf2, log alpha, log alpha') by its own pass of the loss function and every
pass draws fresh keys, so with real randomness each loss sees its own noise; here every pass gets the same arrays,
which is what our single gradient pass uses (a difference of sampling only: each loss has the same expectation).

Updates compared (AntMaze config: Lagrange alpha', calibration; Adroit config: fixed CQL weight): one offline
step from fresh Adam states, then one online-phase step (mixed offline/online batch, online MC returns, the
weight and calibration flag our train() uses online) continuing from the first step's states and targets.
Gradients are compared through Adam's first moments (after the first step m = 0.1 g). Default settings are the
official behaviour for the update (deviation 1 `online_calibration: false` is CORL's variant, not the default).
"""
import contextlib
import math
import tempfile
import types
from pathlib import Path
from unittest import mock

import numpy as np

from . import common

ALGO, REFERENCE = "cal_ql", "calql"
LOOSER_TOL = 3e-5
LOOSER_CRITIC_GRAD = ("looser bound 3e-5: the CQL gradient sums 256 x 31 softmax-weighted terms of both signs; our "
                      "float32 result differs from its float64 recomputation by 2.5e-6 (measured, AntMaze offline "
                      "step), and the official code sums in another order (one pass per network)")
CONFIGS = {"antmaze": "D4RL/antmaze/medium-diverse-v1.yaml", "adroit": "D4RL/pen/cloned-v2.yaml"}
DIMS = {"antmaze": (29, 8), "adroit": (45, 24)}  # (obs, act) of the D4RL envs


def load_config(setting: str):
    import yaml
    cal_ql = common.ours("cal_ql")
    raw = yaml.safe_load((common.REPO_ROOT / "configs" / "cal_ql" / CONFIGS[setting]).read_text())
    return cal_ql.TrainConfig(**raw)


# ---------------------------------------------------------------------------------------------- weight copy
def to_official(actor, critic, n_critics: int) -> dict:
    """Our actor / critic-ensemble params as the official {'policy', 'qf1', 'qf2', ...} Flax variables."""
    out = {"policy": {"params": {"base_network": actor["MLP_0"],
                                 "log_std_multiplier_module": {"value": actor["log_std_multiplier"]},
                                 "log_std_offset_module": {"value": actor["log_std_offset"]}}}}
    for j in range(n_critics):
        member = {layer: {k: v[j] for k, v in p.items()} for layer, p in critic["MLP_0"].items()}
        out[f"qf{j + 1}"] = {"params": {"FullyConnectedNetwork_0": member}}
    return out


def from_official(variables: dict, n_critics: int):
    """Inverse of to_official: (actor, critic ensemble) in our layout."""
    import jax.numpy as jnp
    p = variables["policy"]["params"]
    actor = {"MLP_0": p["base_network"], "log_std_multiplier": p["log_std_multiplier_module"]["value"],
             "log_std_offset": p["log_std_offset_module"]["value"]}
    members = [variables[f"qf{j + 1}"]["params"]["FullyConnectedNetwork_0"] for j in range(n_critics)]
    critic = {"MLP_0": {layer: {k: jnp.stack([m[layer][k] for m in members]) for k in members[0][layer]}
                        for layer in members[0]}}
    return actor, critic


# ---------------------------------------------------------------------------------------------- stand-ins
class _ConfigDict(dict):
    """ml_collections.ConfigDict as far as conservative_sac.py uses it."""

    def __init__(self, d=None):
        super().__init__(d or {})

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError as e:
            raise AttributeError(k) from e

    def __setattr__(self, k, v):
        self[k] = v

    def copy_and_resolve_references(self):
        return _ConfigDict(dict(self))


def _stand_ins() -> dict:
    return {"ml_collections": common.module("ml_collections", ConfigDict=_ConfigDict),
            "gym": common.module("gym"), "d4rl": common.module("d4rl")}


@contextlib.contextmanager
def clip_keywords():
    """jnp.clip with the a_min/a_max keywords of older JAX (the official Lagrange branch uses them)."""
    import jax.numpy as jnp
    clip = jnp.clip

    def compat(x, min=None, max=None, *, a_min=None, a_max=None, **kw):  # noqa: A002
        return clip(x, a_min if min is None else min, a_max if max is None else max, **kw)
    with mock.patch.object(jnp, "clip", compat):
        yield


@contextlib.contextmanager
def injected_noise(normals: list, uniforms: list):
    """jax.random.normal / uniform return `normals` / `uniforms` in call order, cycling (one cycle per pass of a
    loss function). A request whose element count or trailing shape differs from the next prepared array is not
    noise of the update (Flax's parameter shape check evaluates initialisers abstractly) and goes to the real
    function; the counters of served requests are yielded, so the caller can check the call count."""
    import jax
    import jax.numpy as jnp
    calls = {"normal": 0, "uniform": 0}
    real = {"normal": jax.random.normal, "uniform": jax.random.uniform}

    def make(kind, arrays):
        def draw(key, shape=(), dtype=jnp.float32, *args, **kwargs):
            a, shape = arrays[calls[kind] % len(arrays)], tuple(shape)
            if int(np.prod(shape)) != a.size or shape[len(shape) - a.ndim + 1:] != a.shape[1:]:
                return real[kind](key, shape, dtype, *args, **kwargs)
            calls[kind] += 1
            return jnp.asarray(a, dtype).reshape(shape)
        return draw
    with mock.patch.object(jax.random, "normal", make("normal", normals)), \
            mock.patch.object(jax.random, "uniform", make("uniform", uniforms)):
        yield calls


# ---------------------------------------------------------------------------------------------- data
def _sparse(cfg) -> bool:
    return cfg.mc_failure_rule != "none"  # the AntMaze configs (goal reward 1, else 0)


def _mc_values(rng, n: int, cfg) -> np.ndarray:
    """MC returns for a synthetic batch: sparse tasks mix all-fail episodes' r_fail / (1 - gamma) with returns
    around 0 (so max(Q, G) is active for some rows and not for others); dense tasks N(0, 20)."""
    if not _sparse(cfg):
        return rng.normal(0, 20, n)
    r_fail = cfg.mc_failure_raw_reward * cfg.reward_scale + cfg.reward_bias
    return np.where(rng.random(n) < 0.5, r_fail / (1 - cfg.discount), rng.normal(0, 5, n))


def _batch(rng, n: int, obs_dim: int, act_dim: int, cfg, mc: np.ndarray) -> dict:
    """A synthetic transformed batch (rewards scale/bias applied, actions clipped) with the given MC returns."""
    raw = (rng.random(n) < 0.3).astype(np.float32) if _sparse(cfg) else rng.normal(size=n)
    done = ((raw > 0) & (rng.random(n) < 0.5)).astype(np.float32)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return {"observations": f32(rng.normal(size=(n, obs_dim))),
            "actions": f32(np.clip(rng.uniform(-1, 1, (n, act_dim)), -cfg.clip_action, cfg.clip_action)),
            "rewards": f32(raw * cfg.reward_scale + cfg.reward_bias),
            "next_observations": f32(rng.normal(size=(n, obs_dim))), "dones": done, "mc_returns": f32(mc)}


def _noise(rng, b: int, n: int, act_dim: int):
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    normals = [f32(rng.normal(size=(b, act_dim)))] + [f32(rng.normal(size=(b, n, act_dim))) for _ in range(3)]
    return normals, [f32(rng.uniform(-1, 1, (b, n, act_dim)))]


# ---------------------------------------------------------------------------------------------- update parity
def _ours_update(cal_ql, state, batch, normals, uniforms, calibrate, weight, h):
    import jax
    import jax.numpy as jnp
    buf = cal_ql.Buffer(obs=jnp.asarray(batch["observations"]), act=jnp.asarray(batch["actions"]),
                        rew=jnp.asarray(batch["rewards"]), next_obs=jnp.asarray(batch["next_observations"]),
                        done=jnp.asarray(batch["dones"]), mc=jnp.asarray(batch["mc_returns"]))
    with injected_noise(normals, uniforms) as calls:
        step = jax.jit(lambda s, b, k: cal_ql.calql_update(s, b, k, calibrate, weight, h))
        new, metrics = step(state, buf, jax.random.PRNGKey(0))
    assert calls == {"normal": 4, "uniform": 1}, calls
    return new, metrics


def _official_update(sac, batch, normals, uniforms, calibrate, weight):
    import jax.numpy as jnp
    type(sac)._train_step.clear_cache()  # re-trace: the injected noise is baked into the traced step
    with injected_noise(normals, uniforms) as calls, clip_keywords():
        metrics = sac.train({k: jnp.asarray(v) for k, v in batch.items()}, use_cql=True,
                            cql_min_q_weight=weight, enable_calql=calibrate)
    passes = len(sac.model_keys)  # one traced pass of the loss function per trained parameter group
    assert calls == {"normal": 4 * passes, "uniform": passes}, (calls, passes)
    return metrics


def _adam_mu(opt_state):
    return opt_state[0].mu


def _compare_step(rows, setting, phase, ours_state, ours_m, sac, ref_m, n_critics, lagrange, note):
    def cmp(quantity, a, b, extra="", tol=common.TOLERANCE):
        common.compare(rows, ALGO, REFERENCE, phase, setting, quantity, a, b, tol=tol,
                       note="; ".join(x for x in (note, extra) if x))
    ts = sac.train_states
    # losses
    cmp("actor_loss", ours_m["actor_loss"], ref_m["policy_loss"])
    cmp("alpha_loss", ours_m["alpha_loss"], ref_m["alpha_loss"])
    ref_critic = np.mean([ref_m[f"qf{j + 1}_loss"] for j in range(n_critics)])
    cmp("critic_loss (mean over Q1, Q2)", ours_m["critic_loss"], ref_critic)
    cmp("bellman_loss (mean)", ours_m["bellman_loss"],
        np.mean([ref_m[f"cql/qf{j + 1}_bellman_loss"] for j in range(n_critics)]))
    cmp("cql_diff (mean)", ours_m["cql_diff"], np.mean([ref_m[f"cql/cql_qf{j + 1}_diff"] for j in range(n_critics)]))
    if lagrange:
        cmp("alpha_prime_loss", ours_m["alpha_prime_loss"], ref_m["cql/alpha_prime_loss"])
    # gradients (Adam first moments) and updated parameters, in our layout
    flat = common.flat
    ref_mu = {k: _adam_mu(ts[k].opt_state) for k in sac.model_keys}
    ref_params = {k: ts[k].params for k in sac.model_keys}
    mu_actor, mu_critic = from_official(ref_mu, n_critics)
    p_actor, p_critic = from_official(ref_params, n_critics)
    _, t_critic = from_official({"policy": ref_params["policy"], **sac._target_qf_params}, n_critics)
    cmp("grad actor (Adam m)", flat(_adam_mu(ours_state.actor.opt_state)), flat(mu_actor))
    cmp("grad critics (Adam m)", flat(_adam_mu(ours_state.critic.opt_state)), flat(mu_critic), LOOSER_CRITIC_GRAD,
        LOOSER_TOL)
    cmp("grad log_alpha (Adam m)", flat(_adam_mu(ours_state.log_alpha.opt_state)), flat(ref_mu["log_alpha"]))
    cmp("params actor", flat(ours_state.actor.params), flat(p_actor))
    cmp("params critics", flat(ours_state.critic.params), flat(p_critic))
    cmp("params target critics", flat(ours_state.critic_target), flat(t_critic))
    cmp("log_alpha", flat(ours_state.log_alpha.params), flat(ref_params["log_alpha"]))
    if lagrange:
        cmp("grad log_alpha_prime (Adam m)", flat(_adam_mu(ours_state.log_alpha_prime.opt_state)),
            flat(ref_mu["log_alpha_prime"]))
        cmp("log_alpha_prime", flat(ours_state.log_alpha_prime.params), flat(ref_params["log_alpha_prime"]))


def _update_parity(rows, path, setting: str, seed: int = 0):
    import jax
    import jax.numpy as jnp
    cal_ql = common.ours("cal_ql")
    cfg = load_config(setting)
    obs_dim, act_dim = DIMS[setting]
    h = cal_ql.make_hyper(cfg, obs_dim, act_dim)
    n, b = h.cql_n_actions, h.batch_size
    rng = np.random.default_rng(seed)
    state = cal_ql.init_state(h, jax.random.PRNGKey(seed), np.zeros(obs_dim), np.ones(obs_dim),
                              cfg.log_alpha_prime_init)
    # a temperature away from 1 so that alpha enters every loss visibly
    state = state._replace(log_alpha=cal_ql.Trainable(jnp.asarray(-0.3, jnp.float32), state.log_alpha.opt_state))

    with common.reference_on_path(path, _stand_ins()):
        from JaxCQL import jax_utils
        from JaxCQL.conservative_sac import ConservativeSAC
        from JaxCQL.model import FullyConnectedQFunction, TanhGaussianPolicy
        jax_utils.init_rng(seed)
        arch = lambda hidden: "-".join(str(x) for x in hidden)  # noqa: E731
        policy = TanhGaussianPolicy(obs_dim, act_dim, arch(cfg.policy_hidden), False, cfg.log_std_multiplier,
                                    cfg.log_std_offset)
        qf = FullyConnectedQFunction(obs_dim, act_dim, arch(cfg.critic_hidden), False)
        sac = ConservativeSAC(dict(
            discount=cfg.discount, alpha_multiplier=cfg.alpha_multiplier, use_automatic_entropy_tuning=cfg.auto_alpha,
            backup_entropy=cfg.backup_entropy, target_entropy=-float(act_dim), policy_lr=cfg.policy_lr,
            qf_lr=cfg.critic_lr, soft_target_update_rate=cfg.tau, cql_n_actions=cfg.cql_n_actions,
            cql_importance_sample=cfg.cql_importance_sample, cql_lagrange=cfg.cql_lagrange,
            cql_target_action_gap=cfg.cql_target_action_gap, cql_temp=cfg.cql_temp,
            cql_max_target_backup=cfg.cql_max_target_backup, cql_clip_diff_min=cfg.cql_clip_diff_min,
            cql_clip_diff_max=cfg.cql_clip_diff_max), policy, qf)
        # copy our weights (fresh Adam states on both sides)
        variables = to_official(state.actor.params, state.critic.params, h.n_critics)
        variables["log_alpha"] = {"params": {"value": state.log_alpha.params}}
        if cfg.cql_lagrange:
            variables["log_alpha_prime"] = {"params": {"value": state.log_alpha_prime.params}}
        for k in sac.model_keys:
            ts = sac._train_states[k]
            sac._train_states[k] = ts.replace(params=variables[k], opt_state=ts.tx.init(variables[k]))
        sac._target_qf_params = {f"qf{j + 1}": variables[f"qf{j + 1}"] for j in range(h.n_critics)}

        # offline step (calibration on, offline CQL weight) and an online-phase step (mixed batch; our train()'s
        # online weight and calibration flag), the second continuing from the first one's states on both sides
        mc_off = _mc_values(rng, b, cfg)
        online_weight = cfg.cql_weight if cfg.cql_weight_online < 0 else cfg.cql_weight_online
        steps = [("offline", _batch(rng, b, obs_dim, act_dim, cfg, mc_off), cfg.calibration, cfg.cql_weight)]
        n_off = cal_ql.offline_rows(h)
        off_rows = _batch(rng, n_off, obs_dim, act_dim, cfg, mc_off[:n_off])
        on_rows = _batch(rng, b - n_off, obs_dim, act_dim, cfg, _mc_values(rng, b - n_off, cfg))
        mixed = {k: np.concatenate([off_rows[k], on_rows[k]]) for k in off_rows}
        steps.append(("online", mixed, cfg.calibration and cfg.online_calibration, online_weight))
        note = "default = official behaviour for the update"
        for phase, batch, calibrate, weight in steps:
            normals, uniforms = _noise(rng, b, n, act_dim)
            state, ours_m = _ours_update(cal_ql, state, batch, normals, uniforms, calibrate, weight, h)
            ref_m = _official_update(sac, batch, normals, uniforms, calibrate, weight)
            _compare_step(rows, setting, phase, state, ours_m, sac, ref_m, h.n_critics, cfg.cql_lagrange,
                          note + ("" if phase == "offline" else "; continues from the offline step's states"))


# ---------------------------------------------------------------------------------------------- MC returns
# AntMaze-style raw episodes (reward 1 = goal): (raw rewards, last step terminal); the others end by time limit
EPISODES = [([0, 0, 0, 1], True),                 # success, terminal at the goal
            ([0] * 7, False),                     # all-fail, time limit
            ([0, 1, 1, 0, 0], False),             # reward inside, last reward a failure (CORL's rule would differ)
            ([1], True),                          # one-step success
            ([0, 0, 0], True),                    # all-fail ending in a termination
            ([0] * 6, False)]                     # all-fail, last of the dataset


class _DatasetEnv:
    """Stand-in for the unwrapped D4RL env of qlearning_dataset_and_calc_mc: get_dataset() returns `data`."""

    def __init__(self, name: str, data: dict, max_steps: int):
        self.spec = types.SimpleNamespace(name=name)
        self._data, self._max_episode_steps = data, max_steps

    def get_dataset(self, **kwargs):
        return self._data


def _raw_dataset(rng, obs_dim: int, act_dim: int):
    """A D4RL-style flat dataset of EPISODES (observation i = [i, noise...] names the raw row), and each raw
    row's episode index."""
    rewards = np.concatenate([r for r, _ in EPISODES]).astype(np.float32)
    terminals, timeouts, episode = [], [], []
    for k, (r, term) in enumerate(EPISODES):
        end = np.zeros(len(r), bool)
        end[-1] = True
        terminals.append(end & term)
        timeouts.append(end & (not term))
        episode.append(np.full(len(r), k))
    obs = rng.normal(size=(len(rewards), obs_dim)).astype(np.float32)
    obs[:, 0] = np.arange(len(rewards))
    return {"observations": obs, "actions": rng.uniform(-1.2, 1.2, (len(rewards), act_dim)).astype(np.float32),
            "rewards": rewards, "terminals": np.concatenate(terminals), "timeouts": np.concatenate(timeouts)}, \
        np.concatenate(episode)


def _mc_parity(rows, path, seed: int = 0):
    cal_ql = common.ours("cal_ql")
    data = common.ours("data")
    cfg = load_config("antmaze")
    obs_dim, act_dim = DIMS["antmaze"]
    failure = cfg.mc_failure_raw_reward * cfg.reward_scale + cfg.reward_bias
    raw, episode = _raw_dataset(np.random.default_rng(seed), obs_dim, act_dim)
    with common.reference_on_path(path, _stand_ins()):
        from JaxCQL import replay_buffer
        env = _DatasetEnv("antmaze-medium-diverse-v2", raw, 1000)
        ref = replay_buffer.qlearning_dataset_and_calc_mc(env, cfg.reward_scale, cfg.reward_bias, cfg.clip_action,
                                                          cfg.discount)
        # online: one trajectory at a time, rewards already transformed, `dones` True only at a goal
        trajs = [([0] * 699 + [1], True), ([0] * 700, False), ([0, 0, 1], True), ([0] * 5, False)]
        ref_online = [replay_buffer.calc_return_to_go("antmaze-medium-diverse-v2",
                                                      list(np.float32(np.asarray(r) * cfg.reward_scale
                                                                      + cfg.reward_bias)),
                                                      [False] * (len(r) - 1) + [d], cfg.discount, cfg.reward_scale,
                                                      cfg.reward_bias, True) for r, d in trajs]

    # ours on the transitions the official preparation keeps (it drops the last step of time-limited episodes
    # and the dataset's last row; both are dataset handling, not the MC rule)
    kept = ref["observations"][:, 0].astype(int)
    ep = episode[kept]
    last = np.append(ep[1:] != ep[:-1], True)
    ds = data.OfflineData("synthetic", raw["observations"][kept], raw["actions"][kept], raw["rewards"][kept],
                          raw["observations"][kept], raw["terminals"][kept], last & ~raw["terminals"][kept],
                          np.zeros(len(kept), np.float32), np.zeros(obs_dim), np.ones(obs_dim), None)
    rewards, actions, mc = cal_ql.prepare_offline(cfg, ds)
    note = "AntMaze: r <- 10 r - 5, all-fail episodes G = -5 / (1 - gamma)"
    common.compare(rows, ALGO, REFERENCE, "data", "antmaze", "offline rewards (transformed)", rewards,
                   ref["rewards"], note=note)
    common.compare(rows, ALGO, REFERENCE, "data", "antmaze", "offline actions (clipped)", actions, ref["actions"])
    common.compare(rows, ALGO, REFERENCE, "data", "antmaze", "offline mc_returns", mc, ref["mc_returns"],
                   note=note + f"; {len(EPISODES)} synthetic episodes incl. all-fail ones")
    for (r, d), g_ref in zip(trajs, ref_online):
        r = np.asarray(r, np.float32) * cfg.reward_scale + cfg.reward_bias
        ends = np.zeros(len(r), bool)
        ends[-1] = True
        g = cal_ql.mc_returns(r.astype(np.float32), ends, cfg.discount, cfg.mc_failure_rule, failure)
        kind = "all-fail" if not (np.asarray(r) > failure).any() else "success"
        common.compare(rows, ALGO, REFERENCE, "data", "antmaze",
                       f"online mc_returns ({kind}, {len(r)} steps{', goal' if d else ', time limit'})", g, g_ref,
                       note=note)


def step_cal_ql(reference_dir=None) -> list[dict]:
    """Parity rows of our Cal-QL against the official JAX code: MC returns / data preparation (AntMaze) and one
    offline + one online update in the AntMaze (Lagrange) and Adroit (fixed CQL weight) configurations."""
    path = common.reference_checkout("calql", reference_dir)
    rows: list[dict] = []
    _mc_parity(rows, path)
    for setting in CONFIGS:
        _update_parity(rows, path, setting)
    return rows


# ---------------------------------------------------------------------------------------------- learning parity
def _learning_stand_ins() -> dict:
    """ml_collections as far as JaxCQL/utils.py and conservative_sac_main.py use it: ConfigDict, a placeholder
    (None) and DEFINE_config_dict (unused: the adapter hands main() its flags)."""
    config_dict = common.module("ml_collections.config_dict", placeholder=lambda *_: None, ConfigDict=_ConfigDict)
    config_flags = common.module("ml_collections.config_flags", DEFINE_config_dict=lambda *a, **k: None)
    config_dict.config_dict, config_flags.config_flags = config_dict, config_flags  # `from x.y import y`
    ml = common.module("ml_collections", ConfigDict=_ConfigDict, config_dict=config_dict, config_flags=config_flags)
    return {"ml_collections": ml, "ml_collections.config_dict": config_dict,
            "ml_collections.config_flags": config_flags}


class _UnwrappedEnv(common.OldGymEnv):
    """What the official samplers step, `gym.make(env).unwrapped`: a D4RL env without its TimeLimit, so `done` is
    a true termination only (the samplers stop at spec.max_episode_steps themselves, our time limit). `spec.name`
    routes the official MC-return code (see learn_cal_ql)."""

    def __init__(self, dataset_id: str, name: str, seed=None):
        super().__init__(dataset_id)
        self.spec.name = name
        self.seed(seed)

    def step(self, action):
        obs, reward, done, info = super().step(action)
        return obs, reward, done and not info.get("TimeLimit.truncated", False), info


def learn_cal_ql(cfg, reference_dir, log) -> dict:
    """The official JaxCQL/conservative_sac_main.py main() (its own loop: offline epochs, then one trajectory +
    len(trajectory) * UTD updates per epoch, evaluations by epoch / env-step counters) on our dataset with our
    config's hyper-parameters (parity.py learn).

    main() reads absl FLAGS: it is given an attribute dict built from its own FLAGS_DEF defaults and our config;
    its WandBLogger (which needs a wandb_config.py with credentials, else stops in pdb) is replaced by a recorder
    of its per-epoch metrics; viskit logs to <run_dir>/official. Evaluation schedule: offline epochs of
    gcd(offline_eval_every, offline_updates) updates with an evaluation every offline_eval_every / gcd epochs and
    at the end of pre-training, as ours; online main() evaluates when env_steps // online_eval_every grows and at
    the end, as ours. Its extra evaluation of the initial policy (epoch 0) is not recorded.

    Dense rewards: the official code computes MC returns only for AntMaze and Adroit-binary
    (get_d4rl_dataset_with_mc_calculation and TrajSampler raise NotImplementedError for other names; sampler.py
    comments that a dense-reward env needs `calc_return_to_go(..., is_sparse_reward=False)`). The adapter takes
    that route: the env name holds 'antmaze' so both reach their calc_return_to_go call, and calc_return_to_go runs
    with is_sparse_reward=False (plain discounted return-to-go, our mc_failure_rule 'none')."""
    common.require(cfg, "official Cal-QL (JaxCQL/conservative_sac_main.py)", n_critics=2, normalize=False,
                   online_calibration=True, mc_failure_rule="none", terminate_on_success=False, num_seeds=1,
                   log_alpha_prime_init=1.0, offline_checkpoint="")
    if cfg.online_steps == 0:
        raise ValueError("the official loop ends at its end-of-pre-training evaluation when there is no online "
                         "phase, ours logs one more (online) evaluation: set online_steps > 0")
    path = common.reference_checkout("calql", reference_dir)
    every = math.gcd(cfg.offline_eval_every, cfg.offline_updates)  # updates per offline epoch
    epochs = cfg.offline_updates // every
    name = f"{cfg.dataset_id} (antmaze branch, dense MC returns)"
    probe = common.ours("data").make_env(cfg.dataset_id)
    max_steps = probe.spec.max_episode_steps  # the replay buffer holds all online steps (ours: the same capacity)
    probe.close()
    envs, last = [], {}

    def make(*_, **__):  # main() makes the dataset's env, then the eval sampler's, then the train sampler's
        envs.append(_UnwrappedEnv(cfg.dataset_id, name, [None, cfg.eval_seed, cfg.seed][min(len(envs), 2)]))
        return envs[-1]

    def on_epoch(metrics):
        last.update(metrics)
        if "evaluation/average_return" not in metrics or (metrics["epoch"] == 0 and epochs > 0):
            return
        online = metrics["epoch"] > epochs  # the evaluation at epoch == n_pretrain_epochs ends pre-training
        log("online" if online else "offline", metrics["grad_steps"], metrics["env_steps"] if online else 0,
            100.0 * float(metrics["evaluation/average_normalized_return"]),
            float(metrics["evaluation/average_return"]), length=float(metrics["evaluation/average_traj_length"]),
            episodes=cfg.eval_episodes, epoch=int(metrics["epoch"]))

    class Recorder:  # stands for utils.WandBLogger in main()
        experiment_id = f"seed{cfg.seed}"

        def __init__(self, config, variant):
            self.variant = variant

        def log(self, metrics, *_, **__):
            on_epoch(metrics)

    mods = common.learning_stand_ins(cfg.dataset_id, lambda *_: None)
    mods["gym"].make = make
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(tempfile.mkdtemp())
    arch = lambda hidden: "-".join(str(x) for x in hidden)  # noqa: E731
    import absl.flags
    no_define = {f"DEFINE_{kind}": lambda *a, **k: None for kind in ("bool", "integer", "float", "string")}
    with common.reference_on_path(path, {**mods, **_learning_stand_ins()}), \
            mock.patch.multiple(absl.flags, **no_define):  # importing main defines its flags: not in absl's FLAGS
        from JaxCQL import conservative_sac_main as ref, replay_buffer, sampler
        ours = dict(
            env=name, seed=cfg.seed, batch_size=cfg.batch_size, reward_scale=cfg.reward_scale,
            reward_bias=cfg.reward_bias, clip_action=cfg.clip_action, policy_arch=arch(cfg.policy_hidden),
            qf_arch=arch(cfg.critic_hidden), orthogonal_init=cfg.orthogonal_init,
            policy_log_std_multiplier=cfg.log_std_multiplier, policy_log_std_offset=cfg.log_std_offset,
            n_train_step_per_epoch_offline=every, n_pretrain_epochs=epochs,
            offline_eval_every_n_epoch=cfg.offline_eval_every // every, max_online_env_steps=cfg.online_steps,
            online_eval_every_n_env_steps=cfg.online_eval_every, eval_n_trajs=cfg.eval_episodes,
            replay_buffer_size=cfg.online_steps + max_steps, mixing_ratio=cfg.mixing_ratio,
            use_cql=True, online_use_cql=True, cql_min_q_weight=cfg.cql_weight,
            cql_min_q_weight_online=cfg.cql_weight_online, enable_calql=cfg.calibration, n_online_traj_per_epoch=1,
            online_utd_ratio=cfg.online_utd, save_model=False)
        cql = dict(
            discount=cfg.discount, alpha_multiplier=cfg.alpha_multiplier, use_automatic_entropy_tuning=cfg.auto_alpha,
            backup_entropy=cfg.backup_entropy, target_entropy=cfg.target_entropy, policy_lr=cfg.policy_lr,
            qf_lr=cfg.critic_lr, optimizer_type="adam", soft_target_update_rate=cfg.tau,
            cql_n_actions=cfg.cql_n_actions, cql_importance_sample=cfg.cql_importance_sample,
            cql_lagrange=cfg.cql_lagrange, cql_target_action_gap=cfg.cql_target_action_gap, cql_temp=cfg.cql_temp,
            cql_max_target_backup=cfg.cql_max_target_backup, cql_clip_diff_min=cfg.cql_clip_diff_min,
            cql_clip_diff_max=cfg.cql_clip_diff_max)
        unknown = (set(ours) - set(ref.FLAGS_DEF)) | (set(cql) - set(ref.FLAGS_DEF["cql"]))
        assert not unknown, f"not flags of the official main(): {sorted(unknown)}"
        flags = _ConfigDict({**ref.FLAGS_DEF, **ours, "cql": _ConfigDict({**ref.FLAGS_DEF["cql"], **cql}),
                             "logging": _ConfigDict({**ref.FLAGS_DEF["logging"],
                                                     "output_dir": str(run_dir / "official")})})
        real_mc = replay_buffer.calc_return_to_go

        def dense_mc(env_name, rewards, terminals, gamma, reward_scale, reward_bias, is_sparse_reward=None):
            return real_mc(env_name, rewards, terminals, gamma, reward_scale, reward_bias, False)
        ref.absl = common.module("absl", flags=common.module("absl.flags", FLAGS=flags))  # main()'s own FLAGS
        ref.WandBLogger = Recorder
        with mock.patch.object(replay_buffer, "calc_return_to_go", dense_mc), \
                mock.patch.object(sampler, "calc_return_to_go", dense_mc), clip_keywords():
            ref.main([])
    for env in envs:
        env.close()
    return {"reference_config": {k: dict(v) if isinstance(v, dict) else v for k, v in flags.items()},
            "updates": int(last.get("grad_steps", 0)), "env_steps": int(last.get("env_steps", 0))}
