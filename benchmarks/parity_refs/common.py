"""What every parity adapter shares: the pinned references, their checkout, module stand-ins, comparisons.

The reference code is never copied into this repository: `reference_checkout` finds a checkout of the pinned
commit (given with --reference_dir, or in the cache directory), clones it when the network answers, and
otherwise says exactly what to fetch.
"""
import contextlib
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("O2O_PARITY_CACHE", Path.home() / ".cache" / "o2o-jax" / "parity"))

# name -> (git URL, pinned commit). Each adapter names the files it runs.
REFERENCES = {
    "corl": ("https://github.com/tinkoff-ai/CORL", "6afec90484bbf47dee05fdf525e26a3ebe028e9b"),
    "calql": ("https://github.com/nakamotoo/Cal-QL", "ac6eafec22e8d60836573e1f488c7f626ce8a77e"),
    "ocr_cft": ("https://github.com/QinwenLuo/OCR-CFT", "77c49819e0814eb06dccd7f60db06ba58165317c"),
    "pex": ("https://github.com/Haichao-Zhang/PEX", "b0ae11e17e5fd9ae38840748ce043aff895e952b"),
    "aca": ("https://github.com/ZishunYu/Actor-Critic-Alignment", "3a082bd555bcdb96f262dd3214358403ae03a371"),
}

# float32 round-off bound for one update step: relative differences above this fail (see docs of parity.py)
TOLERANCE = 1e-5


class ReferenceMissing(RuntimeError):
    """The reference checkout is absent and could not be cloned; the message says what to fetch."""


def _is_checkout(path: Path, commit: str) -> bool:
    if not path.is_dir():
        return False
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return head.returncode == 0 and head.stdout.strip() == commit


def reference_checkout(name: str, reference_dir=None, clone: bool = True) -> Path:
    """Path of a checkout of reference `name` at its pinned commit.

    `reference_dir`: a directory holding that checkout (itself, or `<reference_dir>/<name>`). Without it the cache
    directory is used, and the commit is cloned there when the network answers (`clone`)."""
    url, commit = REFERENCES[name]
    candidates = [Path(reference_dir) / name, Path(reference_dir)] if reference_dir else [CACHE_DIR / name]
    for path in candidates:
        if _is_checkout(path, commit):
            return path
        holds_references = path.is_dir() and any((path / other).is_dir() for other in REFERENCES)
        if path.is_dir() and any(path.iterdir()) and not (path / ".git").exists() and not holds_references:
            return path  # a plain export of the commit (no .git): trusted as given
    target = candidates[-1]
    how = (f"git clone {url} {target} && git -C {target} checkout {commit}")
    if clone and not reference_dir:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["git", "clone", "--quiet", url, str(target)], check=True, timeout=300,
                           capture_output=True, env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})
            subprocess.run(["git", "-C", str(target), "checkout", "--quiet", commit], check=True, capture_output=True)
            return target
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
            pass
    raise ReferenceMissing(f"reference {name!r} ({url} @ {commit}) not found in {candidates[0]}; fetch it with: "
                           f"{how}  (or pass --reference_dir DIR holding that checkout)")


@contextlib.contextmanager
def reference_on_path(path: Path, stand_ins: dict):
    """Import the reference from `path` with `stand_ins` ({module name: module}) in sys.modules; the modules it added
    (its own files, the stand-ins, any new top-level package) are removed from sys.modules and `path` from sys.path
    afterwards, so several references can be imported in one process. Submodules that already-imported libraries
    load lazily meanwhile (torch._dynamo, ...) stay: importing them twice breaks those libraries."""
    before = set(sys.modules)
    tops = {k.split(".")[0] for k in before}
    saved = {k: sys.modules.get(k) for k in stand_ins}
    sys.modules.update(stand_ins)
    sys.path.insert(0, str(path))
    root = str(Path(path).resolve())
    try:
        yield
    finally:
        sys.path.remove(str(path))
        for k in set(sys.modules) - before:
            file = getattr(sys.modules[k], "__file__", None) or ""
            if k.split(".")[0] not in tops or k in stand_ins or str(Path(file).resolve()).startswith(root + os.sep):
                del sys.modules[k]
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def module(name: str, **attrs) -> types.ModuleType:
    """A stand-in module with the given attributes."""
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def wandb_stand_in() -> types.ModuleType:
    """wandb for reference code: init/log/finish do nothing, config is a dict (WandbRecorder, logs dropped)."""
    return WandbRecorder(lambda *_: None).module()


def to_numpy(x) -> np.ndarray:
    """numpy float64 copy of a torch tensor, jax array or array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_diff(ours, ref) -> tuple[float, float]:
    """(largest |ours - ref| / max|ref|, largest |ours - ref|) over all elements; shapes must agree."""
    a, b = to_numpy(ours), to_numpy(ref)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: ours {a.shape} vs reference {b.shape}")
    abs_diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return (abs_diff / scale if scale > 0 else abs_diff), abs_diff


def compare(rows: list, algo: str, reference: str, phase: str, setting: str, quantity: str, ours, ref,
            tol: float = TOLERANCE, note: str = "") -> dict:
    """Append (and return) one result row: the largest relative difference of one quantity of one update."""
    rel, abs_ = rel_diff(ours, ref)
    row = {"algo": algo, "reference": reference, "phase": phase, "setting": setting, "quantity": quantity,
           "max_rel_diff": rel, "max_abs_diff": abs_, "tol": tol, "passed": bool(rel <= tol), "note": note}
    rows.append(row)
    return row


# ---- stand-ins for what the references import (they run single updates here: no env, no D4RL download) ----
def gym_stand_in() -> types.ModuleType:
    """gym (old API) for reference code that needs its names at import time (type hints, wrappers)."""
    def make(env_id, *_, **__):  # an env that only has a name and a time limit (parity never steps it)
        return types.SimpleNamespace(spec=types.SimpleNamespace(id=env_id), _max_episode_steps=1000,
                                     seed=lambda *a, **k: None)
    wrappers = module("gym.wrappers", TransformObservation=lambda env, f: env, TransformReward=lambda env, f: env)
    env_cls = type("Env", (), {})
    return module("gym", Env=env_cls, Wrapper=env_cls, wrappers=wrappers, spaces=module("gym.spaces"), make=make)


def qlearning_dataset(ds) -> dict:
    """D4RL's `qlearning_dataset` dict of an `algorithms/data.py` OfflineData: the same arrays (copies), `terminals`
    the true terminations, `timeouts` the other episode ends. Unlike D4RL no transition is dropped."""
    return {"observations": ds.observations.copy(), "actions": ds.actions.copy(),
            "next_observations": ds.next_observations.copy(), "rewards": ds.rewards.copy(),
            "terminals": ds.terminals.copy(), "timeouts": ds.timeouts.copy()}


def d4rl_stand_in(ds=None) -> types.ModuleType:
    """d4rl whose qlearning_dataset(env) serves `ds` (an OfflineData) through `qlearning_dataset` above."""
    def serve(*_, **__):
        if ds is None:
            raise RuntimeError("this d4rl stand-in serves no dataset")
        return qlearning_dataset(ds)
    return module("d4rl", qlearning_dataset=serve)


def reference_stand_ins(ds=None) -> dict:
    """sys.modules entries for reference code that imports gym, d4rl and wandb."""
    gym = gym_stand_in()
    return {"gym": gym, "gym.wrappers": gym.wrappers, "gym.spaces": gym.spaces, "d4rl": d4rl_stand_in(ds),
            "wandb": wandb_stand_in()}


# ---- weights: torch nn.Linear <-> flax Dense-style {"kernel": [in, out], "bias": [out]} ----
def linear_layers(torch_module) -> list:
    """The nn.Linear layers of a torch module, in registration (= forward, for MLPs) order."""
    import torch
    return [m for m in torch_module.modules() if isinstance(m, torch.nn.Linear)]


def _put(tree: dict, path: str, value):
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _get(tree: dict, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def dense_tree(layers: list, names: list, get=None) -> dict:
    """Flax params of torch Linear `layers`: {names[i]: {"kernel": W_i.T, "bias": b_i}} as float32 numpy (a name may
    be a path, 'MLP_0/Dense_1'). `get(parameter)` maps each weight/bias first, e.g. to its Adam moment."""
    if len(layers) != len(names):
        raise ValueError(f"{len(layers)} torch layers for {len(names)} flax names")
    get = get or (lambda p: p)
    tree = {}
    for layer, name in zip(layers, names):
        _put(tree, name, {"kernel": to_numpy(get(layer.weight)).T.astype(np.float32),
                          "bias": to_numpy(get(layer.bias)).astype(np.float32)})
    return tree


def load_dense_tree(tree: dict, names: list, layers: list, member=None):
    """Write flax params (`dense_tree` layout; `member` i of a vmapped ensemble) into torch Linear `layers`."""
    import torch
    with torch.no_grad():
        for layer, name in zip(layers, names):
            p = _get(tree, name)
            kernel, bias = (np.asarray(p["kernel"]), np.asarray(p["bias"]))
            if member is not None:
                kernel, bias = kernel[member], bias[member]
            layer.weight.copy_(torch.as_tensor(np.ascontiguousarray(kernel.T)))
            layer.bias.copy_(torch.as_tensor(bias))


def stack_members(trees: list):
    """One vmapped-ensemble param tree (leading member axis) from per-member trees."""
    import jax
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def flat(tree) -> np.ndarray:
    """All leaves of a (param) tree, in tree order, as one float64 vector."""
    import jax
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([to_numpy(x).ravel() for x in leaves]) if leaves else np.zeros(0)


def adam_first_moment(optimizer):
    """`get` for dense_tree: a torch parameter's Adam first moment (exp_avg) after the optimiser's steps."""
    return lambda p: optimizer.state[p]["exp_avg"]


# ---- the same noise on both sides: queues of standard draws consumed in call order ----
class Noise:
    """Queues of standard draws by kind: normal (N(0,1)), uniform (U[0,1), mapped to [low, high) by the caller's
    bounds), categorical (a U[0,1) per draw, inverted through the caller's CDF), bernoulli (keep masks). Each side's
    patched samplers take the next array of their kind; its size must match the requested shape."""

    def __init__(self, **queues):
        self.queues = {k: [np.asarray(a) for a in queues.get(k, ())] for k in
                       ("normal", "uniform", "categorical", "bernoulli")}

    def take(self, kind: str, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        if not self.queues[kind]:
            raise RuntimeError(f"noise queue '{kind}' is empty (a draw of shape {shape} was not expected)")
        arr = self.queues[kind].pop(0)
        if arr.size != int(np.prod(shape)):
            raise RuntimeError(f"noise '{kind}' of shape {arr.shape} given to a draw of shape {shape}")
        return arr.reshape(shape)

    def check_used(self):
        left = {k: len(q) for k, q in self.queues.items() if q}
        if left:
            raise RuntimeError(f"noise not consumed: {left}")


def inverse_cdf(probs, u):
    """Category index of uniform draws `u` under `probs` (last axis): the number of CDF steps u passes."""
    cdf = probs.cumsum(-1)[..., :-1]
    return (u[..., None] >= cdf).sum(-1)


@contextlib.contextmanager
def jax_noise(noise: Noise):
    """jax.random.{normal, uniform, categorical, bernoulli} draw from `noise` (keys ignored) while active. A draw
    with a traced key (under jit or eval_shape, e.g. flax's shape check of existing parameters, which runs their
    init) is left to jax: run the update un-jitted so that its keys are concrete."""
    from unittest import mock
    import jax
    import jax.numpy as jnp
    original = {k: getattr(jax.random, k) for k in ("normal", "uniform", "categorical", "bernoulli")}

    def injected(kind, draw):
        def sampler(key, *args, **kwargs):
            if isinstance(key, jax.core.Tracer):
                return original[kind](key, *args, **kwargs)
            return draw(*args, **kwargs)
        return sampler

    def normal(shape=(), dtype=jnp.float32, **_):
        return jnp.asarray(noise.take("normal", shape), dtype)

    def uniform(shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0, **_):
        return minval + (maxval - minval) * jnp.asarray(noise.take("uniform", shape), dtype)

    def categorical(logits, axis=-1, shape=None, **_):
        probs = jax.nn.softmax(jnp.moveaxis(logits, axis, -1), -1)
        return inverse_cdf(probs, jnp.asarray(noise.take("categorical", probs.shape[:-1]), probs.dtype))

    def bernoulli(p=0.5, shape=None, **_):
        return jnp.asarray(noise.take("bernoulli", shape if shape is not None else jnp.shape(p)), bool)

    with mock.patch.multiple(jax.random, **{k: injected(k, f) for k, f in (
            ("normal", normal), ("uniform", uniform), ("categorical", categorical), ("bernoulli", bernoulli))}):
        yield noise


@contextlib.contextmanager
def torch_noise(noise: Noise):
    """torch's Normal.rsample/sample, Tensor.uniform_, Categorical.sample and F.dropout draw from `noise` while
    active (the distributions' own arithmetic is kept: loc + eps * scale)."""
    from unittest import mock
    import torch
    from torch.distributions import normal as torch_normal

    def standard_normal(shape, dtype=None, device=None):
        return torch.as_tensor(noise.take("normal", shape), dtype=dtype)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def uniform_(self, a=0.0, b=1.0, generator=None):
        with torch.no_grad():
            return self.copy_(a + (b - a) * torch.as_tensor(noise.take("uniform", self.shape), dtype=self.dtype))

    def categorical_sample(self, sample_shape=torch.Size()):
        u = torch.as_tensor(noise.take("categorical", self.probs.shape[:-1]), dtype=self.probs.dtype)
        return inverse_cdf(self.probs, u).long()

    def dropout(input, p=0.5, training=True, inplace=False):
        if not training or p == 0.0:
            return input
        return input * torch.as_tensor(noise.take("bernoulli", input.shape), dtype=input.dtype) * (1.0 / (1.0 - p))

    with mock.patch.object(torch_normal, "_standard_normal", standard_normal), \
            mock.patch.object(torch.distributions.Normal, "sample", sample), \
            mock.patch.object(torch.Tensor, "uniform_", uniform_), \
            mock.patch.object(torch.distributions.Categorical, "sample", categorical_sample), \
            mock.patch.object(torch.nn.functional, "dropout", dropout):
        yield noise


# ---- our side, reference files, captured losses, synthetic data ----
def ours(name: str):
    """One of this repository's algorithm modules (algorithms/<name>.py), imported by name as the scripts do."""
    import importlib
    path = str(REPO_ROOT / "algorithms")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)


def load_file(path: Path, name: str) -> types.ModuleType:
    """Execute one reference file as module `name` (not added to sys.modules: same-named files can coexist)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def record_backward():
    """Yields a list that receives (a detached copy of) every tensor torch's backward() is called on, in call
    order: the losses of reference code that does not return them."""
    from unittest import mock
    import torch
    losses, original = [], torch.Tensor.backward

    def backward(self, *args, **kwargs):
        losses.append(self.detach().clone())
        return original(self, *args, **kwargs)
    with mock.patch.object(torch.Tensor, "backward", backward):
        yield losses


def synthetic_data(episodes: list, max_episode_steps=None, dataset_id: str = "synthetic"):
    """An OfflineData (algorithms/data.py) flattened by data.py's own code from episode dicts (observations [T+1, d],
    actions [T, a], rewards [T], terminations [T]), e.g. to feed the same small dataset to both sides."""
    data = ours("data")
    arrays = data._flatten_episodes(episodes, None)
    obs = arrays["observations"]
    return data.OfflineData(dataset_id=dataset_id, mc_returns=data.monte_carlo_returns(
        arrays["rewards"], arrays["terminals"] | arrays["timeouts"], 0.99), obs_mean=obs.mean(0),
        obs_std=obs.std(0) + 1e-3, obs_keys=None, max_episode_steps=max_episode_steps, **arrays)


# ---- LayerNorm weights, integer draws, randn_like, Adam states, tree comparison ----
def layer_norm_tree(layers: list, names: list, get=None) -> dict:
    """Flax params of torch LayerNorm `layers`: {names[i]: {"scale": weight_i, "bias": bias_i}} (as dense_tree)."""
    if len(layers) != len(names):
        raise ValueError(f"{len(layers)} torch layers for {len(names)} flax names")
    get = get or (lambda p: p)
    tree = {}
    for layer, name in zip(layers, names):
        _put(tree, name, {"scale": to_numpy(get(layer.weight)).astype(np.float32),
                          "bias": to_numpy(get(layer.bias)).astype(np.float32)})
    return tree


def load_layer_norm_tree(tree: dict, names: list, layers: list, member=None):
    """Write flax LayerNorm params (`layer_norm_tree` layout; `member` i of an ensemble) into torch `layers`."""
    import torch
    with torch.no_grad():
        for layer, name in zip(layers, names):
            p = _get(tree, name)
            scale, bias = np.asarray(p["scale"]), np.asarray(p["bias"])
            if member is not None:
                scale, bias = scale[member], bias[member]
            layer.weight.copy_(torch.as_tensor(scale))
            layer.bias.copy_(torch.as_tensor(bias))


def merge_trees(*trees) -> dict:
    """Union of nested dicts (e.g. the dense_tree and the layer_norm_tree of one network)."""
    out = {}
    for tree in trees:
        for k, v in tree.items():
            out[k] = merge_trees(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Indices:
    """Integer draws for both sides, one instance per side (like Noise): `randint` arrays handed out by their upper
    bound and shape (so buffers sampled in another order on the two sides still get their own rows), `permutation`
    arrays in call order."""

    def __init__(self, randint=(), permutation=()):
        self.randint = [(int(high), np.asarray(a)) for high, a in randint]
        self.permutation = [np.asarray(a) for a in permutation]

    def take_randint(self, high, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        for i, (h, a) in enumerate(self.randint):
            if h == int(high) and a.shape == shape:
                return self.randint.pop(i)[1]
        left = [(h, a.shape) for h, a in self.randint]
        raise RuntimeError(f"no randint draw of shape {shape} below {high} left (have {left})")

    def take_permutation(self, n) -> np.ndarray:
        if not self.permutation or len(self.permutation[0]) != int(n):
            raise RuntimeError(f"no permutation of {n} left (have {[len(p) for p in self.permutation]})")
        return self.permutation.pop(0)

    def check_used(self):
        if self.randint or self.permutation:
            raise RuntimeError(f"indices not consumed: {len(self.randint)} randint, "
                               f"{len(self.permutation)} permutation")


@contextlib.contextmanager
def jax_indices(idx: Indices):
    """jax.random.randint (minval 0) / permutation (of an int) return `idx`'s arrays while active (keys ignored).
    Served through an ordered io_callback, so draws inside jit, lax.scan or lax.fori_loop bodies get a fresh array
    at every execution, in program order."""
    from unittest import mock
    import jax
    import jax.numpy as jnp
    from jax.experimental import io_callback

    def serve(take, shape, dtype):
        return io_callback(lambda: np.asarray(take(), dtype), jax.ShapeDtypeStruct(shape, dtype), ordered=True)

    def randint(key, shape, minval, maxval, dtype=jnp.int32):
        if int(minval) != 0:
            raise RuntimeError("jax_indices serves randint draws from 0 only")
        high, shape = int(maxval), tuple(int(s) for s in shape)
        return serve(lambda: idx.take_randint(high, shape), shape, dtype)

    def permutation(key, x, axis=0, independent=False):
        if not isinstance(x, int):
            raise RuntimeError("jax_indices serves permutations of range(n) only")
        return serve(lambda: idx.take_permutation(x), (x,), jnp.int32)

    with mock.patch.multiple(jax.random, randint=randint, permutation=permutation):
        yield idx


@contextlib.contextmanager
def torch_indices(idx: Indices):
    """np.random.randint (replay-buffer sampling) and torch.randperm (minibatch samplers) return `idx`'s arrays."""
    from unittest import mock
    import torch

    def randint(low, high=None, size=None, dtype=int):
        low, high = (0, low) if high is None else (low, high)
        if low != 0:
            raise RuntimeError("torch_indices serves randint draws from 0 only")
        shape = () if size is None else (size,) if np.isscalar(size) else tuple(size)
        return idx.take_randint(high, shape).astype(dtype)

    def randperm(n, *args, **kwargs):
        return torch.as_tensor(idx.take_permutation(n), dtype=torch.int64)

    with mock.patch.object(np.random, "randint", randint), mock.patch.object(torch, "randperm", randperm):
        yield idx


@contextlib.contextmanager
def torch_randn_like(noise):
    """torch.randn_like(x) takes the next 'normal' array of `noise` (a Noise) while active."""
    from unittest import mock
    import torch

    def randn_like(x, **kwargs):
        return torch.as_tensor(noise.take("normal", x.shape), dtype=x.dtype)
    with mock.patch.object(torch, "randn_like", randn_like):
        yield noise


# Both sides' Adam states start at step 0 with zero first moments and second moments ADAM_NU0. From all-zero
# second moments Adam's first step is lr * sign(g) wherever |g| >> eps, so a gradient element that float32
# round-off flips in sign would move its parameter by 2 lr on one side only; from nu0 > 0 the step is smooth in g.
# The first moment after the step is still 0.1 * g (Adam's first moment = the gradient, scaled).
ADAM_NU0 = 1e-6
ADAM_LATE_STEP = 10_000
# With nu0 = 1e-4 the step lr * m / sqrt(v) stays about linear in the gradient up to |g| ~ sqrt(nu0 / 0.001) = 0.3:
# a gradient element's round-off then moves its step by the same relative amount. From 1e-6 steps saturate at
# |g| ~ 0.03, and a leaf's mid-size steps, compared relative to its saturated largest one, amplify round-off.
ADAM_NU0_LINEAR = 1e-4


def preset_adam_torch(optimizer, nu0: float = ADAM_NU0, step: int = 0):
    """Give every parameter of a torch Adam optimiser the state (step, exp_avg 0, exp_avg_sq nu0). A late `step`
    (ADAM_LATE_STEP) keeps optax's float32 bias correction out of the comparison: it computes 1 - 0.999^t in
    float32, at t = 1 0.00099998713 where torch (float64) has 0.001: 6.4e-6 relative in the step; ~0 by t = 1e4."""
    import torch
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.full_like(p, nu0)}


def preset_adam_optax(opt_state, nu0: float = ADAM_NU0, step: int = 0):
    """An optax state whose ScaleByAdamState(s) have count `step`, mu 0 and nu = nu0 (other states unchanged)."""
    import jax
    import jax.numpy as jnp
    import optax
    if isinstance(opt_state, optax.ScaleByAdamState):
        return optax.ScaleByAdamState(jnp.full_like(opt_state.count, step),
                                      jax.tree.map(jnp.zeros_like, opt_state.mu),
                                      jax.tree.map(lambda x: jnp.full_like(x, nu0), opt_state.nu))
    if isinstance(opt_state, tuple):
        parts = [preset_adam_optax(s, nu0, step) for s in opt_state]
        return type(opt_state)(*parts) if hasattr(opt_state, "_fields") else tuple(parts)
    return opt_state


def optax_first_moment(opt_state):
    """mu of the (first) ScaleByAdamState inside an optax state."""
    import optax
    if isinstance(opt_state, optax.ScaleByAdamState):
        return opt_state.mu
    for s in opt_state if isinstance(opt_state, tuple) else ():
        mu = optax_first_moment(s)
        if mu is not None:
            return mu
    return None


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _leaves(tree[k], f"{prefix}/{k}" if prefix else str(k))]
    return [(prefix, tree)]


def compare_trees(rows: list, algo: str, reference: str, phase: str, setting: str, quantity: str, ours, ref,
                  tol: float = TOLERANCE, note: str = "", floor: float = 0.0) -> dict:
    """One row for two param trees (nested dicts, same keys): the leaf with the largest relative difference (each
    leaf relative to its own max |ref|, so small leaves such as biases are not hidden by large ones). `floor` > 0:
    a leaf's scale is at least floor x the tree's largest |ref|: for gradients, where a leaf that is a sum
    cancelling to near 0 (e.g. a log-std multiplier's sum of g * raw over the batch) carries the round-off of its
    summands, not of its sum."""
    a, b = dict(_leaves(ours)), dict(_leaves(ref))
    if a.keys() != b.keys():
        raise ValueError(f"{quantity}: trees differ: ours only {sorted(a.keys() - b.keys())}, "
                         f"reference only {sorted(b.keys() - a.keys())}")
    low = floor * max((float(np.max(np.abs(to_numpy(x)))) for x in b.values() if np.size(x)), default=0.0)

    def rel(k):
        diff = rel_diff(a[k], b[k])[1]
        scale = max(float(np.max(np.abs(to_numpy(b[k])))) if np.size(b[k]) else 0.0, low)
        return diff / scale if scale > 0 else diff
    worst = max(a, key=rel)
    where = f"worst of {len(a)} leaves: {worst}" if len(a) > 1 else ""
    row = compare(rows, algo, reference, phase, setting, quantity, a[worst], b[worst], tol,
                  "; ".join(x for x in (note, where) if x))
    if floor:
        row.update(max_rel_diff=rel(worst), passed=bool(rel(worst) <= tol))
    return row


def compare_all(rows: list, algo: str, reference: str, phase: str, setting: str, quantities: dict,
                note: str = "", by_design: str = "") -> list:
    """compare() (compare_trees() for dict trees) for every {quantity: (ours, reference)}; `by_design` (the
    documented deviation that makes our default differ) labels the rows 'default differs by design: ...' so a
    difference is reported, not failed."""
    note = f"default differs by design: {by_design}" + (f"; {note}" if note else "") if by_design else note
    return [(compare_trees if isinstance(a, dict) else compare)(rows, algo, reference, phase, setting, q, a, b,
                                                                note=note) for q, (a, b) in quantities.items()]


def perturb_(torch_module, scale: float = 0.01, seed: int = 0):
    """Add N(0, scale^2) to every parameter in place (e.g. a target network that is no copy of its critic)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in torch_module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


# ---- batches, episodes and torch trees shared by the adapters ----
BATCH = 256  # batch size of all configs


def random_batch(rng, obs_dim: int, act_dim: int, sparse: bool, online_rows: int = 0) -> dict:
    """A batch of raw transitions: states with a non-trivial mean/std, actions in (-1, 1), rewards already
    transformed (AntMaze: r - 1 of 0/1 rewards), terminals at successes of the last `online_rows` rows
    (terminate_on_success online) and nowhere else (Minari's continuing AntMaze data has none)."""
    obs_mean = rng.normal(size=obs_dim).astype(np.float32)
    obs_std = (rng.uniform(0.5, 2.0, obs_dim) + 1e-3).astype(np.float32)
    obs = (obs_mean + obs_std * rng.normal(size=(2, BATCH, obs_dim))).astype(np.float32)
    success = rng.random(BATCH) < 0.2
    rew = success - 1.0 if sparse else rng.normal(size=BATCH)
    done = success & (np.arange(BATCH) >= BATCH - online_rows) if sparse else rng.random(BATCH) < 0.05
    return {"obs": obs[0], "act": rng.uniform(-0.99, 0.99, (BATCH, act_dim)).astype(np.float32),
            "rew": rew.astype(np.float32), "next_obs": obs[1], "done": done.astype(np.float32),
            "obs_mean": obs_mean, "obs_std": obs_std}


def torch_f32(x):
    """A float32 torch tensor of an array."""
    import torch
    return torch.as_tensor(np.asarray(x, np.float32))


def torch_trees(layers_by_net: dict, scalars: dict, get=None) -> dict:
    """{net: flax-layout tree} of torch nets; layers_by_net[net] = (layer lists per ensemble member, names)
    (one list: a single network); scalars[net] = {name: torch parameter} joined into that net's tree."""
    get = get or (lambda p: p)
    out = {}
    for net, (members, names) in layers_by_net.items():
        trees = [dense_tree(layers, names, get) for layers in members]
        out[net] = stack_members(trees) if len(trees) > 1 else trees[0]
        out[net].update({k: to_numpy(get(p)).astype(np.float32) for k, p in scalars.get(net, {}).items()})
    return out


def synthetic_episode(rng, rewards, terminal: bool, obs_dim=4, act_dim=2) -> dict:
    """One episode dict (observations T+1, a random walk) with the given rewards."""
    n = len(rewards)
    obs = np.cumsum(rng.normal(size=(n + 1, obs_dim)), 0).astype(np.float32)
    term = np.zeros(n, bool)
    term[-1] = terminal
    return {"observations": obs, "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
            "rewards": np.asarray(rewards, np.float32), "terminations": term}


def locomotion_episodes(rng) -> list:
    """Dense-reward episodes in our flat layout: terminated ones, one ended by the 1000-step time limit, and a last
    one cut short by the end of the data (a fragment: the smallest return, but no complete episode)."""
    eps = [synthetic_episode(rng, rng.uniform(0.5, 3.0, n), True) for n in (120, 300, 45)]
    eps.append(synthetic_episode(rng, rng.uniform(0.5, 3.0, 1000), False))
    eps.append(synthetic_episode(rng, rng.uniform(0.5, 3.0, 80), True))
    eps.append(synthetic_episode(rng, rng.uniform(0.0, 0.5, 12), False))  # fragment
    return eps


def antmaze_episodes(rng, limit: int) -> list:
    """Sparse 0/1-reward episodes: all failures to the time limit; success ending the episode (terminal, D4RL eval /
    terminate_on_success); success mid-episode then failures to the time limit (continuing task); success at the
    time limit; and a cut all-failure fragment."""
    middle = np.zeros(limit)
    middle[40:46] = 1.0
    at_limit = np.zeros(limit)
    at_limit[-1] = 1.0
    ep = synthetic_episode
    return [ep(rng, np.zeros(limit), False), ep(rng, np.r_[np.zeros(59), 1.0], True), ep(rng, middle, False),
            ep(rng, at_limit, False), ep(rng, np.zeros(30), False)]


# ---- learning runs: the reference trains on our dataset and env through gym/d4rl/wandb stand-ins ----
class OldGymEnv:
    """The gym < 0.26 API that the references expect, over this repository's gymnasium env of a dataset
    (`data.make_env`): reset() -> obs, step(a) -> (obs, r, done, info) with info['TimeLimit.truncated'] at a time
    limit, seed(s) seeds the next reset, get_normalized_score(return) as D4RL's (a fraction, not x100),
    get_dataset() the dataset in D4RL's layout, `_max_episode_steps` the time limit."""

    def __init__(self, dataset_id: str, env=None):
        data = ours("data")
        self.dataset_id = dataset_id
        self.env = data.make_env(dataset_id, eval_env=True) if env is None else env
        self.ref_min_score, self.ref_max_score = data.reference_scores(dataset_id)
        self.observation_space, self.action_space = self.env.observation_space, self.env.action_space
        self._max_episode_steps = self.env.spec.max_episode_steps
        self.spec = types.SimpleNamespace(id=dataset_id, max_episode_steps=self._max_episode_steps)
        self.metadata, self.reward_range = getattr(self.env, "metadata", {}), (-float("inf"), float("inf"))
        self._next_seed = None

    @property
    def unwrapped(self):
        return self

    def seed(self, seed=None):
        self._next_seed = None if seed is None else int(seed)
        return [seed]

    def reset(self, **_):
        obs, _ = self.env.reset(seed=self._next_seed)
        self._next_seed = None
        return obs

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(np.asarray(action, np.float32))
        info = dict(info)
        if truncated and not terminated:
            info["TimeLimit.truncated"] = True
        return obs, float(reward), bool(terminated or truncated), info

    def get_normalized_score(self, score):
        return (score - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)

    def get_dataset(self, **_):
        return qlearning_dataset(ours("data").load_dataset(self.dataset_id))

    def render(self, *_, **__):
        return None

    def close(self):
        self.env.close()


class Wrapper:
    """gym.Wrapper (old API): delegates everything to `env`."""

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)

    def reset(self, **kwargs):
        return self.env.reset(**kwargs)

    def step(self, action):
        return self.env.step(action)


class TransformObservation(Wrapper):
    def __init__(self, env, f):
        super().__init__(env)
        self.f = f

    def reset(self, **kwargs):
        return self.f(self.env.reset(**kwargs))

    def step(self, action):
        obs, reward, done, info = self.env.step(action)
        return self.f(obs), reward, done, info


class TransformReward(Wrapper):
    def __init__(self, env, f):
        super().__init__(env)
        self.f = f

    def step(self, action):
        obs, reward, done, info = self.env.step(action)
        return obs, self.f(reward), done, info


class WandbRecorder:
    """A wandb stand-in that hands every `wandb.log(dict, step=...)` to `on_log(dict, step)` (the adapter turns
    the reference's evaluation logs into eval.jsonl records); init/finish/config do nothing."""

    def __init__(self, on_log):
        self.on_log = on_log

    def module(self) -> types.ModuleType:
        class Run:
            def __getattr__(self, _):
                return lambda *a, **k: None
        return module("wandb", init=lambda *a, **k: Run(), log=lambda d, step=None, **k: self.on_log(dict(d), step),
                      finish=lambda *a, **k: None, config={}, run=Run(), save=lambda *a, **k: None,
                      watch=lambda *a, **k: None)


def learning_stand_ins(dataset_id: str, on_log) -> dict:
    """sys.modules entries for a reference's training run on `dataset_id`: gym.make(any name) is that dataset's env
    (OldGymEnv), d4rl serves its data (qlearning_dataset(env) / env.get_dataset() / get_normalized_score), wandb
    logs go to `on_log`."""
    import gymnasium
    ds_env = lambda *_, **__: OldGymEnv(dataset_id)  # noqa: E731
    wrappers = module("gym.wrappers", TransformObservation=TransformObservation, TransformReward=TransformReward,
                      TimeLimit=Wrapper, RecordEpisodeStatistics=Wrapper)
    gym = module("gym", Env=OldGymEnv, Wrapper=Wrapper, wrappers=wrappers, spaces=gymnasium.spaces, make=ds_env,
                 __version__="0.23.1")

    def get_normalized_score(_name, score):
        lo, hi = ours("data").reference_scores(dataset_id)
        return (np.asarray(score) - lo) / (hi - lo)
    def serve(*_, **__):
        return qlearning_dataset(ours("data").load_dataset(dataset_id))
    d4rl = module("d4rl", qlearning_dataset=serve, get_normalized_score=get_normalized_score,
                  gym_mujoco=module("d4rl.gym_mujoco"))
    return {"gym": gym, "gym.wrappers": wrappers, "gym.spaces": gymnasium.spaces, "d4rl": d4rl,
            "d4rl.gym_mujoco": d4rl.gym_mujoco, "wandb": WandbRecorder(on_log).module()}


REFERENCE_KEY = {"calql_official": "calql"}  # adapter module -> its key in REFERENCES (else the same name)


def require(cfg, reference: str, **expected):
    """ValueError naming every field of our config whose value the reference cannot run (it hard-codes another)."""
    def value(k):
        v = getattr(cfg, k)
        return tuple(v) if isinstance(v, list) else v
    bad = [f"{k}={value(k)!r} (the reference has {v!r})" for k, v in expected.items() if value(k) != v]
    if bad:
        raise ValueError(f"{reference} cannot run this config: " + ", ".join(bad) + "; set those fields to the "
                         "reference's values in the parity protocol")


def require_multiples(cfg, reference: str, **pairs):
    """ValueError unless each budget field is a positive multiple of its evaluation period field (pairs: budget=
    period): `reference` evaluates only at multiples of its period, ours also at the end of a phase."""
    for budget, every in pairs.items():
        b, e = getattr(cfg, budget), getattr(cfg, every)
        if b <= 0 or b % e:
            raise ValueError(f"{reference} evaluates only at multiples of its period: {budget} ({b}) must be a "
                             f"positive multiple of {every} ({e}) to reproduce our evaluation schedule")
