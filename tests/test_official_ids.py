"""The official-dataset path (AntMaze, Adroit) end to end, without the network.

The real `D4RL/antmaze/umaze-v1` and `D4RL/pen/cloned-v2` cannot be downloaded here, so this module writes a tiny
STAND-IN under each official ID into a temporary Minari store of its own: random-action episodes of the real
gymnasium-robotics environment with the official dataset's environment spec (AntMaze_UMaze-v4, continuing task,
fixed evaluation start and goal, Dict observations; AdroitHandPen-v1) and no reference scores in the metadata (the
loader falls back to D4RL's constants). A stand-in has none of the real data's content, so this checks plumbing
only: every script runs, as a command in its own process, its shipped config for that ID (budgets and network
sizes cut to the per-script test sizes, every task setting kept: reward transform, terminate_on_success,
normalisation, Cal-QL's failure rule), reads the Dict observations flattened to 27 + 2 + 2, evaluates in the
recovered evaluation env, and writes a success rate for the goal task. These runs also check that no program a
script compiles (XLA's dump of every program, all phases) calls LAPACK: jaxlib 0.10.2's batched LAPACK kernels can
deadlock XLA:CPU's thread pool (tests/test_thread_pool_hang.py).
"""
import importlib
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import yaml

import data
from conftest import read_evals
from sweep import cli_value

ROOT = Path(__file__).resolve().parent.parent
ALGOS = ("iql", "cal_ql", "o2sac", "o2td3", "o2ppo", "aca", "pex")
# the per-script test sizes taken from each script's TINY (tests/test_<algo>.py): budgets and network sizes only
SIZE_KEY = re.compile(r"(updates|steps|block|every|episodes|hidden|dims|n_actions|batch_size|states|length|epochs"
                      r"|freq|wandb_mode)$")
UMAZE_EVAL_MAP = [[1, 1, 1, 1, 1], [1, "r", 0, 0, 1], [1, 1, 1, 0, 1], [1, "g", 0, 0, 1], [1, 1, 1, 1, 1]]


def random_episodes(env, n_episodes, length, seed):
    """Episode buffers of uniform random actions (truncated after `length` steps)."""
    from minari.data_collector import EpisodeBuffer
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(n_episodes):
        obs, _ = env.reset(seed=seed + i)
        observations, actions, rewards = [obs], [], []
        for _ in range(length):
            a = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            obs, r, _, _, _ = env.step(a)
            observations.append(obs), actions.append(a), rewards.append(r)
        if isinstance(obs, dict):
            observations = {k: np.stack([o[k] for o in observations]).astype(np.float32) for k in obs}
        else:
            observations = np.stack(observations).astype(np.float32)
        ends = np.zeros(length, bool)
        episodes.append(EpisodeBuffer(id=i, observations=observations, actions=np.stack(actions),
                                      rewards=np.asarray(rewards, np.float64), terminations=ends,
                                      truncations=np.r_[ends[:-1], True]))
    return episodes


def write_standin(dataset_id, env, eval_env, n_episodes, length):
    import minari
    episodes = random_episodes(env, n_episodes, length, seed=0)
    with warnings.catch_warnings():  # minari warns about every missing piece of metadata
        warnings.simplefilter("ignore", UserWarning)
        minari.create_dataset_from_buffers(dataset_id, episodes, env=env, eval_env=eval_env,
                                           observation_space=env.observation_space, action_space=env.action_space)
    env.close(), eval_env.close()
    return dataset_id


@pytest.fixture(scope="module", autouse=True)
def standin_store(tmp_path_factory):
    """A Minari store of this module's own: other tests check that these official IDs are missing."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.mktemp("minari_standins")))
        yield


@pytest.fixture(scope="module")
def antmaze_standin():
    import gymnasium_robotics  # noqa: F401  (registers AntMaze)
    kwargs = dict(continuing_task=True, reset_target=False, max_episode_steps=700)
    env = gym.make("AntMaze_UMaze-v4", **kwargs)
    eval_env = gym.make("AntMaze_UMaze-v4", maze_map=UMAZE_EVAL_MAP, **kwargs)
    return write_standin("D4RL/antmaze/umaze-v1", env, eval_env, n_episodes=3, length=100)


@pytest.fixture(scope="module")
def pen_standin():
    import gymnasium_robotics  # noqa: F401  (registers the Adroit hands)
    env = gym.make("AdroitHandPen-v1", max_episode_steps=100)
    return write_standin("D4RL/pen/cloned-v2", env, gym.make("AdroitHandPen-v1", max_episode_steps=100),
                         n_episodes=3, length=100)


def run_shipped_config(algo, dataset_id, run_dir, **extra):
    """`python algorithms/<algo>.py --config_path configs/<algo>/<dataset_id>.yaml` as a user runs it (in its own
    process), with the test sizes of tests/test_<algo>.py on the command line (task settings kept from the YAML).
    Returns the YAML as loaded."""
    tiny = importlib.import_module(f"test_{algo}").TINY
    config = ROOT / "configs" / algo / f"{dataset_id}.yaml"
    sizes = {**{k: v for k, v in tiny.items() if SIZE_KEY.search(k)}, **extra}
    cmd = [sys.executable, f"algorithms/{algo}.py", "--config_path", str(config), "--run_dir", str(run_dir)]
    cmd += [a for k, v in sizes.items() for a in (f"--{k}", cli_value(v))]
    # every program the run compiles is dumped, to check that none calls LAPACK (tests/test_thread_pool_hang.py)
    dump = Path(run_dir) / "xla_dump"
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)  # this module's Minari store
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    programs = list(dump.glob("*after_optimizations.txt"))
    lapack = sorted(p.name for p in programs if "lapack" in p.read_text())
    assert programs and not lapack, f"programs calling LAPACK (can deadlock XLA:CPU's thread pool): {lapack}"
    shutil.rmtree(dump)
    return yaml.safe_load(config.read_text())


def test_antmaze_standin_is_the_official_shape(antmaze_standin):
    ds = data.load_dataset(antmaze_standin)
    assert ds.obs_keys == ("observation", "achieved_goal", "desired_goal")
    assert ds.observations.shape == (300, 31) and ds.actions.shape == (300, 8)
    assert data.reference_scores(antmaze_standin) == data.D4RL_REF_SCORES["antmaze"]  # the fallback constants
    env = data.make_env(antmaze_standin)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (31,)
    np.testing.assert_allclose(obs[29:], [-4.0, -4.0], atol=1.0)  # the evaluation env's fixed goal cell ("g")
    env.close()


@pytest.mark.parametrize("algo", ALGOS)
def test_script_runs_its_antmaze_config(algo, antmaze_standin, tmp_path):
    raw = run_shipped_config(algo, antmaze_standin, tmp_path, eval_episodes=1)  # 700-step episodes
    assert raw["terminate_on_success"] and raw["dataset_id"] == antmaze_standin
    records = read_evals(tmp_path)
    assert {r["phase"] for r in records} >= {"offline", "online"}
    for r in records:
        assert 0.0 <= r["success_rate"] <= 1.0  # a goal task reports its success rate
        # normalised with D4RL's AntMaze constants (0, 1): 100 x the mean return of the 0/1 sparse reward
        assert math.isclose(r["normalized_score"], 100.0 * r["return"], rel_tol=1e-5, abs_tol=1e-6)
        assert math.isfinite(r["normalized_score"])
    assert (tmp_path / "checkpoints" / "latest").exists()


@pytest.mark.parametrize("algo", [a for a in ALGOS if (ROOT / "configs" / a / "D4RL" / "pen").exists()])
def test_script_runs_its_adroit_config(algo, pen_standin, tmp_path):
    run_shipped_config(algo, pen_standin, tmp_path)
    records = read_evals(tmp_path)
    assert {r["phase"] for r in records} >= {"offline", "online"}
    lo, hi = data.D4RL_REF_SCORES["pen"]
    for r in records:
        assert "success_rate" not in r or 0.0 <= r["success_rate"] <= 1.0
        assert math.isclose(r["normalized_score"], 100.0 * (r["return"] - lo) / (hi - lo), rel_tol=1e-4)
