"""Reward normalisation by the return range counts complete episodes only (data.episode_returns).

The local builder (benchmarks/make_datasets.py) rolls out chunks of CHUNK_STEPS steps; each chunk's last episode is
cut at the chunk's end (stored as truncated) and never continued (the next chunk starts from a reset). Such a
fragment has no episode return: counted as an episode, a fragment of a few steps set the minimum return (and so the
reward scale) of the full-size o2o/hopper/medium-v0.
"""
import numpy as np

import data
import make_datasets


def _offline(episodes, max_episode_steps):
    arrays = data._flatten_episodes(episodes, None)
    return data.OfflineData(dataset_id="t", mc_returns=np.zeros(len(arrays["rewards"]), np.float32),
                            obs_mean=np.zeros(1), obs_std=np.ones(1), obs_keys=None,
                            max_episode_steps=max_episode_steps, **arrays)


def _episode(rewards, terminal):
    n = len(rewards)
    return {"observations": np.zeros((n + 1, 1), np.float32), "actions": np.zeros((n, 1), np.float32),
            "rewards": np.asarray(rewards, np.float32), "terminations": np.arange(n) == n - 1 if terminal
            else np.zeros(n, bool)}


def test_episode_returns_drop_fragments_only():
    eps = [_episode([1.0] * 5, True), _episode([2.0] * 10, False), _episode([0.5] * 3, False),
           _episode([3.0] * 4, True), _episode([0.1] * 2, False)]
    ds = _offline(eps, max_episode_steps=10)  # the 10-step one hit the time limit; 3- and 2-step ones are cut
    np.testing.assert_allclose(data.episode_returns(ds), [5.0, 20.0, 12.0])
    np.testing.assert_allclose(data.episode_returns(ds, complete_only=False), [5.0, 20.0, 1.5, 12.0, 0.2])
    ds.max_episode_steps = None  # time limit unknown: every episode end counts
    assert len(data.episode_returns(ds)) == 5
    only_fragments = _offline([_episode([1.0] * 3, False), _episode([2.0] * 2, False)], 10)
    np.testing.assert_allclose(data.episode_returns(only_fragments), [3.0, 4.0])  # nothing complete: all


def test_builder_chunk_fragments_are_not_episodes():
    """Two (short) rollout chunks as make_datasets.collect runs them: every complete episode counts, the cut last
    episode of each chunk does not."""
    chunks = [make_datasets._chunk_job(("hopper", "medium", 700, 2000 + i)) for i in range(2)]
    ds = _offline([ep for chunk in chunks for ep in chunk], 1000)
    cut = [chunk[-1] for chunk in chunks if not chunk[-1]["terminations"][-1]]
    assert cut and all(len(ep["rewards"]) < 1000 for ep in cut)
    complete = [float(np.sum(ep["rewards"], dtype=np.float64)) for chunk in chunks for ep in chunk
                if ep["terminations"][-1] or len(ep["rewards"]) == 1000]
    np.testing.assert_allclose(data.episode_returns(ds), complete)
    assert len(data.episode_returns(ds, complete_only=False)) == len(complete) + len(cut)


def test_load_dataset_knows_the_time_limit(tiny_dataset):
    ds = data.load_dataset(tiny_dataset("hopper", "medium"))
    assert ds.max_episode_steps == 1000
    returns = data.episode_returns(ds)
    assert 0 < len(returns) <= int(ds.episode_ends.sum())
