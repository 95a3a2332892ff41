"""PEX: maths against NumPy (gate softmax and choice frequencies, expectile loss, AWR weights), ensemble init,
iql.py checkpoint compatibility, and tiny end-to-end runs (offline -> online, frozen offline policy, resume,
--num_seeds)."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iql
import pex
from conftest import (assert_ctrl_c_resumes, assert_nan_loss_stops, assert_resume_matches, buffer_rows,
                      kill_after_checkpoints, read_evals)

ROOT = Path(__file__).resolve().parent.parent
# Tiny budgets; every run in this file shares these static shapes, so the update blocks compile once. The IQL
# settings (PyTorch-default actor init, log-std clamp -20, CORL reward scaling) are iql.py's, so that pex.py's
# offline phase can be compared with iql.py's.
TINY = dict(offline_updates=200, online_steps=300, initial_collection_steps=100, update_block=50, online_block=50,
            offline_eval_every=100, online_eval_every=100, eval_episodes=2, hidden_dims=[32, 32], expectile=0.7,
            beta=3.0, reward_bias=0.0, normalize=True, normalize_reward_by_returns=True, terminate_on_success=False,
            actor_init="torch", log_std_min=-20.0, wandb_mode="disabled")
IQL_TINY = dict(offline_updates=200, online_steps=0, update_block=50, online_block=50, offline_eval_every=100,
                online_eval_every=100, eval_episodes=2, hidden_dims=[32, 32], expectile=0.7, beta=3.0,
                reward_bias=0.0, normalize=True, normalize_reward_by_returns=True, terminate_on_success=False,
                wandb_mode="disabled")


def tiny_config(dataset_id, run_dir, **overrides):
    return pex.TrainConfig(dataset_id=dataset_id, run_dir=str(run_dir), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory):
    """One uninterrupted tiny run: (dataset id, run dir, train() result, eval records)."""
    dataset_id = tiny_dataset("hopper", "medium")
    run_dir = tmp_path_factory.mktemp("pex_reference")
    result = pex.train(tiny_config(dataset_id, run_dir))
    return dataset_id, run_dir, result, read_evals(run_dir)


@pytest.fixture(scope="module")
def iql_run(reference_run, tmp_path_factory):
    """A tiny iql.py pre-training with pex's tiny network sizes and data settings: its run dir."""
    run_dir = tmp_path_factory.mktemp("iql_source")
    iql.train(iql.TrainConfig(dataset_id=reference_run[0], run_dir=str(run_dir), **IQL_TINY))
    return run_dir


@pytest.fixture(scope="module")
def multi_run(reference_run, tmp_path_factory):
    """The tiny run with --num_seeds 2 (seeds 0 and 1 together): its run dir."""
    run_dir = tmp_path_factory.mktemp("pex_multi")
    result = pex.train(tiny_config(reference_run[0], run_dir, num_seeds=2))
    assert result["seeds"] == [0, 1] and result["env_steps"] == [300, 300]
    return run_dir


def multi_evals(run_dir, seed):
    return read_evals(Path(run_dir) / f"seed{seed}")


def schedule(evals):
    return [(e["seed"], e["phase"], e["updates"], e["env_steps"]) for e in evals]


def tiny_hyper(**overrides):
    return pex.make_hyper(pex.TrainConfig(**{"hidden_dims": [16, 16], **overrides}), 5, 2)


# ---- maths
def test_expectile_loss_and_awr_weights_match_numpy():
    u = np.random.default_rng(0).normal(size=1000).astype(np.float32) * 2
    for tau in (0.5, 0.7, 0.9):
        expected = np.where(u < 0, 1 - tau, tau) * u ** 2
        np.testing.assert_allclose(np.asarray(pex.expectile_loss(jnp.asarray(u), tau)), expected, rtol=1e-6)
    for beta in (3.0, 10.0):
        expected = np.minimum(np.exp(beta * u.astype(np.float64)), 100.0)
        np.testing.assert_allclose(np.asarray(pex.awr_weights(jnp.asarray(u), beta, 100.0)), expected, rtol=1e-5)


def test_gate_probabilities_and_choice_frequencies_match_numpy():
    """composite_action: a1 = offline mean, P = softmax(inv_temp * min_i Q_i(s, a_k)), a = a_w; the sampled
    choices follow P (training), and eval's epsilon-greedy picks argmax with probability 1 - eps + eps * P."""
    h = tiny_hyper(inv_temperature=5.0, log_std_min=-20.0)
    state = pex.expand(pex.init_state(h, jax.random.PRNGKey(0), np.zeros(5), np.ones(5)), h, True)
    actor, critic, _ = pex.networks(h)
    # scale the Q heads' output layers so that the two candidates' values differ by O(1)
    critic_params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 30 if "TorchLinear_2" in jax.tree_util.keystr(p) else x, state.critic.params)
    n, states = 10000, 8
    obs = jnp.asarray(np.random.default_rng(1).normal(size=(states, 5)), jnp.float32)
    obs = jnp.repeat(obs, n, axis=0)  # n draws at each state
    # a new policy with tiny std: a2 is (almost) its mean, so Q(s, a2) and P are (almost) fixed per state
    actor_params = {**state.actor.params, "log_std": jnp.full((2,), -12.0)}
    a, info = pex.composite_action(state.offline_actor, actor_params, critic_params, obs, jax.random.PRNGKey(2),
                                   1.0, h)
    a1 = np.asarray(actor.apply({"params": state.offline_actor}, obs)[0])
    a2 = np.asarray(actor.apply({"params": actor_params}, obs)[0])
    q = np.stack([np.asarray(critic.apply({"params": critic_params}, obs, x)).min(0) for x in (a1, a2)], -1)
    np.testing.assert_allclose(np.asarray(info["q_offline"]), q[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(info["q_new"]), q[:, 1], rtol=1e-4, atol=1e-4)
    logits = 5.0 * np.stack([np.asarray(info["q_offline"]), np.asarray(info["q_new"])], -1).astype(np.float64)
    p_new = np.exp(logits[:, 1]) / np.exp(logits).sum(-1)
    np.testing.assert_allclose(np.asarray(info["p_new"]), p_new, rtol=1e-4, atol=1e-5)
    w = np.asarray(info["w"])
    np.testing.assert_allclose(np.asarray(a), np.where(w[:, None] == 1, a2, a1), atol=1e-4)  # std e^-12
    per_state_p = p_new.reshape(states, n).mean(1)
    assert per_state_p.min() < 0.1 and per_state_p.max() > 0.6  # clearly different gate probabilities
    np.testing.assert_allclose(w.reshape(states, n).mean(1), per_state_p, atol=0.02)  # 4 binomial std
    # evaluation (epsilon 0.1): the greedy choice w.p. 0.9 + 0.1 * P(greedy)
    _, info = pex.composite_action(state.offline_actor, actor_params, critic_params, obs, jax.random.PRNGKey(3),
                                   0.1, h)
    greedy = (p_new > 0.5).astype(int)
    p_greedy = np.where(greedy == 1, p_new, 1 - p_new)
    hits = (np.asarray(info["w"]) == greedy).reshape(states, n).mean(1)
    np.testing.assert_allclose(hits, (0.9 + 0.1 * p_greedy).reshape(states, n).mean(1), atol=0.012)
    # epsilon 0: the new policy's mean and the argmax of the gate, always
    a, info = pex.composite_action(state.offline_actor, state.actor.params, critic_params, obs[:64],
                                   jax.random.PRNGKey(4), 0.0, h)
    mean2 = np.asarray(actor.apply({"params": state.actor.params}, obs[:64])[0])
    q0 = np.stack([np.asarray(info["q_offline"]), np.asarray(info["q_new"])], -1)
    np.testing.assert_array_equal(np.asarray(info["w"]), q0.argmax(-1))
    np.testing.assert_allclose(np.asarray(a), np.where(q0.argmax(-1)[:, None] == 1, mean2, a1[:64]), atol=1e-6)


def test_updates_due_matches_official_loop():
    """One update per env step once the replay holds more than `initial` transitions (checked before the step)."""
    for initial in (0, 3, 7):
        size, total_loop, total_blocks = 0, 0, 0
        for n in (2, 1, 4, 3, 5, 6):
            total_blocks += pex.updates_due(size, n, initial)
            for _ in range(n):
                total_loop += size > initial  # official: update, then env.step, then memory.push
                size += 1
            assert total_blocks == total_loop


def test_ensemble_members_differ_at_init():
    h = pex.make_hyper(pex.TrainConfig(n_critics=4, hidden_dims=[8, 8]), 5, 2)
    state = pex.init_state(h, jax.random.PRNGKey(0), np.zeros(5), np.ones(5))
    for leaf in jax.tree.leaves(state.critic.params):
        assert leaf.shape[0] == 4
        for i in range(4):
            for j in range(i + 1, 4):
                assert not np.allclose(leaf[i], leaf[j])
    q = pex.networks(h)[1].apply({"params": state.critic.params}, jnp.ones((7, 5)), jnp.ones((7, 2)))
    assert q.shape == (4, 7) and len(np.unique(np.asarray(q[:, 0]))) == 4
    # the new policy of the expansion is a fresh draw, not a copy of the offline actor
    new = pex.expand(state, h, True)
    assert not np.allclose(new.actor.params["TorchLinear_0"]["kernel"], new.offline_actor["TorchLinear_0"]["kernel"])


def test_state_layout_is_iql_compatible():
    """pex.py's offline state has iql.py's leaf names and shapes (so checkpoints load both ways)."""
    names = []
    for module in (pex, iql):
        h = module.make_hyper(module.TrainConfig(hidden_dims=[8, 8]), 5, 2)
        state = module.init_state(h, jax.random.PRNGKey(0), np.zeros(5), np.ones(5))
        leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        names.append([(jax.tree_util.keystr(k), np.shape(v)) for k, v in leaves])
    assert names[0] == names[1]


# ---- configuration errors
def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="offline_fraction"):
        pex.TrainConfig(offline_fraction=1.0)
    with pytest.raises(ValueError, match="actor_init"):
        pex.TrainConfig(actor_init="xavir")
    with pytest.raises(ValueError, match="eval_epsilon"):
        pex.TrainConfig(eval_epsilon=2.0)


# ---- end to end
def test_end_to_end_writes_evals_and_checkpoints(reference_run):
    _, run_dir, result, evals = reference_run
    assert [e["phase"] for e in evals[:2]] == ["offline", "offline"]
    assert [e["updates"] for e in evals[:2]] == [100, 200]
    online = [e for e in evals if e["phase"] == "online"]
    assert len(online) >= 2 and online[-1]["env_steps"] == 300
    assert result["updates"] == 200 + 300 - 101  # one update per env step after the initial collection
    for e in evals:
        assert e["episodes"] == 2 and np.isfinite(e["normalized_score"])
    for e in online:  # the per-eval gate statistics
        assert 0.0 <= e["new_policy_fraction"] <= 1.0 and 0.0 <= e["gate_prob_new"] <= 1.0
        assert np.isfinite(e["q_offline_action"]) and np.isfinite(e["q_new_action"])
    assert "new_policy_fraction" not in evals[0] and all(e["seed"] == 0 for e in evals)
    times = [e["wall_time"] for e in read_evals(run_dir, timing=True)]
    assert times == sorted(times) and times[0] > 0
    ckpt = run_dir / "checkpoints"
    for name in ("offline", "latest"):
        assert (ckpt / name / "state.npz").exists() and (ckpt / name / "config.yaml").exists()
    assert buffer_rows(ckpt.parent) == 300


def test_offline_policy_stays_frozen_online(reference_run):
    dataset_id, run_dir, _, _ = reference_run
    cfg = tiny_config(dataset_id, run_dir)
    h = pex.make_hyper(cfg, 11, 3)
    iql_template = pex.init_state(h, jax.random.PRNGKey(0), np.zeros(11), np.ones(11))
    offline, _ = pex.load_checkpoint(run_dir / "checkpoints" / "offline", iql_template)
    latest, meta = pex.load_checkpoint(run_dir / "checkpoints" / "latest", pex.expand(iql_template, h, True))
    assert meta["phase"] == "done" and isinstance(latest, pex.PEXState)
    for a, b in zip(jax.tree.leaves(offline.actor.params), jax.tree.leaves(latest.offline_actor)):
        np.testing.assert_array_equal(a, b)  # pi_off bit-identical after 199 online updates
    for before, after in ((offline.critic.params, latest.critic.params), (offline.value.params, latest.value.params)):
        assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.mark.parametrize("kill_after", [2, 5])  # 2: at the offline->online switch, 5: during fine-tuning
def test_resume_after_kill_matches_uninterrupted(reference_run, tmp_path, monkeypatch, kill_after):
    assert_resume_matches(pex, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), kill_after, monkeypatch,
                          reference_run[1])


@pytest.mark.parametrize("function,calls,num_seeds", [("scan_updates", 2, 1), ("update_online", 3, 1),
                                                      ("update_online", 3, 2)])
def test_ctrl_c_checkpoints_and_resumes_exactly(reference_run, multi_run, tmp_path, monkeypatch, function,
                                                calls, num_seeds):
    """SIGINT stops the IQL pre-training at the next block boundary, fine-tuning at the next episode end (of every
    seed), with a checkpoint; --resume then ends with exactly the uninterrupted run's records (composite policy,
    exploration keys and evaluation keys included)."""
    assert_ctrl_c_resumes(pex, lambda **kw: tiny_config(reference_run[0], tmp_path, num_seeds=num_seeds, **kw),
                          function, calls, monkeypatch, reference_run[1] if num_seeds == 1 else multi_run,
                          seeds=None if num_seeds == 1 else (0, 1))


def test_resume_from_the_offline_checkpoint_expands(reference_run, tmp_path, monkeypatch):
    """--resume past a damaged `latest` falls back to the offline checkpoint (phase "expand", an IQL state): the
    expansion is redone and the run ends with the uninterrupted run's records."""
    kill_after_checkpoints(pex, tiny_config(reference_run[0], tmp_path), 4, monkeypatch)  # an online checkpoint
    (tmp_path / "checkpoints" / "latest" / "state.npz").unlink()
    assert pex.load_meta(tmp_path / "checkpoints" / "offline")["phase"] == "expand"
    pex.train(tiny_config(reference_run[0], tmp_path, resume=True))
    assert read_evals(tmp_path) == reference_run[3]


def test_offline_checkpoint_round_trip(reference_run, tmp_path):
    dataset_id, ref_dir, _, reference = reference_run
    pex.train(tiny_config(dataset_id, tmp_path, offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    assert read_evals(tmp_path) == reference[1:]


def test_starts_from_iql_checkpoint(reference_run, iql_run, tmp_path):
    """An iql.py offline checkpoint starts pex.py's fine-tuning; with iql.py's settings pex.py's own
    pre-training reaches the same state."""
    dataset_id, ref_dir, _, reference = reference_run
    source = iql_run / "checkpoints" / "offline"
    with np.load(source / "state.npz") as a, np.load(ref_dir / "checkpoints" / "offline" / "state.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    pex.train(tiny_config(dataset_id, tmp_path, offline_checkpoint=str(source)))
    evals = read_evals(tmp_path)
    assert evals[0] == read_evals(iql_run)[1]  # pex scores iql's final offline actor exactly as iql.py did
    # and fine-tuning continues as from pex.py's own pre-training, up to float32 round-off (other op order)
    assert [(e["phase"], e["updates"], e["env_steps"]) for e in evals] == \
        [(e["phase"], e["updates"], e["env_steps"]) for e in reference[1:]]
    np.testing.assert_allclose([e["return"] for e in evals], [e["return"] for e in reference[1:]], rtol=0.01)


def test_iql_starts_from_pex_checkpoint(reference_run, tmp_path):
    """The other direction: pex.py's offline checkpoint is an iql.py offline checkpoint."""
    dataset_id, ref_dir, _, reference = reference_run
    iql.train(iql.TrainConfig(dataset_id=dataset_id, run_dir=str(tmp_path), **IQL_TINY,
                              offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    assert read_evals(tmp_path)[0] == reference[1]


def test_iql_checkpoint_with_other_sizes_fails_clearly(reference_run, iql_run, tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the checks")
    monkeypatch.setattr(pex.data, "load_dataset", no_data)  # every refusal below comes before the data
    source = str(iql_run / "checkpoints" / "offline")
    with pytest.raises(pex.RunError, match=r'network sizes.*hidden_dims.*--hidden_dims "\[32, 32\]"'):
        pex.train(tiny_config(reference_run[0], tmp_path, offline_checkpoint=source, hidden_dims=[16, 16]))
    with pytest.raises(pex.RunError, match=r"reward transformation.*--reward_bias 0.0"):
        pex.train(tiny_config(reference_run[0], tmp_path, offline_checkpoint=source, reward_bias=-1.0))
    with pytest.raises(pex.RunError, match="no intact checkpoint there"):
        pex.train(tiny_config(reference_run[0], tmp_path, offline_checkpoint=str(tmp_path / "nothing")))
    assert not (tmp_path / "checkpoints").exists()


def test_nan_loss_stops_with_step_and_name(reference_run, tmp_path):
    assert_nan_loss_stops(pex, tiny_config(reference_run[0], tmp_path, reward_bias=float("nan")),
                          r"offline/critic_loss .* at update 1\b")


def test_command_line(reference_run, tmp_path):
    """The script runs from the shell with a YAML plus overrides (pyrallis only under __main__)."""
    args = [sys.executable, str(ROOT / "algorithms" / "pex.py"), "--config_path",
            str(ROOT / "configs" / "pex" / "quickstart.yaml"), "--dataset_id", reference_run[0], "--run_dir",
            str(tmp_path), "--offline_updates", "50", "--update_block", "50", "--offline_eval_every", "50",
            "--online_steps", "80", "--initial_collection_steps", "40", "--online_eval_every", "1000",
            "--eval_episodes", "1", "--hidden_dims", "[16, 16]"]
    out = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [e["phase"] for e in read_evals(tmp_path)] == ["offline", "online"]


# ---- several seeds in one process
def test_num_seeds_matches_single_seed_runs(reference_run, multi_run, tmp_path):
    """--num_seeds 2 trains seeds 0 and 1 together; each equals its single-seed run up to float32 round-off."""
    dataset_id, _, _, reference = reference_run
    pex.train(tiny_config(dataset_id, tmp_path, seed=1))
    for seed, expected in ((0, reference), (1, read_evals(tmp_path))):
        got = multi_evals(multi_run, seed)
        assert schedule(got) == schedule(expected)
        offline = [e for e in got if e["phase"] == "offline"]
        np.testing.assert_allclose([e["return"] for e in offline],
                                   [e["return"] for e in expected[:len(offline)]], rtol=1e-3)
        # online: the same schedule; returns agree closely (tiny round-off can grow through the dynamics)
        np.testing.assert_allclose([e["return"] for e in got], [e["return"] for e in expected], rtol=0.05)
    # one joint checkpoint (seed axis first) and one online buffer per seed
    ckpt = multi_run / "checkpoints"
    with np.load(ckpt / "latest" / "state.npz") as z, np.load(reference_run[1] / "checkpoints" / "latest" /
                                                              "state.npz") as one:
        assert sorted(z.files) == sorted(one.files)
        assert all(z[k].shape == (2,) + one[k].shape for k in z.files)
    for seed in (0, 1):
        assert buffer_rows(ckpt.parent, seed) == 300


def test_num_seeds_resume_after_kill_matches_uninterrupted(reference_run, multi_run, tmp_path, monkeypatch):
    assert_resume_matches(pex, lambda **kw: tiny_config(reference_run[0], tmp_path, num_seeds=2, **kw), 5,
                          monkeypatch, multi_run, seeds=(0, 1))  # killed during fine-tuning


def test_num_seeds_offline_checkpoints_with_iql(reference_run, multi_run, tmp_path):
    """An N-seed iql.py offline checkpoint starts an N-seed pex.py fine-tuning, a pex.py one an iql.py
    fine-tuning; a different seed count is a clear error."""
    dataset_id = reference_run[0]
    iql_dir = tmp_path / "iql"
    iql.train(iql.TrainConfig(dataset_id=dataset_id, run_dir=str(iql_dir), num_seeds=2, **IQL_TINY))
    source = iql_dir / "checkpoints" / "offline"
    pex.train(tiny_config(dataset_id, tmp_path / "pex", num_seeds=2, offline_checkpoint=str(source)))
    for seed in (0, 1):
        got, expected = multi_evals(tmp_path / "pex", seed), multi_evals(multi_run, seed)
        assert got[0] == multi_evals(iql_dir, seed)[1]  # pex scores iql's final offline actor exactly as iql.py did
        assert schedule(got) == schedule(expected[1:])
        np.testing.assert_allclose([e["return"] for e in got], [e["return"] for e in expected[1:]], rtol=0.05)
    iql.train(iql.TrainConfig(dataset_id=dataset_id, run_dir=str(tmp_path / "back"), num_seeds=2, **IQL_TINY,
                              offline_checkpoint=str(multi_run / "checkpoints" / "offline")))
    for seed in (0, 1):
        assert multi_evals(tmp_path / "back", seed)[0] == multi_evals(multi_run, seed)[1]
    with pytest.raises(pex.RunError, match=r"holds 2 seed\(s\); run with --num_seeds 2"):
        pex.train(tiny_config(dataset_id, tmp_path / "one", offline_checkpoint=str(source)))
