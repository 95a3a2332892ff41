"""Step parity of algorithms/aca.py against the official ACA (ZishunYu/Actor-Critic-Alignment, PyTorch, d3rlpy 1.1.0).

The official agents (`sacml_agent/sacml.py` + `sacml_impl.py` offline, `aca_agent/aca.py` + `aca_impl.py` online,
`utility.py::critic_init` at the switch) run unmodified on d3rlpy 1.1.0. That d3rlpy builds on Python 3.11 (with
Cython < 3) but wants its own environment (gym 0.23, old scikit-learn stack), so the reference side runs in a
separate virtualenv (benchmarks/parity-requirements.txt, section ACA): this module, run there as
`python -m parity_refs.aca --reference-side IN.npz OUT.npz` (from benchmarks/), reads our weights, batches and noise,
performs the official updates and writes parameters, Adam first moments and losses back. Its python is
$O2O_ACA_PYTHON, else <parity cache>/venv-aca/bin/python, else this interpreter if it has d3rlpy.

Adapters on the reference side, nothing else: our weights loaded into the d3rlpy modules (torch layouts);
batches as d3rlpy Transitions; `torch.distributions.Normal.rsample` returns loc + eps * scale with our unit
normals in call order (temperature sample, next-state sample(s), actor sample; checked to be used up); the
switch is `run_aca.py`'s glue (SAC+ML checkpoint saved and loaded into ACA, temperature reset, pi0 = deep copy)
around the official `critic_init`, with stand-ins for its env and dataset arguments (it only reads the
observation size and one transition for its own assertion). AntMaze's online reward shift: `run_aca.py` uses
d3rlpy's ConstantShiftRewardScaler, which d3rlpy 1.1.0 does not have (it came with a later d3rlpy), so a
RewardScaler with the same transform (r + shift) is passed.

Compared per setting (MuJoCo: squashed policy, hopper-medium config; AntMaze: Gaussian policy with a std
parameter, umaze config, sparse rewards): one SAC+ML update (temperature, critic, baseline Z, actor, target
EMA) from fresh Adam states; the switch (R from Z, targets); one ACA update continuing from there with the
SAC+ML optimiser states (as the official load_model keeps them); the rewards each side trains on; the w schedule
over its whole decay. Gradients are compared through Adam's first moments. One ACA update, not more: a second
one was measured too, and on MuJoCo one ReLU pre-activation of a critic (2.5e-7 in float64) fell on the other
side of 0 in our float32 run, which moved that sample's gradient contribution (critic Adam m 1.0e-4 relative);
our update recomputed in float64 matched the official float32 one to 1e-7 there. Our defaults are the official
behaviour for the update (deviations 1-7 and 9 of algorithms/aca.py concern data, scheduling or round-off; 8's
switch `online_reset_optimizers` defaults to the official false).

Learning parity (`learn_aca`, parity.py learn): the official `run_sacml.py` then `run_aca.py` train on our dataset
and env in the same venv, which then also needs our env and data packages (`learning_python`).
"""
import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import common

ALGO, REFERENCE = "aca", "aca"
CONFIGS = {"mujoco": "o2o/hopper/medium-v0.yaml", "antmaze": "D4RL/antmaze/umaze-v1.yaml"}
DIMS = {"mujoco": (11, 3), "antmaze": (29, 8)}  # (obs, act) of hopper and D4RL AntMaze
OFFLINE_NOISE, ONLINE_NOISE = ("temp", "next", "z_next", "pi"), ("temp", "next", "pi")
# looser bounds, each with its reason (the rows' notes repeat it)
LOOSER_TOL = 3e-5
LOOSER_ACTOR_LOSS = ("looser bound 3e-5: the loss (about -0.15) is the mean of terms about 20x larger (T log pi, R, "
                     "w softclip(log pi0), up to ~3), whose float32 values differ by ~1e-6 between XLA and torch; "
                     "its gradient rows stay within 1e-5")
LOOSER_LOG_TEMP = ("looser bound 3e-5: log T is reset to 0 at the switch, so after this step it is one Adam update "
                   "(~3e-4), and optax computes Adam's bias correction 1 - 0.999^t in float32 (relative error ~1e-5 "
                   "at t = 2) where torch uses float64")
# after the single online update, this many more on fresh batches and noise (the Adam moments past their first step,
# the temperature, the target EMA and w evolving together), compared at the end with a bound for the accumulation.
# Adam amplifies round-off (a coordinate whose gradient is near 0 moves by about lr x sign either way), so the bound
# is measured: the same sequence run by ours from a state perturbed at round-off size (every float leaf x (1 + 1e-6 z))
# sets each quantity's floor; the reference must stay within SEQUENCE_FACTOR x that floor (and at least 1e-5).
ONLINE_SEQUENCE = 100
SEQUENCE_FACTOR = 10.0
SEQUENCE_NOTE = (f"after {ONLINE_SEQUENCE} more online updates on fresh batches and noise (Adam past step 1, T, target "
                 "EMA and w together); bound: 10x ours against ours from a state perturbed by 1e-6 relative")
# our module -> (d3rlpy impl attribute, its optimiser)
MODULES = {"actor": ("_policy", "_actor_optim"), "critic": ("_q_func", "_critic_optim"),
           "baseline": ("_z_func", "_baseline_optim"), "log_temp": ("_log_temp", "_temp_optim"),
           "critic_target": ("_targ_q_func", None)}


# ---------------------------------------------------------------------------------------------- weight layouts
def to_torch(kind: str, params, n_hidden: int, squashed: bool = True) -> dict:
    """Our params (or a tree of their shape, e.g. Adam moments) as the d3rlpy module's state_dict arrays.
    kind: actor | critic | baseline (ensembles, leading member axis) | log_temp."""
    a = lambda x: np.asarray(x, np.float32)  # noqa: E731
    if kind == "log_temp":
        return {"_parameter": a(params).reshape(1, 1)}

    def mlp(p, prefix, j=None):
        pick = (lambda x: a(x)) if j is None else (lambda x: a(x)[j])
        out = {}
        for i in range(n_hidden):
            out[f"{prefix}_encoder._fcs.{i}.weight"] = pick(p[f"TorchLinear_{i}"]["kernel"]).T
            out[f"{prefix}_encoder._fcs.{i}.bias"] = pick(p[f"TorchLinear_{i}"]["bias"])
        return out
    if kind == "actor":
        out = mlp(params, "")
        out["_mu.weight"] = a(params[f"TorchLinear_{n_hidden}"]["kernel"]).T
        out["_mu.bias"] = a(params[f"TorchLinear_{n_hidden}"]["bias"])
        if squashed:
            out["_logstd.weight"] = a(params[f"TorchLinear_{n_hidden + 1}"]["kernel"]).T
            out["_logstd.bias"] = a(params[f"TorchLinear_{n_hidden + 1}"]["bias"])
        else:
            out["_logstd"] = a(params["log_std_param"])[None]
        return out
    member = {"critic": "_q_funcs", "baseline": "_z_funcs"}[kind]
    out = {}
    for j in range(a(params["TorchLinear_0"]["bias"]).shape[0]):
        out.update(mlp(params, f"{member}.{j}.", j))
        out[f"{member}.{j}._fc.weight"] = a(params[f"TorchLinear_{n_hidden}"]["kernel"])[j].T
        out[f"{member}.{j}._fc.bias"] = a(params[f"TorchLinear_{n_hidden}"]["bias"])[j]
    return out


def from_torch(kind: str, sd: dict, n_hidden: int, squashed: bool = True):
    """Inverse of to_torch (numpy arrays in our layout)."""
    if kind == "log_temp":
        return np.asarray(sd["_parameter"]).reshape(())

    def mlp(prefix):
        return {f"TorchLinear_{i}": {"kernel": np.asarray(sd[f"{prefix}_encoder._fcs.{i}.weight"]).T,
                                     "bias": np.asarray(sd[f"{prefix}_encoder._fcs.{i}.bias"])}
                for i in range(n_hidden)}
    if kind == "actor":
        out = mlp("")
        out[f"TorchLinear_{n_hidden}"] = {"kernel": sd["_mu.weight"].T, "bias": sd["_mu.bias"]}
        if squashed:
            out[f"TorchLinear_{n_hidden + 1}"] = {"kernel": sd["_logstd.weight"].T, "bias": sd["_logstd.bias"]}
        else:
            out["log_std_param"] = np.asarray(sd["_logstd"])[0]
        return out
    member = {"critic": "_q_funcs", "baseline": "_z_funcs"}[kind]
    n = len({k.split(".")[1] for k in sd if k.startswith(member + ".")})
    members = []
    for j in range(n):
        m = mlp(f"{member}.{j}.")
        m[f"TorchLinear_{n_hidden}"] = {"kernel": sd[f"{member}.{j}._fc.weight"].T,
                                        "bias": sd[f"{member}.{j}._fc.bias"]}
        members.append(m)
    return {layer: {k: np.stack([m[layer][k] for m in members]) for k in members[0][layer]} for layer in members[0]}


def _flat(sd: dict) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(sd[k], np.float64)) for k in sorted(sd)])


# ---------------------------------------------------------------------------------------------- driver side
def reference_python() -> str:
    """The python of the environment with d3rlpy 1.1.0 (see the module docstring)."""
    for candidate in (os.environ.get("O2O_ACA_PYTHON"), str(common.CACHE_DIR / "venv-aca" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            return candidate
    if importlib.util.find_spec("d3rlpy") is not None:
        return sys.executable
    raise common.ReferenceMissing(
        "ACA's reference side needs d3rlpy 1.1.0 (PyTorch) in its own virtualenv: create it as described in "
        "benchmarks/parity-requirements.txt (section ACA) and set O2O_ACA_PYTHON to its python "
        f"(or create it at {common.CACHE_DIR / 'venv-aca'})")


def load_config(setting: str):
    import yaml
    aca = common.ours("aca")
    return aca.TrainConfig(**yaml.safe_load((common.REPO_ROOT / "configs" / "aca" / CONFIGS[setting]).read_text()))


def _raw_batch(rng, n: int, obs_dim: int, act_dim: int, sparse: bool) -> dict:
    """Untransformed transitions: AntMaze-like sparse 0/1 rewards (termination at some goals) or dense ones."""
    if sparse:
        rew = (rng.random(n) < 0.2).astype(np.float32)
        done = ((rew > 0) & (rng.random(n) < 0.5)).astype(np.float32)
    else:
        rew = rng.normal(1.0, 1.0, n).astype(np.float32)
        done = (rng.random(n) < 0.05).astype(np.float32)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return {"obs": f32(rng.normal(size=(n, obs_dim))), "act": f32(rng.uniform(-0.99, 0.99, (n, act_dim))),
            "rew": rew, "next_obs": f32(rng.normal(size=(n, obs_dim))), "done": done}


def _run_reference(python: str, arrays: dict, meta: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="o2o-aca-parity-") as tmp:
        inp, out = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inp, meta=np.asarray(json.dumps(meta)), **arrays)
        env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT / "benchmarks"), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([python, "-m", "parity_refs.aca", "--reference-side", str(inp), str(out)],
                              cwd=common.REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"ACA reference side failed ({python}):\n{proc.stderr[-4000:]}")
        return dict(np.load(out))


def _parity(rows: list, path: Path, python: str, setting: str, seed: int = 0):
    import jax
    import jax.numpy as jnp
    aca = common.ours("aca")
    cfg = load_config(setting)
    obs_dim, act_dim = DIMS[setting]
    h = aca.make_hyper(cfg, obs_dim, act_dim)
    nh, sq, b = len(h.hidden_dims), h.squashed_policy, h.batch_size
    rng = np.random.default_rng(seed)
    state = aca.init_state(h, jax.random.PRNGKey(seed), np.zeros(obs_dim), np.ones(obs_dim), cfg.initial_temperature)
    # a temperature away from 1 so that T enters the offline losses visibly (the switch resets it to 1)
    state = state._replace(log_temp=aca.Trainable(jnp.asarray(-0.5, jnp.float32), state.log_temp.opt_state))
    sparse = setting == "antmaze"
    w0, decay, w_min = cfg.interpolation
    w_steps = int(math.ceil((w0 - w_min) * decay * cfg.interpolation_unit / w0)) + 10  # past the end of the decay

    stages = [("offline", OFFLINE_NOISE), ("online", ONLINE_NOISE)] + [
        (f"seq{i}", ONLINE_NOISE) for i in range(ONLINE_SEQUENCE)]
    arrays, ours_batches = {}, {}
    for stage, names in stages:
        raw = _raw_batch(rng, b, obs_dim, act_dim, sparse)
        arrays.update({f"{stage}/batch/{k}": v for k, v in raw.items()})
        bias = cfg.reward_bias if stage == "offline" else cfg.online_reward_bias  # our train()'s transforms
        # (the sequence's stages are online ones)
        ours_batches[stage] = aca.Buffer(jnp.asarray(raw["obs"]), jnp.asarray(raw["act"]),
                                         jnp.asarray(raw["rew"] * cfg.reward_scale + bias),
                                         jnp.asarray(raw["next_obs"]), jnp.asarray(raw["done"]))
        for name in names:
            arrays[f"{stage}/noise/{name}"] = rng.normal(size=(b, act_dim)).astype(np.float32)
    weights = {"actor": to_torch("actor", state.actor.params, nh, sq),
               "critic": to_torch("critic", state.critic.params, nh),
               "critic_target": to_torch("critic", state.critic_target, nh),
               "baseline": to_torch("baseline", state.baseline.params, nh),
               "log_temp": to_torch("log_temp", state.log_temp.params, nh)}
    arrays.update({f"init/{mod}/{k}": v for mod, sd in weights.items() for k, v in sd.items()})
    meta = {"checkout": str(path), "obs_dim": obs_dim, "act_dim": act_dim, "hidden": list(h.hidden_dims),
            "n_critics": h.n_critics, "squashed": sq, "batch_size": b, "gamma": h.discount, "tau": h.tau,
            "actor_lr": h.actor_lr, "critic_lr": h.critic_lr, "temp_lr": h.temp_lr, "baseline_lr": h.baseline_lr,
            "alpha": h.ml_alpha, "target_entropy": cfg.target_entropy_coef * act_dim, "beta": h.beta,
            "interpolation": [float(x) for x in cfg.interpolation],
            "online_reward_shift": -1.0 if sparse else None,  # run_aca.py: ConstantShiftRewardScaler(-1) for AntMaze
            "w_steps": w_steps, "online_sequence": ONLINE_SEQUENCE}
    ref = _run_reference(python, arrays, meta)

    # ours: the same sequence
    offline = jax.jit(aca.offline_update, static_argnames="h")
    online = jax.jit(aca.online_update, static_argnames="h")
    noise = lambda stage, names: {n: jnp.asarray(arrays[f"{stage}/noise/{n}"]) for n in names}  # noqa: E731
    results = {}
    state, results["offline"] = offline(state, ours_batches["offline"], noise("offline", OFFLINE_NOISE), h=h)
    snapshots = {"offline": state}
    state = aca.align(state, h, cfg.online_reset_optimizers)
    snapshots["switch"] = state
    state, results["online"] = online(state, ours_batches["online"], noise("online", ONLINE_NOISE), h=h)
    snapshots["online"] = state
    perturbed = jax.tree.map(lambda x, z: x * (1 + 1e-6 * z) if jnp.issubdtype(x.dtype, jnp.floating) else x, state,
                             _normal_like(state, rng))
    for i in range(ONLINE_SEQUENCE):
        state, results["sequence"] = online(state, ours_batches[f"seq{i}"], noise(f"seq{i}", ONLINE_NOISE), h=h)
        perturbed, results["perturbed"] = online(perturbed, ours_batches[f"seq{i}"], noise(f"seq{i}", ONLINE_NOISE),
                                                 h=h)
    snapshots["sequence"], snapshots["perturbed"] = state, perturbed

    note = "default = official behaviour for the update"

    def cmp(phase, quantity, ours, theirs, extra="", tol=common.TOLERANCE):
        common.compare(rows, ALGO, REFERENCE, phase, setting, quantity, ours, theirs, tol=tol,
                       note="; ".join(x for x in (note, extra) if x))

    def ref_sd(stage, what, mod):
        prefix = f"{stage}/{what}/{MODULES[mod][0]}/"
        return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}

    def ours_sd(st, mod, moments=False):
        kind = {"critic_target": "critic"}.get(mod, mod)
        tree = st.critic_target if mod == "critic_target" else getattr(st, mod).params
        if moments:
            tree = getattr(st, mod).opt_state[0].mu
        return to_torch(kind, tree, nh, sq)

    for stage in ("offline", "switch", "online", "sequence"):
        phase = {"offline": "offline (SAC+ML)", "switch": "alignment (switch)", "online": "online (ACA)",
                 "sequence": f"online, {ONLINE_SEQUENCE} more updates"}[stage]
        st = snapshots[stage]
        if stage == "switch":
            for mod in ("critic", "critic_target", "log_temp", "actor"):
                cmp(phase, f"params {mod}", _flat(ours_sd(st, mod)), _flat(ref_sd(stage, "param", mod)),
                    "R from Z by the official critic_init" if mod.startswith("critic") else "")
            continue
        if stage == "sequence":
            pt = snapshots["perturbed"]

            def seq_cmp(quantity, ours, perturbed, theirs):
                floor = common.rel_diff(perturbed, ours)[0]
                tol = max(SEQUENCE_FACTOR * floor, common.TOLERANCE)
                cmp(phase, quantity, ours, theirs, f"{SEQUENCE_NOTE} (that difference: {floor:.1e})", tol)
            for name in ("temp_loss", "critic_loss", "actor_loss"):
                seq_cmp(f"{name} (last update)", results[stage][name], results["perturbed"][name],
                        ref[f"{stage}/loss/{name}"])
            for mod in ("actor", "critic", "log_temp"):
                seq_cmp(f"grad {mod} (Adam m)", _flat(ours_sd(st, mod, True)), _flat(ours_sd(pt, mod, True)),
                        _flat(ref_sd(stage, "m", mod)))
            for mod in ("actor", "critic", "log_temp", "critic_target"):
                seq_cmp(f"params {mod}", _flat(ours_sd(st, mod)), _flat(ours_sd(pt, mod)),
                        _flat(ref_sd(stage, "param", mod)))
            continue
        losses = ("temp_loss", "critic_loss", "baseline_loss", "actor_loss") if stage == "offline" else \
            ("temp_loss", "critic_loss", "actor_loss")
        for name in losses:
            looser = stage == "online" and name == "actor_loss"
            cmp(phase, name, results[stage][name], ref[f"{stage}/loss/{name}"],
                LOOSER_ACTOR_LOSS if looser else "", LOOSER_TOL if looser else common.TOLERANCE)
        trained = ("actor", "critic", "baseline", "log_temp") if stage == "offline" else ("actor", "critic", "log_temp")
        for mod in trained:
            cmp(phase, f"grad {mod} (Adam m)", _flat(ours_sd(st, mod, True)), _flat(ref_sd(stage, "m", mod)),
                "continues the SAC+ML Adam state" if stage != "offline" else "")
        for mod in trained + ("critic_target",):
            looser = stage == "online" and mod == "log_temp"
            cmp(phase, f"params {mod}", _flat(ours_sd(st, mod)), _flat(ref_sd(stage, "param", mod)),
                LOOSER_LOG_TEMP if looser else "", LOOSER_TOL if looser else common.TOLERANCE)
        cmp(phase, "rewards (transformed)", ours_batches[stage].rew, ref[f"{stage}/rewards"],
            ("online: r - 1 (d3rlpy reward scaler)" if sparse else "") if stage != "offline" else "")
    # the w schedule over its whole decay: w used by online update n = 0..w_steps (official: decremented in float64
    # after every update by ACA._update_interpolation)
    cmp("online (ACA)", f"w schedule (updates 0..{w_steps})",
        aca.interpolation_weight(jnp.arange(w_steps + 1), h), ref["w_schedule"],
        "deviation 5: closed form (float32) vs the official float64 decrement")


def _normal_like(tree, rng):
    """A standard-normal array (float32) for every leaf of `tree`, drawn from the numpy generator `rng`."""
    import jax
    return jax.tree.map(lambda x: np.asarray(rng.normal(size=np.shape(x)), np.float32), tree)


def step_aca(reference_dir=None) -> list[dict]:
    """Parity rows of our ACA against the official code: per setting (MuJoCo squashed, AntMaze Gaussian) one
    SAC+ML update, the switch, one ACA update, 100 more ACA updates (fresh batches and noise) and the w schedule, on
    the same weights, batches and noise."""
    path = common.reference_checkout("aca", reference_dir)
    python = reference_python()
    rows: list[dict] = []
    for setting in CONFIGS:
        _parity(rows, path, python, setting)
    return rows


# ---------------------------------------------------------------------------------------------- reference side
def _reference_side(inp: Path, out: Path):
    """Runs in the d3rlpy 1.1.0 environment: the official updates on the given weights, batches and noise."""
    import copy
    import types
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(1)
    arrays = dict(np.load(inp))
    meta = json.loads(str(arrays.pop("meta")))
    sys.path.insert(0, meta["checkout"])
    from d3rlpy.dataset import Transition, TransitionMiniBatch
    from d3rlpy.models.encoders import VectorEncoderFactory
    from d3rlpy.preprocessing.reward_scalers import RewardScaler
    from d3rlpy.torch_utility import TorchMiniBatch
    from aca_agent.aca import ACA
    from sacml_agent.sacml import SACML
    import utility

    class ShiftRewardScaler(RewardScaler):
        """r + shift (the transform of the later d3rlpy's ConstantShiftRewardScaler used by run_aca.py)."""
        TYPE = "constant_shift"

        def __init__(self, shift: float):
            self.shift = shift

        def fit(self, episodes):
            pass

        def transform(self, reward):
            return self.shift + reward

        def reverse_transform(self, reward):
            return reward - self.shift

        def get_params(self, deep=False):
            return {"shift": self.shift}

    obs_dim, act_dim = meta["obs_dim"], meta["act_dim"]
    enc = VectorEncoderFactory(hidden_units=meta["hidden"])
    common_kw = dict(batch_size=meta["batch_size"], actor_learning_rate=meta["actor_lr"],
                     critic_learning_rate=meta["critic_lr"], temp_learning_rate=meta["temp_lr"],
                     actor_encoder_factory=enc, critic_encoder_factory=enc, baseline_encoder_factory=enc,
                     baseline_learning_rate=meta["baseline_lr"], gamma=meta["gamma"], tau=meta["tau"],
                     n_critics=meta["n_critics"], target_entropy=meta["target_entropy"],
                     squashed_normal_policy=meta["squashed"], use_gpu=False)

    queue: list = []

    def rsample(self, sample_shape=torch.Size()):
        eps = queue.pop(0)
        assert tuple(sample_shape) == () and eps.shape == self.loc.shape, (sample_shape, eps.shape, self.loc.shape)
        return self.loc + eps * self.scale
    torch.distributions.Normal.rsample = rsample

    def minibatch(stage):
        o, a, r, no, d = (arrays[f"{stage}/batch/{k}"] for k in ("obs", "act", "rew", "next_obs", "done"))
        return TransitionMiniBatch([Transition([obs_dim], act_dim, o[i], a[i], float(r[i]), no[i], float(d[i]))
                                    for i in range(len(r))])

    results = {}

    def dump(stage, impl, metrics=None):
        for mod, (attr, optim) in MODULES.items():
            module = getattr(impl, attr)
            for name, p in module.named_parameters():
                results[f"{stage}/param/{attr}/{name}"] = p.detach().numpy().copy()
                state = getattr(impl, optim).state.get(p, {}) if optim else {}
                if "exp_avg" in state:
                    results[f"{stage}/m/{attr}/{name}"] = state["exp_avg"].numpy().copy()
        for k, v in (metrics or {}).items():
            results[f"{stage}/loss/{k}"] = np.asarray(v, np.float64)

    def update(algo, stage, names):
        queue.extend(torch.from_numpy(arrays[f"{stage}/noise/{n}"]) for n in names)
        batch = minibatch(stage)
        results[f"{stage}/rewards"] = TorchMiniBatch(batch, "cpu:0", reward_scaler=algo._impl.reward_scaler) \
            .rewards.numpy()[:, 0]
        metrics = algo.update(batch)
        assert not queue, f"{len(queue)} noise arrays unused in {stage}"
        dump(stage, algo._impl, metrics)

    # offline SAC+ML step on our initial weights (fresh Adam states)
    sac = SACML(alpha=meta["alpha"], **common_kw)
    sac.create_impl((obs_dim,), act_dim)
    for mod, (attr, _) in MODULES.items():
        prefix = f"init/{mod}/"
        getattr(sac._impl, attr).load_state_dict(
            {k[len(prefix):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)})
    update(sac, "offline", OFFLINE_NOISE)

    # the switch as in run_aca.py: load the SAC+ML checkpoint into ACA, T <- 1, pi0 <- copy(pi), critic_init
    shift = meta["online_reward_shift"]
    agent = ACA(beta=meta["beta"], interpolation=meta["interpolation"],
                reward_scaler=ShiftRewardScaler(shift) if shift is not None else None, **common_kw)
    agent.create_impl((obs_dim,), act_dim)
    with tempfile.TemporaryDirectory() as tmp:
        sac.save_model(str(Path(tmp) / "model.pt"))
        agent.load_model(str(Path(tmp) / "model.pt"))
    agent._impl._log_temp.state_dict()["_parameter"].copy_(torch.Tensor([0.0]))
    agent._impl._reference_policy = copy.deepcopy(agent._impl._policy)
    obs0 = arrays["online/batch/obs"][0]
    env = types.SimpleNamespace(observation_space=types.SimpleNamespace(_shape=(obs_dim,)))
    dataset = types.SimpleNamespace(episodes=[[types.SimpleNamespace(observation=obs0,
                                                                     action=arrays["online/batch/act"][0])]])
    utility.critic_init(agent, env, dataset)
    dump("switch", agent._impl)
    update(agent, "online", ONLINE_NOISE)
    for i in range(meta["online_sequence"]):  # ACA.update also steps w, as fit_online's updates do
        queue.extend(torch.from_numpy(arrays[f"seq{i}/noise/{n}"]) for n in ONLINE_NOISE)
        metrics = agent.update(minibatch(f"seq{i}"))
        assert not queue, f"{len(queue)} noise arrays unused in update {i} of the sequence"
    dump("sequence", agent._impl, metrics)
    agent._impl._weight = agent._interpolation[0]  # the weight schedule alone, from its start
    w = [agent._impl._weight]
    for _ in range(meta["w_steps"]):
        agent._update_interpolation()
        w.append(agent._impl._weight)
    results["w_schedule"] = np.asarray(w, np.float64)
    np.savez(out, **results)


# ---------------------------------------------------------------------------------------------- learning runs
EVAL_MARK = "@@o2o-eval "  # prefix of the reference side's evaluation lines on its stdout
OFFICIAL_LEVELS = {"random": "mjc_r", "medium": "mjc_m", "medium-replay": "mjc_mr", "medium-expert": "mjc_me",
                   "expert": "mjc_e"}  # utility.get_config's file per D4RL level (MuJoCo)
LEARN_PACKAGES = "gymnasium==1.4.0 mujoco==4.0.0 imageio==2.38.2 minari==0.5.4 pillow==13.0.0"  # our env and data
# (gymnasium[mujoco] imports imageio, Minari's HDF5 storage PIL) in the ACA venv


def learning_python() -> str:
    """reference_python(), which for a learning run must also import our env and data (gymnasium, MuJoCo, Minari)."""
    python = reference_python()
    probe = subprocess.run([python, "-c", "import gymnasium.envs.mujoco, minari, PIL"], capture_output=True)
    if probe.returncode != 0:
        raise common.ReferenceMissing(f"ACA's learning runs step our env and read our data in the ACA venv: "
                                      f"{python} -m pip install {LEARN_PACKAGES}")
    return python


def learn_aca(cfg, reference_dir, log) -> dict:
    """The official pipeline on our dataset (parity.py learn): `run_sacml.py`'s main (SAC+ML pre-training) then
    `run_aca.py`'s main (load its last model, T <- 1, pi0, critic_init, buffer_init, fit_online), unmodified, in the
    ACA venv (`_reference_learn`). The official configs of the dataset's D4RL name (configs/{offline,online}/
    mjc_*.yaml: alpha, squashed policy, target entropy, beta, interpolation, n_trajs) must equal ours; what the
    scripts hard-code (learning rates, batch, ensembles, an update per env step, d3rlpy's buffer) is required equal
    or, for budgets, evaluation schedule and episodes and network widths, passed in by the adapter (see
    _reference_learn).
    Evaluations: offline every `offline_eval_every` updates (d3rlpy epochs), online every `online_eval_every` env
    steps; both budgets must be multiples of them. MuJoCo datasets only (run_aca.py's AntMaze reward scaler does
    not exist in d3rlpy 1.1.0)."""
    common.require(cfg, "official ACA (run_sacml.py / run_aca.py)", batch_size=256, actor_lr=3e-4, critic_lr=3e-4,
                   temp_lr=3e-4, baseline_lr=3e-4, n_critics=2, tau=0.005, discount=0.99, initial_temperature=1.0,
                   actor_grad_clip=0.25, interpolation_unit=1000, normalize=False, reward_scale=1.0,
                   reward_bias=0.0, online_reward_bias=0.0, terminate_on_success=False,
                   online_reset_optimizers=False, num_seeds=1, offline_checkpoint="", online_block=1,
                   d3rlpy_terminals=True)
    data = common.ours("data")
    parsed = data.parse_local_id(cfg.dataset_id)
    if parsed is None:
        raise ValueError(f"official ACA learning runs are set up for our MuJoCo datasets o2o/<env>/<level>-v0, not "
                         f"{cfg.dataset_id}")
    common.require_multiples(cfg, "official ACA (once per d3rlpy epoch)", offline_updates="offline_eval_every",
                             online_steps="online_eval_every")
    import yaml
    path = common.reference_checkout("aca", reference_dir)
    env_name, level = parsed
    official = {phase: yaml.safe_load((path / "configs" / phase / f"{OFFICIAL_LEVELS[level]}.yaml").read_text())
                for phase in ("offline", "online")}
    common.require(cfg, f"official ACA's configs/*/{OFFICIAL_LEVELS[level]}.yaml",
                   ml_alpha=float(official["offline"]["alpha"]),
                   squashed_policy=bool(official["online"]["squashed_normal_policy"]),
                   target_entropy_coef=float(official["online"]["target_entropy_coef"]),
                   beta=float(official["online"]["beta"]), n_trajs=int(official["online"]["n_trajs"]),
                   interpolation=tuple(float(x) for x in official["online"]["interpolation"]))
    python = learning_python()
    work = Path(cfg.run_dir).resolve() / "reference"  # the scripts' cwd: d3rlpy_logs/ and configs/ (-> checkout)
    shutil.rmtree(work, ignore_errors=True)  # d3rlpy refuses an existing experiment dir; a restart starts afresh
    work.mkdir(parents=True)
    (work / "configs").symlink_to(path / "configs")
    spec = {"checkout": str(path), "dataset_id": cfg.dataset_id, "d4rl_name": f"{env_name}-{level}-v2",
            "seed": cfg.seed, "hidden": list(cfg.hidden_dims), "eval_episodes": cfg.eval_episodes,
            "offline_updates": cfg.offline_updates, "offline_eval_every": cfg.offline_eval_every,
            "online_steps": cfg.online_steps, "online_eval_every": cfg.online_eval_every}
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    lo, hi = data.reference_scores(cfg.dataset_id)
    env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT / "benchmarks"), "OMP_NUM_THREADS": "1"}
    # python -O: the official critic_init (utility.py) ends with `assert z(s) == q(s, a)`, exact float equality of its
    # state-only critic and the copied critic whose action weights are zero: a sum over 11 inputs against one over
    # 14 (3 zero terms) may round differently, and did for seed 10 here (AssertionError after SAC+ML). -O skips that
    # self-check, the only assert on this path; it changes nothing computed.
    proc = subprocess.Popen([python, "-O", "-m", "parity_refs.aca", "--learn", str(work / "spec.json")], cwd=work,
                            env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
    r = {}
    try:
        for line in proc.stdout:  # the reference's evaluations become our records as they come (wall_time)
            if line.startswith(EVAL_MARK):
                r = json.loads(line[len(EVAL_MARK):])
                log(r["phase"], r["updates"], r["env_steps"], 100.0 * (r["return"] - lo) / (hi - lo), r["return"],
                    episodes=cfg.eval_episodes)
            else:
                print(line, end="", flush=True)
    finally:
        if proc.poll() is None and sys.exc_info()[0] is not None:  # interrupted: no orphaned reference run
            proc.kill()
    if proc.wait() != 0:
        raise RuntimeError(f"the official ACA run failed ({python}, exit code {proc.returncode}); see its output above")
    return {"reference_spec": spec, "reference_python": python, "updates": r.get("updates")}


def final_policy_scores(ours_dir: Path, official_model: Path, eval_seeds=None, sampled_seeds=None) -> dict:
    """Our final online policy (<ours_dir>/checkpoints/latest of a one-seed run) and the official one (the model
    d3rlpy saved at the end of fit_online, converted with from_torch) scored by our evaluator: the deterministic
    tanh(mean) policy with `eval_episodes` episodes per evaluation seed (default: the run's eval_seed and the next
    four), and the sampling policy a = tanh(mean + std eps) (default: the first two of those seeds; numpy's
    generator seeded 0). Also the mean policy std (before tanh) at the first 20k dataset states."""
    import jax
    import jax.numpy as jnp
    import torch
    aca = common.ours("aca")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = aca.parse_config(["--config_path", str(Path(ours_dir) / "config.yaml"), "--run_dir", tmp])
    eval_seeds = list(eval_seeds) if eval_seeds is not None else [cfg.eval_seed + i for i in range(5)]
    sampled_seeds = list(sampled_seeds) if sampled_seeds is not None else eval_seeds[:2]
    world = aca.load_world(cfg, 1)
    h = world.h
    template = aca.stack_seeds([aca.init_state(h, jax.random.PRNGKey(0), world.obs_mean, world.obs_std)])
    state, _ = aca.load_state(Path(ours_dir) / "checkpoints" / "latest", template, cfg)
    one = aca.seed_slice(state, 0)
    sd = torch.load(official_model, map_location="cpu", weights_only=False)["_policy"]
    theirs = from_torch("actor", {k: v.numpy() for k, v in sd.items()}, len(cfg.hidden_dims), cfg.squashed_policy)
    theirs = jax.tree.map(lambda r, v: jnp.asarray(np.reshape(v, np.shape(r)), r.dtype), one.actor.params, theirs)
    states = np.asarray(world.offline.obs)[:20000]
    try:
        return {"ours": _policy_scores(aca, world, cfg, one, one.actor.params, eval_seeds, sampled_seeds, states),
                "official": _policy_scores(aca, world, cfg, one, theirs, eval_seeds, sampled_seeds, states)}
    finally:
        world.close()


def _policy_scores(aca, world, cfg, one, params, eval_seeds, sampled_seeds, states) -> dict:
    import jax
    h = world.h
    apply = jax.jit(lambda o: aca.networks(h)[0].apply({"params": params}, (o - one.obs_mean) / one.obs_std))
    rng = np.random.default_rng(0)

    def sampled(o):
        mean, log_std = (np.asarray(x) for x in apply(o))
        x = mean + np.exp(log_std) * rng.standard_normal(mean.shape)
        return np.tanh(x) if cfg.squashed_policy else np.clip(x, -1.0, 1.0)

    def run(policy, seeds):
        evs = [aca.evaluate(world.eval_env, policy, cfg.eval_episodes, s, cfg.terminate_on_success,
                            "antmaze" in cfg.dataset_id, world.refs) for s in seeds]
        key = "normalized_score" if world.refs is not None else "return"
        return [e[key] for e in evs], [e["length"] for e in evs]
    det, length = run(lambda o: aca.act_deterministic(params, one.obs_mean, one.obs_std, o, h), eval_seeds)
    smp, _ = run(sampled, sampled_seeds)
    return {"deterministic": det, "deterministic_mean": float(np.mean(det)), "length_mean": float(np.mean(length)),
            "sampled": smp, "sampled_mean": float(np.mean(smp)),
            "policy_std_mean": float(np.exp(np.asarray(apply(states)[1])).mean())}


def _reference_learn(spec_path: Path):
    """Runs in the ACA venv, cwd = the work dir: run_sacml.main then run_aca.main, with adapters only:
      * data and env: d3rlpy's own get_d4rl builds its MDPDataset from `gym.make(name).get_dataset()`, which is our
        dataset in D4RL's layout (common.OldGymEnv; `d4rl` is an empty stand-in); every gym.make is our env;
      * budgets and evaluation (hard-coded in the scripts): SACML.fit gets n_steps = offline_updates,
        n_steps_per_epoch = offline_eval_every and saves its last model only (linked as model_500000.pt, the name
        run_aca.py loads); ACA.fit_online gets n_steps = online_steps, n_steps_per_epoch = online_eval_every; the
        scorers (d3rlpy's evaluate_on_environment) run `eval_episodes` episodes and print one line per evaluation;
        no progress bars;
      * network widths: d3rlpy's default encoders are 256-256 MLPs; actor, critic and baseline encoders of both
        agents get VectorEncoderFactory(hidden_units=our hidden_dims) (256-256 is the default itself);
      * buffer_init's TorchMiniBatch(device="cuda") runs on the CPU."""
    import warnings
    warnings.filterwarnings("ignore")
    import functools
    spec = json.loads(spec_path.read_text())
    import torch
    torch.set_num_threads(1)
    sys.modules["d4rl"] = common.module("d4rl")
    import gym
    import d3rlpy
    import d3rlpy.online.iterators as iterators
    from d3rlpy.models.encoders import VectorEncoderFactory
    class Env(common.OldGymEnv):
        """Our env, its spaces as gym's Boxes (d3rlpy's fit_online checks their class)."""
        def __init__(self):
            super().__init__(spec["dataset_id"])
            self.observation_space, self.action_space = (gym.spaces.Box(s.low, s.high, dtype=s.dtype)
                                                         for s in (self.observation_space, self.action_space))
    gym.make = lambda *_, **__: Env()
    sys.path.insert(0, spec["checkout"])
    import run_aca
    import run_sacml
    import utility
    from aca_agent.aca import ACA
    from sacml_agent.sacml import SACML
    progress = {"env_steps": 0}

    def emit(phase, algo, score):
        offline = phase == "offline"
        print(EVAL_MARK + json.dumps({"phase": phase, "env_steps": 0 if offline else progress["env_steps"],
                                      "updates": algo.grad_step + (0 if offline else spec["offline_updates"]),
                                      "return": float(score)}), flush=True)

    def scorer_factory(phase, original):
        def factory(env, n_trials=10, epsilon=0.0, render=False):
            scorer = original(env, n_trials=spec["eval_episodes"], epsilon=epsilon, render=render)

            def score(algo, *args):
                value = scorer(algo, *args)
                emit(phase, algo, value)
                return value
            return score
        return factory

    def with_kwargs(method, **override):
        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            return method(self, *args, **{**kwargs, **override})
        return wrapped

    enc = VectorEncoderFactory(hidden_units=spec["hidden"])
    encoders = dict(actor_encoder_factory=enc, critic_encoder_factory=enc, baseline_encoder_factory=enc)
    n_epochs = spec["offline_updates"] // spec["offline_eval_every"]
    SACML.__init__ = with_kwargs(SACML.__init__, **encoders)
    ACA.__init__ = with_kwargs(ACA.__init__, **encoders)
    SACML.fit = with_kwargs(SACML.fit, n_steps=spec["offline_updates"], n_steps_per_epoch=spec["offline_eval_every"],
                            save_interval=n_epochs, show_progress=False)
    ACA.fit_online = with_kwargs(ACA.fit_online, n_steps=spec["online_steps"], show_progress=False,
                                 n_steps_per_epoch=spec["online_eval_every"],
                                 save_interval=spec["online_steps"] // spec["online_eval_every"],
                                 callback=lambda algo, epoch, step: progress.update(env_steps=step))
    d3rlpy.metrics.evaluate_on_environment = scorer_factory("offline", d3rlpy.metrics.evaluate_on_environment)
    iterators.evaluate_on_environment = scorer_factory("online", iterators.evaluate_on_environment)
    if not torch.cuda.is_available():
        to_torch = utility.TorchMiniBatch
        utility.TorchMiniBatch = lambda batch, device=None, **kwargs: to_torch(batch, "cpu:0", **kwargs)
    # the scripts' options (their argparse has --gpu 0 = cuda:0 for d3rlpy's use_gpu; False = this CPU)
    args = argparse.Namespace(dataset=spec["d4rl_name"], seed=spec["seed"], gpu=False)
    run_sacml.main(args)
    logdir = Path("d3rlpy_logs") / "SAC+ML" / spec["d4rl_name"] / str(spec["seed"]) / "exp"
    if spec["offline_updates"] != 500000:  # run_aca.py loads model_500000.pt: the last SAC+ML model
        (logdir / "model_500000.pt").symlink_to(f"model_{spec['offline_updates']}.pt")
    run_aca.main(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side = parser.add_mutually_exclusive_group(required=True)
    side.add_argument("--reference-side", nargs=2, metavar=("IN", "OUT"))
    side.add_argument("--learn", metavar="SPEC", help="a learning run (learn_aca's spec.json)")
    args = parser.parse_args()
    if args.learn:
        _reference_learn(Path(args.learn))
    else:
        _reference_side(Path(args.reference_side[0]), Path(args.reference_side[1]))
