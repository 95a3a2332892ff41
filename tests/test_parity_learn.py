"""Learning parity (benchmarks/parity.py learn): the stand-ins that let a reference train on our data and env, the
reference runner's early checks, the sweep runner's per-entry command, and the report's statistics and verdicts on
fake runs. No network; the one test that trains a reference needs torch and $O2O_PARITY_REFS (skipped otherwise).
"""
import json
import os
import shutil

import numpy as np
import pytest
import yaml

import data
import parity
import sweep
from parity_refs import common, run_reference

ROOT = sweep.ROOT


# ---- stand-ins: data, env API, wandb
def test_learning_stand_ins_serve_our_dataset(tiny_dataset):
    ds_id = tiny_dataset("hopper", "medium")
    ds = data.load_dataset(ds_id)
    mods = common.learning_stand_ins(ds_id, lambda d, step: None)
    env = mods["gym"].make("any-name-v2")
    for served in (mods["d4rl"].qlearning_dataset(env), env.get_dataset()):
        assert set(served) == {"observations", "actions", "next_observations", "rewards", "terminals", "timeouts"}
        for key, arr in served.items():
            assert np.array_equal(arr, getattr(ds, key)), key
    lo, hi = data.reference_scores(ds_id)
    assert env.get_normalized_score(lo + 0.25 * (hi - lo)) == pytest.approx(0.25)
    assert mods["d4rl"].get_normalized_score("x", np.array([hi])) == pytest.approx(1.0)
    assert env._max_episode_steps == 1000 and env.spec.id == ds_id


def test_old_gym_env_api(tiny_dataset):
    env = common.OldGymEnv(tiny_dataset("hopper", "medium"))
    env.seed(3)
    first = env.reset()
    env.seed(3)
    assert isinstance(first, np.ndarray) and np.array_equal(env.reset(), first)  # seed() seeds the next reset
    obs, reward, done, info = env.step(np.zeros(env.action_space.shape, np.float32))
    assert obs.shape == first.shape and isinstance(reward, float) and isinstance(done, bool)
    assert "TimeLimit.truncated" not in info
    wrapped = common.TransformObservation(env, lambda o: o * 0 + 7.0)
    assert np.all(wrapped.reset() == 7.0) and np.all(wrapped.step(np.zeros(3, np.float32))[0] == 7.0)
    assert wrapped._max_episode_steps == 1000  # attributes reach the env through the wrapper
    assert common.TransformReward(env, lambda r: 5.0).step(np.zeros(3, np.float32))[1] == 5.0


def test_old_gym_env_marks_time_limits(tiny_dataset):
    class Limited:  # a gymnasium env that is truncated at its second step
        observation_space = action_space = None
        spec = type("Spec", (), {"max_episode_steps": 2})()

        def reset(self, seed=None):
            self.t = 0
            return np.zeros(2), {}

        def step(self, action):
            self.t += 1
            return np.zeros(2), 1.0, False, self.t == 2, {}
    env = common.OldGymEnv(tiny_dataset("hopper", "medium"), env=Limited())
    env.reset()
    assert env.step(0)[2:] == (False, {})
    assert env.step(0)[2:] == (True, {"TimeLimit.truncated": True})


def test_wandb_stand_in_forwards_logs():
    logged = []
    wandb = common.WandbRecorder(lambda d, step: logged.append((d, step))).module()
    wandb.init(project="p").save()
    wandb.log({"eval/score": 1.0}, step=7)
    wandb.finish()
    assert logged == [({"eval/score": 1.0}, 7)]


# ---- the reference runner's early checks (before any reference import or data load)
def test_run_reference_refuses_fields_the_reference_cannot_run(tmp_path, capsys):
    config = str(ROOT / "configs" / "iql" / "o2o" / "hopper" / "medium-replay-v0.yaml")
    rc = run_reference.main(["corl", "iql", "--config_path", config, "--run_dir", str(tmp_path), "--n_critics", "3",
                             "--offline_eval_every", "1000", "--online_eval_every", "1000",
                             "--offline_updates", "1000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "n_critics=3" in err[0] and "parity protocol" in err[0]
    rc = run_reference.main(["corl", "iql", "--config_path", config, "--run_dir", str(tmp_path),
                             "--offline_eval_every", "1000", "--online_eval_every", "500"])
    assert rc == 1 and "offline_eval_every (1000) = online_eval_every (500)" in capsys.readouterr().err
    assert run_reference.main(["nope", "iql"]) == 2
    assert run_reference.main(["pex", "iql", "--config_path", config, "--run_dir", str(tmp_path)]) == 2
    assert "parity_refs/pex.py has no learn_iql" in capsys.readouterr().err
    assert not (tmp_path / "eval.jsonl").exists() or (tmp_path / "eval.jsonl").read_text() == ""


# ---- protocol: per-entry command and datasets
def _protocol(tmp_path, seeds=(0, 1, 2)):
    proto = {"name": "pl_test", "output_root": str(tmp_path / "runs"), "seeds": list(seeds),
             "datasets": ["o2o/hopper/medium-replay-v0", "o2o/walker2d/medium-v0"],
             "algorithms": {"iql": {"offline_updates": 1000},
                            "iql@corl": {"script": "iql", "offline_updates": 1000, "datasets": [
                                "o2o/hopper/medium-replay-v0"], "command": [
                                "{python}", "benchmarks/parity_refs/run_reference.py", "corl", "{algo}",
                                "--config_path", "{config}", "--seed", "{seed}", "--run_dir", "{run_dir}"]}}}
    path = tmp_path / "pl_test.yaml"
    path.write_text(yaml.safe_dump(proto))
    return sweep.load_protocol(path)


def test_entry_command_and_datasets(tmp_path):
    protocol = _protocol(tmp_path)
    plan = sweep.build_plan(protocol, ROOT)
    ref = [r for r in plan.runs if r.algo == "iql@corl"]
    assert len(ref) == 3 and {r.dataset for r in ref} == {"o2o/hopper/medium-replay-v0"}
    args = ref[0].args(protocol["command"])
    assert args[1:5] == ["benchmarks/parity_refs/run_reference.py", "corl", "iql", "--config_path"]
    assert "--offline_updates" in args and plan.recorded_args(ref[0]) == args[1:]
    assert [parity.implementation(protocol["algorithms"][e]) for e in ("iql", "iql@corl")] == ["ours", "corl"]
    assert parity.learn_entries(protocol, "iql") == ["iql", "iql@corl"]
    protocol["algorithms"]["iql@corl"]["datasets"] = ["o2o/halfcheetah/medium-v0"]
    with pytest.raises(sweep.SweepError, match="datasets must be a list of the protocol's datasets"):
        sweep.build_plan(protocol, ROOT)


def test_entry_seeds(tmp_path):
    """An entry's own `seeds` replaces the protocol's for its runs (--only accepts them); a bad list is refused."""
    protocol = _protocol(tmp_path)
    protocol["algorithms"]["iql@corl"]["seeds"] = [0, 1, 2, 3, 4]
    plan = sweep.build_plan(protocol, ROOT)
    assert sorted(r.seeds[0] for r in plan.runs if r.algo == "iql@corl") == [0, 1, 2, 3, 4]
    assert sorted(r.seeds[0] for r in plan.runs if r.algo == "iql" and "hopper" in r.dataset) == [0, 1, 2]
    assert "--seed" in plan.recorded_args(plan.runs[-1]) and "--seeds" not in plan.recorded_args(plan.runs[-1])
    only = sweep.build_plan(protocol, ROOT, only=["seed=4"])
    assert [(r.algo, r.seeds) for r in only.runs] == [("iql@corl", [4])]
    for bad in ([], [1, 1], "0-4", [0, True]):
        protocol["algorithms"]["iql@corl"]["seeds"] = bad
        with pytest.raises(sweep.SweepError, match="iql@corl: seeds must be a non-empty list of distinct integers"):
            sweep.build_plan(protocol, ROOT)


def test_precision_protocol_pairs_bf16_with_float32():
    """benchmarks/protocols/precision_learn.yaml: each algorithm in bf16 ("ours") against the same file in float32,
    the `implementation` label not passed to the script."""
    protocol = sweep.load_protocol("precision_learn")
    plan = sweep.build_plan(protocol, ROOT)
    for algo in ("iql", "cal_ql"):
        assert parity.learn_entries(protocol, algo) == [algo, f"{algo}@float32"]
        assert [parity.implementation(protocol["algorithms"][e]) for e in parity.learn_entries(protocol, algo)] == [
            "ours", "float32"]
    for run in plan.runs:
        args = run.args(protocol["command"])
        assert "--implementation" not in args
        assert args[args.index("--precision") + 1] == ("float32" if run.algo.endswith("@float32") else "bf16")


# ---- statistics and verdicts
def test_bootstrap_and_verdict():
    diff, lo, hi = parity.bootstrap_diff([50, 52, 51], [50, 52, 51])
    assert diff == 0 and lo <= 0 <= hi
    assert parity.learn_verdict(3, 3, lo, hi) == "match"
    diff, lo, hi = parity.bootstrap_diff([70, 71, 72], [50, 51, 52])
    assert diff == pytest.approx(20) and 18 <= lo < hi <= 22
    assert parity.learn_verdict(3, 3, lo, hi) == "differs"
    assert parity.learn_verdict(3, 3, 1.0, 4.0) == "match"  # within +-5 although 0 is outside
    assert parity.learn_verdict(3, 3, -6.0, -1.0) == "differs"
    assert parity.learn_verdict(2, 3, -1.0, 1.0) == "incomplete (2 / 3 seeds)"
    a = parity.bootstrap_diff([1, 2, 3], [0, 5, 9], seed=1)
    assert a == parity.bootstrap_diff([1, 2, 3], [0, 5, 9], seed=1)  # reproducible


def _fake_run(plan, run_dir, seed, offline, online, wall, updates=(1000, 2000)):
    run_dir.mkdir(parents=True)
    run = next(r for r in plan.runs if ROOT / r.run_dir == run_dir)
    records = [{"seed": seed, "phase": "offline", "updates": updates[0], "env_steps": 0, "normalized_score": offline,
                "return": 1.0, "wall_time": wall / 2},
               {"seed": seed, "phase": "online", "updates": updates[1], "env_steps": updates[1] - updates[0],
                "normalized_score": online, "return": 2.0, "wall_time": wall}]
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "done.json").write_text(json.dumps({"wall_time_s": wall, "load_avg_at_end": [1.0, 1.0, 1.0],
                                                   "args": plan.recorded_args(run)}))


def test_learn_report_on_fake_runs(tmp_path, capsys):
    protocol = _protocol(tmp_path)
    root = tmp_path / "runs"
    hopper = "o2o/hopper/medium-replay-v0"
    plan = sweep.build_plan(protocol, ROOT)
    for seed, (ours_score, ref_score) in enumerate([(60.0, 58.0), (62.0, 61.0), (59.0, 63.0)]):
        _fake_run(plan, root / "iql" / hopper / f"seed{seed}", seed, 40.0 + seed, ours_score, 100.0)
        _fake_run(plan, root / "iql@corl" / hopper / f"seed{seed}", seed, 41.0, ref_score, 250.0)
    _fake_run(plan, root / "iql" / "o2o/walker2d/medium-v0" / "seed0", 0, 1.0, 2.0, 10.0)  # no reference: not compared
    out = tmp_path / "out"
    summary = parity.learn_report(protocol, out, readme=False, root=ROOT)
    assert len(summary) == 1
    item = summary[0]
    assert item["reference"] == "corl" and item["ours"]["seeds"] == [0, 1, 2]
    assert item["online"]["ours_mean"] == pytest.approx(60.333, abs=1e-3)
    assert item["online"]["diff"] == pytest.approx(60.333 - 60.667, abs=1e-3)
    assert item["online"]["verdict"] == "match" and item["speedup_wall"] == pytest.approx(2.5)
    assert item["ours"]["updates_per_s"] == [20.0] * 3
    rows = (out / "learn.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 7 and rows[0].startswith("implementation,entry,algorithm,dataset,seed")
    assert json.loads((out / "learn.json").read_text())["summary"][0]["online"]["verdict"] == "match"
    assert (out / "learn.png").stat().st_size > 0 and "| iql | o2o/hopper/medium-replay-v0 | CORL | 3 / 3 |" in \
        (out / "learn.md").read_text()
    assert "| 60.3 ± 1.5 / 60.7 ± 2.5 | -0.3 [" in parity.learn_readme(summary)
    # each finished run's record files are kept beside the report (to be committed with it), not its checkpoints
    kept = out / "records" / "iql@corl" / hopper / "seed2"
    assert sorted(p.name for p in kept.iterdir()) == ["done.json", "eval.jsonl"]
    # a run whose directory is gone (another machine, a new checkout) is read from its kept record
    shutil.rmtree(root / "iql@corl" / hopper / "seed2")
    item = parity.learn_report(protocol, out, readme=False, root=ROOT)[0]
    assert item["ref"]["seeds"] == [0, 1, 2] and item["online"]["verdict"] == "match"
    # a finished run that neither holds is not dropped from the committed report silently
    shutil.rmtree(kept)
    with pytest.raises(parity.ReportError, match="holds 1 finished runs that neither the run directories nor"):
        parity.learn_report(protocol, out, readme=False, root=ROOT)
    assert "| iql | o2o/hopper/medium-replay-v0 | CORL | 3 / 3 |" in (out / "learn.md").read_text()  # untouched
    # `learn` says so before any slow work (here --report_only); a run it would train again counts as present
    assert parity.learn("iql", out=out, report_only=True, protocol_name=protocol["path"], readme=False) == 2
    assert "holds 1 finished runs" in capsys.readouterr().err
    # an unfinished run (no done.json) is plotted and listed but not counted
    (out / "learn.csv").unlink()
    _fake_run(plan, root / "iql@corl" / hopper / "seed2", 2, 41.0, 63.0, 250.0)
    (root / "iql@corl" / hopper / "seed2" / "done.json").unlink()
    item = parity.learn_report(protocol, out, readme=False, root=ROOT)[0]
    assert item["ref"]["seeds"] == [0, 1] and item["online"]["verdict"] == "incomplete (3 / 2 seeds)"


def test_committed_learning_parity_matches_its_generator():
    """The README section is what parity.py writes from the committed learn.json (when the runs exist)."""
    path = ROOT / "benchmarks" / "results" / "parity" / "learn.json"
    if not path.exists():
        pytest.skip("no learning-parity results committed yet")
    section = (ROOT / "README.md").read_text().split("<!-- parity_learn:begin -->\n")[1].split(
        "\n<!-- parity_learn:end -->")[0]
    assert section == parity.learn_readme(json.loads(path.read_text())["summary"]).strip()


# ---- a real reference run (torch + checkout)
def test_corl_iql_learns_on_our_data(tiny_dataset, tmp_path):
    pytest.importorskip("torch")
    refs = os.environ.get("O2O_PARITY_REFS")
    if not refs:
        pytest.skip("reference checkouts not available: set O2O_PARITY_REFS to a directory holding them")
    ds_id = tiny_dataset("hopper", "medium")
    config = str(ROOT / "configs" / "iql" / "quickstart.yaml")
    os.environ["O2O_PARITY_REFERENCE_DIR"] = refs
    try:
        rc = run_reference.main(["corl", "iql", "--config_path", config, "--dataset_id", ds_id, "--seed", "1",
                                 "--run_dir", str(tmp_path), "--offline_updates", "40", "--update_block", "20",
                                 "--offline_eval_every", "20", "--online_steps", "20", "--online_eval_every", "20",
                                 "--eval_episodes", "1", "--hidden_dims", "[256, 256]", "--corl_cosine_restart",
                                 "true"])
    finally:
        os.environ.pop("O2O_PARITY_REFERENCE_DIR", None)
    assert rc == 0
    records = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["updates"], r["env_steps"]) for r in records] == [
        ("offline", 20, 0), ("offline", 40, 0), ("online", 60, 20)]
    lo, hi = data.reference_scores(ds_id)
    for r in records:
        assert r["normalized_score"] == pytest.approx(100 * (r["return"] - lo) / (hi - lo))
    info = json.loads((tmp_path / "reference.json").read_text())
    assert info["commit"] == common.REFERENCES["corl"][1] and info["reference_config"]["iql_tau"] == 0.7


def test_aca_train_returns_on_fake_runs(tmp_path):
    """Ours: episodes cut where a buffer row's obs is not the previous row's next_obs, windowed by the row of the
    episode's end; the official: d3rlpy's rollout_return.csv by epoch; then the per-window difference."""
    hopper = "o2o/hopper/medium-replay-v0"
    proto = {"name": "aca_test", "output_root": str(tmp_path / "runs"), "seeds": [0, 1], "datasets": [hopper],
             "algorithms": {"aca": {"online_steps": 20, "online_eval_every": 10},
                            "aca@aca": {"script": "aca", "online_steps": 20, "online_eval_every": 10, "command": [
                                "{python}", "benchmarks/parity_refs/run_reference.py", "aca", "{algo}",
                                "--config_path", "{config}", "--seed", "{seed}", "--run_dir", "{run_dir}"]}}}
    (tmp_path / "aca_test.yaml").write_text(yaml.safe_dump(proto))
    protocol = sweep.load_protocol(tmp_path / "aca_test.yaml")
    root = tmp_path / "runs"
    plan = sweep.build_plan(protocol, ROOT)

    def finished(run_dir):
        run = next(r for r in plan.runs if ROOT / r.run_dir == run_dir)
        (run_dir / "done.json").write_text(json.dumps({"args": plan.recorded_args(run)}))

    for seed in (0, 1):
        ours = root / "aca" / hopper / f"seed{seed}"
        buf = ours / "checkpoints" / "buffer" / f"seed{seed}"
        buf.mkdir(parents=True)
        # episodes of 6, 6 and 8 rows (ends at rows 5, 11, 19: windows 0, 1, 1), rewards 1 each, +seed in the last
        obs = np.arange(20, dtype=np.float32)[:, None].repeat(2, 1)
        nxt = obs + 1
        nxt[[5, 11]] = -1  # an episode ends: the next row starts elsewhere
        rew = np.ones(20, np.float32)
        rew[12:] += seed
        np.savez(buf / "rows_0000000000_0000000012.npz", obs=obs[:12], act=obs[:12], rew=rew[:12],
                 next_obs=nxt[:12], done=np.zeros(12, np.float32))
        np.savez(buf / "rows_0000000012_0000000020.npz", obs=obs[12:], act=obs[12:], rew=rew[12:],
                 next_obs=nxt[12:], done=np.zeros(8, np.float32))
        finished(ours)
        ref = root / "aca@aca" / hopper / f"seed{seed}"
        exp = ref / "reference" / "d3rlpy_logs" / "ACA" / "hopper-medium-replay-v2" / str(seed) / "exp"
        exp.mkdir(parents=True)
        (exp / "rollout_return.csv").write_text(f"1,10,6.0\n2,20,{7.0 + seed}\n2,20,{7.0 + seed}\n")
        finished(ref)
    result = parity.aca_train_returns(protocol, tmp_path / "out", root=sweep.ROOT, refs=(0.0, 100.0))
    assert result["per_seed_normalized"]["ours"] == {0: [6.0, 7.0], 1: [6.0, 11.0]}  # (6 + 8) / 2; (6 + 16) / 2
    assert result["per_seed_normalized"]["official"] == {0: [6.0, 7.0], 1: [6.0, 8.0]}
    w0, w1 = result["windows"]
    assert w0["env_steps"] == [0, 10] and w0["diff"] == 0.0 and w0["n"] == [2, 2]
    assert w1["diff"] == pytest.approx(9.0 - 7.5)
    assert "| 10-20 | 2 / 2 | 9.0 ± 2.8 | 7.5 ± 0.7 | +1.5 [" in (tmp_path / "out" / "aca_train_returns.md").read_text()
    # seed 1's runs gone (a new checkout): its numbers come from the committed JSON, the same result
    shutil.rmtree(root / "aca" / hopper / "seed1")
    shutil.rmtree(root / "aca@aca" / hopper / "seed1")
    again = parity.aca_train_returns(protocol, tmp_path / "out", root=sweep.ROOT, refs=(0.0, 100.0))
    assert again["per_seed_normalized"] == result["per_seed_normalized"] and again["windows"] == result["windows"]
    assert "Incomplete" not in (tmp_path / "out" / "aca_train_returns.md").read_text()
    # a protocol with a seed not yet run: the table says it is not a result yet
    parity.aca_train_returns({**protocol, "seeds": [0, 1, 2]}, tmp_path / "out", root=sweep.ROOT, refs=(0.0, 100.0))
    assert "**Incomplete: 2 of 3 seeds finished on both sides" in (tmp_path / "out" / "aca_train_returns.md").read_text()
