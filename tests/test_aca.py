"""ACA: maths against NumPy (policy log-probs, soft-clip bound, R <- Z initialisation, the SAC+ML / baseline-Z /
aligned-critic losses, the w schedule), ensemble init, and tiny end-to-end runs (offline -> online with an empty
buffer and with top-N seeding, resume, offline checkpoint reuse, clear errors, several seeds in one process)."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aca
import data
from conftest import (assert_ctrl_c_resumes, assert_nan_loss_stops, assert_resume_matches, buffer_rows,
                      kill_after_checkpoints, read_evals)

ROOT = Path(__file__).resolve().parent.parent

# Tiny budgets; every run in this file shares these static shapes, so the update blocks compile once.
TINY = dict(offline_updates=200, online_steps=300, update_block=50, online_block=50, offline_eval_every=100,
            online_eval_every=100, eval_episodes=2, hidden_dims=[32, 32], batch_size=64, wandb_mode="disabled")


def tiny_config(dataset_id, run_dir, **overrides):
    return aca.TrainConfig(dataset_id=dataset_id, run_dir=str(run_dir), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory):
    """One uninterrupted tiny run (empty online buffer): (dataset id, run dir, train() result, eval records)."""
    dataset_id = tiny_dataset("hopper", "medium")
    run_dir = tmp_path_factory.mktemp("aca_reference")
    result = aca.train(tiny_config(dataset_id, run_dir))
    return dataset_id, run_dir, result, read_evals(run_dir)


# ---- NumPy references
LOG2PI = math.log(2 * math.pi)


def np_gauss(mean, log_std, x):
    return np.sum(-0.5 * ((x - mean) / np.exp(log_std)) ** 2 - log_std - 0.5 * LOG2PI, -1)


def np_log1m_tanh2(u):  # log(1 - tanh(u)^2), stable
    return 2 * (math.log(2) - np.abs(u) - np.log1p(np.exp(-2 * np.abs(u))))


def np_log_prob(mean, log_std, a, squashed):
    if not squashed:
        return np_gauss(mean, log_std, a)
    u = np.arctanh(np.clip(a, -0.999999, 0.999999))
    return np_gauss(mean, log_std, u) - np.sum(np_log1m_tanh2(u), -1)


def np_sample(mean, log_std, eps, squashed):
    x = mean + np.exp(log_std) * eps
    if squashed:
        return np.tanh(x), np_gauss(mean, log_std, x) - np.sum(np_log1m_tanh2(x), -1)
    a = np.clip(x, -1, 1)
    return a, np_gauss(mean, log_std, a)


def np_clip_bound(mean, log_std, beta, squashed):
    std = np.exp(log_std)
    if squashed:
        f = lambda u: np_gauss(mean, log_std, u) - np.sum(np_log1m_tanh2(u), -1)  # noqa: E731
    else:
        f = lambda u: np_gauss(mean, log_std, u)  # noqa: E731
    return np.minimum(f(mean - beta * std), f(mean + beta * std))


def np_soft_clip(x, c):
    return np.logaddexp(0.0, x - c) + c


def f64(x):
    return np.asarray(x, np.float64)


def tiny_hyper(squashed=True, **kw):
    cfg = aca.TrainConfig(hidden_dims=[16, 16], squashed_policy=squashed, **kw)
    return aca.make_hyper(cfg, 5, 3)


def random_batch(rng, b=32, obs_dim=5, act_dim=3):
    return aca.Buffer(*(jnp.asarray(x, jnp.float32) for x in (
        rng.normal(size=(b, obs_dim)), rng.uniform(-1, 1, (b, act_dim)), rng.normal(size=b),
        rng.normal(size=(b, obs_dim)), (rng.uniform(size=b) < 0.2))))


# ---- maths
@pytest.mark.parametrize("squashed", [True, False])
def test_policy_sample_and_log_prob_match_numpy(squashed):
    h = tiny_hyper(squashed)
    actor = aca.networks(h)[0]
    params = actor.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"]
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(64, 5)).astype(np.float32)
    mean, log_std = (f64(x) for x in actor.apply({"params": params}, obs))
    if not squashed:  # d3rlpy NonSquashedNormalPolicy: tanh mean, std parameter -5 + 5 sigmoid(0) = -2.5 at init
        np.testing.assert_allclose(log_std, -2.5, atol=1e-6)
        assert np.all(np.abs(mean) <= 1)
    eps = rng.normal(size=(64, 3)) * 3
    a, logp = aca.sample_action(jnp.asarray(mean, jnp.float32), jnp.asarray(log_std, jnp.float32),
                                jnp.asarray(eps, jnp.float32), squashed)
    a_np, logp_np = np_sample(mean, log_std, eps, squashed)
    np.testing.assert_allclose(a, a_np, atol=1e-5)
    np.testing.assert_allclose(logp, logp_np, rtol=1e-4, atol=1e-3)
    assert np.all(np.abs(np.asarray(a)) <= 1)
    # actions inside (-0.99, 0.99) (float32 atanh is inexact closer to 1), then boundary actions (clamped first)
    given = np.concatenate([np.clip(a_np[:60], -0.99, 0.99), np.array([[1.0, -1.0, 0.0]] * 4)])
    got = aca.log_prob(jnp.asarray(mean[:64], jnp.float32), jnp.asarray(log_std[:64], jnp.float32),
                       jnp.asarray(given, jnp.float32), squashed)
    expected = np_log_prob(mean, log_std, f64(given.astype(np.float32)), squashed)  # the float32-rounded actions
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got)[:60], expected[:60], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(got)[60:], expected[60:], rtol=1e-3, atol=0.2)  # atanh(float32 0.999999)


@pytest.mark.parametrize("squashed", [True, False])
def test_soft_clip_bound_matches_numpy(squashed):
    rng = np.random.default_rng(1)
    mean, log_std = rng.normal(size=(40, 3)) * 0.7, rng.normal(size=(40, 3)) * 0.5 - 0.5
    if not squashed:
        mean = np.tanh(mean)
    for beta in (3.0, 7.0, 15.0):
        c = aca.clip_bound(jnp.asarray(mean, jnp.float32), jnp.asarray(log_std, jnp.float32), beta, squashed)
        expected = np_clip_bound(mean, log_std, beta, squashed)
        np.testing.assert_allclose(c, expected, rtol=1e-4, atol=1e-3)
        if not squashed:  # symmetric: both sides equal sum(-beta^2 / 2 - log std - log(2 pi) / 2)
            np.testing.assert_allclose(c, np.sum(-beta ** 2 / 2 - log_std - 0.5 * LOG2PI, -1), rtol=1e-5)
    x = rng.normal(size=40) * 30
    c = rng.normal(size=40) * 10
    clipped = np.asarray(aca.soft_clip(jnp.asarray(x), jnp.asarray(c)))
    np.testing.assert_allclose(clipped, np_soft_clip(x, c), rtol=1e-5, atol=1e-5)
    assert np.all(clipped >= np.maximum(x, c) - 1e-5) and np.all(clipped <= np.maximum(x, c) + math.log(2) + 1e-5)


def test_interpolation_weight_matches_official_loop():
    for interp in ([1, 40, 0.5], [1, 10, 0], [1, 100, 1], [1, 200, 0.5]):
        h = tiny_hyper(interpolation=[float(x) for x in interp])
        w, expected = interp[0], {}
        for n in range(60_001):  # official ACA._update_interpolation, after every update
            if n in (0, 1, 999, 5000, 9999, 10_000, 20_000, 60_000):
                expected[n] = w
            w = max(w - interp[0] / (interp[1] * 1000), interp[2])
        got = {n: float(aca.interpolation_weight(jnp.asarray(n), h)) for n in expected}
        np.testing.assert_allclose(list(got.values()), list(expected.values()), atol=1e-6)


def test_clip_grad_norm_matches_torch_rule():
    grads = {"a": jnp.asarray([3.0, 4.0]), "b": jnp.asarray([[12.0]])}  # norm 13
    clipped, norm = aca.clip_grad_norm(grads, 0.25)
    assert float(norm) == pytest.approx(13.0)
    scale = 0.25 / (13.0 + 1e-6)
    np.testing.assert_allclose(clipped["a"], [3 * scale, 4 * scale], rtol=1e-6)
    same, _ = aca.clip_grad_norm(grads, 100.0)
    np.testing.assert_allclose(same["b"], [[12.0]])


def test_critic_from_baseline_equals_z_for_any_action():
    h = tiny_hyper(n_critics=3)
    state = aca.init_state(h, jax.random.PRNGKey(0), np.zeros(5), np.ones(5), initial_temperature=0.3)
    # move the state away from its initialisation so the switch has something to reset
    adam = state.critic.opt_state[0]._replace(count=jnp.asarray(5, jnp.int32))
    state = state._replace(log_temp=state.log_temp._replace(params=jnp.asarray(-1.7)),
                           critic=state.critic._replace(opt_state=(adam,) + tuple(state.critic.opt_state[1:])))
    aligned = aca.align(state, h)
    _, critic, baseline = aca.networks(h)
    rng = np.random.default_rng(2)
    obs = jnp.asarray(rng.normal(size=(50, 5)), jnp.float32)
    z = baseline.apply({"params": state.baseline.params}, obs)
    for _ in range(3):
        act = jnp.asarray(rng.uniform(-1, 1, (50, 3)), jnp.float32)
        r = critic.apply({"params": aligned.critic.params}, obs, act)
        np.testing.assert_allclose(r, z, rtol=1e-6, atol=1e-6)  # R_j(s, a) == Z_j(s), member by member
        r_target = critic.apply({"params": aligned.critic_target}, obs, act)
        np.testing.assert_allclose(r_target, z, rtol=1e-6, atol=1e-6)
    kernel = aligned.critic.params["TorchLinear_0"]["kernel"]
    assert kernel.shape == (3, 8, 16) and np.all(np.asarray(kernel[:, 5:]) == 0)  # action rows zeroed
    assert float(aligned.log_temp.params) == 0.0  # T reset to 1
    for a, b in zip(jax.tree.leaves(aligned.ref_actor), jax.tree.leaves(state.actor.params)):
        np.testing.assert_array_equal(a, b)  # pi0 = pi at the switch
    # official: the SAC+ML Adam states are kept; online_reset_optimizers gives fresh ones
    for a, b in zip(jax.tree.leaves(aligned.critic.opt_state), jax.tree.leaves(state.critic.opt_state)):
        np.testing.assert_array_equal(a, b)
    assert int(aligned.critic.opt_state[0].count) == 5
    reset = aca.align(state, h, reset_optimizers=True)
    assert int(reset.critic.opt_state[0].count) == 0


def test_offline_update_matches_numpy():
    """Temperature, critic, baseline-Z calibration and the SAC+ML actor loss (ML term, Q normalised by mean|Q|)."""
    h = tiny_hyper(n_critics=2, ml_alpha=2.5, target_entropy_coef=0.5, discount=0.9)
    state = aca.init_state(h, jax.random.PRNGKey(3), np.zeros(5), np.ones(5), initial_temperature=0.5)
    rng = np.random.default_rng(3)
    batch = random_batch(rng)
    noise = {k: jnp.asarray(rng.normal(size=(32, 3)), jnp.float32) for k in ("temp", "next", "z_next", "pi")}
    new, m = jax.jit(aca.offline_update, static_argnames="h")(state, batch, noise, h)
    actor, critic, baseline = aca.networks(h)
    obs, act, rew, next_obs, done = (f64(x) for x in batch)
    mean, log_std = (f64(x) for x in actor.apply({"params": state.actor.params}, batch.obs))
    nmean, nlog_std = (f64(x) for x in actor.apply({"params": state.actor.params}, batch.next_obs))
    n = {k: f64(v) for k, v in noise.items()}

    # temperature: L_T = -mean(log T (log pi - H)), H = 0.5 |A|; the new T is used by every later loss
    _, logp_t = np_sample(mean, log_std, n["temp"], True)
    log_t0 = math.log(0.5)
    np.testing.assert_allclose(m["temp_loss"], -np.mean(log_t0 * (logp_t - 1.5)), rtol=1e-4)
    temp = float(np.exp(new.log_temp.params))
    first_adam_step = -3e-4 * np.sign(-np.mean(logp_t - 1.5))  # Adam's first step: -lr * sign(gradient)
    assert m["alpha"] == pytest.approx(temp) and temp == pytest.approx(0.5 * math.exp(first_adam_step), rel=1e-5)

    # critic: y = r + gamma (1-d) [min_j Qbar_j(s', a') - T log pi(a'|s')], loss = sum_j MSE_j
    a_next, logp_next = np_sample(nmean, nlog_std, n["next"], True)
    q_next = f64(critic.apply({"params": state.critic_target}, batch.next_obs, jnp.asarray(a_next, jnp.float32)))
    y = rew + 0.9 * (1 - done) * (q_next.min(0) - temp * logp_next)
    q = f64(critic.apply({"params": state.critic.params}, batch.obs, batch.act))
    np.testing.assert_allclose(m["critic_loss"], ((q - y) ** 2).mean(-1).sum(), rtol=1e-4)

    # baseline: log pi(a|s) + Z_j(s) regressed on r + gamma (1-d) [log pi(a''|s') + min_j Z_j(s') - T log pi(a''|s')]
    _, logp_z = np_sample(nmean, nlog_std, n["z_next"], True)
    z_next = f64(baseline.apply({"params": state.baseline.params}, batch.next_obs)).min(0)
    y_z = rew + 0.9 * (1 - done) * (logp_z + z_next - temp * logp_z)
    z = f64(baseline.apply({"params": state.baseline.params}, batch.obs))
    logp_data = np_log_prob(mean, log_std, act, True)
    np.testing.assert_allclose(m["baseline_loss"], ((logp_data + z - y_z) ** 2).mean(-1).sum(), rtol=1e-4)

    # actor: lambda = alpha / mean|min_j Q_j(s, a~)| with the UPDATED critic; loss = lambda * SAC - mean log pi(a|s)
    a_pi, logp_pi = np_sample(mean, log_std, n["pi"], True)
    q_pi = f64(critic.apply({"params": new.critic.params}, batch.obs, jnp.asarray(a_pi, jnp.float32))).min(0)
    lam = 2.5 / np.abs(q_pi).mean()
    np.testing.assert_allclose(m["lambda"], lam, rtol=1e-4)
    np.testing.assert_allclose(m["ml_loss"], -logp_data.mean(), rtol=1e-4)
    np.testing.assert_allclose(m["actor_loss"], lam * np.mean(temp * logp_pi - q_pi) - logp_data.mean(), rtol=1e-4)

    # targets: Qbar <- tau Q' + (1 - tau) Qbar
    for t_new, q_new, t_old in zip(jax.tree.leaves(new.critic_target), jax.tree.leaves(new.critic.params),
                                   jax.tree.leaves(state.critic_target)):
        np.testing.assert_allclose(t_new, 0.005 * f64(q_new) + 0.995 * f64(t_old), rtol=1e-5, atol=1e-7)
    assert int(new.updates) == 1 and int(new.online_updates) == 0


@pytest.mark.parametrize("squashed", [True, False])
def test_online_update_matches_numpy(squashed):
    """Aligned critic Q = R + w softclip(log pi0) in the TD target and the regression, actor against it."""
    h = tiny_hyper(squashed, interpolation=[1.0, 0.01, 0.2], beta=2.0, discount=0.95)  # w_step 0.1 per update
    state = aca.init_state(h, jax.random.PRNGKey(4), np.zeros(5), np.ones(5))
    state = aca.align(state, h)
    other = aca.networks(h)[0].init(jax.random.PRNGKey(99), jnp.zeros((1, 5)))["params"]
    state = state._replace(ref_actor=other, online_updates=jnp.asarray(7, jnp.int32))  # pi0 != pi, w = 0.3
    rng = np.random.default_rng(4)
    batch = random_batch(rng)
    noise = {k: jnp.asarray(rng.normal(size=(32, 3)), jnp.float32) for k in ("temp", "next", "pi")}
    new, m = jax.jit(aca.online_update, static_argnames="h")(state, batch, noise, h)
    actor, critic, _ = aca.networks(h)
    obs, act, rew, next_obs, done = (f64(x) for x in batch)
    out = lambda p, o: (f64(x) for x in actor.apply({"params": p}, o))  # noqa: E731
    mean, log_std = out(state.actor.params, batch.obs)
    nmean, nlog_std = out(state.actor.params, batch.next_obs)
    m0, ls0 = out(other, batch.obs)
    nm0, nls0 = out(other, batch.next_obs)
    n = {k: f64(v) for k, v in noise.items()}
    w = 0.3
    assert float(m["w"]) == pytest.approx(w, abs=1e-6) and int(new.online_updates) == 8

    _, logp_t = np_sample(mean, log_std, n["temp"], squashed)
    np.testing.assert_allclose(m["temp_loss"], -np.mean(0.0 * (logp_t - 3.0)), atol=1e-6)  # log T = 0 after reset
    temp = float(np.exp(new.log_temp.params))

    def bonus(mm, ls, a):
        return w * np_soft_clip(np_log_prob(mm, ls, a, squashed), np_clip_bound(mm, ls, 2.0, squashed))

    a_next, logp_next = np_sample(nmean, nlog_std, n["next"], squashed)
    r_next = f64(critic.apply({"params": state.critic_target}, batch.next_obs, jnp.asarray(a_next, jnp.float32)))
    y = rew + 0.95 * (1 - done) * (r_next.min(0) + bonus(nm0, nls0, a_next) - temp * logp_next)
    r = f64(critic.apply({"params": state.critic.params}, batch.obs, batch.act))
    expected = ((r + bonus(m0, ls0, act) - y) ** 2).mean(-1).sum()
    np.testing.assert_allclose(m["critic_loss"], expected, rtol=1e-3)
    np.testing.assert_allclose(m["clip_bound"], np_clip_bound(m0, ls0, 2.0, squashed).mean(), rtol=1e-4)

    a_pi, logp_pi = np_sample(mean, log_std, n["pi"], squashed)
    r_pi = f64(critic.apply({"params": new.critic.params}, batch.obs, jnp.asarray(a_pi, jnp.float32))).min(0)
    q_pi = r_pi + bonus(m0, ls0, a_pi)
    np.testing.assert_allclose(m["actor_loss"], np.mean(temp * logp_pi - q_pi), rtol=1e-3, atol=1e-3)
    for a, b in zip(jax.tree.leaves(new.ref_actor), jax.tree.leaves(other)):
        np.testing.assert_array_equal(a, b)  # pi0 frozen
    for a, b in zip(jax.tree.leaves(new.baseline), jax.tree.leaves(state.baseline)):
        np.testing.assert_array_equal(a, b)  # Z not trained online


def test_top_episode_rows():
    rewards = np.array([1, 1, 5, 5, 5, 0, 2, 2], np.float32)  # episodes [0,1]=2, [2,4]=15, [5]=0, [6,7]=4
    ends = np.array([0, 1, 0, 0, 1, 1, 0, 1], bool)
    np.testing.assert_array_equal(aca.top_episode_rows(rewards, ends, 2), [6, 7, 2, 3, 4])
    assert len(aca.top_episode_rows(rewards, ends, 0)) == 0
    with pytest.raises(ValueError, match="n_trajs=5"):
        aca.top_episode_rows(rewards, ends, 5)


def test_ensemble_members_differ_at_init():
    h = tiny_hyper(n_critics=4)
    state = aca.init_state(h, jax.random.PRNGKey(0), np.zeros(5), np.ones(5))
    for tree in (state.critic.params, state.baseline.params):
        for leaf in jax.tree.leaves(tree):
            assert leaf.shape[0] == 4
            for i in range(4):
                for j in range(i + 1, 4):
                    assert not np.allclose(leaf[i], leaf[j])
    _, critic, baseline = aca.networks(h)
    q = critic.apply({"params": state.critic.params}, jnp.ones((7, 5)), jnp.ones((7, 3)))
    z = baseline.apply({"params": state.baseline.params}, jnp.ones((7, 5)))
    assert q.shape == (4, 7) and len(np.unique(np.asarray(q[:, 0]))) == 4
    assert z.shape == (4, 7) and len(np.unique(np.asarray(z[:, 0]))) == 4


# ---- configuration errors
def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="interpolation must be"):
        aca.TrainConfig(interpolation=[1.0, 40.0])
    with pytest.raises(ValueError, match="w0 and k must be > 0"):
        aca.TrainConfig(interpolation=[1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="n_trajs"):
        aca.TrainConfig(n_trajs=-1)
    with pytest.raises(ValueError, match="multiple of update_block"):
        aca.TrainConfig(offline_updates=1050, update_block=100)


# ---- end to end
def test_end_to_end_empty_buffer(reference_run):
    _, run_dir, result, evals = reference_run
    assert [e["phase"] for e in evals[:2]] == ["offline", "offline"]
    assert [e["updates"] for e in evals[:2]] == [100, 200]
    online = [e for e in evals if e["phase"] == "online"]
    assert len(online) >= 2 and online[-1]["env_steps"] == 300
    # no offline data online: updates start once the buffer holds more than batch_size (64) online transitions
    assert result["seeded_transitions"] == 0 and result["updates"] == 200 + 300 - 64
    for e in evals:
        assert e["episodes"] == 2 and np.isfinite(e["normalized_score"]) and e["seed"] == 0
        for key in ("alpha", "q_mean", "z_mean", "clip_low_mean", "clip_low_min", "clip_low_max"):
            assert np.isfinite(e[key]), key
        assert e["clip_low_min"] <= e["clip_low_mean"] <= e["clip_low_max"]
    for e in online:
        assert 0.5 < e["w"] <= 1.0 and np.isfinite(e["r_mean"]) and np.isfinite(e["log_pi0_mean"])
    assert online[-1]["w"] == pytest.approx(1.0 - (result["updates"] - 200) / 40_000, abs=1e-6)
    assert {k: v for k, v in result["last_eval"].items() if k != "wall_time"} == evals[-1]
    assert result["seeds"] == [0] and result["env_steps"] == 300
    times = [e["wall_time"] for e in read_evals(run_dir, timing=True)]
    assert times == sorted(times) and times[0] > 0
    ckpt = run_dir / "checkpoints"
    for name in ("offline", "latest"):
        assert (ckpt / name / "state.npz").exists() and (ckpt / name / "config.yaml").exists()
    assert buffer_rows(ckpt.parent) == 300  # every online transition is in the checkpointed buffer


def test_switch_initialises_r_from_z_in_a_run(reference_run):
    """The saved offline (SAC+ML) state, aligned, gives R(s, a) == Z(s) on dataset states for any action."""
    dataset_id, run_dir, _, _ = reference_run
    ds = data.load_dataset(dataset_id)
    h = aca.make_hyper(tiny_config(dataset_id, run_dir), ds.observations.shape[1], ds.actions.shape[1])
    template = aca.init_state(h, jax.random.PRNGKey(0), np.zeros(h.obs_dim), np.ones(h.obs_dim))
    offline, meta = aca.load_checkpoint(run_dir / "checkpoints" / "offline", template)
    assert meta["phase"] == "align" and meta["updates"] == [200] and meta["num_seeds"] == 1
    aligned = aca.align(offline, h)
    _, critic, baseline = aca.networks(h)
    obs = jnp.asarray(ds.observations[:500])
    z = baseline.apply({"params": offline.baseline.params}, obs)
    for a in (ds.actions[:500], -ds.actions[:500], np.zeros_like(ds.actions[:500])):
        np.testing.assert_allclose(critic.apply({"params": aligned.critic.params}, obs, jnp.asarray(a)), z,
                                   rtol=1e-5, atol=1e-5)


def test_top_n_seeding_run(reference_run, tmp_path):
    """The official option: the online buffer starts with the top-N offline episodes, so updates start at once."""
    dataset_id, ref_dir, _, reference = reference_run
    ds = data.load_dataset(dataset_id)
    seeded = len(aca.top_episode_rows(ds.rewards, ds.episode_ends, 3))
    assert seeded > 64
    result = aca.train(tiny_config(dataset_id, tmp_path, n_trajs=3,
                                   offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    evals = read_evals(tmp_path)
    assert result["seeded_transitions"] == seeded and result["updates"] == 200 + 300
    assert evals[0] == reference[1]  # same SAC+ML start
    assert [e for e in evals if e["phase"] == "online"] != [e for e in reference if e["phase"] == "online"]
    assert buffer_rows(tmp_path) == 300  # only online transitions are saved; seeded rows are rebuilt from the dataset


def test_d3rlpy_terminals_run(reference_run, tmp_path):
    """`d3rlpy_terminals` (the official online buffer): each transition is stored one env step late with that step's
    termination flag, so the last two transitions of a terminated episode are terminal; a time-limited or unfinished
    episode loses its last transition. Updates: one per env step after which the buffer holds > batch_size rows."""
    dataset_id, ref_dir, _, _ = reference_run
    result = aca.train(tiny_config(dataset_id, tmp_path, d3rlpy_terminals=True,
                                   offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    parts = [np.load(f) for f in sorted((tmp_path / "checkpoints" / "buffer" / "seed0").glob("rows_*.npz"))]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in ("obs", "next_obs", "done")}
    n = len(rows["done"])
    cuts = [0] + [k + 1 for k in range(n - 1) if not np.array_equal(rows["next_obs"][k], rows["obs"][k + 1])] + [n]
    episodes = [rows["done"][a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    terminated = [d for d in episodes if d[-1] == 1.0]
    assert len(terminated) >= 2 and all(len(d) >= 2 for d in terminated)  # a tiny policy falls within 300 steps
    for d in episodes:
        expected = np.zeros(len(d))
        if d[-1] == 1.0:
            expected[-2:] = 1.0
        np.testing.assert_array_equal(d, expected)
    assert 300 - (len(episodes) - len(terminated)) - 1 <= n <= 300 - (len(episodes) - len(terminated))
    # no time limit within 300 steps: the buffer lags the steps by one row except right after a termination, so
    # the first update comes at env step 66 (65 if an episode terminated there), one or none later than by default
    assert result["env_steps"] == 300 and result["updates"] in (200 + 300 - 65, 200 + 300 - 64)


@pytest.mark.parametrize("kill_after", [2, 5])  # 2: at the switch, 5: during fine-tuning
def test_resume_after_kill_matches_uninterrupted(reference_run, tmp_path, monkeypatch, kill_after):
    assert_resume_matches(aca, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), kill_after, monkeypatch,
                          reference_run[1])


@pytest.mark.parametrize("function,calls,num_seeds", [("scan_updates", 2, 1), ("update_online", 3, 1),
                                                      ("update_online", 3, 2)])
def test_ctrl_c_checkpoints_and_resumes_exactly(reference_run, multi_run, tmp_path, monkeypatch, function,
                                                calls, num_seeds):
    """SIGINT stops SAC+ML at the next block boundary, fine-tuning at the next episode end (of every seed), with a
    checkpoint; --resume then ends with exactly the uninterrupted run's records (the switch and w schedule
    included)."""
    assert_ctrl_c_resumes(aca, lambda **kw: tiny_config(reference_run[0], tmp_path, num_seeds=num_seeds, **kw),
                          function, calls, monkeypatch, reference_run[1] if num_seeds == 1 else multi_run[0],
                          seeds=None if num_seeds == 1 else (0, 1))


def test_resume_from_the_offline_checkpoint_realigns(reference_run, tmp_path, monkeypatch):
    """--resume past a damaged `latest` falls back to the offline checkpoint (phase "align", SAC+ML state): the
    switch is redone and the run ends with the uninterrupted run's records."""
    kill_after_checkpoints(aca, tiny_config(reference_run[0], tmp_path), 4, monkeypatch)  # an online checkpoint
    (tmp_path / "checkpoints" / "latest" / "state.npz").unlink()
    assert aca.load_meta(tmp_path / "checkpoints" / "offline")["phase"] == "align"
    aca.train(tiny_config(reference_run[0], tmp_path, resume=True))
    assert read_evals(tmp_path) == reference_run[3]


def test_offline_checkpoint_reuse_and_wrong_checkpoints(reference_run, tmp_path, monkeypatch):
    dataset_id, ref_dir, _, reference = reference_run
    aca.train(tiny_config(dataset_id, tmp_path / "reuse", offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    # the loaded state scores like the end of pre-training, and fine-tuning continues exactly as in the source run
    assert read_evals(tmp_path / "reuse") == reference[1:]

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the checks")
    monkeypatch.setattr(aca.data, "load_dataset", no_data)  # every refusal below comes before the data
    with pytest.raises(aca.RunError, match="online-phase checkpoint"):
        aca.train(tiny_config(dataset_id, tmp_path / "a", offline_checkpoint=str(ref_dir / "checkpoints" / "latest")))
    other = tmp_path / "iql_run" / "checkpoints" / "offline"  # another script's checkpoint (no ACA tag)
    other.mkdir(parents=True)
    np.savez(other / "state.npz", x=np.zeros(1))
    (other / "meta.json").write_text(json.dumps({"phase": "online", "updates": 10}))
    shutil.copy(ref_dir / "config.yaml", other / "config.yaml")
    with pytest.raises(aca.RunError, match="not written by algorithms/aca.py"):
        aca.train(tiny_config(dataset_id, tmp_path / "b", offline_checkpoint=str(other)))
    with pytest.raises(aca.RunError, match="no intact checkpoint there"):
        aca.train(tiny_config(dataset_id, tmp_path / "c", offline_checkpoint=str(tmp_path / "missing")))
    with pytest.raises(aca.RunError, match=r"holds 1 seed\(s\); run with --num_seeds 1"):
        aca.train(tiny_config(dataset_id, tmp_path / "d", num_seeds=2,
                              offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    # all refused before anything was written
    assert not any((tmp_path / d / "checkpoints").exists() for d in "abcd")


def test_nan_loss_stops_with_step_and_name(reference_run, tmp_path):
    assert_nan_loss_stops(aca, tiny_config(reference_run[0], tmp_path, reward_bias=float("nan")),
                          r"offline/critic_loss = nan.* at update 1\b")


def test_command_line(reference_run, tmp_path):
    """The script runs from the shell with a YAML plus overrides (pyrallis only under __main__)."""
    args = [sys.executable, str(ROOT / "algorithms" / "aca.py"), "--config_path",
            str(ROOT / "configs" / "aca" / "quickstart.yaml"), "--dataset_id", reference_run[0], "--run_dir",
            str(tmp_path), "--offline_updates", "50", "--update_block", "50", "--offline_eval_every", "50",
            "--online_steps", "60", "--online_eval_every", "1000", "--eval_episodes", "1", "--hidden_dims", "[16, 16]",
            "--batch_size", "32", "--n_trajs", "1"]
    out = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [e["phase"] for e in read_evals(tmp_path)] == ["offline", "online"]


# ---- several seeds in one process
@pytest.fixture(scope="module")
def multi_run(reference_run, tmp_path_factory):
    """An uninterrupted tiny --num_seeds 2 run (seeds 0 and 1): (run dir, train() result)."""
    run_dir = tmp_path_factory.mktemp("aca_multi")
    return run_dir, aca.train(tiny_config(reference_run[0], run_dir, num_seeds=2))


def test_num_seeds_matches_single_seed_runs(reference_run, multi_run, tmp_path):
    """--num_seeds 2 trains seeds 0 and 1 together (SAC+ML, switch and ACA vmapped, each seed its own buffer and
    w schedule); each equals its single-seed run up to float32 round-off."""
    dataset_id, _, ref_result, reference = reference_run
    multi_dir, multi = multi_run
    single1 = aca.train(tiny_config(dataset_id, tmp_path / "single1", seed=1))
    assert multi["seeds"] == [0, 1] and multi["env_steps"] == [300, 300]
    assert multi["updates"] == [ref_result["updates"], single1["updates"]] == [200 + 300 - 64] * 2
    assert not (multi_dir / "eval.jsonl").exists()
    for seed, expected in ((0, reference), (1, read_evals(tmp_path / "single1"))):
        got = read_evals(multi_dir / f"seed{seed}")
        assert [(e["seed"], e["phase"], e["updates"], e["env_steps"]) for e in got] == \
            [(e["seed"], e["phase"], e["updates"], e["env_steps"]) for e in expected]
        offline = [e for e in got if e["phase"] == "offline"]
        for key in ("return", "alpha", "q_mean", "z_mean"):
            np.testing.assert_allclose([e[key] for e in offline], [e[key] for e in expected[:len(offline)]],
                                       rtol=1e-3, err_msg=key)
        # online: the same schedule and w; returns agree closely (tiny round-off can grow through the dynamics)
        online = [e for e in got if e["phase"] == "online"]
        assert [e["w"] for e in online] == [e["w"] for e in expected if e["phase"] == "online"]
        np.testing.assert_allclose([e["return"] for e in got], [e["return"] for e in expected], rtol=0.05)
    rows = [sum(np.load(f)["rew"].shape[0] for f in (multi_dir / "checkpoints" / "buffer" / f"seed{s}").glob("*.npz"))
            for s in (0, 1)]
    assert rows == [300, 300]


def test_num_seeds_resume_after_kill_matches_uninterrupted(reference_run, multi_run, tmp_path, monkeypatch):
    """A --num_seeds 2 run killed during fine-tuning and resumed reproduces the uninterrupted 2-seed run."""
    assert_resume_matches(aca, lambda **kw: tiny_config(reference_run[0], tmp_path, num_seeds=2, **kw), 5,
                          monkeypatch, multi_run[0], seeds=(0, 1))


def test_num_seeds_top_n_seeding_from_offline_checkpoint(reference_run, multi_run, tmp_path):
    """Fine-tuning 2 seeds from their joint offline checkpoint with per-seed online buffers seeded with the top-N
    episodes: seed 0 equals the single-seed run from the single-seed offline checkpoint."""
    dataset_id, ref_dir, _, reference = reference_run
    multi_dir, _ = multi_run
    multi = aca.train(tiny_config(dataset_id, tmp_path / "multi", num_seeds=2, n_trajs=3,
                                  offline_checkpoint=str(multi_dir / "checkpoints" / "offline")))
    single = aca.train(tiny_config(dataset_id, tmp_path / "single0", n_trajs=3,
                                   offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    assert multi["updates"] == [200 + 300] * 2 and multi["seeded_transitions"] == single["seeded_transitions"] > 64
    got, expected = read_evals(tmp_path / "multi" / "seed0"), read_evals(tmp_path / "single0")
    assert [(e["phase"], e["updates"], e["env_steps"]) for e in got] == \
        [(e["phase"], e["updates"], e["env_steps"]) for e in expected]
    np.testing.assert_allclose([e["return"] for e in got], [e["return"] for e in expected], rtol=0.05)
    np.testing.assert_allclose(got[0]["return"], reference[1]["return"], rtol=1e-3)  # the SAC+ML start
    seed1 = read_evals(tmp_path / "multi" / "seed1")
    assert seed1[0] == [e for e in read_evals(multi_dir / "seed1") if e["phase"] == "offline"][-1]
    for s in (0, 1):
        assert buffer_rows(tmp_path / "multi", s) == 300


def test_final_policy_comparison_scores_a_copied_policy_identically(reference_run, tmp_path):
    """parity.py aca_returns: an official d3rlpy model holding *our* final actor (to_torch, saved as d3rlpy saves
    `_policy`) scores exactly as our checkpoint does, deterministic and sampled (torch: skipped without it)."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from parity_refs import aca as aca_ref
    _, run_dir, _, _ = reference_run
    cfg = aca.parse_config(["--config_path", str(run_dir / "config.yaml"), "--run_dir", str(tmp_path / "x")])
    world = aca.load_world(cfg, 1)
    template = aca.stack_seeds([aca.init_state(world.h, jax.random.PRNGKey(0), world.obs_mean, world.obs_std)])
    state, _ = aca.load_state(run_dir / "checkpoints" / "latest", template, cfg)
    world.close()
    sd = aca_ref.to_torch("actor", aca.seed_slice(state, 0).actor.params, len(cfg.hidden_dims), cfg.squashed_policy)
    model = tmp_path / "model_300.pt"
    torch.save({"_policy": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, model)
    got = aca_ref.final_policy_scores(run_dir, model, eval_seeds=[0, 1], sampled_seeds=[0])
    assert got["ours"] == got["official"]
    assert len(got["ours"]["deterministic"]) == 2 and got["ours"]["policy_std_mean"] > 0
