"""O2PPO: maths against NumPy (GAE with terminals vs truncations, reference advantage, per-sample vs broadcast
mixing, clipped PPO loss, Monte-Carlo targets and reward scaling), actor compatibility with iql.py, and tiny
end-to-end runs (three phases, each switch off, resume after a kill or a Ctrl-C, offline checkpoints of o2ppo and
iql.py)."""
import json
import math
import signal
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data
import iql
import o2ppo
from conftest import assert_nan_loss_stops, assert_resume_matches, read_evals, stop_after_calls

# Tiny budgets; every run in this file shares these static shapes, so each jitted function compiles once per variant.
TINY = dict(offline_updates=200, reevaluation_updates=100, online_steps=600, update_block=50, offline_eval_every=100,
            reevaluation_eval_every=50, evaluate_freq=200, eval_episodes=2, hidden_dims=[32, 32],
            value_hidden_dims=[32, 32, 32], iql_batch_size=64, reevaluation_batch_size=64, rollout_length=128,
            minibatch_size=32, ppo_epochs=2, end_steps=1000, wandb_mode="disabled")


def tiny_config(dataset_id, run_dir, **overrides):
    return o2ppo.TrainConfig(dataset_id=dataset_id, run_dir=str(run_dir), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory):
    """One uninterrupted tiny run: (dataset id, run dir, train() result, eval records)."""
    dataset_id = tiny_dataset("hopper", "medium")
    run_dir = tmp_path_factory.mktemp("o2ppo_reference")
    result = o2ppo.train(tiny_config(dataset_id, run_dir))
    return dataset_id, run_dir, result, read_evals(run_dir)


# ---- maths
def np_gae(r, v, v_next, terminal, done, gamma, lam):
    """The official loop (ppo.py::update)."""
    adv, running = [], 0.0
    deltas = r + gamma * (1.0 - terminal) * v_next - v
    for delta, d in zip(deltas[::-1], done[::-1]):
        running = delta + gamma * lam * running * (1.0 - d)
        adv.insert(0, running)
    return np.array(adv)


def test_gae_terminals_vs_truncations():
    rng = np.random.default_rng(0)
    r, v, v_next = rng.normal(size=(3, 12))
    terminal, done = np.zeros(12), np.zeros(12)
    terminal[3] = done[3] = 1.0  # true termination: no bootstrap, trace cut
    done[7] = 1.0  # time-limit truncation: bootstrap from V(s'), trace cut
    gamma, lam = 0.99, 0.95
    got = np.asarray(o2ppo.gae(*(jnp.asarray(x, jnp.float32) for x in (r, v, v_next, terminal, done)), gamma, lam))
    np.testing.assert_allclose(got, np_gae(r, v, v_next, terminal, done, gamma, lam), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[3], r[3] - v[3], rtol=1e-5)
    np.testing.assert_allclose(got[7], r[7] + gamma * v_next[7] - v[7], rtol=1e-5)
    np.testing.assert_allclose(got[11], r[11] + gamma * v_next[11] - v[11], rtol=1e-5)  # end of rollout: trace from 0


def test_reference_advantage_and_kl_match_numpy():
    rng = np.random.default_rng(1)
    n, d, alpha = 64, 3, 2.0
    mean, act = rng.normal(size=(2, n, d)).astype(np.float32) * 0.5
    log_std = rng.normal(size=d).astype(np.float32) * 0.3 - 1.0
    std = np.exp(log_std)
    logp = np.sum(-((act - mean) ** 2) / (2 * std ** 2) - log_std - 0.5 * math.log(2 * math.pi), -1)
    entropy = np.sum(0.5 + 0.5 * math.log(2 * math.pi) + log_std)
    expected = alpha / d * (np.logaddexp(0.0, logp + entropy + 4 * d) - 4 * d)  # softplus
    got = o2ppo.reference_advantage(jnp.asarray(mean), jnp.asarray(log_std), jnp.asarray(act), alpha)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)
    mean2, log_std2 = mean + 0.1, log_std + 0.2
    kl = np.sum(log_std2 - log_std + (std ** 2 + (mean - mean2) ** 2) / (2 * np.exp(2 * log_std2)) - 0.5, -1)
    np.testing.assert_allclose(np.asarray(o2ppo.gaussian_kl(mean, log_std, mean2, log_std2)), kl, rtol=1e-4, atol=1e-6)


def np_normalize(a):
    return (a - a.mean()) / (a.std(ddof=1) + 1e-5)  # torch.std is unbiased


def np_ppo_loss(ratio, adv, entropy, clip, coef):
    """Official: ratios [M,1] * adv[index] ([M,1] or [M,N]), minus coef * entropy [M,1], mean over everything."""
    r = ratio[:, None]
    return np.mean(-np.minimum(r * adv, np.clip(r, 1 - clip, 1 + clip) * adv) - coef * entropy[:, None])


def test_mixing_per_sample_vs_broadcast_bug():
    rng = np.random.default_rng(2)
    n, w = 16, 0.3
    adv, adv_ref = rng.normal(size=(2, n)).astype(np.float32)
    per = np.asarray(o2ppo.normalize_advantages(o2ppo.mix_advantages(jnp.asarray(adv), jnp.asarray(adv_ref), w, False)))
    assert per.shape == (n, 1)
    np.testing.assert_allclose(per[:, 0], np_normalize((adv + w * adv_ref) / (1 + w)), rtol=1e-4, atol=1e-5)
    # the official broadcast: A [N, 1] + A_ref [N] -> [N, N], normalised over all N^2 entries
    bug = np.asarray(o2ppo.normalize_advantages(o2ppo.mix_advantages(jnp.asarray(adv), jnp.asarray(adv_ref), w, True)))
    official = np_normalize((adv.reshape(-1, 1) + adv_ref * w) / (1 + w))
    assert bug.shape == (n, n)
    np.testing.assert_allclose(bug, official, rtol=1e-4, atol=1e-5)
    # a minibatch takes rows: the loss averages the clipped objective over all N reference terms of each row
    idx = np.array([1, 4, 9])
    ratio = np.exp(rng.normal(size=3).astype(np.float32) * 0.3)
    entropy = np.full(3, 1.7, np.float32)
    got, _ = o2ppo.ppo_actor_loss(jnp.log(ratio), jnp.zeros(3), jnp.asarray(bug[idx]), jnp.asarray(entropy), 0.2, 0.01)
    np.testing.assert_allclose(float(got), np_ppo_loss(ratio, official[idx], entropy, 0.2, 0.01), rtol=1e-5)
    # the two variants differ (the per-sample reference term is averaged away in the broadcast one)
    got_per, _ = o2ppo.ppo_actor_loss(jnp.log(ratio), jnp.zeros(3), jnp.asarray(per[idx]), jnp.asarray(entropy),
                                      0.2, 0.01)
    assert abs(float(got_per) - float(got)) > 1e-3


def test_ppo_clipped_loss_matches_numpy():
    rng = np.random.default_rng(3)
    m = 32
    logp, logp_old = rng.normal(size=(2, m)).astype(np.float32) * 0.3
    adv = rng.normal(size=(m, 1)).astype(np.float32)
    entropy = np.full(m, 2.1, np.float32)
    loss, clip_frac = o2ppo.ppo_actor_loss(jnp.asarray(logp), jnp.asarray(logp_old), jnp.asarray(adv),
                                           jnp.asarray(entropy), 0.2, 0.01)
    ratio = np.exp(logp - logp_old)
    np.testing.assert_allclose(float(loss), np_ppo_loss(ratio, adv, entropy, 0.2, 0.01), rtol=1e-5)
    np.testing.assert_allclose(float(clip_frac), np.mean(np.abs(ratio - 1) > 0.2), rtol=1e-6)


class NpRewardScaling:
    """The official RewardScaling + ppo_utils.RunningMeanStd, written out for the test."""

    def __init__(self, gamma):
        self.gamma, self.n, self.mean, self.S, self.std, self.R = gamma, 0, np.zeros(1), np.ones(1), np.ones(1), 0.0

    def __call__(self, x):
        self.R = self.gamma * self.R + x
        self.n += 1
        if self.n == 1:
            self.mean = np.array([self.R])
        else:
            old = self.mean.copy()
            self.mean = old + (self.R - old) / self.n
            self.S = self.S + (self.R - old) * (self.R - self.mean)
            self.std = np.sqrt(self.S / self.n)
        return (x / (self.std + 1e-8))[0]


def np_mc(rewards, not_done, gamma):
    out, g = np.zeros(len(rewards)), 0.0
    for i in reversed(range(len(rewards))):
        g = rewards[i] + gamma * g * not_done[i]
        out[i] = g
    return out


def test_reevaluation_targets_mc_returns_and_reward_scaling():
    gamma = 0.9
    rewards = np.array([1, 2, 3, 4, 5, 6, 7], np.float32)
    terminals = np.array([0, 0, 1, 0, 0, 0, 0], bool)
    timeouts = np.array([0, 0, 0, 0, 1, 0, 0], bool)  # episode 2 is truncated, episode 3 is cut off by the data
    g, _ = o2ppo.reevaluation_targets(rewards, terminals, timeouts, gamma, False, False)
    np.testing.assert_allclose(g, np_mc(rewards, 1.0 - (terminals | timeouts), gamma), rtol=1e-6)
    np.testing.assert_allclose(g[4], 5.0, rtol=1e-6)  # no return across the time limit
    official, _ = o2ppo.reevaluation_targets(rewards, terminals, timeouts, gamma, True, False)
    np.testing.assert_allclose(official, np_mc(rewards, 1.0 - terminals, gamma), rtol=1e-6)
    np.testing.assert_allclose(official[4], 5 + gamma * 6 + gamma ** 2 * 7, rtol=1e-6)  # across the time limit
    # dynamic reward scaling: every reward scaled, the discounted return reset after each episode end
    scaled, scaler = o2ppo.reevaluation_targets(rewards, terminals, timeouts, gamma, False, True)
    ref, r = NpRewardScaling(gamma), []
    for x, end in zip(rewards, terminals | timeouts):
        r.append(ref(float(x)))
        if end:
            ref.R = 0.0
    np.testing.assert_allclose(scaled, np_mc(np.array(r), 1.0 - (terminals | timeouts), gamma), rtol=1e-6)
    assert scaler.n == 7 and math.isclose(scaler.std, float(ref.std[0]))
    # official processing (offline_buffer.reward_normalize): a terminal resets the scaler and keeps its raw reward
    scaled, scaler = o2ppo.reevaluation_targets(rewards, terminals, timeouts, gamma, True, True)
    ref, r = NpRewardScaling(gamma), []
    for x, term in zip(rewards, terminals):
        if term:
            ref.R = 0.0
            r.append(float(x))
        else:
            r.append(ref(float(x)))
    np.testing.assert_allclose(scaled, np_mc(np.array(r), 1.0 - terminals, gamma), rtol=1e-6)
    assert scaler.n == 6
    # the scaler continues online from its state (checkpointed as a dict)
    cont = o2ppo.RewardScaler(gamma, scaler.state())
    assert math.isclose(cont(3.0), ref(3.0), rel_tol=1e-12)


def test_reevaluation_targets_are_the_datasets_mc_returns(tiny_dataset):
    ds = data.load_dataset(tiny_dataset("hopper", "medium"), gamma=0.99)
    g, _ = o2ppo.reevaluation_targets(ds.rewards, ds.terminals, ds.timeouts, 0.99, False, False)
    np.testing.assert_allclose(g, ds.mc_returns, rtol=1e-6)


def test_value_reevaluation_fits_mc_returns():
    h = o2ppo.make_hyper(o2ppo.TrainConfig(value_hidden_dims=[16, 16, 16], reevaluation_batch_size=64,
                                           reevaluation_lr=3e-3, update_block=100), 4, 2)
    rng = np.random.default_rng(4)
    obs = jnp.asarray(rng.normal(size=(512, 4)), jnp.float32)
    returns = 3.0 * obs[:, 0] - obs[:, 1] + 5.0
    state = o2ppo.make_reeval_state(h, {}, o2ppo.init_ppo_value(h, jax.random.PRNGKey(0)), jax.random.PRNGKey(1),
                                    np.zeros(4), np.ones(4))
    state = o2ppo.stack_seeds([state])  # the blocks are vmapped over a leading seed axis

    def mse(s):
        params = o2ppo.seed_slice(s.value.params, 0)
        return float(jnp.mean((o2ppo.ppo_value_net(h).apply({"params": params}, obs) - returns) ** 2))
    before = mse(state)
    for _ in range(5):
        state, metrics = o2ppo.scan_reevaluation_updates(state, obs, returns, h)
    assert mse(state) < 0.1 * before and metrics["value_loss"].shape == (1, 100)


def test_actor_is_parameter_compatible_with_iql():
    key, obs = jax.random.PRNGKey(0), jnp.ones((3, 5))
    h_iql = iql.make_hyper(iql.TrainConfig(hidden_dims=[8, 8]), 5, 2)
    params = iql.networks(h_iql)[0].init(key, obs)["params"]
    h = o2ppo.make_hyper(o2ppo.TrainConfig(hidden_dims=[8, 8]), 5, 2)
    ours = o2ppo.actor_net(h).init(key, obs)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(ours)
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ours)
    mean_iql, _ = iql.networks(h_iql)[0].apply({"params": params}, obs)
    mean, _ = o2ppo.actor_net(h).apply({"params": params}, obs)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(mean_iql), rtol=1e-6)
    capped = o2ppo.cap_log_std({**params, "log_std": jnp.array([-4.0, 0.5])}, 0.05)
    np.testing.assert_allclose(np.asarray(capped["log_std"]), [-4.0, math.log(0.05)], rtol=1e-6)


# ---- configuration errors
def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="multiple of minibatch_size"):
        o2ppo.TrainConfig(rollout_length=2000, minibatch_size=128)
    with pytest.raises(ValueError, match="policy_reevaluation: false"):
        o2ppo.TrainConfig(reevaluation_updates=0)
    with pytest.raises(ValueError, match="multiple of update_block"):
        o2ppo.TrainConfig(offline_updates=1500)
    assert o2ppo.TrainConfig(value_alignment=True).value_alignment  # accepted, documented no-op


# ---- end to end
def test_end_to_end_three_phases(reference_run):
    _, run_dir, result, evals = reference_run
    phases = [e["phase"] for e in evals]
    assert phases == ["offline"] * 2 + ["reevaluation"] * 2 + ["online"] * 3
    assert [e["updates"] for e in evals[:4]] == [100, 200, 50, 100]
    online = evals[4:]
    assert [e["env_steps"] for e in online] == [200, 400, 600]
    for e in evals:
        assert e["episodes"] == 2 and np.isfinite(e["normalized_score"]) and np.isfinite(e["return"])
        assert ("value_start" in e) == (e["phase"] != "offline")
    for e in online:
        assert math.isclose(e["w_t"], 1 - e["env_steps"] / 1000) and e["kl_to_ref"] >= 0
        assert np.isfinite(e["value_mean"]) and "reference_updated" in e
    assert all(np.isfinite(e["value_loss"]) for e in evals[2:4])
    assert result["ppo_updates"] == 4 * 2 * (128 // 32)  # 4 full rollouts in 600 steps, 2 epochs of 4 minibatches
    assert {k: v for k, v in result["last_eval"].items() if k != "wall_time"} == evals[-1]
    assert result["env_steps"] == 600 and all(e["seed"] == 0 for e in evals)
    times = [e["wall_time"] for e in read_evals(run_dir, timing=True)]
    assert times == sorted(times) and times[0] > 0
    for name in ("offline", "latest"):
        assert (run_dir / "checkpoints" / name / "state.npz").exists()
    assert o2ppo.load_meta(run_dir / "checkpoints" / "latest")["phase"] == "done"


@pytest.mark.parametrize("kill_after", [4, 6])  # 4: during re-evaluation, 6: online, mid-rollout
def test_resume_after_kill_matches_uninterrupted(reference_run, tmp_path, monkeypatch, kill_after):
    def after_kill(run_dir):
        meta = o2ppo.load_meta(run_dir / "checkpoints" / "latest")
        assert meta["phase"] == ("reevaluation" if kill_after == 4 else "online")
        if kill_after == 6:
            assert 0 < meta["rollout"][0]["count"] < 128  # a partial rollout is part of the checkpoint
    assert_resume_matches(o2ppo, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), kill_after, monkeypatch,
                          reference_run[1], after_kill=after_kill)


def test_resume_falls_back_to_the_offline_checkpoint(reference_run, tmp_path, monkeypatch):
    """With `latest` unusable, --resume continues from checkpoints/offline (the end of pre-training) and still ends
    with the uninterrupted run's records."""
    def damage(run_dir):
        (run_dir / "checkpoints" / "latest" / "meta.json").write_text("{not json")
    assert_resume_matches(o2ppo, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), 6, monkeypatch,
                          reference_run[1], after_kill=damage)


# scan_offline_updates calls 1-4 (IQL), scan_reevaluation_updates 1-2 (re-evaluation), ppo_update 1-4 (full rollouts
# at 128, 256, ... steps)
@pytest.mark.parametrize("where,calls,phase", [("scan_offline_updates", 2, "offline"),
                                               ("scan_offline_updates", 4, "reevaluation"),
                                               ("scan_reevaluation_updates", 1, "reevaluation"),
                                               ("ppo_update", 1, "online")])
def test_ctrl_c_checkpoints_and_resumes_exactly(reference_run, tmp_path, monkeypatch, where, calls, phase):
    """SIGINT stops at the next block boundary (or phase end) of IQL and the re-evaluation and, online, at the next
    online checkpoint (the first episode end after an evaluation, with the partial rollout); --resume then ends with
    exactly the uninterrupted run's records."""
    dataset_id, _, _, reference = reference_run
    run_dir = tmp_path / "run"
    stop_after_calls(monkeypatch, o2ppo, where, calls)
    with pytest.raises(o2ppo.Interrupted, match="checkpoint written .* --resume"):
        o2ppo.train(tiny_config(dataset_id, run_dir))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    evals = read_evals(run_dir)
    assert len(evals) < len(reference) and evals == reference[:len(evals)]
    meta = o2ppo.load_meta(run_dir / "checkpoints" / "latest")
    assert meta["phase"] == phase and meta["eval_lines"] == [len(evals)]
    if phase == "online":
        assert 128 < meta["env_steps"][0] < 600 and meta["rollout"][0]["count"] == meta["env_steps"][0] % 128
    monkeypatch.undo()
    o2ppo.train(tiny_config(dataset_id, run_dir, resume=True))
    assert read_evals(run_dir) == reference


def test_own_offline_checkpoint_round_trip(reference_run, tmp_path):
    dataset_id, ref_dir, _, reference = reference_run
    # value_alignment is a documented no-op: the run is identical to the source run after pre-training
    o2ppo.train(tiny_config(dataset_id, tmp_path, value_alignment=True,
                            offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    assert read_evals(tmp_path) == reference[1:]


@pytest.mark.parametrize("switches", [dict(policy_reevaluation=False), dict(constrained_finetuning=False),
                                      dict(policy_reevaluation=False, constrained_finetuning=False),
                                      dict(reference_advantage_broadcast_bug=True)], ids=str)
def test_switches(reference_run, tmp_path, switches):
    dataset_id, ref_dir, _, reference = reference_run
    o2ppo.train(tiny_config(dataset_id, tmp_path, offline_checkpoint=str(ref_dir / "checkpoints" / "offline"),
                            **switches))
    evals = read_evals(tmp_path)
    same = lambda e: {k: v for k, v in e.items() if k != "w_t"}  # noqa: E731  (w_t is 0 without the constraint)
    assert same(evals[0]) == same(reference[1])  # same offline actor
    expect = ["offline"] + ["reevaluation"] * 2 * switches.get("policy_reevaluation", True) + ["online"] * 3
    assert [e["phase"] for e in evals] == expect
    online = [e for e in evals if e["phase"] == "online"]
    if not switches.get("constrained_finetuning", True):
        assert all(e["w_t"] == 0.0 for e in online)
    assert all(np.isfinite(e["return"]) and np.isfinite(e["value_start"]) for e in online)
    assert online != reference[-3:]  # each switch changes the fine-tuning


def test_offline_checkpoint_from_iql_py(reference_run, tmp_path):
    dataset_id = reference_run[0]
    iql_cfg = iql.TrainConfig(dataset_id=dataset_id, run_dir=str(tmp_path / "iql"), offline_updates=100,
                              online_steps=0, update_block=50, offline_eval_every=100, eval_episodes=2,
                              hidden_dims=[32, 32], expectile=0.7, beta=3.0, reward_bias=0.0,
                              terminate_on_success=False, wandb_mode="disabled")
    iql.train(iql_cfg)
    iql_offline = read_evals(tmp_path / "iql")[0]
    o2ppo.train(tiny_config(dataset_id, tmp_path / "o2ppo", reevaluation_updates=50, online_steps=200,
                            offline_checkpoint=str(tmp_path / "iql" / "checkpoints" / "offline")))
    evals = read_evals(tmp_path / "o2ppo")
    assert evals[0]["phase"] == "offline" and evals[0]["updates"] == 100
    np.testing.assert_allclose(evals[0]["return"], iql_offline["return"], rtol=1e-4)  # the same actor and stats
    assert [e["phase"] for e in evals[1:]] == ["reevaluation", "online"]
    # a multi-seed iql.py checkpoint (--num_seeds 2: leading seed axis) gives the actor of O2PPO's --seed
    src, multi = tmp_path / "iql" / "checkpoints" / "offline", tmp_path / "multi"
    multi.mkdir()
    with np.load(src / "state.npz") as z:
        np.savez(multi / "state.npz", **{k: np.stack([z[k], z[k] + 1.0]) for k in z.files})
    (multi / "meta.json").write_text(json.dumps({"num_seeds": 2, "updates": [100, 100]}))
    (multi / "config.yaml").write_text((src / "config.yaml").read_text().replace("seed: 0", "seed: 4"))
    h = o2ppo.make_hyper(tiny_config(dataset_id, tmp_path), 11, 3)
    single, mean0, _, _ = o2ppo.load_offline_actor(src, h, 0)
    second, mean5, _, updates = o2ppo.load_offline_actor(multi, h, 5)
    np.testing.assert_allclose(np.asarray(second["log_std"]), np.asarray(single["log_std"]) + 1.0)
    np.testing.assert_allclose(np.asarray(mean5), np.asarray(mean0) + 1.0)
    assert updates == 100
    with pytest.raises(o2ppo.RunError, match=r"holds seeds 4\.\.5"):
        o2ppo.load_offline_actor(multi, h, 0)


class _Foreign(NamedTuple):
    actor: Any
    obs_mean: Any
    obs_std: Any


def test_wrong_offline_checkpoint_fails_clearly(reference_run, tmp_path):
    dataset_id, ref_dir, _, _ = reference_run
    offline = str(ref_dir / "checkpoints" / "offline")
    with pytest.raises(o2ppo.RunError, match="no intact checkpoint there"):
        o2ppo.train(tiny_config(dataset_id, tmp_path / "a", offline_checkpoint=str(tmp_path)))
    with pytest.raises(o2ppo.RunError, match=r"has shape .* hidden_dims"):
        o2ppo.train(tiny_config(dataset_id, tmp_path / "b", offline_checkpoint=offline, hidden_dims=[16, 16]))
    with pytest.raises(o2ppo.RunError, match="its actor differs: missing"):
        o2ppo.train(tiny_config(dataset_id, tmp_path / "c", offline_checkpoint=offline, hidden_dims=[32, 32, 32]))
    # a checkpoint of another actor type (e.g. a tanh-Gaussian actor with state-dependent std)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    tree = _Foreign(o2ppo.Trainable({"Dense_0": {"kernel": np.zeros((11, 6))}}, ()), np.zeros(11), np.ones(11))
    o2ppo.save_tree(foreign / "state.npz", tree)
    (foreign / "meta.json").write_text(json.dumps({"updates": 5}))
    (foreign / "config.yaml").write_text("cql_weight: 5.0\n")
    with pytest.raises(o2ppo.RunError, match="its actor differs"):
        o2ppo.train(tiny_config(dataset_id, tmp_path / "d", offline_checkpoint=str(foreign)))
    o2ppo.save_tree(foreign / "state.npz", {"policy": np.zeros(3)})
    with pytest.raises(o2ppo.RunError, match=r"holds no '.actor.params'"):
        o2ppo.train(tiny_config(dataset_id, tmp_path / "e", offline_checkpoint=str(foreign)))


def test_nan_loss_stops_with_step_and_name(reference_run, tmp_path):
    assert_nan_loss_stops(o2ppo, tiny_config(reference_run[0], tmp_path, iql_reward_bias=float("nan")),
                          r"offline/critic_loss .* at update 1\b")


# ---- several seeds in one process
@pytest.fixture(scope="module")
def multi_seed_run(reference_run, tmp_path_factory):
    """An uninterrupted tiny --num_seeds 2 run (seeds 0 and 1): (train() result, run dir)."""
    run_dir = tmp_path_factory.mktemp("o2ppo_multi")
    return o2ppo.train(tiny_config(reference_run[0], run_dir, num_seeds=2)), run_dir


def test_num_seeds_matches_single_seed_runs(reference_run, multi_seed_run, tmp_path):
    """--num_seeds 2 trains seeds 0 and 1 together; each equals its single-seed run up to float32 round-off."""
    dataset_id, _, _, reference = reference_run
    multi, run_dir = multi_seed_run
    single1 = tmp_path / "single1"
    o2ppo.train(tiny_config(dataset_id, single1, seed=1))
    assert multi["seeds"] == [0, 1] and multi["env_steps"] == [600, 600] and multi["ppo_updates"] == [32, 32]
    assert not (run_dir / "eval.jsonl").exists()
    for seed, expected in ((0, reference), (1, read_evals(single1))):
        got = read_evals(run_dir / f"seed{seed}")
        # the schedule (evaluations exactly every evaluate_freq env steps) does not depend on the dynamics
        assert [(e["seed"], e["phase"], e["updates"], e["env_steps"]) for e in got] == \
            [(e["seed"], e["phase"], e["updates"], e["env_steps"]) for e in expected]
        offline = [e for e in got if e["phase"] != "online"]  # IQL and re-evaluation: no env in the loop
        for key in ("return", "value_start"):
            np.testing.assert_allclose([e.get(key, 0.0) for e in offline],
                                       [e.get(key, 0.0) for e in expected[:len(offline)]], rtol=1e-3)
        np.testing.assert_allclose([e["value_loss"] for e in got if e["phase"] == "reevaluation"],
                                   [e["value_loss"] for e in expected if e["phase"] == "reevaluation"], rtol=1e-3)
        # online: the same schedule and w_t; returns agree closely (tiny round-off can grow through the dynamics)
        assert [e["w_t"] for e in got] == [e["w_t"] for e in expected]
        np.testing.assert_allclose([e["return"] for e in got], [e["return"] for e in expected], rtol=0.05)
    meta = o2ppo.load_meta(run_dir / "checkpoints" / "latest")
    assert meta["num_seeds"] == 2 and meta["phase"] == "done" and np.shape(meta["act_key"]) == (2, 2)
    with np.load(run_dir / "checkpoints" / "latest" / "state.npz") as z:
        assert all(z[k].shape[0] == 2 for k in z.files)  # every leaf has the seed axis


def test_num_seeds_resume_after_kill_matches_uninterrupted(reference_run, multi_seed_run, tmp_path, monkeypatch):
    def after_kill(run_dir):  # killed at the first joint online checkpoint
        meta = o2ppo.load_meta(run_dir / "checkpoints" / "latest")
        assert meta["phase"] == "online" and len(meta["rollout"]) == 2
    assert_resume_matches(o2ppo, lambda **kw: tiny_config(reference_run[0], tmp_path, num_seeds=2, **kw), 6,
                          monkeypatch, multi_seed_run[1], seeds=(0, 1), after_kill=after_kill)


def test_num_seeds_ctrl_c_resumes_exactly(reference_run, multi_seed_run, tmp_path, monkeypatch):
    """Online, a stop request waits for the next joint checkpoint (the seeds wait for each other only where an
    uninterrupted run does too); the resumed run repeats the uninterrupted --num_seeds 2 run exactly."""
    dataset_id, multi_dir = reference_run[0], multi_seed_run[1]
    run_dir = tmp_path / "run"
    stop_after_calls(monkeypatch, o2ppo, "ppo_update", 1)
    with pytest.raises(o2ppo.Interrupted, match="online env steps"):
        o2ppo.train(tiny_config(dataset_id, run_dir, num_seeds=2))
    meta = o2ppo.load_meta(run_dir / "checkpoints" / "latest")
    assert meta["phase"] == "online" and all(200 <= t < 600 for t in meta["env_steps"])
    monkeypatch.undo()
    o2ppo.train(tiny_config(dataset_id, run_dir, num_seeds=2, resume=True))
    for seed in (0, 1):
        assert read_evals(run_dir / f"seed{seed}") == read_evals(multi_dir / f"seed{seed}")


def test_num_seeds_offline_checkpoint(reference_run, multi_seed_run, tmp_path):
    dataset_id, ref_dir, _, reference = reference_run
    multi_dir = multi_seed_run[1]
    with pytest.raises(o2ppo.RunError, match=r"holds 1 seed\(s\), this run trains 2"):
        o2ppo.train(tiny_config(dataset_id, tmp_path / "a", num_seeds=2,
                                offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    # one seed of the two-seed offline checkpoint: seed 1's actor, as in the two-seed run
    o2ppo.train(tiny_config(dataset_id, tmp_path / "b", seed=1, online_steps=0, reevaluation_updates=50,
                            offline_checkpoint=str(multi_dir / "checkpoints" / "offline")))
    got, expected = read_evals(tmp_path / "b")[0], read_evals(multi_dir / "seed1")[1]
    assert got["seed"] == 1 and got["updates"] == expected["updates"] == 200
    np.testing.assert_allclose(got["return"], expected["return"], rtol=1e-4)
