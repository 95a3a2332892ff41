"""O2SAC: maths against NumPy (tanh-Gaussian log-prob with clamps, value-alignment targets and anchors, lambda loss,
eps schedule, KL estimate), ensemble init, the lambda-on-first-update rule, tiny end-to-end runs (all phases, each
ablation switch, resume after a kill, offline checkpoint reuse from this script and from cal_ql.py, bad inputs), and
--num_seeds 2 against the single-seed runs (resume, offline checkpoints, the cal_ql.py hand-off seed by seed)."""
import json
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cal_ql
import o2sac
from conftest import assert_ctrl_c_resumes, assert_nan_loss_stops, assert_resume_matches, buffer_rows, read_evals

# Tiny budgets; every run in this file shares these static shapes, so each jitted block compiles once per Hyper.
TINY = dict(offline_updates=100, ope_steps=100, align_steps=100, online_steps=300, update_block=50, online_block=10,
            utd=2, warmup_steps=100, offline_eval_every=50, reconstruct_eval_every=50, online_eval_every=100,
            eval_episodes=2, eval_batch_size=64, policy_hidden=[32, 32], critic_hidden=[32, 32],
            cql_critic_hidden=[32, 32], cql_n_actions=4, end_steps=300, wandb_mode="disabled")
PHASES = ["offline"] * 2 + ["reevaluation"] * 2 + ["alignment"] * 2 + ["online"] * 3
FIELDS = ("normalized_score", "return", "lambda", "kl_to_reference", "q_offline_mode", "alpha", "epsilon", "phase")


def tiny_config(dataset_id, run_dir, **overrides):
    return o2sac.TrainConfig(dataset_id=dataset_id, run_dir=str(run_dir), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory):
    """One uninterrupted tiny run: (dataset id, run dir, train() result, eval records)."""
    dataset_id = tiny_dataset("hopper", "medium")
    run_dir = tmp_path_factory.mktemp("o2sac_reference")
    result = o2sac.train(tiny_config(dataset_id, run_dir))
    return dataset_id, run_dir, result, read_evals(run_dir)


def tiny_hyper(**overrides):
    cfg = o2sac.TrainConfig(**{**TINY, **overrides})
    return o2sac.make_hyper(cfg, 5, 2)


def tiny_state(h, seed=0, ref_seed=None):
    """An O2State with a random actor (and, if ref_seed is given, a different random reference actor)."""
    actor = o2sac.actor_net(h).init(jax.random.PRNGKey(seed), jnp.zeros((1, h.obs_dim)))["params"]
    state = o2sac.init_o2_state(h, seed, actor, np.zeros(h.obs_dim), np.ones(h.obs_dim), 0.3, 1.5, 0.0)
    if ref_seed is not None:
        ref = o2sac.actor_net(h).init(jax.random.PRNGKey(ref_seed), jnp.zeros((1, h.obs_dim)))["params"]
        state = state._replace(ref_actor=ref)
    # a target critic different from the critic (as after re-evaluation)
    target = jax.tree.map(lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape) + 1.0), state.critic_target)
    return state._replace(critic_target=target)


# ---- maths
def np_log_prob_given(mean, log_std, a, clip=1e-4):
    u = np.arctanh(np.clip(a, -1 + clip, 1 - clip))
    std = np.exp(log_std)
    log_n = -((u - mean) ** 2) / (2 * std ** 2) - log_std - 0.5 * math.log(2 * math.pi)
    return np.sum(log_n - np.log(1 - np.tanh(u) ** 2), -1)


def test_tanh_gaussian_log_prob_with_clamps():
    rng = np.random.default_rng(0)
    mean, log_std = rng.normal(size=(2, 16, 3)) * 0.5
    a = rng.uniform(-0.95, 0.95, (16, 3))
    a[0] = [1.0, -1.0, 0.99999]  # saturated actions are clamped to +-(1 - 1e-4) before atanh (OCR log_prob)
    got = np.asarray(o2sac.tanh_gaussian_log_prob(jnp.asarray(mean, jnp.float32), jnp.asarray(log_std, jnp.float32),
                                                  jnp.asarray(a, jnp.float32)))
    np.testing.assert_allclose(got, np_log_prob_given(mean, log_std, a), rtol=2e-4, atol=2e-3)
    assert np.all(np.isfinite(got))
    # samples: the log-prob comes from the pre-tanh value (no clamp), and agrees with the given-action form
    a_s, lp_s = o2sac.tanh_gaussian_sample(jnp.asarray(mean, jnp.float32), jnp.asarray(log_std, jnp.float32),
                                           jax.random.PRNGKey(1))
    np.testing.assert_allclose(np.asarray(lp_s), np_log_prob_given(mean, log_std, np.asarray(a_s, np.float64), 0.0),
                               rtol=1e-3, atol=1e-3)
    # the deterministic ("most likely") action is clip(tanh(mean), +-0.9999)
    big = jnp.asarray([[-30.0, 0.3, 30.0]])
    np.testing.assert_allclose(np.asarray(o2sac.deterministic_action(big)), [[-0.9999, np.tanh(0.3), 0.9999]],
                               rtol=1e-6)


def test_alignment_target_and_anchors_match_numpy():
    rng = np.random.default_rng(2)
    q_star, lp_star, lp_tilde, q_tilde = rng.normal(size=(4, 32)) * 3
    got = o2sac.alignment_target(q_star, lp_star, lp_tilde, q_tilde, 0.2)
    np.testing.assert_allclose(np.asarray(got), np.minimum(q_star - 0.2 * (lp_star - lp_tilde), q_tilde), rtol=1e-6)
    # anchors from the networks: a* = clip(tanh(mean_ref)), Q* = min_i Qbar_i(s, a*), y~ never above Qbar(s, a~)
    h = tiny_hyper()
    state = tiny_state(h, seed=0, ref_seed=1)
    obs = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    a_star, q_star, a_tilde, y_tilde = jax.jit(o2sac.alignment_targets, static_argnames="h")(
        state, obs, jax.random.PRNGKey(3), h=h)
    actor, critic = o2sac.actor_net(h), o2sac.critic_net(h)
    mean_ref, log_std_ref = actor.apply({"params": state.ref_actor}, obs)
    np.testing.assert_allclose(np.asarray(a_star), np.clip(np.tanh(np.asarray(mean_ref)), -0.9999, 0.9999), rtol=1e-6)
    q_bar = lambda a: np.asarray(critic.apply({"params": state.critic_target}, obs, a)).min(0)  # noqa: E731
    np.testing.assert_allclose(np.asarray(q_star), q_bar(a_star), rtol=1e-5, atol=1e-6)
    mean_ref, log_std_ref = np.asarray(mean_ref, np.float64), np.asarray(log_std_ref, np.float64)
    expected = np.minimum(q_bar(a_star) - 0.3 * (np_log_prob_given(mean_ref, log_std_ref, np.asarray(a_star)) -
                                                 np_log_prob_given(mean_ref, log_std_ref, np.asarray(a_tilde))),
                          q_bar(a_tilde))
    np.testing.assert_allclose(np.asarray(y_tilde), expected, rtol=1e-3, atol=1e-3)
    assert np.all(np.asarray(y_tilde) <= q_bar(a_tilde) + 1e-6)
    # a~ is a sample of the current actor pi, not of pi_ref
    mean_pi, log_std_pi = actor.apply({"params": state.actor.params}, obs)
    key_tilde = jax.random.PRNGKey(3)
    np.testing.assert_allclose(np.asarray(a_tilde), np.asarray(o2sac.tanh_gaussian_sample(mean_pi, log_std_pi,
                                                                                          key_tilde)[0]), rtol=1e-6)


def test_value_alignment_freezes_targets_and_fits_anchors():
    h = tiny_hyper()
    state = tiny_state(h, seed=0, ref_seed=0)
    rng = np.random.default_rng(4)
    batch = o2sac.Buffer(*(jnp.asarray(x, jnp.float32) for x in (rng.normal(size=(64, 5)), rng.uniform(-1, 1, (64, 2)),
                                                                 rng.normal(size=64), rng.normal(size=(64, 5)),
                                                                 np.zeros(64))))
    step = jax.jit(lambda s, k: o2sac.va_update(s, batch, k, h))
    first = None
    for i in range(100):
        new, m = step(state, jax.random.PRNGKey(i))
        first = first if first is not None else float(m["fixed_loss"])
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.critic_target),
                                                        jax.tree.leaves(state.critic_target)))  # frozen targets
        state = new
    assert float(m["fixed_loss"]) < 0.5 * first  # the critics fit the anchors Q(s, a*) = Q*
    assert not np.allclose(jax.tree.leaves(state.actor.params)[0], jax.tree.leaves(state.ref_actor)[0])


def test_lambda_loss_sign_and_weights():
    u = np.array([-2.0, -0.5, 0.0, 0.5, 3.0])
    expected = np.mean(np.where(u > 0, 0.3, 0.7) * u)
    np.testing.assert_allclose(float(o2sac.lambda_loss_weight(jnp.asarray(u), 0.7)), expected, rtol=1e-6)
    # KL above the threshold everywhere (u < 0): negative weight, so minimising lambda * weight raises lambda
    grad = jax.grad(lambda log_l: jnp.exp(log_l) * o2sac.lambda_loss_weight(jnp.asarray([-1.0, -2.0]), 0.7))(0.0)
    assert float(grad) == pytest.approx(-0.7 * 1.5)
    grad = jax.grad(lambda log_l: jnp.exp(log_l) * o2sac.lambda_loss_weight(jnp.asarray([1.0, 2.0]), 0.7))(0.0)
    assert float(grad) == pytest.approx(0.3 * 1.5)


def test_epsilon_schedule_matches_numpy():
    t = np.array([0, 1, 500, 99_999, 100_000, 250_000])
    for eps0, eps_end in ((0.125, 2.0), (0.005, 0.125)):
        expected = np.minimum(eps_end, eps0 + t * (eps_end - eps0) / 100_000)
        np.testing.assert_allclose(np.asarray(o2sac.epsilon_schedule(jnp.asarray(t), eps0, eps_end, 100_000)),
                                   expected, rtol=1e-6)


def test_kl_estimate_matches_numpy_and_gaussian_kl():
    rng = np.random.default_rng(5)
    lp, lp_ref = rng.normal(size=(2, 50)) * 30
    np.testing.assert_allclose(np.asarray(o2sac.kl_estimate(lp, lp_ref, -50.0)), lp - np.maximum(lp_ref, -50.0),
                               rtol=1e-5)
    # KL is invariant under tanh: the Monte-Carlo estimate equals the Gaussians' KL (unsaturated actions)
    m1, s1, m2, s2 = 0.2, 0.3, -0.1, 0.4
    n = 200_000
    mean1, ls1 = jnp.full((n, 1), m1), jnp.full((n, 1), math.log(s1))
    a, lp = o2sac.tanh_gaussian_sample(mean1, ls1, jax.random.PRNGKey(0))
    lp_ref = o2sac.tanh_gaussian_log_prob(jnp.full((n, 1), m2), jnp.full((n, 1), math.log(s2)), a)
    analytic = math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5
    assert float(o2sac.kl_estimate(lp, lp_ref, -50.0).mean()) == pytest.approx(analytic, abs=0.01)
    # pi == pi_ref: the logged estimate is ~0
    h = tiny_hyper()
    state = tiny_state(h)
    d = o2sac.o2_diagnostics(state, jnp.asarray(rng.normal(size=(64, 5)), jnp.float32), jax.random.PRNGKey(1), 0, h)
    assert abs(float(d["kl_to_reference"])) < 1e-3 and float(d["epsilon"]) == pytest.approx(0.125)


def test_lambda_steps_only_on_the_first_update_and_not_when_unconstrained():
    rng = np.random.default_rng(6)
    batch = o2sac.Buffer(*(jnp.asarray(x, jnp.float32) for x in (rng.normal(size=(32, 5)), rng.uniform(-1, 1, (32, 2)),
                                                                 rng.normal(size=32), rng.normal(size=(32, 5)),
                                                                 np.zeros(32))))
    for constrained in (True, False):
        h = tiny_hyper(constrained_finetuning=constrained)
        state = tiny_state(h, seed=0, ref_seed=1)
        key = jax.random.PRNGKey(0)
        update = jax.jit(o2sac.cf_update, static_argnames="h")
        first, m = update(state, batch, key, 10, True, h=h)
        later, _ = update(state, batch, key, 10, False, h=h)
        assert np.array_equal(later.log_lmbda.params, state.log_lmbda.params)
        assert float(later.log_lmbda.opt_state[0].count) == 0
        assert (float(first.log_lmbda.params) != float(state.log_lmbda.params)) == constrained
        assert float(m["lambda"]) == (pytest.approx(1.5) if constrained else 0.0)
        # everything else is updated on every step, alike for first and later updates
        assert np.array_equal(jax.tree.leaves(first.actor.params)[0], jax.tree.leaves(later.actor.params)[0])
        assert not np.array_equal(jax.tree.leaves(first.actor.params)[0], jax.tree.leaves(state.actor.params)[0])


def test_reference_update_is_per_seed():
    """pi_ref := pi and best := score only for the seeds whose score beats their own best (-inf: not evaluated)."""
    h = tiny_hyper()
    state = o2sac.stack_seeds([tiny_state(h, seed=s, ref_seed=s + 10) for s in (0, 1, 2)])
    state = state._replace(best_score=jnp.asarray([1.0, 5.0, 2.0]))
    new, better = o2sac.update_reference(state, jnp.asarray([3.0, 4.0, -np.inf]))
    assert np.asarray(better).tolist() == [True, False, False]
    np.testing.assert_array_equal(np.asarray(new.best_score), [3.0, 5.0, 2.0])
    for i, source in ((0, new.actor.params), (1, state.ref_actor), (2, state.ref_actor)):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(o2sac.seed_slice(new.ref_actor, i)),
                                                        jax.tree.leaves(o2sac.seed_slice(source, i))))


def test_ensemble_members_differ_at_init_and_actor_layout_matches_cal_ql():
    h = tiny_hyper(n_critics=3)
    state = tiny_state(h)
    leaves = jax.tree_util.tree_leaves_with_path(state.critic.params)
    assert any("LayerNorm" in jax.tree_util.keystr(k) for k, _ in leaves)
    for path, leaf in leaves:
        assert leaf.shape[0] == 3
        if "kernel" in jax.tree_util.keystr(path):
            assert not np.allclose(leaf[0], leaf[1]) and not np.allclose(leaf[1], leaf[2])
    q = o2sac.critic_net(h).apply({"params": state.critic.params}, jnp.ones((7, 5)), jnp.ones((7, 2)))
    assert q.shape == (3, 7) and len(np.unique(np.asarray(q[:, 0]))) == 3
    assert o2sac.make_hyper(o2sac.TrainConfig(**{**TINY, "double_critic": False}), 5, 2).finetune_n_critics == 1
    # the actor's parameter tree has cal_ql.py's TanhGaussianActor names and shapes (one-to-one hand-off)
    mine = o2sac.actor_net(h).init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]
    theirs = cal_ql.TanhGaussianActor(2, (32, 32), True, 1.0, -1.0).init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))
    assert jax.tree.map(np.shape, mine) == jax.tree.map(np.shape, theirs["params"])


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="multiple of update_block"):
        o2sac.TrainConfig(align_steps=1050, update_block=100)
    with pytest.raises(ValueError, match="mixing_ratio"):
        o2sac.TrainConfig(mixing_ratio=1.0)
    with pytest.raises(ValueError, match="offline critics"):
        o2sac.TrainConfig(policy_reevaluation=False, n_critics=3)


# ---- end to end
def test_end_to_end_all_phases(reference_run):
    _, run_dir, result, evals = reference_run
    assert [e["phase"] for e in evals] == PHASES
    for e in evals:
        assert all(k in e for k in FIELDS) and e["episodes"] == 2 and np.isfinite(e["normalized_score"])
    for e in evals[2:]:
        assert all(np.isfinite(e[k]) for k in ("lambda", "kl_to_reference", "q_offline_mode", "alpha", "epsilon"))
    # re-evaluation keeps the offline actor: its score is the offline one, its Q comes from the new critics
    assert all(e["score_reused"] and e["normalized_score"] == evals[1]["normalized_score"] for e in evals[2:4])
    assert evals[2]["q_offline_mode"] != evals[1]["q_offline_mode"]
    assert evals[2]["kl_to_reference"] == pytest.approx(0.0, abs=1e-3)
    online = evals[-3:]
    assert [e["env_steps"] for e in online] == [100, 200, 300]
    assert online[0]["lambda"] == pytest.approx(1.0)  # no update before warmup_steps = 100
    assert online[-1]["lambda"] != 1.0 and online[-1]["epsilon"] == pytest.approx(2.0)  # end_steps = 300
    assert all(isinstance(e["reference_updated"], bool) for e in online)
    assert result["updates"] == 300 + 200 * 2  # offline + PR + VA, then utd 2 for env steps 101..300
    assert result["seeds"] == [0] and all(e["seed"] == 0 for e in evals)
    times = [e["wall_time"] for e in read_evals(run_dir, timing=True)]
    assert times == sorted(times) and times[0] > 0
    ckpt = run_dir / "checkpoints"
    for name in ("offline", "latest"):
        assert (ckpt / name / "state.npz").exists() and (ckpt / name / "config.yaml").exists()
    assert buffer_rows(ckpt.parent) == 300


@pytest.mark.parametrize("kill_after", [4, 9])  # 4: during re-evaluation, 9: during fine-tuning
def test_resume_after_kill_matches_uninterrupted(reference_run, tmp_path, monkeypatch, kill_after):
    assert_resume_matches(o2sac, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), kill_after, monkeypatch,
                          reference_run[1])


def test_resume_falls_back_to_the_offline_checkpoint(reference_run, tmp_path, monkeypatch):
    """A damaged `latest` (no `latest.old`): --resume restarts from `offline` and ends as the uninterrupted run."""
    assert_resume_matches(o2sac, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), 9, monkeypatch,
                          reference_run[1], after_kill=lambda rd: (rd / "checkpoints" / "latest" / "state.npz").unlink())


@pytest.mark.parametrize("function,calls", [("scan_cql_updates", 1), ("scan_reconstruction_updates", 3),
                                            ("scan_online_updates", 3)])
def test_ctrl_c_checkpoints_and_resumes_exactly(reference_run, tmp_path, monkeypatch, function, calls):
    assert_ctrl_c_resumes(o2sac, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), function, calls,
                          monkeypatch, reference_run[1])


def test_offline_checkpoint_reuse_equals_the_full_run(reference_run, tmp_path):
    dataset_id, ref_dir, _, reference = reference_run
    o2sac.train(tiny_config(dataset_id, tmp_path, offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    assert read_evals(tmp_path) == reference[1:]


@pytest.mark.parametrize("switches, phases", [
    (dict(policy_reevaluation=False), ["offline", "alignment", "alignment", "online", "online", "online"]),
    (dict(value_alignment=False), ["offline", "reevaluation", "reevaluation", "online", "online", "online"]),
    (dict(constrained_finetuning=False), PHASES[1:]),
    (dict(policy_reevaluation=False, value_alignment=False, constrained_finetuning=False),
     ["offline", "online", "online", "online"]),
], ids=["no_PR", "no_VA", "no_CF", "naive"])
def test_ablation_switches(reference_run, tmp_path, switches, phases):
    dataset_id, ref_dir, _, reference = reference_run
    o2sac.train(tiny_config(dataset_id, tmp_path, offline_checkpoint=str(ref_dir / "checkpoints" / "offline"),
                            **switches))
    evals = read_evals(tmp_path)
    assert [e["phase"] for e in evals] == phases and evals[0] == reference[1]
    if not any(switches.get(k, True) for k in ("policy_reevaluation", "value_alignment")):
        # naive start: the offline CQL critics are kept (first online eval precedes any update: warmup 100)
        assert evals[1]["q_offline_mode"] == pytest.approx(reference[1]["q_offline_mode"], rel=1e-5)
    if not switches.get("constrained_finetuning", True):
        assert all(e["lambda"] == 0.0 for e in evals if e["phase"] == "online")
    if not switches.get("value_alignment", True):  # the actor leaves the reconstruction unchanged
        first_online = next(e for e in evals if e["phase"] == "online")  # at env step 100: no update yet
        assert first_online["kl_to_offline"] == pytest.approx(0.0, abs=1e-3)


class _GaussianActorState(NamedTuple):  # the form of an IQL checkpoint (state-independent log_std, value net)
    actor: Any
    value: Any
    obs_mean: Any
    obs_std: Any


def test_offline_checkpoint_from_cal_ql_and_wrong_forms(reference_run, tmp_path):
    dataset_id, ref_dir, _, _ = reference_run
    # a genuine cal_ql.py checkpoint (no updates: only its layout and actor matter here)
    cal_cfg = cal_ql.TrainConfig(dataset_id=dataset_id, run_dir=str(tmp_path / "cal_ql"), offline_updates=0,
                                 online_steps=0, update_block=50, offline_eval_every=50, eval_episodes=1,
                                 policy_hidden=[32, 32], critic_hidden=[16], normalize=True, reward_bias=0.0,
                                 terminate_on_success=False, wandb_mode="disabled")
    cal_ql.train(cal_cfg)
    src = tmp_path / "cal_ql" / "checkpoints" / "offline"
    cfg = tiny_config(dataset_id, tmp_path / "o2sac", offline_checkpoint=str(src))
    ds = o2sac.data.load_dataset(dataset_id)
    h_cql = o2sac.make_hyper(cfg, ds.observations.shape[1], ds.actions.shape[1])
    start = o2sac.load_offline_start(str(src), cfg, h_cql, ds.obs_mean, ds.obs_std)
    cal_state = cal_ql.load_checkpoint(src, cal_ql.init_state(cal_ql.make_hyper(cal_cfg, *h_cql[:2]),
                                                              jax.random.PRNGKey(9), ds.obs_mean, ds.obs_std, 1.0))[0]
    obs = ds.observations[:20]
    theirs = cal_ql.act_deterministic(cal_state.actor.params, cal_state.obs_mean, cal_state.obs_std, obs,
                                      cal_ql.make_hyper(cal_cfg, *h_cql[:2]))
    mine = o2sac.act_deterministic(o2sac.seed_slice(start.actor, 0), jnp.asarray(ds.obs_mean),
                                   jnp.asarray(ds.obs_std), obs, h_cql)
    np.testing.assert_allclose(np.asarray(mine), np.clip(np.asarray(theirs), -0.9999, 0.9999), rtol=1e-5, atol=1e-6)
    assert start.critic is None and start.source == "cal_ql"
    o2sac.train(cfg)  # fine-tunes the cal_ql actor: fresh critics, all phases
    evals = read_evals(tmp_path / "o2sac")
    assert [e["phase"] for e in evals] == PHASES[1:] and evals[0]["q_offline_mode"] is None

    with pytest.raises(ValueError, match=r"set policy_hidden: \[32, 32\]"):
        o2sac.load_offline_start(str(src), tiny_config(dataset_id, tmp_path, policy_hidden=[16, 16]),
                                 h_cql._replace(policy_hidden=(16, 16)), ds.obs_mean, ds.obs_std)
    with pytest.raises(ValueError, match="policy_reevaluation: true"):
        o2sac.load_offline_start(str(src), tiny_config(dataset_id, tmp_path, policy_reevaluation=False), h_cql,
                                 ds.obs_mean, ds.obs_std)
    with pytest.raises(ValueError, match="set normalize: True"):
        o2sac.load_offline_start(str(src), tiny_config(dataset_id, tmp_path, normalize=False), h_cql,
                                 np.zeros_like(ds.obs_mean), np.ones_like(ds.obs_std))
    # an IQL-style Gaussian actor is a different distribution
    bad = tmp_path / "iql_like"
    bad.mkdir()
    o2sac.save_tree(bad / "state.npz", _GaussianActorState(
        o2sac.Trainable({"Dense_0": {"kernel": np.zeros((11, 32)), "bias": np.zeros(32)}, "log_std": np.zeros(3)}, ()),
        o2sac.Trainable({"Dense_0": {"kernel": np.zeros((11, 1))}}, ()), ds.obs_mean, ds.obs_std))
    (bad / "meta.json").write_text(json.dumps({"phase": "online"}))
    with pytest.raises(ValueError, match="IQL-style Gaussian actor.*O2SAC needs a tanh-Gaussian actor"):
        o2sac.load_offline_start(str(bad), cfg, h_cql, ds.obs_mean, ds.obs_std)
    with pytest.raises(ValueError, match="not an offline one"):
        o2sac.load_offline_start(str(ref_dir / "checkpoints" / "latest"), cfg, h_cql, ds.obs_mean, ds.obs_std)
    with pytest.raises(o2sac.RunError, match="no intact checkpoint there"):
        o2sac.train(tiny_config(dataset_id, tmp_path / "run", offline_checkpoint=str(tmp_path / "missing")))


def test_nan_loss_stops_with_step_and_name(reference_run, tmp_path):
    assert_nan_loss_stops(o2sac, tiny_config(reference_run[0], tmp_path, reward_bias=float("nan")),
                          r"offline/.*critic_loss = nan.* at update 1\b")


# ---- several seeds in one process
@pytest.fixture(scope="module")
def multi_run(reference_run, tmp_path_factory):
    """The tiny run with --num_seeds 2 (seeds 0 and 1): (run dir, train() result)."""
    run_dir = tmp_path_factory.mktemp("o2sac_multi")
    return run_dir, o2sac.train(tiny_config(reference_run[0], run_dir, num_seeds=2))


def test_num_seeds_matches_single_seed_runs(reference_run, multi_run, tmp_path):
    """--num_seeds 2 trains seeds 0 and 1 together (every phase vmapped; per-seed reference, best score, lambda,
    alpha, eps_t); each seed equals its single-seed run up to float32 round-off."""
    dataset_id, _, _, reference = reference_run
    multi_dir, multi = multi_run
    single1 = tmp_path / "single1"
    o2sac.train(tiny_config(dataset_id, single1, seed=1))
    assert multi["seeds"] == [0, 1] and multi["env_steps"] == [300, 300] and multi["updates"] == [700, 700]
    assert not (multi_dir / "eval.jsonl").exists()
    for seed, expected in ((0, reference), (1, read_evals(single1))):
        got = read_evals(multi_dir / f"seed{seed}")
        schedule = lambda evals: [(e["seed"], e["phase"], e["updates"], e["phase_updates"], e["env_steps"],  # noqa
                                   e["epsilon"]) for e in evals]
        assert schedule(got) == schedule(expected)
        before = [e for e in got if e["phase"] != "online"]  # the update-only phases
        for key in ("return", "q_offline_mode", "alpha"):
            np.testing.assert_allclose([e[key] for e in before], [e[key] for e in expected[:len(before)]], rtol=1e-3)
        aligned = [i for i, e in enumerate(before) if e["phase"] == "alignment"]  # (PR: pi == pi_ref, KL ~ 0)
        np.testing.assert_allclose([before[i]["kl_to_reference"] for i in aligned],
                                   [expected[i]["kl_to_reference"] for i in aligned], rtol=1e-2, atol=1e-3)
        # online: the same schedule; returns, lambda and alpha agree closely (round-off can grow through the dynamics)
        np.testing.assert_allclose([e["return"] for e in got], [e["return"] for e in expected], rtol=0.05)
        for key in ("lambda", "alpha"):
            np.testing.assert_allclose([e[key] for e in got[2:]], [e[key] for e in expected[2:]], rtol=1e-2)
        assert buffer_rows(multi_dir, seed) == 300
    assert read_evals(multi_dir / "seed0") != read_evals(multi_dir / "seed1")  # the seeds differ


def test_num_seeds_resume_after_kill_matches_uninterrupted(reference_run, multi_run, tmp_path, monkeypatch):
    dataset_id = reference_run[0]
    multi_dir = multi_run[0]
    assert_resume_matches(o2sac, lambda **kw: tiny_config(dataset_id, tmp_path, num_seeds=2, **kw), 9, monkeypatch,
                          multi_dir, seeds=(0, 1))  # killed during fine-tuning


def test_num_seeds_offline_checkpoint(reference_run, multi_run, tmp_path):
    """An N=2 offline checkpoint restarts both seeds exactly; a checkpoint of another seed count fails clearly."""
    dataset_id, ref_dir, _, _ = reference_run
    multi_dir = multi_run[0]
    source = str(multi_dir / "checkpoints" / "offline")
    o2sac.train(tiny_config(dataset_id, tmp_path / "ok", num_seeds=2, offline_checkpoint=source, online_steps=100))
    for seed in (0, 1):
        got, expected = read_evals(tmp_path / "ok" / f"seed{seed}"), read_evals(multi_dir / f"seed{seed}")
        assert got == expected[1:7]  # the loaded CQL actors, re-evaluation, alignment, first online evaluation
    with pytest.raises(ValueError, match="holds 2 seed.*--num_seeds 2"):
        o2sac.train(tiny_config(dataset_id, tmp_path / "x1", offline_checkpoint=source))
    with pytest.raises(ValueError, match="holds 1 seed.*--num_seeds 1"):
        o2sac.train(tiny_config(dataset_id, tmp_path / "x2", num_seeds=2,
                                offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))


def test_num_seeds_start_from_cal_ql_checkpoints(reference_run, multi_run, tmp_path):
    """An N-seed cal_ql.py checkpoint starts an N-seed run seed by seed; a one-seed one gives every seed its actor;
    other seed counts fail clearly."""
    dataset_id = reference_run[0]
    common = dict(dataset_id=dataset_id, offline_updates=0, online_steps=0, update_block=50, offline_eval_every=50,
                  eval_episodes=2, policy_hidden=[32, 32], critic_hidden=[16], normalize=True, reward_bias=0.0,
                  terminate_on_success=False, wandb_mode="disabled")
    cal_ql.train(cal_ql.TrainConfig(run_dir=str(tmp_path / "cal2"), num_seeds=2, **common))
    cal_ql.train(cal_ql.TrainConfig(run_dir=str(tmp_path / "cal1"), seed=5, **common))
    two, one = tmp_path / "cal2" / "checkpoints" / "offline", tmp_path / "cal1" / "checkpoints" / "offline"
    ds = o2sac.data.load_dataset(dataset_id)
    h_cql = o2sac.make_hyper(tiny_config(dataset_id, tmp_path), ds.observations.shape[1], ds.actions.shape[1])
    cal_h = cal_ql.make_hyper(cal_ql.TrainConfig(**common), *h_cql[:2])
    template = cal_ql.stack_seeds([cal_ql.init_state(cal_h, jax.random.PRNGKey(s), ds.obs_mean, ds.obs_std, 1.0)
                                   for s in (0, 1)])
    cal_state = cal_ql.load_checkpoint(two, template)[0]
    start = o2sac.load_offline_start(str(two), tiny_config(dataset_id, tmp_path, num_seeds=2), h_cql, ds.obs_mean,
                                     ds.obs_std)
    for i in (0, 1):  # seed by seed: this run's i-th seed gets cal_ql's i-th actor
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(o2sac.seed_slice(start.actor, i)),
                                                        jax.tree.leaves(o2sac.seed_slice(cal_state.actor.params, i))))
    kernel = start.actor["MLP_0"]["Dense_0"]["kernel"]
    assert not np.array_equal(kernel[0], kernel[1])  # two different actors
    start = o2sac.load_offline_start(str(one), tiny_config(dataset_id, tmp_path, num_seeds=2), h_cql, ds.obs_mean,
                                     ds.obs_std)
    assert all(np.array_equal(x[0], x[1]) for x in jax.tree.leaves(start.actor))  # the one actor for both seeds
    with pytest.raises(ValueError, match="holds 2 seeds.*this run trains 3: run it with --num_seeds 2"):
        o2sac.load_offline_start(str(two), tiny_config(dataset_id, tmp_path, num_seeds=3), h_cql, ds.obs_mean,
                                 ds.obs_std)
    # end to end: fine-tune both cal_ql actors (fresh critics); each seed's first record is its cal_ql actor's score
    o2sac.train(tiny_config(dataset_id, tmp_path / "o2sac", num_seeds=2, offline_checkpoint=str(two), online_steps=0))
    for seed in (0, 1):
        evals = read_evals(tmp_path / "o2sac" / f"seed{seed}")
        assert [e["phase"] for e in evals] == PHASES[1:6] + ["online"] and evals[0]["q_offline_mode"] is None
        cal_score = read_evals(tmp_path / "cal2" / f"seed{seed}")[0]["normalized_score"]
        assert evals[0]["normalized_score"] == pytest.approx(cal_score, rel=1e-3)  # tanh(mean) vs its 0.9999 clip
