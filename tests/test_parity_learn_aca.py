"""Learning parity of ACA (benchmarks/parity_refs/aca.py::learn_aca): the reference runner's early refusals of
configs the official scripts cannot run, and one tiny real run of the official run_sacml.py + run_aca.py on our data
in the ACA venv (needs $O2O_PARITY_REFS holding the aca/ checkout and the ACA venv with our env packages, see
parity_refs/aca.py::learning_python; skipped otherwise).
"""
import json
import os

import pytest

import data
import sweep
from parity_refs import aca as aca_parity
from parity_refs import common, run_reference

ROOT = sweep.ROOT
CONFIG = str(ROOT / "configs" / "aca" / "o2o" / "hopper" / "medium-replay-v0.yaml")


@pytest.mark.parametrize("overrides, message", [
    (["--critic_lr", "0.001"], "critic_lr=0.001 (the reference has 0.0003)"),
    (["--online_reset_optimizers", "true"], "online_reset_optimizers=True"),
    (["--online_reward_bias", "-1"], "online_reward_bias=-1.0"),
    (["--online_block", "50"], "online_block=50 (the reference has 1)"),
    (["--d3rlpy_terminals", "false"], "d3rlpy_terminals=False (the reference has True)"),
    (["--dataset_id", "D4RL/antmaze/umaze-v1"], "o2o/<env>/<level>-v0"),
    (["--online_steps", "25000", "--online_eval_every", "10000"],
     "online_steps (25000) must be a positive multiple of online_eval_every (10000)"),
    (["--offline_updates", "50000", "--offline_eval_every", "20000"],
     "offline_updates (50000) must be a positive multiple of offline_eval_every (20000)"),
])
def test_refuses_what_the_official_scripts_cannot_run(tmp_path, capsys, overrides, message):
    rc = run_reference.main(["aca", "aca", "--config_path", CONFIG, "--run_dir", str(tmp_path), "--online_block", "1",
                             "--d3rlpy_terminals", "true", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message in err[0]
    assert (tmp_path / "eval.jsonl").read_text() == ""


def _reference_or_skip():
    refs = os.environ.get("O2O_PARITY_REFS")
    if not refs or not (common.Path(refs) / "aca").is_dir():
        pytest.skip("set O2O_PARITY_REFS to a directory holding the aca/ reference checkout")
    try:
        aca_parity.learning_python()
    except common.ReferenceMissing as e:
        pytest.skip(str(e))
    return refs


def test_refuses_official_config_mismatch(tmp_path, capsys):
    os.environ["O2O_PARITY_REFERENCE_DIR"] = _reference_or_skip()
    try:  # medium-replay: the official online config seeds the buffer with the 50 best offline episodes
        rc = run_reference.main(["aca", "aca", "--config_path", CONFIG, "--run_dir", str(tmp_path), "--n_trajs", "0",
                                 "--online_block", "1", "--d3rlpy_terminals", "true"])
    finally:
        os.environ.pop("O2O_PARITY_REFERENCE_DIR", None)
    err = capsys.readouterr().err
    assert rc == 1 and "n_trajs=0 (the reference has 50)" in err and "mjc_mr.yaml" in err


def test_official_aca_learns_on_our_data(tiny_dataset, tmp_path):
    refs = _reference_or_skip()
    ds_id = tiny_dataset("hopper", "medium")  # official mjc_m configs: empty online buffer at the start
    os.environ["O2O_PARITY_REFERENCE_DIR"] = refs
    try:
        rc = run_reference.main(["aca", "aca", "--config_path", str(ROOT / "configs" / "aca" / "quickstart.yaml"),
                                 "--dataset_id", ds_id, "--seed", "1", "--run_dir", str(tmp_path),
                                 "--offline_updates", "40", "--update_block", "20", "--offline_eval_every", "20",
                                 "--online_steps", "300", "--online_eval_every", "150", "--eval_episodes", "1",
                                 "--hidden_dims", "[64, 64]", "--online_block", "1", "--d3rlpy_terminals", "true"])
    finally:
        os.environ.pop("O2O_PARITY_REFERENCE_DIR", None)
    assert rc == 0
    records = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    # online: d3rlpy updates once per env step once its buffer holds more than 256 transitions (len(buffer) counts
    # transitions of finished episodes and lags the steps: at least 1 update by step 300, none by step 150)
    assert [(r["phase"], r["env_steps"]) for r in records] == [
        ("offline", 0), ("offline", 0), ("online", 150), ("online", 300)]
    assert [r["updates"] for r in records[:3]] == [20, 40, 40] and 40 < records[3]["updates"] <= 40 + 300 - 256
    lo, hi = data.reference_scores(ds_id)
    for r in records:
        assert r["episodes"] == 1 and r["normalized_score"] == pytest.approx(100 * (r["return"] - lo) / (hi - lo))
    info = json.loads((tmp_path / "reference.json").read_text())
    assert info["commit"] == common.REFERENCES["aca"][1] and info["updates"] == records[-1]["updates"]
    assert info["reference_spec"]["d4rl_name"] == "hopper-medium-v2"
