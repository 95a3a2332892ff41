"""IQL: maths against NumPy, ensemble init, and tiny end-to-end runs (offline -> online, resume, offline checkpoint)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iql
from conftest import assert_nan_loss_stops, assert_resume_matches, buffer_rows, read_evals

ROOT = Path(__file__).resolve().parent.parent
# Tiny budgets; every run in this file shares these static shapes, so the update block compiles once.
TINY = dict(offline_updates=200, online_steps=300, update_block=50, online_block=50, offline_eval_every=100,
            online_eval_every=100, eval_episodes=2, hidden_dims=[32, 32], expectile=0.7, beta=3.0,
            reward_bias=0.0, normalize_reward_by_returns=True, terminate_on_success=False, wandb_mode="disabled")


def tiny_config(dataset_id, run_dir, **overrides):
    return iql.TrainConfig(dataset_id=dataset_id, run_dir=str(run_dir), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory):
    """One uninterrupted tiny run: (dataset id, run dir, train() result, eval records)."""
    dataset_id = tiny_dataset("hopper", "medium")
    run_dir = tmp_path_factory.mktemp("iql_reference")
    result = iql.train(tiny_config(dataset_id, run_dir))
    return dataset_id, run_dir, result, read_evals(run_dir)


# ---- maths
def test_expectile_loss_matches_numpy():
    u = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    for tau in (0.5, 0.7, 0.9):
        expected = np.where(u < 0, 1 - tau, tau) * u ** 2
        np.testing.assert_allclose(np.asarray(iql.expectile_loss(jnp.asarray(u), tau)), expected, rtol=1e-6)


def test_gaussian_log_prob_matches_numpy():
    rng = np.random.default_rng(1)
    mean, log_std, x = rng.normal(size=(3, 64, 4)).astype(np.float32)
    std = np.exp(log_std)
    expected = np.sum(-((x - mean) ** 2) / (2 * std ** 2) - np.log(std) - 0.5 * math.log(2 * math.pi), -1)
    np.testing.assert_allclose(np.asarray(iql.gaussian_log_prob(mean, log_std, x)), expected, rtol=1e-5, atol=1e-5)


def test_actor_lr_schedule():
    h = iql.make_hyper(iql.TrainConfig(offline_updates=1000, update_block=100, offline_eval_every=100), 3, 2)
    lr = iql.actor_lr_schedule(h)
    np.testing.assert_allclose(float(lr(0)), 3e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(500)), 1.5e-4, rtol=1e-5)  # cosine decay offline (CORL)
    np.testing.assert_allclose(float(lr(1000)), 3e-4, rtol=1e-6)  # constant online (deviation 1)
    corl = iql.actor_lr_schedule(h._replace(corl_cosine_restart=True))
    for k in (0, 250, 1000):  # PyTorch CosineAnnealingLR continued past T_max: rises again online
        np.testing.assert_allclose(float(corl(1000 + k)), 3e-4 * (1 - math.cos(math.pi * k / 1000)) / 2, atol=1e-9)


def test_ensemble_members_differ_at_init():
    h = iql.make_hyper(iql.TrainConfig(n_critics=4, hidden_dims=[8, 8]), 5, 2)
    state = iql.init_state(h, jax.random.PRNGKey(0), np.zeros(5), np.ones(5))
    for leaf in jax.tree.leaves(state.critic.params):
        assert leaf.shape[0] == 4
        for i in range(4):
            for j in range(i + 1, 4):
                assert not np.allclose(leaf[i], leaf[j])
    q = iql.networks(h)[1].apply({"params": state.critic.params}, jnp.ones((7, 5)), jnp.ones((7, 2)))
    assert q.shape == (4, 7) and len(np.unique(np.asarray(q[:, 0]))) == 4


# ---- configuration errors
def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="multiple of update_block"):
        iql.TrainConfig(offline_updates=1050, update_block=100)


# ---- end to end
def test_end_to_end_writes_evals_and_checkpoints(reference_run):
    _, run_dir, result, evals = reference_run
    assert [e["phase"] for e in evals[:2]] == ["offline", "offline"]
    assert [e["updates"] for e in evals[:2]] == [100, 200]
    online = [e for e in evals if e["phase"] == "online"]
    assert len(online) >= 2 and online[-1]["env_steps"] == 300
    for e in evals:
        assert e["episodes"] == 2 and np.isfinite(e["normalized_score"]) and np.isfinite(e["return"])
    assert {k: v for k, v in result["last_eval"].items() if k != "wall_time"} == evals[-1]
    assert result["env_steps"] == 300 and all(e["seed"] == 0 for e in evals)
    times = [e["wall_time"] for e in read_evals(run_dir, timing=True)]
    assert times == sorted(times) and times[0] > 0
    ckpt = run_dir / "checkpoints"
    for name in ("offline", "latest"):
        assert (ckpt / name / "state.npz").exists() and (ckpt / name / "config.yaml").exists()
    assert buffer_rows(ckpt.parent) == 300  # every online transition is in the checkpointed buffer


@pytest.mark.parametrize("kill_after", [2, 5])  # 2: during pre-training, 5: during fine-tuning
def test_resume_after_kill_matches_uninterrupted(reference_run, tmp_path, monkeypatch, kill_after):
    assert_resume_matches(iql, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), kill_after, monkeypatch,
                          reference_run[1])


def test_offline_checkpoint_round_trip(reference_run, tmp_path):
    dataset_id, ref_dir, _, reference = reference_run
    iql.train(tiny_config(dataset_id, tmp_path, offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    evals = read_evals(tmp_path)
    # the loaded state scores like the end of pre-training, and fine-tuning continues exactly as in the source run
    assert evals == reference[1:]


def test_nan_loss_stops_with_step_and_name(reference_run, tmp_path):
    assert_nan_loss_stops(iql, tiny_config(reference_run[0], tmp_path, reward_bias=float("nan")),
                          r"offline/critic_loss .* at update 1\b")


def test_command_line(reference_run, tmp_path):
    """The script runs from the shell with a YAML plus overrides (pyrallis only under __main__)."""
    dataset_id = reference_run[0]
    args = [sys.executable, str(ROOT / "algorithms" / "iql.py"), "--config_path",
            str(ROOT / "configs" / "iql" / "quickstart.yaml"), "--dataset_id", dataset_id, "--run_dir", str(tmp_path),
            "--offline_updates", "50", "--update_block", "50", "--offline_eval_every", "50", "--online_steps", "60",
            "--online_eval_every", "1000", "--eval_episodes", "1", "--hidden_dims", "[16, 16]"]
    out = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [e["phase"] for e in read_evals(tmp_path)] == ["offline", "online"]


def test_num_seeds_matches_single_seed_runs(reference_run, tmp_path):
    """--num_seeds 2 trains seeds 0 and 1 together; each equals its single-seed run up to float32 round-off."""
    dataset_id, _, _, reference = reference_run
    multi = iql.train(tiny_config(dataset_id, tmp_path / "multi", num_seeds=2))
    single1 = tmp_path / "single1"
    iql.train(tiny_config(dataset_id, single1, seed=1))
    assert multi["seeds"] == [0, 1] and multi["env_steps"] == [300, 300]
    for seed, expected in ((0, reference), (1, read_evals(single1))):
        got = read_evals(tmp_path / "multi" / f"seed{seed}")
        assert [(e["seed"], e["phase"], e["updates"], e["env_steps"]) for e in got] == \
            [(e["seed"], e["phase"], e["updates"], e["env_steps"]) for e in expected]
        offline = [e for e in got if e["phase"] == "offline"]
        np.testing.assert_allclose([e["return"] for e in offline],
                                   [e["return"] for e in expected[:len(offline)]], rtol=1e-3)
        # online: the same schedule; returns agree closely (tiny round-off can grow through the dynamics)
        np.testing.assert_allclose([e["return"] for e in got], [e["return"] for e in expected], rtol=0.05)



def test_num_seeds_resume_after_kill_matches_uninterrupted(reference_run, tmp_path, monkeypatch):
    """A --num_seeds 2 run killed during fine-tuning and resumed reproduces the uninterrupted 2-seed run."""
    iql.train(tiny_config(reference_run[0], tmp_path / "full", num_seeds=2))
    assert_resume_matches(iql, lambda **kw: tiny_config(reference_run[0], tmp_path / "killed", num_seeds=2, **kw), 5,
                          monkeypatch, tmp_path / "full", seeds=(0, 1))