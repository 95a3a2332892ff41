"""O2TD3: maths against NumPy (alignment target, multiplier loss, threshold schedule, target smoothing), the policy
delay and multiplier direction of the online update, ensemble init, and tiny end-to-end runs (all phases, each
phase switch off, the naive all-off baseline, resume after a kill or a Ctrl-C, offline checkpoints of o2td3.py and
iql.py, clear errors for wrong checkpoints), and --num_seeds 2 against the single-seed runs."""
import json
import math
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iql
import o2td3
from conftest import assert_nan_loss_stops, assert_resume_matches, buffer_rows, read_evals, stop_after_calls

# Tiny budgets; the runs share these static shapes, so each phase's update block compiles once per Hyper.
TINY = dict(offline_updates=200, ope_updates=100, align_updates=100, online_steps=300, warmup_steps=50,
            update_block=50, offline_eval_every=100, online_eval_every=100, eval_episodes=2, probe_states=64,
            actor_hidden=[32, 32], critic_hidden=[32, 32], wandb_mode="disabled")
FIELDS = ("normalized_score", "return", "lambda", "mse_to_reference", "q_offline_action", "epsilon_t", "phase")


def tiny_config(dataset_id, run_dir, **overrides):
    return o2td3.TrainConfig(dataset_id=dataset_id, run_dir=str(run_dir), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def reference_run(tiny_dataset, tmp_path_factory):
    """One uninterrupted tiny run with every phase: (dataset id, run dir, train() result, eval records)."""
    dataset_id = tiny_dataset("hopper", "medium")
    run_dir = tmp_path_factory.mktemp("o2td3_reference")
    result = o2td3.train(tiny_config(dataset_id, run_dir))
    return dataset_id, run_dir, result, read_evals(run_dir)


# ---- maths
def test_smoothed_action_clips_noise_then_action():
    rng = np.random.default_rng(0)
    mean, normal = rng.uniform(-1, 1, (64, 3)), rng.normal(size=(64, 3)) * 3
    expected = np.clip(mean + np.clip(0.2 * normal, -0.5, 0.5), -1, 1)
    got = np.asarray(o2td3.smoothed_action(jnp.asarray(mean), jnp.asarray(normal), 0.2, 0.5))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert np.abs(got - np.clip(mean, -1, 1)).max() <= 0.5 + 1e-6 and np.abs(got).max() <= 1.0


def test_alignment_target_matches_numpy():
    rng = np.random.default_rng(1)
    act_dim, beta = 3, 1.5
    a_ref = rng.uniform(-1, 1, (200, act_dim))
    a_noisy = np.clip(a_ref + rng.normal(size=(200, act_dim)) * rng.uniform(0, 0.6, (200, 1)), -1, 1)
    q_ref = rng.normal(size=200) * 10  # both signs
    d = np.minimum(np.linalg.norm(a_noisy - a_ref, axis=-1) / math.sqrt(act_dim), 0.2)
    expected = np.where(q_ref < 0, q_ref * (1 + beta * d ** 2), q_ref / (1 + beta * d ** 2))
    target, dist = o2td3.alignment_target(jnp.asarray(q_ref), jnp.asarray(a_noisy), jnp.asarray(a_ref), beta, 0.2)
    np.testing.assert_allclose(np.asarray(dist), d, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(target), expected, rtol=1e-5)
    assert (d == 0.2).any() and (d < 0.2).any()  # the clamp at 0.2 is exercised
    assert np.all(np.asarray(target) <= q_ref + 1e-6)  # farther from the reference action is never better
    # hand-checked values: d clamped to 0.2 -> factor 1 + beta * 0.04
    far = jnp.asarray([[1.0, 1.0, 1.0]]), jnp.asarray([[-1.0, -1.0, -1.0]])
    for q in (-10.0, 10.0):
        t, d1 = o2td3.alignment_target(jnp.asarray([q]), *far, beta, 0.2)
        assert float(d1[0]) == pytest.approx(0.2)
        assert float(t[0]) == pytest.approx(q * 1.06 if q < 0 else q / 1.06, rel=1e-6)


def test_asymmetric_multiplier_loss_matches_numpy():
    u = np.random.default_rng(2).normal(size=(128, 3)).astype(np.float32)
    for tau in (0.5, 0.7, 0.9):
        expected = np.mean(np.abs(tau - (u > 0)) * u)
        assert float(o2td3.asymmetric_weight(jnp.asarray(u), tau)) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # MSE above the threshold (u < 0): negative weight, so gradient descent on exp(log lambda) * w raises lambda
    assert float(o2td3.asymmetric_weight(jnp.full((4, 2), -1.0), 0.7)) == pytest.approx(-0.7)
    assert float(o2td3.asymmetric_weight(jnp.full((4, 2), 1.0), 0.7)) == pytest.approx(0.3)


def test_epsilon_schedule_rises_linearly_then_stays():
    eps0, eps_end, end = 0.0025, 0.04, 100_000
    for t in (0, 1, 50_000, 100_000, 100_001, 250_000):
        expected = min(eps_end, eps0 + t * (eps_end - eps0) / end)
        assert float(o2td3.epsilon_schedule(t, eps0, eps_end, end)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("layernorm", [True, False])
def test_ensemble_members_differ_at_init(layernorm):
    cfg = o2td3.TrainConfig(n_critics=3, critic_hidden=[8, 8], actor_hidden=[8], critic_layernorm=layernorm)
    h = o2td3.make_hyper(cfg, 5, 2, offline=False)
    state = o2td3.start_finetuning(o2td3.init_offline_state(o2td3.make_hyper(cfg, 5, 2, True), jax.random.PRNGKey(0),
                                                            np.zeros(5), np.ones(5)), h, True, 1.0)
    names = jax.tree_util.tree_flatten_with_path(state.critic.params)[0]
    assert any("LayerNorm" in jax.tree_util.keystr(k) for k, _ in names) == layernorm
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(state.critic.params))
    kernels = [v for k, v in names if "kernel" in jax.tree_util.keystr(k)]  # biases / LayerNorm start equal
    for leaf in kernels:
        assert not np.allclose(leaf[0], leaf[1]) and not np.allclose(leaf[1], leaf[2])
    q = o2td3.networks(h)[1].apply({"params": state.critic.params}, jnp.ones((7, 5)), jnp.ones((7, 2)))
    assert q.shape == (3, 7) and len(np.unique(np.asarray(q[:, 0]))) == 3
    w = np.asarray(kernels[1][0])  # orthogonal init: W^T W = I for a square layer
    np.testing.assert_allclose(w.T @ w, np.eye(8), atol=1e-5)


def test_online_update_policy_delay_and_multiplier_direction():
    """Actor, lambda and targets move only on every policy_freq-th update; lambda rises when the actor is farther
    than eps_t from the reference, and stays put without the constraint."""
    for constrained in (True, False):
        cfg = o2td3.TrainConfig(actor_hidden=[16], critic_hidden=[16], threshold=0.0, end_threshold=0.0,
                                lambda_lr=0.1, constrained_finetuning=constrained)
        h = o2td3.make_hyper(cfg, 4, 2, offline=False)
        off = o2td3.init_offline_state(o2td3.make_hyper(cfg, 4, 2, True), jax.random.PRNGKey(0), np.zeros(4),
                                       np.ones(4))
        state = o2td3.start_finetuning(off, h, True, 1.0)
        ref = jax.tree.map(lambda x: x + 0.5, state.actor.params)  # a reference far from pi
        state = state._replace(ref_actor=ref)
        rng = np.random.default_rng(3)
        batch = o2td3.Buffer(*(jnp.asarray(x, jnp.float32) for x in (
            rng.normal(size=(32, 4)), rng.uniform(-1, 1, (32, 2)), rng.normal(size=32), rng.normal(size=(32, 4)),
            np.zeros(32))))
        step = jax.jit(o2td3.online_update, static_argnames=("h",))
        s1, m1 = step(state, batch, jax.random.PRNGKey(1), 1, h=h)  # it = 1: critic only
        same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
        assert float(m1["actor_step"]) == 0 and int(s1.it) == 1
        assert same(s1.actor.params, state.actor.params) and same(s1.critic_target, state.critic_target)
        assert not same(s1.critic.params, state.critic.params)
        s2, m2 = step(s1, batch, jax.random.PRNGKey(2), 2, h=h)  # it = 2: critic + actor + lambda + targets
        assert float(m2["actor_step"]) == 1
        assert not same(s2.actor.params, s1.actor.params) and not same(s2.critic_target, s1.critic_target)
        assert not same(s2.actor_target, s1.actor_target)
        if constrained:
            assert float(s2.log_lmbda.params) > float(s1.log_lmbda.params)  # MSE > eps_t = 0: lambda grows
            assert float(m2["penalty_next"]) > 0
        else:
            assert float(s2.log_lmbda.params) == float(s1.log_lmbda.params) and float(m2["penalty_next"]) == 0


# ---- configuration errors
def test_bad_config_fails_clearly():
    with pytest.raises(ValueError, match="multiple of update_block"):
        o2td3.TrainConfig(align_updates=1050, update_block=100)
    with pytest.raises(ValueError, match="mixing_ratio"):
        o2td3.TrainConfig(mixing_ratio=1.0)
    with pytest.raises(ValueError, match="lmbda"):
        o2td3.TrainConfig(lmbda=0.0)
    assert o2td3.parse_config(["--value_alignment", "false"]).value_alignment is False


# ---- end to end
def test_end_to_end_all_phases(reference_run):
    _, run_dir, result, evals = reference_run
    phases = [e["phase"] for e in evals]
    assert phases == ["offline", "offline", "reevaluation", "alignment", "online", "online", "online"]
    assert [e["updates"] for e in evals[:4]] == [100, 200, 100, 100]
    assert [e["env_steps"] for e in evals[4:]] == [100, 200, 300]
    assert [e["updates"] for e in evals[4:]] == [50, 150, 250]  # UTD 1 after 50 warm-up steps
    for e in evals:
        assert all(k in e for k in FIELDS) and e["episodes"] == 2 and np.isfinite(e["normalized_score"])
        assert np.isfinite(e["q_offline_action"])
    for e in evals[2:]:
        assert all(np.isfinite(e[k]) for k in ("lambda", "mse_to_reference", "epsilon_t"))
    # re-evaluation: actor fixed (score reused, no distance to the reference), critics re-learn Q
    assert evals[2]["normalized_score"] == evals[1]["normalized_score"] and evals[2]["mse_to_reference"] == 0
    assert evals[2]["q_offline_action"] != evals[1]["q_offline_action"]
    assert evals[3]["mse_to_reference"] > 0  # the aligned actor moved away from the offline actor
    assert evals[2]["reference_score"] == evals[1]["normalized_score"]
    online = evals[4:]
    assert all(e["lambda"] != 1.0 for e in online)  # the multiplier is trained
    assert [e["epsilon_t"] for e in online] == pytest.approx([0.0025 + t * 0.0375 / 1e5 for t in (100, 200, 300)])
    best = max(e["normalized_score"] for e in evals[1:])  # reference = best evaluated policy
    assert result["last_eval"] == {**evals[-1], "wall_time": result["last_eval"]["wall_time"]}
    assert result["seeds"] == [0] and all(e["seed"] == 0 for e in evals)
    times = [e["wall_time"] for e in read_evals(run_dir, timing=True)]
    assert times == sorted(times) and times[0] > 0
    assert result["before_finetuning"] == evals[1]["normalized_score"] and best >= result["before_finetuning"]
    ckpt = run_dir / "checkpoints"
    for name in ("offline", "latest"):
        assert (ckpt / name / "state.npz").exists() and (ckpt / name / "config.yaml").exists()
    rows = [np.load(f) for f in sorted((ckpt / "buffer" / "seed0").glob("rows_*.npz"))]
    assert sum(r["rew"].shape[0] for r in rows) == 300
    acts = np.concatenate([r["act"] for r in rows])
    assert np.abs(acts).max() <= 1.0  # executed actions, clipped


@pytest.mark.parametrize("kill_after", [1, 5, 7])  # during pre-training, after re-evaluation, during fine-tuning
def test_resume_after_kill_matches_uninterrupted(reference_run, tmp_path, monkeypatch, kill_after):
    assert_resume_matches(o2td3, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), kill_after, monkeypatch,
                          reference_run[1])


def test_resume_falls_back_to_the_offline_checkpoint(reference_run, tmp_path, monkeypatch):
    """With `latest` unusable, --resume continues from checkpoints/offline (saved between pre-training and
    fine-tuning) and still ends with the uninterrupted run's records."""
    def damage(run_dir):
        (run_dir / "checkpoints" / "latest" / "state.npz").unlink()
    assert_resume_matches(o2td3, lambda **kw: tiny_config(reference_run[0], tmp_path, **kw), 7, monkeypatch,
                          reference_run[1], after_kill=damage)


# scan_updates calls 1-4: TD3+BC, 5-6: re-evaluation, 7-8: alignment; update_online: one call per env step after
# the 50 warm-up steps
@pytest.mark.parametrize("where,calls,phase", [("scan_updates", 2, "offline"), ("scan_updates", 6, "alignment"),
                                               ("scan_updates", 7, "alignment"), ("update_online", 3, "online")])
def test_ctrl_c_checkpoints_and_resumes_exactly(reference_run, tmp_path, monkeypatch, where, calls, phase):
    """SIGINT stops at the next block boundary (or phase end) of the update-only phases and, online, at the next
    episode end, with a checkpoint and no extra evaluation; --resume then ends with exactly the uninterrupted run's
    records."""
    dataset_id, _, _, reference = reference_run
    run_dir = tmp_path / "run"
    stop_after_calls(monkeypatch, o2td3, where, calls)
    with pytest.raises(o2td3.Interrupted, match="checkpoint written .* --resume"):
        o2td3.train(tiny_config(dataset_id, run_dir))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    evals = read_evals(run_dir)
    assert len(evals) < len(reference) and evals == reference[:len(evals)]
    meta = o2td3.load_meta(run_dir / "checkpoints" / "latest")
    assert meta["phase"] == phase and meta["eval_lines"] == [len(evals)]
    if phase == "online":
        assert 50 < meta["env_steps"][0] < 300
    monkeypatch.undo()
    o2td3.train(tiny_config(dataset_id, run_dir, resume=True))
    assert read_evals(run_dir) == reference


def test_offline_checkpoint_round_trip(reference_run, tmp_path):
    dataset_id, ref_dir, _, reference = reference_run
    o2td3.train(tiny_config(dataset_id, tmp_path, offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))
    # the loaded actor scores like the end of pre-training, and every later phase continues exactly as in the source
    assert read_evals(tmp_path) == reference[1:]


@pytest.mark.parametrize("switch", ["policy_reevaluation", "value_alignment", "constrained_finetuning", "all"])
def test_phase_switches(reference_run, tmp_path, switch):
    dataset_id, ref_dir, _, reference = reference_run
    names = ("policy_reevaluation", "value_alignment", "constrained_finetuning")
    off = {k: False for k in names} if switch == "all" else {switch: False}
    extra = {"online_block": 8} if switch == "all" else {}  # also exercises the masked multi-step online scan
    o2td3.train(tiny_config(dataset_id, tmp_path, offline_checkpoint=str(ref_dir / "checkpoints" / "offline"),
                            **off, **extra))
    evals = read_evals(tmp_path)
    phases = [e["phase"] for e in evals]
    assert evals[0] == reference[1]  # the same offline actor
    assert ("reevaluation" in phases) == (switch not in ("policy_reevaluation", "all"))
    assert ("alignment" in phases) == (switch not in ("value_alignment", "all"))
    online = [e for e in evals if e["phase"] == "online"]
    assert [e["env_steps"] for e in online] == [100, 200, 300]
    if switch in ("constrained_finetuning", "all"):
        assert all(e["lambda"] == 1.0 for e in online)  # plain TD3: the multiplier is never trained
    else:
        assert all(e["lambda"] != 1.0 for e in online)
    if switch == "value_alignment":
        assert evals[2]["phase"] == "online" and evals[2]["reference_score"] >= evals[0]["normalized_score"]
    assert evals != reference[1:]


def test_naive_baseline_keeps_the_offline_critics(reference_run, tmp_path):
    """With re-evaluation off the fine-tuning state starts from the TD3+BC critics (Q at the offline actions equal)."""
    dataset_id, ref_dir, _, reference = reference_run
    cfg = tiny_config(dataset_id, tmp_path, offline_checkpoint=str(ref_dir / "checkpoints" / "offline"),
                      policy_reevaluation=False, value_alignment=False, constrained_finetuning=False,
                      online_steps=0)
    o2td3.train(cfg)
    evals = read_evals(tmp_path)
    assert [e["phase"] for e in evals] == ["offline", "online"]
    assert evals[1]["q_offline_action"] == pytest.approx(reference[1]["q_offline_action"], rel=1e-5)
    assert evals[1]["normalized_score"] == reference[1]["normalized_score"]


def test_start_from_iql_checkpoint(reference_run, tmp_path):
    """iql.py's Gaussian actor (tanh mean network) is the deterministic offline actor: same evaluation score."""
    dataset_id = reference_run[0]
    iql_dir = tmp_path / "iql"
    iql.train(iql.TrainConfig(dataset_id=dataset_id, run_dir=str(iql_dir), offline_updates=100, update_block=50,
                              offline_eval_every=100, online_steps=0, eval_episodes=2, hidden_dims=[32, 32],
                              reward_bias=0.0, terminate_on_success=False, wandb_mode="disabled"))
    iql_offline = [e for e in read_evals(iql_dir) if e["phase"] == "offline"][-1]
    source = str(iql_dir / "checkpoints" / "offline")
    o2td3.train(tiny_config(dataset_id, tmp_path / "o2td3", offline_checkpoint=source, online_steps=100))
    evals = read_evals(tmp_path / "o2td3")
    assert evals[0]["phase"] == "offline" and evals[0]["updates"] == 100
    assert evals[0]["normalized_score"] == pytest.approx(iql_offline["normalized_score"], rel=1e-6)
    assert [e["phase"] for e in evals] == ["offline", "reevaluation", "alignment", "online"]
    # wrong forms / mismatches fail clearly
    with pytest.raises(o2td3.RunError, match=r"hidden sizes are \[32, 32\].*actor_hidden"):
        o2td3.train(tiny_config(dataset_id, tmp_path / "x1", offline_checkpoint=source, actor_hidden=[16, 16]))
    with pytest.raises(o2td3.RunError, match="no TD3 critics"):
        o2td3.train(tiny_config(dataset_id, tmp_path / "x2", offline_checkpoint=source, policy_reevaluation=False))
    with pytest.raises(o2td3.RunError, match="normalises observations differently"):
        o2td3.train(tiny_config(dataset_id, tmp_path / "x3", offline_checkpoint=source, normalize=False))


def test_wrong_checkpoint_forms_fail_clearly(reference_run, tmp_path, monkeypatch):
    """A missing or wrong-form --offline_checkpoint fails with one RunError before the dataset is loaded; a
    checkpoint of the right form with other network sizes fails when it is loaded."""
    dataset_id, ref_dir, _, _ = reference_run

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the checks")
    monkeypatch.setattr(o2td3.data, "load_dataset", no_data)
    with pytest.raises(o2td3.RunError, match="no intact checkpoint there"):
        o2td3.train(tiny_config(dataset_id, tmp_path / "a", offline_checkpoint=str(tmp_path / "missing")))
    with pytest.raises(o2td3.RunError, match="fine-tuning checkpoint of o2td3.py"):
        o2td3.train(tiny_config(dataset_id, tmp_path / "b", offline_checkpoint=str(ref_dir / "checkpoints" / "latest")))
    fake = tmp_path / "fake"  # e.g. a checkpoint of a stochastic-actor algorithm
    fake.mkdir()
    np.savez(fake / "state.npz", x=np.zeros(1))
    (fake / "meta.json").write_text(json.dumps({"phase": "online"}))
    (fake / "config.yaml").write_text("cql_weight: 5.0\npolicy_hidden: [32, 32]\n")
    with pytest.raises(o2td3.RunError, match="not a checkpoint o2td3.py can start from"):
        o2td3.train(tiny_config(dataset_id, tmp_path / "d", offline_checkpoint=str(fake)))
    monkeypatch.undo()
    with pytest.raises(o2td3.RunError, match="shape"):  # same form, other network sizes
        o2td3.train(tiny_config(dataset_id, tmp_path / "c", offline_checkpoint=str(ref_dir / "checkpoints" / "offline"),
                                critic_hidden=[16, 16]))


def test_nan_loss_stops_with_step_and_name(reference_run, tmp_path):
    assert_nan_loss_stops(o2td3, tiny_config(reference_run[0], tmp_path, reward_bias=float("nan")),
                          r"offline/critic_loss = nan.* at update 1 of phase offline")


# ---- several seeds in one process
@pytest.fixture(scope="module")
def multi_run(reference_run, tmp_path_factory):
    """The tiny run with --num_seeds 2 (seeds 0 and 1): (run dir, train() result)."""
    run_dir = tmp_path_factory.mktemp("o2td3_multi")
    return run_dir, o2td3.train(tiny_config(reference_run[0], run_dir, num_seeds=2))


def test_num_seeds_matches_single_seed_runs(reference_run, multi_run, tmp_path):
    """--num_seeds 2 trains seeds 0 and 1 together (every phase vmapped, per-seed reference / best score / lambda);
    each seed equals its single-seed run up to float32 round-off."""
    dataset_id, _, _, reference = reference_run
    multi_dir, multi = multi_run
    single1 = tmp_path / "single1"
    o2td3.train(tiny_config(dataset_id, single1, seed=1))
    assert multi["seeds"] == [0, 1] and multi["env_steps"] == [300, 300] and multi["updates"] == [250, 250]
    assert not (multi_dir / "eval.jsonl").exists()
    for seed, expected in ((0, reference), (1, read_evals(single1))):
        got = read_evals(multi_dir / f"seed{seed}")
        schedule = lambda evals: [(e["seed"], e["phase"], e["updates"], e["env_steps"], e["epsilon_t"])  # noqa
                                  for e in evals]
        assert schedule(got) == schedule(expected)
        before = [e for e in got if e["phase"] != "online"]  # the update-only phases
        for key in ("return", "q_offline_action"):
            np.testing.assert_allclose([e[key] for e in before], [e[key] for e in expected[:len(before)]], rtol=1e-3)
        np.testing.assert_allclose([e["mse_to_reference"] for e in before[2:]],
                                   [e["mse_to_reference"] for e in expected[2:len(before)]], rtol=1e-3, atol=1e-6)
        # online: the same schedule; returns and lambda agree closely (round-off can grow through the dynamics)
        np.testing.assert_allclose([e["return"] for e in got], [e["return"] for e in expected], rtol=0.05)
        np.testing.assert_allclose([e["lambda"] for e in got[2:]], [e["lambda"] for e in expected[2:]], rtol=1e-2)
        assert buffer_rows(multi_dir, seed) == 300
    assert read_evals(multi_dir / "seed0") != read_evals(multi_dir / "seed1")  # the seeds differ


def test_num_seeds_resume_after_kill_matches_uninterrupted(reference_run, multi_run, tmp_path, monkeypatch):
    dataset_id = reference_run[0]
    multi_dir = multi_run[0]
    assert_resume_matches(o2td3, lambda **kw: tiny_config(dataset_id, tmp_path, num_seeds=2, **kw), 7, monkeypatch,
                          multi_dir, seeds=(0, 1))  # killed during fine-tuning


def test_num_seeds_ctrl_c_resumes_exactly(reference_run, multi_run, tmp_path, monkeypatch):
    """After a stop request each seed waits at its next episode end for the other (masked no-op updates); the
    resumed run still repeats the uninterrupted --num_seeds 2 run exactly."""
    dataset_id, multi_dir = reference_run[0], multi_run[0]
    run_dir = tmp_path / "run"
    stop_after_calls(monkeypatch, o2td3, "update_online", 3)
    with pytest.raises(o2td3.Interrupted, match="online env steps"):
        o2td3.train(tiny_config(dataset_id, run_dir, num_seeds=2))
    meta = o2td3.load_meta(run_dir / "checkpoints" / "latest")
    assert meta["phase"] == "online" and all(50 < t < 300 for t in meta["env_steps"])
    monkeypatch.undo()
    o2td3.train(tiny_config(dataset_id, run_dir, num_seeds=2, resume=True))
    for seed in (0, 1):
        assert read_evals(run_dir / f"seed{seed}") == read_evals(multi_dir / f"seed{seed}")


def test_num_seeds_offline_checkpoint(reference_run, multi_run, tmp_path):
    """An N=2 offline checkpoint restarts both seeds exactly; a checkpoint of another seed count fails clearly."""
    dataset_id, ref_dir, _, _ = reference_run
    multi_dir = multi_run[0]
    source = str(multi_dir / "checkpoints" / "offline")
    o2td3.train(tiny_config(dataset_id, tmp_path / "ok", num_seeds=2, offline_checkpoint=source, online_steps=100))
    for seed in (0, 1):
        got, expected = read_evals(tmp_path / "ok" / f"seed{seed}"), read_evals(multi_dir / f"seed{seed}")
        assert got[:4] == expected[1:5]  # the loaded actors, re-evaluation, alignment, first online evaluation
    with pytest.raises(o2td3.RunError, match="holds 2 seed.*--num_seeds 2"):
        o2td3.train(tiny_config(dataset_id, tmp_path / "x1", offline_checkpoint=source))
    with pytest.raises(o2td3.RunError, match="holds 1 seed.*--num_seeds 1"):
        o2td3.train(tiny_config(dataset_id, tmp_path / "x2", num_seeds=2,
                                offline_checkpoint=str(ref_dir / "checkpoints" / "offline")))


def test_num_seeds_start_from_multi_seed_iql_checkpoint(reference_run, tmp_path):
    """A multi-seed iql.py checkpoint gives each o2td3 seed the iql.py actor of the same seed."""
    dataset_id = reference_run[0]
    iql_dir = tmp_path / "iql"
    iql.train(iql.TrainConfig(dataset_id=dataset_id, run_dir=str(iql_dir), num_seeds=2, offline_updates=50,
                              update_block=50, offline_eval_every=50, online_steps=0, eval_episodes=2,
                              hidden_dims=[32, 32], reward_bias=0.0, terminate_on_success=False, wandb_mode="disabled"))
    source = str(iql_dir / "checkpoints" / "offline")
    o2td3.train(tiny_config(dataset_id, tmp_path / "o2td3", num_seeds=2, offline_checkpoint=source, online_steps=0,
                            ope_updates=50, align_updates=50))
    for seed in (0, 1):
        iql_score = [e for e in read_evals(iql_dir / f"seed{seed}") if e["phase"] == "offline"][-1]["normalized_score"]
        evals = read_evals(tmp_path / "o2td3" / f"seed{seed}")
        assert evals[0]["phase"] == "offline" and evals[0]["normalized_score"] == pytest.approx(iql_score, rel=1e-6)
    with pytest.raises(o2td3.RunError, match=r"holds iql.py seeds 0..1"):
        o2td3.train(tiny_config(dataset_id, tmp_path / "x", seed=1, num_seeds=2, offline_checkpoint=source))
