"""Cal-QL: maths against NumPy (tanh-Gaussian, calibration bound, CQL logsumexp, MC returns), gradient isolation
of the single-gradient update, ensemble init, and tiny end-to-end runs (offline -> online, resume, checkpoint)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cal_ql
from conftest import assert_ctrl_c_resumes, assert_nan_loss_stops, assert_resume_matches, read_evals

# Tiny budgets; every run in this file shares these static shapes, so the update block compiles once.
TINY = dict(offline_updates=200, online_steps=300, update_block=50, offline_eval_every=100, online_eval_every=100,
            eval_episodes=2, policy_hidden=[32, 32], critic_hidden=[32, 32], cql_n_actions=4, normalize=True,
            reward_scale=1.0, reward_bias=0.0, mc_failure_rule="none", terminate_on_success=False,
            cql_lagrange=True, cql_weight=1.0, wandb_mode="disabled")


def tiny_config(dataset_id, run_dir, **overrides):
    return cal_ql.TrainConfig(dataset_id=dataset_id, run_dir=str(run_dir), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory):
    dataset_id = tiny_dataset("hopper", "medium")
    run_dir = tmp_path_factory.mktemp("cal_ql_reference")
    result = cal_ql.train(tiny_config(dataset_id, run_dir))
    return dataset_id, run_dir, result, read_evals(run_dir)


# ---- maths
def np_tanh_gaussian_log_prob(mean, log_std, u):
    std = np.exp(log_std)
    log_n = np.sum(-((u - mean) ** 2) / (2 * std ** 2) - log_std - 0.5 * math.log(2 * math.pi), -1)
    return log_n - np.sum(np.log(1 - np.tanh(u) ** 2), -1)


def test_tanh_gaussian_log_prob_matches_numpy():
    rng = np.random.default_rng(0)
    mean, log_std = rng.normal(size=(2, 32, 3)).astype(np.float32) * 0.5
    logp = np.asarray(cal_ql.gaussian_log_prob(mean, log_std, mean))
    np.testing.assert_allclose(logp, np.sum(-log_std - 0.5 * math.log(2 * math.pi), -1), rtol=1e-5)
    # samples: log-prob from the pre-tanh value; given actions: through atanh
    key = jax.random.PRNGKey(0)
    a, logp = cal_ql.tanh_gaussian_sample(jnp.asarray(mean), jnp.asarray(log_std), key, 5)
    assert a.shape == (32, 5, 3) and logp.shape == (32, 5)
    u = np.arctanh(np.asarray(a, np.float64))
    expected = np_tanh_gaussian_log_prob(mean[:, None].astype(np.float64), log_std[:, None].astype(np.float64), u)
    np.testing.assert_allclose(np.asarray(logp), expected, rtol=1e-3, atol=1e-3)
    given = np.asarray(cal_ql.tanh_gaussian_log_prob(mean[:, None], log_std[:, None], a))
    np.testing.assert_allclose(given, expected, rtol=1e-3, atol=1e-3)


def test_calibration_bound_matches_numpy():
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(2, 8, 5)), rng.normal(size=(1, 8, 1))
    np.testing.assert_allclose(np.asarray(cal_ql.calibrated(q, g, True)), np.maximum(q, g), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cal_ql.calibrated(q, g, False)), q, rtol=1e-6)


def test_cql_logsumexp_matches_numpy():
    rng = np.random.default_rng(2)
    n, act_dim, temp = 10, 3, 0.7
    q_rand, q_next, q_cur, lp_next, lp_cur = rng.normal(size=(5, 2, 16, n))
    q_data = rng.normal(size=(2, 16))
    cat = np.concatenate([q_rand - np.log(0.5 ** act_dim), q_next - lp_next, q_cur - lp_cur], -1) / temp
    m = cat.max(-1, keepdims=True)
    expected = temp * (m[..., 0] + np.log(np.exp(cat - m).sum(-1)))
    got = cal_ql.cql_logsumexp(q_rand, q_next, q_cur, lp_next, lp_cur, act_dim, temp)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    plain = np.concatenate([q_rand, q_data[..., None], q_next, q_cur], -1)
    got = cal_ql.cql_logsumexp(q_rand, q_next, q_cur, lp_next, lp_cur, act_dim, 1.0, q_data, importance_sample=False)
    np.testing.assert_allclose(np.asarray(got), np.log(np.exp(plain).sum(-1)), rtol=1e-5)


def test_mc_returns_with_failure_rule():
    gamma = 0.9
    rewards = np.array([-5, -5, -5, -5, 5, -5, -5], np.float32)  # episodes: [0..2] failed, [3..4] success, [5..6]
    ends = np.array([0, 0, 1, 0, 1, 0, 0], bool)  # the last episode is cut off (no end flag)
    g = cal_ql.mc_returns(rewards, ends, gamma, "all", -5.0)
    expected_success = [-5 + gamma * 5, 5]
    np.testing.assert_allclose(g, [-50, -50, -50] + expected_success + [-50, -50], rtol=1e-6)
    plain = cal_ql.mc_returns(rewards, ends, gamma, "none", -5.0)
    np.testing.assert_allclose(plain[:3], [-5 - 4.5 - 4.05, -5 - 4.5, -5], rtol=1e-6)
    last = cal_ql.mc_returns(np.array([5, -5, 1, -5], np.float32), np.array([0, 1, 0, 1], bool), gamma, "last", -5.0)
    np.testing.assert_allclose(last, [-50, -50, -50, -50], rtol=1e-6)  # CORL: only the last reward matters


def test_one_gradient_keeps_losses_on_their_own_parameters():
    """The single value_and_grad over all parameters must give each parameter group only its own loss's gradient."""
    h = cal_ql.make_hyper(cal_ql.TrainConfig(policy_hidden=[16], critic_hidden=[16], cql_n_actions=3), 4, 2)
    state = cal_ql.init_state(h, jax.random.PRNGKey(0), np.zeros(4), np.ones(4), 1.0)
    rng = np.random.default_rng(3)
    batch = cal_ql.Buffer(*(jnp.asarray(x, jnp.float32) for x in (
        rng.normal(size=(8, 4)), rng.uniform(-0.9, 0.9, (8, 2)), rng.normal(size=8), rng.normal(size=(8, 4)),
        np.zeros(8), rng.normal(size=8))))
    params = {"actor": state.actor.params, "critic": state.critic.params, "log_alpha": state.log_alpha.params,
              "log_alpha_prime": state.log_alpha_prime.params}
    args = (state, batch, jax.random.PRNGKey(1), True, 1.0, h)

    @jax.jit
    def gradients(p):  # d/dp of [total, E * critic_loss, actor_loss, alpha_loss, alpha_prime_loss], one compile
        def losses(p):
            total, m = cal_ql.calql_losses(p, *args)
            return jnp.stack([total, h.n_critics * m["critic_loss"], m["actor_loss"], m["alpha_loss"],
                              m["alpha_prime_loss"]])
        return jax.jacrev(losses)(p)
    jac = gradients(params)
    total = jax.tree.map(lambda x: x[0], jac)
    only = {name: jax.tree.map(lambda x, i=i: x[i], jac) for i, name in
            enumerate(["critic_loss", "actor_loss", "alpha_loss", "alpha_prime_loss"], start=1)}

    def close(a, b):
        return all(np.allclose(x, y, atol=1e-6) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert close(total["critic"], only["critic_loss"]["critic"])
    assert close(total["actor"], only["actor_loss"]["actor"])
    assert close(total["log_alpha"], only["alpha_loss"]["log_alpha"])
    assert close(total["log_alpha_prime"], only["alpha_prime_loss"]["log_alpha_prime"])
    assert np.abs(np.asarray(total["log_alpha_prime"])) > 0


def test_ensemble_members_differ_at_init():
    h = cal_ql.make_hyper(cal_ql.TrainConfig(n_critics=3, policy_hidden=[8], critic_hidden=[8, 8]), 5, 2)
    state = cal_ql.init_state(h, jax.random.PRNGKey(0), np.zeros(5), np.ones(5), 1.0)
    for leaf in jax.tree.leaves(state.critic.params):
        assert leaf.shape[0] == 3
        if np.any(leaf != 0):  # biases start at 0 in every member (orthogonal init)
            assert not np.allclose(leaf[0], leaf[1]) and not np.allclose(leaf[1], leaf[2])


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="mc_failure_rule"):
        cal_ql.TrainConfig(mc_failure_rule="al")
    with pytest.raises(ValueError, match="mixing_ratio"):
        cal_ql.TrainConfig(mixing_ratio=1.0)


# ---- end to end
def test_end_to_end_writes_evals_and_checkpoints(reference_run):
    _, run_dir, result, evals = reference_run
    assert [e["phase"] for e in evals[:2]] == ["offline", "offline"]
    online = [e for e in evals if e["phase"] == "online"]
    assert len(online) >= 2 and online[-1]["env_steps"] >= 300  # whole trajectories: may overshoot
    for e in evals:
        assert e["episodes"] == 2 and np.isfinite(e["normalized_score"])
    assert {k: v for k, v in result["last_eval"].items() if k != "wall_time"} == evals[-1]
    assert result["updates"] == 200 + result["env_steps"]  # UTD 1 online
    ckpt = run_dir / "checkpoints"
    for name in ("offline", "latest"):
        assert (ckpt / name / "state.npz").exists() and (ckpt / name / "config.yaml").exists()
    rows = [np.load(f) for f in sorted((ckpt / "buffer" / "seed0").glob("rows_*.npz"))]
    assert sum(r["rew"].shape[0] for r in rows) == result["env_steps"]
    mc = np.concatenate([r["mc"] for r in rows])
    assert np.all(np.isfinite(mc)) and np.any(mc != 0)  # online MC returns were computed per episode


def test_resume_after_kill_matches_uninterrupted(reference_run, tmp_path, monkeypatch):
    # killed after the first online evaluation
    assert_resume_matches(cal_ql, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), 4, monkeypatch,
                          reference_run[1])


def test_resume_falls_back_to_the_offline_checkpoint(reference_run, tmp_path, monkeypatch):
    """A damaged `latest` (no `latest.old`): --resume restarts from `offline` and ends as the uninterrupted run."""
    assert_resume_matches(cal_ql, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), 4, monkeypatch,
                          reference_run[1], after_kill=lambda rd: (rd / "checkpoints" / "latest" / "state.npz").unlink())


@pytest.mark.parametrize("function,calls", [("scan_updates", 2), ("update_few", 2)])  # offline; online
def test_ctrl_c_checkpoints_and_resumes_exactly(reference_run, tmp_path, monkeypatch, function, calls):
    assert_ctrl_c_resumes(cal_ql, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), function, calls,
                          monkeypatch, reference_run[1])


def test_offline_checkpoint_round_trip_and_corl_variant(reference_run, tmp_path):
    dataset_id, ref_dir, _, reference = reference_run
    offline = str(ref_dir / "checkpoints" / "offline")
    cal_ql.train(tiny_config(dataset_id, tmp_path / "same", offline_checkpoint=offline))
    assert read_evals(tmp_path / "same") == reference[1:]
    # CORL's variant (calibration off online) starts from the same offline state and then diverges
    cal_ql.train(tiny_config(dataset_id, tmp_path / "corl", offline_checkpoint=offline, online_calibration=False))
    corl = read_evals(tmp_path / "corl")
    assert corl[0] == reference[1] and corl != reference[1:]


def test_nan_loss_stops_with_step_and_name(reference_run, tmp_path):
    assert_nan_loss_stops(cal_ql, tiny_config(reference_run[0], tmp_path, reward_bias=float("nan")),
                          r"offline/.*critic_loss = nan.* at update 1\b")


def test_num_seeds_matches_single_seed_runs(reference_run, tmp_path):
    """--num_seeds 2 trains seeds 0 and 1 together; each follows its single-seed schedule and numbers."""
    dataset_id, _, _, reference = reference_run
    multi = cal_ql.train(tiny_config(dataset_id, tmp_path / "multi", num_seeds=2))
    cal_ql.train(tiny_config(dataset_id, tmp_path / "single1", seed=1))
    assert multi["seeds"] == [0, 1]
    for seed, expected in ((0, reference), (1, read_evals(tmp_path / "single1"))):
        got = read_evals(tmp_path / "multi" / f"seed{seed}")
        assert [(e["seed"], e["phase"], e["updates"]) for e in got if e["phase"] == "offline"] == \
            [(e["seed"], e["phase"], e["updates"]) for e in expected if e["phase"] == "offline"]
        offline = [e["return"] for e in got if e["phase"] == "offline"]
        np.testing.assert_allclose(offline, [e["return"] for e in expected][:len(offline)], rtol=1e-3)
        # online: same schedule while trajectories agree; round-off may change an episode's length later
        assert got[len(offline)]["env_steps"] == expected[len(offline)]["env_steps"]
        np.testing.assert_allclose(got[-1]["return"], expected[-1]["return"], rtol=0.1)



def test_num_seeds_resume_after_kill_matches_uninterrupted(reference_run, tmp_path, monkeypatch):
    """A --num_seeds 2 run killed during fine-tuning and resumed reproduces the uninterrupted 2-seed run."""
    cal_ql.train(tiny_config(reference_run[0], tmp_path / "full", num_seeds=2))
    assert_resume_matches(cal_ql, lambda **kw: tiny_config(reference_run[0], tmp_path / "killed", num_seeds=2, **kw), 4,
                          monkeypatch, tmp_path / "full", seeds=(0, 1))