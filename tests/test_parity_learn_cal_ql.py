"""Learning parity of Cal-QL against the official code (benchmarks/parity_refs/calql_official.py, learn_cal_ql):
the config fields the official main() cannot run are refused before any reference import or data load, and one
tiny real run of the official training loop on our data (needs $O2O_PARITY_REFS, skipped otherwise) writes our
eval.jsonl records at our evaluation points.
"""
import json
import os

import pytest

import data
import sweep
from parity_refs import common, run_reference

ROOT = sweep.ROOT
HOPPER = str(ROOT / "configs" / "cal_ql" / "o2o" / "hopper" / "medium-replay-v0.yaml")


def _run(tmp_path, *overrides, config=HOPPER):
    return run_reference.main(["calql_official", "cal_ql", "--config_path", config, "--run_dir", str(tmp_path),
                               *overrides])


# ---- early refusals (no checkout needed: they come before any reference import)
def test_refuses_fields_the_official_code_hard_codes(tmp_path, capsys):
    rc = _run(tmp_path, "--n_critics", "3")  # the hopper config also normalises states: refused too
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "n_critics=3" in err[0] and "normalize=True" in err[0]
    assert "parity protocol" in err[0]
    for field, value in (("online_calibration", "false"), ("mc_failure_rule", "last"), ("num_seeds", "2")):
        assert _run(tmp_path, "--normalize", "false", f"--{field}", value) == 1
        assert f"{field}=" in capsys.readouterr().err
    assert _run(tmp_path, "--normalize", "false", "--online_steps", "0") == 1
    assert "set online_steps > 0" in capsys.readouterr().err
    assert not (tmp_path / "eval.jsonl").exists() or (tmp_path / "eval.jsonl").read_text() == ""


# ---- a real run of the official main() (JAX; the checkout from $O2O_PARITY_REFS)
def test_official_cal_ql_learns_on_our_data(tiny_dataset, tmp_path):
    for name in ("distrax", "absl", "cloudpickle", "dateutil"):
        pytest.importorskip(name)
    refs = os.environ.get("O2O_PARITY_REFS")
    if not refs:
        pytest.skip("reference checkouts not available: set O2O_PARITY_REFS to a directory holding them")
    import absl.flags
    ds_id = tiny_dataset("hopper", "medium")
    config = str(ROOT / "configs" / "cal_ql" / "quickstart.yaml")
    os.environ["O2O_PARITY_REFERENCE_DIR"] = refs
    try:  # offline: epochs of gcd(30, 40) = 10 updates, evaluations at 30 and 40; online: every 10 env steps
        rc = _run(tmp_path, "--dataset_id", ds_id, "--seed", "1", "--offline_updates", "40", "--update_block", "10",
                  "--offline_eval_every", "30", "--online_steps", "20", "--online_eval_every", "10",
                  "--eval_episodes", "1", "--normalize", "false", "--policy_hidden", "[32, 32]",
                  "--critic_hidden", "[32, 32]", "--cql_n_actions", "4", config=config)
    finally:
        os.environ.pop("O2O_PARITY_REFERENCE_DIR", None)
    assert rc == 0
    records = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["updates"], r["env_steps"]) for r in records[:2]] == [("offline", 30, 0), ("offline", 40, 0)]
    online = records[2:]
    steps = [r["env_steps"] for r in online]
    # as ours: one evaluation when env_steps // 10 grows (after a whole trajectory and its updates), one at the end
    assert online and all(r["phase"] == "online" and r["updates"] == 40 + r["env_steps"] for r in online)
    assert steps[-1] >= 20 and all(s < 20 for s in steps[:-1])
    assert all(a // 10 < b // 10 for a, b in zip(steps, steps[1:])) and steps[0] >= 10
    lo, hi = data.reference_scores(ds_id)
    for r in records:
        assert r["episodes"] == 1 and r["normalized_score"] == pytest.approx(100 * (r["return"] - lo) / (hi - lo))
    info = json.loads((tmp_path / "reference.json").read_text())
    ref = info["reference_config"]
    assert info["commit"] == common.REFERENCES["calql"][1] and info["updates"] == online[-1]["updates"]
    assert (ref["n_train_step_per_epoch_offline"], ref["n_pretrain_epochs"], ref["offline_eval_every_n_epoch"]) == \
        (10, 4, 3)
    assert ref["qf_arch"] == "32-32" and ref["cql"]["cql_n_actions"] == 4 and ref["enable_calql"] is True
    assert "n_pretrain_epochs" not in absl.flags.FLAGS  # the official flags were not defined in absl's registry
