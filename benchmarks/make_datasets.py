"""Build the local D4RL-style locomotion datasets (`o2o/<env>/<level>-v0`) as Minari datasets.

    python benchmarks/make_datasets.py --env hopper --level medium         # one dataset
    python benchmarks/make_datasets.py --env all --level all               # all fifteen
    python benchmarks/make_datasets.py --env hopper --level expert --size 100000 --force

Levels, as D4RL built them (Fu et al. 2020), from the SAC policies in `behavior_policies/<env>/`
(trained by `train_behavior.py`; `--select` below copies them there):
- random: uniform random actions;
- medium / expert: the medium (about a third of expert return) / final SAC actor, actions sampled from
  the stochastic tanh-Gaussian policy, as the data-collecting agent did;
- medium-replay: the stream of transitions the SAC agent collected until the medium checkpoint,
  replayed: uniform actions for the first `start_steps`, then for each `snapshot_every` window the
  actor snapshot from the start of that window (during training the actor changed every update, so this
  is the snapshot-granular version of the real replay buffer; 10k-step snapshots);
- medium-expert: the medium and expert datasets' episodes together.
Sizes: 1M transitions for random/medium/expert (D4RL's), medium-replay = the steps before the medium
checkpoint; `--size N` scales any of them (medium-replay: every window shrinks in proportion).
Episodes use the gymnasium v5 time limit (1000 steps); the last episode of a rollout chunk is cut
at the chunk's size and stored as truncated. Observations and actions are stored as float32.

Reference scores in every dataset's metadata: ref_min_score = mean return of the uniform random
policy, ref_max_score = mean return of the (stochastic) expert policy, each over 100 episodes, measured
once by `--select` and stored in `behavior_policies/<env>/policies.json`.

    python benchmarks/make_datasets.py --select --env hopper --workdir /path/to/behavior_runs/hopper_seed0
picks expert = the final snapshot (or --expert_step) and medium = the first snapshot whose stochastic
return reaches a third of the expert's, and copies the files the datasets need.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
POLICY_ROOT = HERE / "behavior_policies"
sys.path.insert(0, str(HERE.parent / "algorithms"))
import data  # noqa: E402

LEVEL_SEEDS = {"random": 1, "medium": 2, "medium-replay": 3, "expert": 5}  # medium-expert reuses 2 and 5
DEFAULT_SIZE = 1_000_000
CHUNK_STEPS = 50_000  # rollouts run in chunks of this many steps, spread over worker processes
REF_EPISODES = 100


# ---- policies ----
class NumpyActor:
    """The SAC tanh-Gaussian actor of train_behavior.py in NumPy (no JAX needed to build datasets)."""

    def __init__(self, path):
        with np.load(path) as z:
            self.layers = [(z[f"l{i}_kernel"].astype(np.float32), z[f"l{i}_bias"].astype(np.float32))
                           for i in range(3)]

    def __call__(self, obs, rng, stochastic=True):
        h = np.asarray(obs, np.float32)
        for w, b in self.layers[:-1]:
            h = np.maximum(h @ w + b, 0.0)
        mean, log_std = np.split(h @ self.layers[-1][0] + self.layers[-1][1], 2, axis=-1)
        if not stochastic:
            return np.tanh(mean)
        std = np.exp(np.clip(log_std, -5.0, 2.0))
        return np.tanh(mean + std * rng.standard_normal(mean.shape).astype(np.float32))


def policy_info(env: str) -> dict:
    path = POLICY_ROOT / env / "policies.json"
    if not path.exists():
        raise data.DatasetError(f"no behaviour policies for '{env}' in {path.parent}: train them with "
                                f"benchmarks/train_behavior.py --env {env} and run make_datasets.py --select")
    return json.loads(path.read_text())


def load_actor(env: str, name: str) -> NumpyActor:
    return NumpyActor(POLICY_ROOT / env / name)


def random_actor(act_dim):
    return lambda obs, rng, stochastic=True: rng.uniform(-1.0, 1.0, act_dim).astype(np.float32)


# ---- rollouts ----
def rollout(env_id, schedule, n_steps, seed, stochastic=True):
    """Run one continuous stream of `n_steps` env steps; `schedule(t)` gives the acting policy at step t.

    Returns episode dicts (observations has one row more than actions); the last episode is cut at
    n_steps and marked truncated."""
    import gymnasium as gym
    env = gym.make(env_id)
    rng = np.random.default_rng(seed)
    episodes, ep = [], None
    obs, _ = env.reset(seed=seed)
    for t in range(n_steps):
        if ep is None:
            ep = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
        act = schedule(t)(obs, rng, stochastic)
        obs, rew, term, trunc, _ = env.step(act)
        trunc = trunc or (t == n_steps - 1 and not term)
        for k, v in (("observations", obs), ("actions", act), ("rewards", rew), ("terminations", term),
                     ("truncations", trunc)):
            ep[k].append(v)
        if term or trunc:
            episodes.append({k: np.asarray(v, np.float32 if k in ("observations", "actions", "rewards") else bool)
                             for k, v in ep.items()})
            ep = None
            if t < n_steps - 1:
                obs, _ = env.reset()
    env.close()
    return episodes


def _chunk_job(job):
    env, level, n_steps, seed = job
    env_id = data.LOCAL_ENVS[env]
    if level == "random":
        import gymnasium as gym
        actor = random_actor(gym.make(env_id).action_space.shape[0])
    else:
        actor = load_actor(env, policy_info(env)[level]["file"])
    return rollout(env_id, lambda t: actor, n_steps, seed)


def exit_with_parent(parent: int):
    """Pool initializer (Linux): a rollout worker ends when the process that started it dies, even by SIGKILL, so a
    killed dataset build (or the training script that started it) leaves no worker running."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def collect(env, level, size, workers, desc):
    """Chunks of CHUNK_STEPS steps over `workers` processes, each chunk with its own seed."""
    from tqdm import tqdm
    sizes = [min(CHUNK_STEPS, size - s) for s in range(0, size, CHUNK_STEPS)]
    jobs = [(env, level, n, 1000 * LEVEL_SEEDS[level] + i) for i, n in enumerate(sizes)]
    episodes = []
    with tqdm(total=size, desc=desc, unit="step", mininterval=2) as bar:
        if workers > 1 and len(jobs) > 1:
            # spawn, not fork: the caller may be an algorithm script with JAX's threads running
            with mp.get_context("spawn").Pool(min(workers, len(jobs)), exit_with_parent, (os.getpid(),)) as pool:
                for (_, _, n, _), eps in zip(jobs, pool.imap(_chunk_job, jobs)):
                    episodes += eps
                    bar.update(n)
        else:
            for job in jobs:
                episodes += _chunk_job(job)
                bar.update(job[2])
    return episodes


def collect_replay(env, size, desc):
    """The medium-replay stream, replayed from the training snapshots (see module docstring)."""
    from tqdm import tqdm
    import gymnasium as gym
    info = policy_info(env)
    rep = info["medium-replay"]
    total, every, start = rep["total_steps"], rep["snapshot_every"], rep["start_steps"]
    scale = size / total
    act_dim = gym.make(data.LOCAL_ENVS[env]).action_space.shape[0]
    windows = []  # (steps in this window at full size, actor)
    for w0 in range(0, total, every):
        actor = random_actor(act_dim) if w0 < start else load_actor(env, rep["snapshots"][str(w0)])
        windows.append((min(every, total - w0), actor))
    bounds = np.round(np.cumsum([n for n, _ in windows]) * scale).astype(int)
    n_steps = int(bounds[-1])

    def schedule(t):
        return windows[int(np.searchsorted(bounds, t, side="right"))][1]

    with tqdm(total=1, desc=desc + " (one stream)", mininterval=2) as bar:
        episodes = rollout(data.LOCAL_ENVS[env], schedule, n_steps, 1000 * LEVEL_SEEDS["medium-replay"])
        bar.update(1)
    return episodes


# ---- building ----
def write_dataset(dataset_id, env_id, episodes, refs, description):
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer
    genv = gym.make(env_id)
    space = genv.observation_space
    obs_space = gym.spaces.Box(space.low.astype(np.float32), space.high.astype(np.float32), dtype=np.float32)
    buffers = [EpisodeBuffer(id=i, observations=ep["observations"], actions=ep["actions"], rewards=ep["rewards"],
                             terminations=ep["terminations"], truncations=ep["truncations"])
               for i, ep in enumerate(episodes)]
    path = data.dataset_dir(dataset_id)
    if path.exists():
        shutil.rmtree(path)
    with warnings.catch_warnings():  # minari asks for an author e-mail; the code link says who made it
        warnings.simplefilter("ignore", UserWarning)
        minari.create_dataset_from_buffers(
            dataset_id, buffers, env=env_id, eval_env=env_id, observation_space=obs_space,
            action_space=genv.action_space, algorithm_name="SAC (o2o-jax benchmarks/train_behavior.py)",
            author="o2o-jax", code_permalink="benchmarks/make_datasets.py", ref_min_score=refs[0],
            ref_max_score=refs[1], description=description, requirements=["gymnasium[mujoco]>=1.0"])


def build(env: str, level: str, size: int | None = None, workers: int | None = None, force: bool = False) -> str:
    """Build `o2o/<env>/<level>-v0` into the local Minari store; returns its ID."""
    dataset_id = data.local_id(env, level)
    data.parse_local_id(dataset_id)  # validates env and level
    if data.is_local(dataset_id) and not force:
        return dataset_id
    info = policy_info(env)
    refs = (info["ref_min_score"], info["ref_max_score"])
    workers = workers or min(2, os.cpu_count() or 1)
    t0 = time.time()
    desc = f"building {dataset_id}"
    if level == "medium-expert":
        episodes = []
        for part in ("medium", "expert"):
            part_id = build(env, part, size=size, workers=workers)
            import minari
            for ep in minari.load_dataset(part_id).iterate_episodes():
                episodes.append({"observations": ep.observations, "actions": ep.actions, "rewards": ep.rewards,
                                 "terminations": ep.terminations, "truncations": ep.truncations})
    elif level == "medium-replay":
        episodes = collect_replay(env, size or info["medium-replay"]["total_steps"], desc)
    else:
        episodes = collect(env, level, size or DEFAULT_SIZE, workers, desc)
    n = sum(len(ep["rewards"]) for ep in episodes)
    description = (f"D4RL-style {level} data for {data.LOCAL_ENVS[env]} built by o2o-jax from its SAC behaviour "
                   f"policies ({n} transitions, {len(episodes)} episodes). ref_min_score = uniform random policy, "
                   f"ref_max_score = expert policy, mean returns over {info['ref_episodes']} episodes.")
    write_dataset(dataset_id, data.LOCAL_ENVS[env], episodes, refs, description)
    data.write_flat_cache(dataset_id, episodes)  # the first load_dataset then skips the per-episode read-back
    print(f"{dataset_id}: {n} transitions, {len(episodes)} episodes in {time.time() - t0:.1f} s "
          f"-> {data.dataset_dir(dataset_id)}")
    return dataset_id


# ---- selecting the shipped policies from a training run ----
def episode_returns(env_id, actor, episodes, seed, stochastic=True):
    import gymnasium as gym
    env = gym.make(env_id)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, ret = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(actor(obs, rng, stochastic))
            ret += r
            done = term or trunc
        out.append(ret)
    return np.asarray(out)


def select(env, workdir, expert_step=None, medium_fraction=1 / 3, episodes=REF_EPISODES):
    workdir = Path(workdir)
    cfg = json.loads((workdir / "config.json").read_text())
    with open(workdir / "progress.csv") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    snaps = {int(p.stem.split("_")[1]): p for p in (workdir / "snapshots").glob("step_*.npz")}
    expert_step = expert_step or max(snaps)
    env_id = data.LOCAL_ENVS[env]
    expert_returns = episode_returns(env_id, NumpyActor(snaps[expert_step]), episodes, 10_000)
    target = medium_fraction * expert_returns.mean()
    medium_step = next(int(r["step"]) for r in rows if r["return_stoch"] >= target and int(r["step"]) in snaps)
    medium_returns = episode_returns(env_id, NumpyActor(snaps[medium_step]), episodes, 20_000)
    expert_det = episode_returns(env_id, NumpyActor(snaps[expert_step]), episodes, 40_000, stochastic=False)
    medium_det = episode_returns(env_id, NumpyActor(snaps[medium_step]), episodes, 50_000, stochastic=False)
    import gymnasium as gym
    random_returns = episode_returns(env_id, random_actor(gym.make(env_id).action_space.shape[0]), episodes, 30_000)
    out = POLICY_ROOT / env
    if out.exists():
        shutil.rmtree(out)
    (out / "replay").mkdir(parents=True)
    shutil.copy(workdir / "progress.csv", out / "progress.csv")  # the training curve
    shutil.copy(snaps[expert_step], out / "expert.npz")
    shutil.copy(snaps[medium_step], out / "medium.npz")
    replay = {}
    for step in range(cfg["start_steps"], medium_step, cfg["snapshot_every"]):
        name = f"replay/step_{step:07d}.npz"
        shutil.copy(snaps[step], out / name)
        replay[str(step)] = name
    stats = lambda x: {"mean": float(x.mean()), "std": float(x.std())}  # noqa: E731
    info = {
        "env_id": env_id, "train_config": cfg, "ref_episodes": episodes,
        "ref_min_score": float(random_returns.mean()), "ref_max_score": float(expert_returns.mean()),
        "random": {"returns": stats(random_returns)},
        "medium": {"file": "medium.npz", "step": medium_step, "returns": stats(medium_returns),
                   "returns_deterministic": stats(medium_det)},
        "expert": {"file": "expert.npz", "step": expert_step, "returns": stats(expert_returns),
                   "returns_deterministic": stats(expert_det)},
        "medium-replay": {"total_steps": medium_step, "snapshot_every": cfg["snapshot_every"],
                          "start_steps": cfg["start_steps"], "snapshots": replay},
        "selection": f"expert = snapshot at step {expert_step}; medium = first evaluated snapshot whose "
                     f"stochastic return reached {medium_fraction:.3f} x expert ({target:.1f})",
    }
    (out / "policies.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: info[k] for k in ("ref_min_score", "ref_max_score", "medium", "expert")}, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(description="Build local D4RL-style datasets (see module docstring).")
    p.add_argument("--env", default="hopper", help=f"one of {list(data.LOCAL_ENVS)} or 'all'")
    p.add_argument("--level", default="medium", help=f"one of {list(data.LOCAL_LEVELS)} or 'all'")
    p.add_argument("--size", type=int, default=None, help="transitions (default: D4RL sizes)")
    p.add_argument("--workers", type=int, default=None, help="rollout processes (default: min(2, cores))")
    p.add_argument("--force", action="store_true", help="rebuild even if the dataset exists")
    p.add_argument("--select", action="store_true", help="copy policies from a train_behavior.py run")
    p.add_argument("--workdir", default=None, help="with --select: the train_behavior.py work directory")
    p.add_argument("--expert_step", type=int, default=None, help="with --select: expert snapshot (default last)")
    args = p.parse_args(argv)
    envs = list(data.LOCAL_ENVS) if args.env == "all" else [args.env]
    levels = list(data.LOCAL_LEVELS) if args.level == "all" else [args.level]
    for name, value, valid in (("--env", envs, data.LOCAL_ENVS), ("--level", levels, data.LOCAL_LEVELS)):
        bad = [v for v in value if v not in valid]
        if bad:
            p.error(f"{name} {bad[0]!r} is not one of {list(valid)} (or 'all')")
    if args.select:
        if args.workdir is None or len(envs) != 1:
            p.error("--select needs one --env and --workdir")
        return select(envs[0], args.workdir, args.expert_step)
    for env in envs:
        for level in levels:
            build(env, level, size=args.size, workers=args.workers, force=args.force)


if __name__ == "__main__":
    main()
