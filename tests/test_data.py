"""The shared dataset utility: building, flattening, returns, scores and every error path."""
import socket
from pathlib import Path
import subprocess
import sys
import time

import warnings

import gymnasium as gym
import numpy as np
import pytest

import data
import make_datasets
from dataset_report import complete_episode_returns
from conftest import ROOT, TINY_SIZE


def write_episodes(dataset_id, episodes, obs_space, act_space, env=None, refs=(None, None)):
    """A hand-made Minari dataset from episode dicts (observations have one row more than actions)."""
    import minari
    from minari.data_collector import EpisodeBuffer
    buffers = [EpisodeBuffer(id=i, observations=ep["observations"], actions=ep["actions"],
                             rewards=np.asarray(ep["rewards"], np.float64),
                             terminations=np.asarray(ep["terminations"]), truncations=np.asarray(ep["truncations"]))
               for i, ep in enumerate(episodes)]
    with warnings.catch_warnings():  # minari warns about every missing piece of metadata
        warnings.simplefilter("ignore", UserWarning)
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env, observation_space=obs_space,
                                           action_space=act_space, ref_min_score=refs[0], ref_max_score=refs[1])
    return dataset_id


def box(n, lo=-np.inf, hi=np.inf):
    return gym.spaces.Box(lo, hi, (n,), np.float32)


def episode(length, obs_dim=3, act_dim=2, term=False, trunc=False, start=0.0):
    obs = start + np.arange((length + 1) * obs_dim, dtype=np.float32).reshape(length + 1, obs_dim)
    ends = np.zeros(length, bool)
    t, u = ends.copy(), ends.copy()
    t[-1], u[-1] = term, trunc
    return {"observations": obs, "actions": np.full((length, act_dim), 0.5, np.float32),
            "rewards": np.arange(1, length + 1, dtype=np.float32), "terminations": t, "truncations": u}


# ---- building and flattening ----
def test_build_load_round_trip(tiny_dataset):
    dataset_id = tiny_dataset("hopper", "medium")
    ds = data.load_dataset(dataset_id)
    n = TINY_SIZE
    assert ds.observations.shape == (n, 11) and ds.next_observations.shape == (n, 11)
    assert ds.actions.shape == (n, 3) and ds.rewards.shape == (n,) and ds.mc_returns.shape == (n,)
    assert ds.observations.dtype == np.float32 and ds.terminals.dtype == bool
    assert np.abs(ds.actions).max() <= 1.0
    # within an episode the next observation is the following row's observation
    inner = ~ds.episode_ends[:-1]
    np.testing.assert_array_equal(ds.next_observations[:-1][inner], ds.observations[1:][inner])
    assert ds.episode_ends[-1] and not (ds.terminals & ds.timeouts).any()
    assert ds.obs_mean.shape == (11,) and (ds.obs_std > 0).all()
    # the cached reload gives identical arrays
    again = data.load_dataset(dataset_id)
    np.testing.assert_array_equal(again.observations, ds.observations)
    np.testing.assert_array_equal(again.timeouts, ds.timeouts)
    # the cache written at build time equals both readers of the Minari file (direct HDF5 and minari's)
    import minari
    dataset = minari.load_dataset(dataset_id)
    h5 = data.dataset_dir(dataset_id) / "data" / "main_data.hdf5"
    direct = data._flatten_episodes(data._iterate_episodes(dataset, h5), None)
    via_minari = data._flatten_episodes(data._iterate_episodes(dataset, h5.with_name("absent.hdf5")), None)
    for k in direct:
        np.testing.assert_array_equal(direct[k], via_minari[k])
        np.testing.assert_array_equal(direct[k], getattr(ds, k))
    # the evaluation env matches the data
    env = data.make_env(dataset_id)
    assert env.observation_space.shape == (11,) and env.spec.id == "Hopper-v5"


def test_every_level_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))  # a store of its own: sizes are known
    sizes = {}
    for level in data.LOCAL_LEVELS:
        ds = data.load_dataset(make_datasets.build("hopper", level, size=1000, workers=1))
        sizes[level] = len(ds)
    assert sizes == {"random": 1000, "medium": 1000, "medium-replay": 1000, "medium-expert": 2000, "expert": 1000}


def test_missing_local_dataset_builds_on_first_use(minari_store):
    dataset_id = data.local_id("hopper", "random")
    if data.is_local(dataset_id):  # built by another test in this session: remove it
        import shutil
        shutil.rmtree(data.dataset_dir(dataset_id))
    ds = data.load_dataset(dataset_id, build_size=500)
    assert len(ds) == 500 and data.is_local(dataset_id)
    with pytest.raises(data.DatasetError, match="make_datasets.py --env walker2d --level expert"):
        data.load_dataset("o2o/walker2d/expert-v0", build=False)


def test_first_use_build_with_parallel_workers(tmp_path, monkeypatch):
    """The automatic build spreads rollout chunks over worker processes (the default), as for 1M sets."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    builder = data._make_datasets_module()
    monkeypatch.setattr(builder, "CHUNK_STEPS", 400)
    ds = data.load_dataset("o2o/hopper/expert-v0", build_size=1000)  # 3 chunks on min(2, cores) workers
    assert len(ds) == 1000 and ds.timeouts.sum() >= 3  # every chunk ends its last episode


def test_terminals_and_timeouts_hand_made(minari_store):
    episodes = [episode(4, term=True), episode(3, trunc=True, start=100.0), episode(2, start=200.0)]
    dataset_id = write_episodes("test/handmade/flags-v0", episodes, box(3), box(2, -1, 1))
    ds = data.load_dataset(dataset_id)
    assert len(ds) == 9
    np.testing.assert_array_equal(ds.terminals, [0, 0, 0, 1, 0, 0, 0, 0, 0])
    # the truncated episode and the one cut with no flag both end in a timeout (bootstrap there)
    np.testing.assert_array_equal(ds.timeouts, [0, 0, 0, 0, 0, 0, 1, 0, 1])
    np.testing.assert_array_equal(ds.observations[4], episodes[1]["observations"][0])
    np.testing.assert_array_equal(ds.next_observations[6], episodes[1]["observations"][3])  # final obs kept
    np.testing.assert_array_equal(ds.rewards, [1, 2, 3, 4, 1, 2, 3, 1, 2])


def test_dict_observations_flattened_in_documented_order(minari_store):
    import gymnasium_robotics  # noqa: F401  (registers PointMaze, a Dict-observation env, for the dataset)
    space = gym.spaces.Dict({"desired_goal": box(2), "observation": box(4), "achieved_goal": box(2)})
    eps = []
    for i in range(2):
        base = episode(3, obs_dim=4, start=10.0 * i)
        obs = {"observation": base["observations"], "achieved_goal": base["observations"][:, :2] + 0.5,
               "desired_goal": np.full((4, 2), -7.0, np.float32)}
        eps.append(dict(base, observations=obs))
    eps[0]["terminations"][-1] = True
    eps[1]["truncations"][-1] = True
    dataset_id = write_episodes("test/handmade/dict-v0", eps, space, box(2, -1, 1), env="PointMaze_UMaze-v3")
    ds = data.load_dataset(dataset_id)
    assert ds.obs_keys == ("observation", "achieved_goal", "desired_goal")
    o = eps[1]["observations"]
    expected = np.concatenate([o["observation"][1], o["achieved_goal"][1], o["desired_goal"][1]])
    np.testing.assert_array_equal(ds.observations[4], expected)
    # the recovered environment flattens its observations in the same order
    import minari
    env = data.make_env(dataset_id)
    obs, _ = env.reset(seed=0)
    raw, _ = minari.load_dataset(dataset_id).recover_environment(eval_env=True).reset(seed=0)
    assert obs.shape == (8,) and env.observation_space.shape == (8,)
    np.testing.assert_array_equal(obs, data.flatten_obs(raw, ds.obs_keys))
    assert not np.array_equal(raw["achieved_goal"], raw["desired_goal"])
    flat = data.flatten_obs({"observation": np.ones(4), "achieved_goal": np.full(2, 2.0),
                             "desired_goal": np.full(2, 3.0)}, ds.obs_keys)
    np.testing.assert_array_equal(flat, [1, 1, 1, 1, 2, 2, 3, 3])


# ---- Monte-Carlo returns and scores ----
def test_monte_carlo_returns_against_brute_force():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=300).astype(np.float32)
    ends = rng.random(300) < 0.05
    ends[-1] = True
    gamma = 0.97
    got = data.monte_carlo_returns(rewards, ends, gamma)
    starts = np.r_[0, np.where(ends)[0][:-1] + 1]
    stops = np.where(ends)[0] + 1
    for a, b in zip(starts, stops):
        for t in range(a, b):
            expected = sum(gamma ** (k - t) * float(rewards[k]) for k in range(t, b))
            assert got[t] == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_mc_returns_in_loaded_dataset(minari_store):
    dataset_id = write_episodes("test/handmade/mc-v0", [episode(3, term=True), episode(2, trunc=True)],
                                box(3), box(2, -1, 1))
    ds = data.load_dataset(dataset_id, gamma=0.5)
    np.testing.assert_allclose(ds.mc_returns, [1 + 1 + 0.75, 2 + 1.5, 3, 1 + 1, 2])


def test_normalised_score_random_and_expert(tiny_dataset):
    lo, hi = data.reference_scores(tiny_dataset("hopper", "random"))
    assert data.normalized_score("o2o/hopper/random-v0", lo) == pytest.approx(0.0)
    assert data.normalized_score("o2o/hopper/random-v0", hi) == pytest.approx(100.0)
    random_score = data.normalized_score("o2o/hopper/random-v0", complete_episode_returns(
        data.load_dataset("o2o/hopper/random-v0")).mean())
    assert abs(random_score) < 3.0
    expert = data.load_dataset(tiny_dataset("hopper", "expert", size=6000))
    returns = complete_episode_returns(expert)
    assert len(returns) >= 3
    assert 75.0 < data.normalized_score(expert.dataset_id, returns.mean()) < 125.0


def test_d4rl_reference_fallback_and_missing_scores(minari_store):
    write_episodes("D4RL/door/human-v2", [episode(3, obs_dim=3, trunc=True)], box(3), box(2, -1, 1))
    assert data.reference_scores("D4RL/door/human-v2") == data.D4RL_REF_SCORES["door"]
    dataset_id = write_episodes("test/handmade/noref-v0", [episode(3, trunc=True)], box(3), box(2, -1, 1))
    with pytest.raises(data.DatasetError, match="no reference scores"):
        data.normalized_score(dataset_id, 10.0)


# ---- errors ----
def test_unknown_ids():
    with pytest.raises(data.DatasetError, match="did you mean o2o/hopper/medium-v0"):
        data.load_dataset("o2o/hopper/meduim-v0")
    with pytest.raises(data.DatasetError, match="unknown local dataset id"):
        data.load_dataset("o2o/ant/medium-v0")
    with pytest.raises(data.DatasetError, match="did you mean D4RL/antmaze/umaze-v1"):
        data.load_dataset("D4RL/antmaze/umaze-v0")
    with pytest.raises(data.DatasetError, match="non-empty string"):
        data.load_dataset("")


def test_remote_id_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(data.DatasetError, match="HF_HUB_OFFLINE=1"):
        data.load_dataset("D4RL/antmaze/umaze-v1")
    assert time.time() - t0 < 2.0


def test_remote_id_silent_server_fails_within_10s(monkeypatch):
    """A server that accepts connections and never answers must not hang the loader."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # connections queue in the backlog and are never answered
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    t0 = time.time()
    try:
        with pytest.raises(data.DatasetError, match="cannot be reached") as err:
            data.load_dataset("D4RL/antmaze/umaze-v1")
    finally:
        server.close()
    assert time.time() - t0 < 10.0
    assert "\n" not in str(err.value)


def test_unusable_spaces():
    with pytest.raises(data.DatasetError, match="discrete actions are not supported"):
        data.check_spaces(box(3), gym.spaces.Discrete(4), "x")
    with pytest.raises(data.DatasetError, match="RescaleAction"):
        data.check_spaces(box(3), box(2, -2, 2), "x")
    with pytest.raises(data.DatasetError, match="1-D Box"):
        data.check_spaces(gym.spaces.Box(0, 255, (8, 8, 3), np.uint8), box(2, -1, 1), "x")
    with pytest.raises(data.DatasetError, match="desired_goal"):
        data.check_spaces(gym.spaces.Dict({"observation": box(3), "desired_goal": gym.spaces.Discrete(3)}),
                          box(2, -1, 1), "x")
    assert data.check_spaces(box(3), box(2, -1, 1)) is None


def test_discrete_dataset_rejected_on_load(minari_store):
    ep = episode(3, trunc=True)
    ep["actions"] = np.array([0, 1, 2])
    dataset_id = write_episodes("test/handmade/discrete-v0", [ep], box(3), gym.spaces.Discrete(3))
    with pytest.raises(data.DatasetError, match="discrete"):
        data.load_dataset(dataset_id)


def test_import_has_no_heavy_side_effects():
    code = ("import sys; sys.path.insert(0, 'algorithms'); import data; "
            "heavy = [m for m in ('jax', 'flax', 'minari', 'torch', 'wandb') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_builder_cli_rejects_typos(capsys):
    with pytest.raises(SystemExit):
        make_datasets.main(["--env", "hoper", "--level", "medium"])
    assert "'hoper' is not one of" in capsys.readouterr().err



def test_rollout_workers_end_with_their_parent(tmp_path):
    """A dataset build killed by SIGKILL leaves no rollout worker running (the pool's workers get SIGTERM when the
    process that started them dies)."""
    import os
    import signal
    script = tmp_path / "build.py"
    script.write_text(
        "import multiprocessing as mp, os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import make_datasets\n"
        "def pid(_):\n    time.sleep(0.5)\n    return os.getpid()\n"
        "if __name__ == '__main__':\n"
        "    pool = mp.get_context('spawn').Pool(2, make_datasets.exit_with_parent, (os.getpid(),))\n"
        "    print(' '.join(map(str, sorted(set(pool.map(pid, range(4), chunksize=1))))), flush=True)\n"
        "    pool.map_async(time.sleep, [600, 600])\n"
        "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive(pid):
        try:
            return "State:\tZ" not in (Path("/proc") / str(pid) / "status").read_text()
        except FileNotFoundError:
            return False
    deadline = time.time() + 10
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, "rollout workers outlived their killed parent"


@pytest.fixture
def own_copy(tiny_dataset, tmp_path, monkeypatch):
    """A private copy of the tiny hopper dataset (its files get damaged here), in a store of its own."""
    import shutil
    dataset_id = tiny_dataset("hopper", "medium")
    src = data.dataset_dir(dataset_id)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    shutil.copytree(src, data.dataset_dir(dataset_id))
    return dataset_id, data.dataset_dir(dataset_id)


def test_damaged_cache_is_rebuilt(own_copy, capsys):
    dataset_id, root = own_copy
    expected = data.load_dataset(dataset_id, build=False, download=False)
    cache = root / "o2o_flat_cache.npz"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # truncated
    got = data.load_dataset(dataset_id, build=False, download=False)
    assert "unreadable" in capsys.readouterr().out
    np.testing.assert_array_equal(got.observations, expected.observations)
    np.load(cache)["rewards"]  # written again, whole


def test_truncated_dataset_file_names_the_fix(own_copy):
    dataset_id, root = own_copy
    (root / "o2o_flat_cache.npz").unlink()
    h5 = root / "data" / "main_data.hdf5"
    h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 3])
    with pytest.raises(data.DatasetError, match="make_datasets.py --env hopper --level medium --force"):
        data.load_dataset(dataset_id, build=False, download=False)


def test_garbled_dataset_file_is_caught_not_cached(own_copy):
    """Bytes overwritten inside the observations: the NaNs are caught at load and never written into the cache."""
    import h5py
    dataset_id, root = own_copy
    (root / "o2o_flat_cache.npz").unlink()
    h5 = root / "data" / "main_data.hdf5"
    with h5py.File(h5, "r") as f:
        ds = f["episode_0"]["observations"]
        assert not ds.compression  # stored raw: its bytes can be garbled in place
        offset = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
    raw = bytearray(h5.read_bytes())
    raw[offset + 64: offset + 96] = b"\xff" * 32  # float32 0xffffffff is NaN
    h5.write_bytes(bytes(raw))
    with pytest.raises(data.DatasetError, match="non-finite values in observations.*--force"):
        data.load_dataset(dataset_id, build=False, download=False)
    assert not (root / "o2o_flat_cache.npz").exists()
