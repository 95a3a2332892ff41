"""Dataset utility shared by the o2o-jax algorithm files (the only shared module).

    import data
    ds = data.load_dataset("o2o/hopper/medium-v0", gamma=0.99)   # flat NumPy arrays, see OfflineData
    env = data.make_env("o2o/hopper/medium-v0")                    # evaluation env, flat observations
    data.normalized_score("o2o/hopper/medium-v0", episode_return)  # D4RL score: 0 random, 100 expert

IDs:
- local D4RL-style locomotion: `o2o/{hopper,walker2d,halfcheetah}/{random,medium,medium-replay,
  medium-expert,expert}-v0`, built from the policies shipped in `benchmarks/behavior_policies/`
  automatically on first use (by `benchmarks/make_datasets.py`, which also builds them by hand);
- official Minari IDs (`D4RL/antmaze/umaze-v1`, `mujoco/hopper/medium-v0`, ...): loaded from the local
  Minari store (`$MINARI_DATASETS_PATH`, default ~/.minari/datasets), downloaded when missing and the
  network answers. A download never hangs: `HF_HUB_OFFLINE=1` fails at once, an unreachable or silent
  endpoint (`HF_ENDPOINT`, default huggingface.co) fails after `PROBE_TIMEOUT_S` seconds.

Flattening (D4RL's `qlearning_dataset` conventions, except that no transition is dropped):
- an episode of T steps has T+1 observations: observations = o[:-1], next_observations = o[1:];
- `terminals` are true terminations only; `timeouts` mark episode ends that are not terminations
  (time limits, or data cut off), where a critic should bootstrap from next_observations;
- `mc_returns[t] = sum_k gamma^k r[t+k]` to the end of t's episode (no bootstrap at a timeout);
- `episode_returns(ds)`: returns of the complete episodes only (ended by a termination or the time limit,
  not cut short by the end of a collection run), e.g. for reward normalisation by the return range;
- Dict observations are concatenated in the order of `DICT_OBS_KEYS` (AntMaze: observation (27),
  achieved_goal (2, the ant's x-y), desired_goal (2)), the same order `make_env` uses.
The flat arrays are cached next to the dataset (`<dataset dir>/o2o_flat_cache.npz`).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOCAL_NAMESPACE = "o2o"
LOCAL_ENVS = {"hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "halfcheetah": "HalfCheetah-v5"}
LOCAL_LEVELS = ("random", "medium", "medium-replay", "medium-expert", "expert")
LOCAL_VERSION = 0
DICT_OBS_KEYS = ("observation", "achieved_goal", "desired_goal")  # other Dict keys follow, sorted
PROBE_TIMEOUT_S = 6.0
REPO_ROOT = Path(__file__).resolve().parent.parent

# Official Minari datasets this project knows (a typo in these namespaces is caught offline).
_MAZES = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
KNOWN_REMOTE = (
    [f"D4RL/antmaze/{m}-v1" for m in _MAZES]
    + [f"D4RL/{t}/{q}-v2" for t in ("door", "hammer", "pen", "relocate") for q in ("human", "cloned", "expert")]
    + [f"D4RL/kitchen/{q}-v2" for q in ("complete", "partial", "mixed")]
    + [f"mujoco/{e}/{q}-v0" for e in ("halfcheetah", "hopper", "walker2d", "ant", "humanoid")
       for q in ("expert", "medium", "simple")])
# D4RL's published (random, expert) returns, used when a D4RL/ dataset lacks reference scores.
D4RL_REF_SCORES = {
    "antmaze": (0.0, 1.0), "kitchen": (0.0, 4.0), "door": (-56.512833, 2880.5693087298737),
    "hammer": (-274.856578, 12794.134825156867), "pen": (96.262799, 3076.8331017826877),
    "relocate": (-6.425911, 4233.877797728884)}


class DatasetError(Exception):
    """A dataset ID, file or space that o2o-jax cannot use; the message says what to do."""


@dataclass
class OfflineData:
    """Flat transitions of a dataset (float32, bool for masks), row t = (s_t, a_t, r_t, s_{t+1})."""
    dataset_id: str
    observations: np.ndarray       # [N, obs_dim]
    actions: np.ndarray            # [N, act_dim]
    rewards: np.ndarray            # [N]
    next_observations: np.ndarray  # [N, obs_dim]
    terminals: np.ndarray          # [N] bool, true terminations only
    timeouts: np.ndarray           # [N] bool, episode ended without termination (bootstrap here)
    mc_returns: np.ndarray         # [N] discounted return-to-go within the episode
    obs_mean: np.ndarray           # [obs_dim] for normalisation
    obs_std: np.ndarray            # [obs_dim] std + 1e-3, never 0
    obs_keys: tuple | None         # order of Dict observation keys, None for Box observations
    max_episode_steps: int | None = None  # the env's time limit (dataset env spec), None if unknown

    @property
    def episode_ends(self) -> np.ndarray:
        return self.terminals | self.timeouts

    def __len__(self):
        return len(self.rewards)


# ---- IDs and the local store ----
def parse_local_id(dataset_id: str):
    """(env, level) for an `o2o/...` ID, None for other namespaces; DatasetError for a malformed one."""
    if not dataset_id.startswith(LOCAL_NAMESPACE + "/"):
        return None
    m = re.fullmatch(rf"{LOCAL_NAMESPACE}/([a-z0-9]+)/([a-z-]+)-v(\d+)", dataset_id)
    valid = [local_id(e, lvl) for e in LOCAL_ENVS for lvl in LOCAL_LEVELS]
    if not m or m[1] not in LOCAL_ENVS or m[2] not in LOCAL_LEVELS or int(m[3]) != LOCAL_VERSION:
        close = difflib.get_close_matches(dataset_id, valid, n=3)
        raise DatasetError(f"unknown local dataset id '{dataset_id}'"
                           + (f"; did you mean {' or '.join(close)}?" if close else "")
                           + f" Local ids are {LOCAL_NAMESPACE}/<{'|'.join(LOCAL_ENVS)}>/"
                           f"<{'|'.join(LOCAL_LEVELS)}>-v{LOCAL_VERSION}.")
    return m[1], m[2]


def local_id(env: str, level: str) -> str:
    return f"{LOCAL_NAMESPACE}/{env}/{level}-v{LOCAL_VERSION}"


def dataset_dir(dataset_id: str) -> Path:
    root = os.environ.get("MINARI_DATASETS_PATH") or os.path.join(os.path.expanduser("~"), ".minari", "datasets")
    return Path(root) / dataset_id


def is_local(dataset_id: str) -> bool:
    return (dataset_dir(dataset_id) / "data" / "metadata.json").exists()


def ensure_dataset(dataset_id: str, build: bool = True, download: bool = True, build_size: int | None = None):
    """Make `dataset_id` present in the local Minari store (build a local one, download an official one).

    `build_size` overrides the D4RL size of a local dataset built here (tests use tiny ones)."""
    if not isinstance(dataset_id, str) or not dataset_id:
        raise DatasetError(f"dataset id must be a non-empty string, got {dataset_id!r}")
    if is_local(dataset_id):
        return
    parsed = parse_local_id(dataset_id)
    if parsed is not None:
        if not build:
            raise DatasetError(f"local dataset '{dataset_id}' is not built in {dataset_dir(dataset_id)}; run "
                               f"`python benchmarks/make_datasets.py --env {parsed[0]} --level {parsed[1]}`")
        _make_datasets_module().build(*parsed, size=build_size)
        return
    namespace = dataset_id.split("/")[0]
    if namespace in ("D4RL", "mujoco") and dataset_id not in KNOWN_REMOTE:
        close = difflib.get_close_matches(dataset_id, KNOWN_REMOTE, n=3)
        raise DatasetError(f"unknown dataset id '{dataset_id}'" + (f"; did you mean {' or '.join(close)}?" if close
                           else f"; known ids in {namespace}/: {[k for k in KNOWN_REMOTE if k.startswith(namespace)]}"))
    if not download:
        raise DatasetError(f"dataset '{dataset_id}' is not in the local Minari store ({dataset_dir(dataset_id)})")
    _download(dataset_id)


def _make_datasets_module():
    path = REPO_ROOT / "benchmarks" / "make_datasets.py"
    if not path.exists():
        raise DatasetError(f"cannot build local datasets: {path} is missing (clone the whole o2o-jax repository)")
    import sys
    if str(path.parent) not in sys.path:  # importable by name, so its spawned rollout workers find it too
        sys.path.insert(0, str(path.parent))
    import make_datasets
    return make_datasets


def _download(dataset_id: str) -> None:
    where = f"'{dataset_id}' is not in the local Minari store ({dataset_dir(dataset_id)})"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise DatasetError(f"{where} and downloads are disabled (HF_HUB_OFFLINE=1): unset it, or run "
                           f"`minari download {dataset_id}` where there is network and copy the folder here")
    if importlib.util.find_spec("huggingface_hub") is None:
        raise DatasetError(f"{where}; downloading needs huggingface_hub: pip install 'minari[hf]'")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    result = {}

    def probe():  # in a thread: DNS lookups ignore socket timeouts, a silent server may never answer
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint + "/api/datasets?limit=1", method="HEAD"),
                                   timeout=PROBE_TIMEOUT_S)
            result["ok"] = True
        except urllib.error.HTTPError:  # the server answered: good enough
            result["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure means no usable network
            result["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1.0)
    if not result.get("ok"):
        reason = result.get("error", f"no answer within {PROBE_TIMEOUT_S:.0f} s")
        raise DatasetError(f"{where} and {endpoint} cannot be reached ({reason}); download it where there is "
                           f"network (`minari download {dataset_id}`) and copy it to {dataset_dir(dataset_id)}")
    import minari
    try:
        minari.download_dataset(dataset_id)
    except Exception as e:  # noqa: BLE001 - minari raises ValueError, httpx errors, ...
        raise DatasetError(f"downloading '{dataset_id}' failed: {type(e).__name__}: {e}") from e


# ---- spaces ----
def dict_obs_keys(space) -> tuple:
    keys = list(space.spaces)
    return tuple([k for k in DICT_OBS_KEYS if k in keys] + sorted(k for k in keys if k not in DICT_OBS_KEYS))


def check_spaces(observation_space, action_space, dataset_id: str = "") -> tuple | None:
    """Raise DatasetError unless observations are (a Dict of) 1-D Boxes and actions a 1-D Box in [-1, 1].

    Returns the Dict key order, or None for Box observations."""
    from gymnasium import spaces
    what = f"dataset/env '{dataset_id}'" if dataset_id else "environment"
    if not isinstance(action_space, spaces.Box) or len(action_space.shape) != 1:
        raise DatasetError(f"{what} has action space {action_space}: o2o-jax algorithms need continuous "
                           "1-D Box actions (discrete actions are not supported)")
    if not (np.allclose(action_space.low, -1) and np.allclose(action_space.high, 1)):
        raise DatasetError(f"{what} has actions in [{action_space.low}, {action_space.high}]: the tanh actors "
                           "need [-1, 1]; wrap the env in gymnasium.wrappers.RescaleAction(env, -1, 1) and "
                           "rescale the dataset actions")
    boxes = observation_space.spaces if isinstance(observation_space, spaces.Dict) else {"": observation_space}
    for key, box in boxes.items():
        if not isinstance(box, spaces.Box) or len(box.shape) != 1:
            raise DatasetError(f"{what} has observation space {observation_space}: o2o-jax needs a 1-D Box or a "
                               f"Dict of 1-D Boxes (offending part: {key or 'observation'} = {box})")
    return dict_obs_keys(observation_space) if isinstance(observation_space, spaces.Dict) else None


def flatten_obs(obs, keys: tuple | None) -> np.ndarray:
    """Concatenate Dict observations (single or batched along axis 0) in `keys` order."""
    if keys is None:
        return np.asarray(obs, dtype=np.float32)
    return np.concatenate([np.asarray(obs[k], dtype=np.float32) for k in keys], axis=-1)


# ---- episodes ----
def episode_bounds(episode_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, last) row of every episode; rows after the last episode end form one more episode."""
    last = np.flatnonzero(episode_ends)
    if len(episode_ends) and (len(last) == 0 or last[-1] != len(episode_ends) - 1):
        last = np.append(last, len(episode_ends) - 1)
    return np.concatenate([[0], last[:-1] + 1]).astype(int), last


def episode_returns(ds: OfflineData, complete_only: bool = True) -> np.ndarray:
    """Undiscounted return of every episode (float64), for reward normalisation by the return range.

    complete_only: only episodes that ended by a termination or at the env's time limit (length >=
    `ds.max_episode_steps`). An episode cut short by the end of a data-collection run is a fragment without a
    complete return: each rollout chunk of benchmarks/make_datasets.py ends with one (the next chunk starts from
    a fresh reset, so it is never continued), as does the end of a D4RL file, which CORL's
    `return_reward_range` (episodes end at a terminal or after max_episode_steps rows, the unfinished rest is
    dropped) never counts either. With the time limit unknown every episode end counts as complete; if no
    episode is complete, all are returned."""
    first, last = episode_bounds(ds.episode_ends)
    returns = np.add.reduceat(ds.rewards.astype(np.float64), first) if len(first) else np.zeros(0)
    if not complete_only or ds.max_episode_steps is None:
        return returns
    complete = ds.terminals[last] | (last - first + 1 >= ds.max_episode_steps)
    return returns[complete] if complete.any() else returns


# ---- loading ----
def monte_carlo_returns(rewards: np.ndarray, episode_ends: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted return-to-go of every transition, restarting at each episode end (no bootstrap)."""
    out = np.zeros(len(rewards), np.float64)
    g = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        g = rewards[t] + gamma * g * (1.0 - episode_ends[t])
        out[t] = g
    return out.astype(np.float32)


def _h5_episodes(h5_path: Path):
    """Episodes straight from Minari's HDF5 file (groups episode_<id>), in id order: much faster than
    minari's iterate_episodes for datasets of many short episodes. None if the layout is not the expected one."""
    import h5py

    def read(node):
        return {k: read(v) for k, v in node.items()} if isinstance(node, h5py.Group) else node[()]
    with h5py.File(h5_path, "r") as f:
        names = list(f.keys())
        if not names or not all(n.startswith("episode_") and n[8:].isdigit() for n in names):
            return None
        for name in sorted(names, key=lambda n: int(n[8:])):
            g = f[name]
            if not {"observations", "actions", "rewards", "terminations"} <= set(g.keys()):
                return None
            yield {k: read(g[k]) for k in ("observations", "actions", "rewards", "terminations")}


def _iterate_episodes(dataset, h5_path: Path):
    episodes = _h5_episodes(h5_path) if h5_path.exists() else None
    if episodes is not None:
        try:
            first = next(episodes)
        except StopIteration:
            first = None
        if first is not None:
            yield first
            yield from episodes
            return
    for ep in dataset.iterate_episodes():
        yield {"observations": ep.observations, "actions": ep.actions, "rewards": ep.rewards,
               "terminations": ep.terminations}


def _flatten_episodes(episodes, keys):
    """Flat transition arrays from episode dicts (observations has one row more than the other fields)."""
    obs, next_obs, acts, rews, terms, truncs = [], [], [], [], [], []
    for ep in episodes:
        o = flatten_obs(ep["observations"], keys)
        obs.append(o[:-1])
        next_obs.append(o[1:])
        n = len(ep["rewards"])
        acts.append(np.asarray(ep["actions"], np.float32).reshape(n, -1))
        rews.append(np.asarray(ep["rewards"], np.float32))
        terms.append(np.asarray(ep["terminations"], bool))
        end = np.zeros(n, bool)
        end[-1] = True  # an episode's last step ends it, whether truncated, cut or terminal
        truncs.append(end & ~terms[-1])
    cat = np.concatenate
    return dict(observations=cat(obs), next_observations=cat(next_obs), actions=cat(acts), rewards=cat(rews),
                terminals=cat(terms), timeouts=cat(truncs))


def _cache_path(dataset_id: str) -> Path:
    return dataset_dir(dataset_id) / "o2o_flat_cache.npz"


def _cache_stamp(dataset, keys, h5: Path) -> str:
    """Identifies the HDF5 file the flat cache was made from (a rebuilt dataset invalidates the cache)."""
    return f"{keys}|{h5.stat().st_size}|{h5.stat().st_mtime_ns}|{dataset.total_steps}" if h5.exists() else ""


def _save_cache(cache: Path, stamp: str, arrays: dict):
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, stamp=stamp, **arrays)
    os.replace(tmp, cache)


def write_flat_cache(dataset_id: str, episodes) -> None:
    """Write the flat-array cache of a dataset just created from `episodes` (dicts of observations, actions,
    rewards, terminations), so its first load skips reading it back episode by episode."""
    import minari
    dataset = minari.load_dataset(dataset_id)
    keys = check_spaces(dataset.observation_space, dataset.action_space, dataset_id)
    stamp = _cache_stamp(dataset, keys, dataset_dir(dataset_id) / "data" / "main_data.hdf5")
    _save_cache(_cache_path(dataset_id), stamp, _flatten_episodes(episodes, keys))


def _rebuild_hint(dataset_id: str) -> str:
    if is_local(dataset_id):
        env, level = parse_local_id(dataset_id)[:2]
        return f"rebuild it with: python benchmarks/make_datasets.py --env {env} --level {level} --force"
    return f"delete {dataset_dir(dataset_id)} and download it again: minari download {dataset_id}"


def check_finite(arrays: dict, dataset_id: str, source: Path):
    """NaN / inf in a dataset (e.g. a file garbled mid-way) stop the load with the count and the fix."""
    for k, v in arrays.items():
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            raise DatasetError(f"dataset '{dataset_id}' ({source}): {int(np.sum(~np.isfinite(v)))} non-finite values "
                               f"in {k}; the file is damaged: {_rebuild_hint(dataset_id)}")


def load_dataset(dataset_id: str, gamma: float = 0.99, build: bool = True, download: bool = True,
                 build_size: int | None = None) -> OfflineData:
    """Flat arrays of a Minari dataset (building or downloading it first when missing)."""
    ensure_dataset(dataset_id, build=build, download=download, build_size=build_size)
    import minari
    try:
        dataset = minari.load_dataset(dataset_id)
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"cannot open dataset '{dataset_id}' at {dataset_dir(dataset_id)} ({type(e).__name__}: "
                           f"{e}); if its files are damaged, {_rebuild_hint(dataset_id)}") from e
    keys = check_spaces(dataset.observation_space, dataset.action_space, dataset_id)
    h5 = dataset_dir(dataset_id) / "data" / "main_data.hdf5"
    cache, stamp = _cache_path(dataset_id), _cache_stamp(dataset, keys, h5)
    arrays = None
    if cache.exists():
        try:
            with np.load(cache) as z:
                if stamp and str(z["stamp"]) == stamp:
                    arrays = {k: z[k] for k in z.files if k != "stamp"}
        except Exception as e:  # noqa: BLE001 (truncated or garbled: rebuilt below from the dataset file)
            print(f"warning: the flat cache {cache} is unreadable ({type(e).__name__}); rebuilding it")
    if arrays is None:
        try:
            arrays = _flatten_episodes(_iterate_episodes(dataset, h5), keys)
        except Exception as e:  # noqa: BLE001
            raise DatasetError(f"the file of dataset '{dataset_id}' ({h5}) is unreadable ({type(e).__name__}: {e}); "
                               f"{_rebuild_hint(dataset_id)}") from e
        check_finite(arrays, dataset_id, h5)
        _save_cache(cache, stamp, arrays)
    check_finite(arrays, dataset_id, cache)
    ends = arrays["terminals"] | arrays["timeouts"]
    obs = arrays["observations"]
    return OfflineData(dataset_id=dataset_id, mc_returns=monte_carlo_returns(arrays["rewards"], ends, gamma),
                       obs_mean=obs.mean(0), obs_std=obs.std(0) + 1e-3, obs_keys=keys,
                       max_episode_steps=getattr(dataset.env_spec, "max_episode_steps", None), **arrays)


# ---- environments and scores ----
def make_env(dataset_id: str, eval_env: bool = True, **kwargs):
    """The dataset's (evaluation) environment, its Dict observations flattened like `load_dataset` does."""
    import gymnasium as gym
    import minari
    ensure_dataset(dataset_id)
    dataset = minari.load_dataset(dataset_id)
    try:
        env = dataset.recover_environment(eval_env=eval_env, **kwargs)
    except gym.error.NameNotFound:  # AntMaze, Adroit, PointMaze... register on import
        try:
            import gymnasium_robotics  # noqa: F401
        except ImportError as e:
            raise DatasetError(f"the environment of '{dataset_id}' needs gymnasium-robotics: "
                               "pip install gymnasium-robotics") from e
        env = dataset.recover_environment(eval_env=eval_env, **kwargs)
    keys = check_spaces(env.observation_space, env.action_space, dataset_id)
    if keys is not None:
        low = np.concatenate([env.observation_space[k].low for k in keys]).astype(np.float32)
        high = np.concatenate([env.observation_space[k].high for k in keys]).astype(np.float32)
        env = gym.wrappers.TransformObservation(env, lambda o: flatten_obs(o, keys),
                                                gym.spaces.Box(low, high, dtype=np.float32))
    return env


def reference_scores(dataset_id: str) -> tuple[float, float]:
    """(ref_min_score, ref_max_score) from the dataset metadata, else D4RL's constants for D4RL/ IDs."""
    import minari
    ensure_dataset(dataset_id)
    meta = minari.load_dataset(dataset_id).storage.metadata
    lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")
    if lo is not None and hi is not None:
        return float(lo), float(hi)
    parts = dataset_id.split("/")
    if parts[0] == "D4RL" and len(parts) == 3 and parts[1] in D4RL_REF_SCORES:
        return D4RL_REF_SCORES[parts[1]]
    raise DatasetError(f"dataset '{dataset_id}' has no reference scores (ref_min_score/ref_max_score in its "
                       "metadata), so no normalised score exists for it; report raw returns instead")


def normalized_score(dataset_id: str, returns, refs: tuple[float, float] | None = None):
    """D4RL normalised score 100 * (return - ref_min) / (ref_max - ref_min); 0 = random, 100 = expert."""
    lo, hi = refs if refs is not None else reference_scores(dataset_id)
    return 100.0 * (np.asarray(returns, np.float64) - lo) / (hi - lo)
