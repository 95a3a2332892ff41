"""Learning parity of PEX (benchmarks/parity_refs/pex.py::learn_pex): the reference runner's early refusals of
configs the official scripts cannot run, and one tiny real run of the official main_offline.py + main_online.py on
our data (needs torch and $O2O_PARITY_REFS holding the pex/ checkout; skipped otherwise).
"""
import json
import os

import pytest

import data
import sweep
from parity_refs import common, run_reference

ROOT = sweep.ROOT
CONFIG = str(ROOT / "configs" / "pex" / "o2o" / "hopper" / "medium-replay-v0.yaml")
PROTOCOL = ["--clip_actions", "false", "--offline_updates", "50000", "--offline_eval_every", "5000",
            "--online_steps", "25000", "--online_eval_every", "5000"]  # the parity protocol's PEX settings


@pytest.mark.parametrize("overrides, message", [
    ([], "clip_actions=True (the reference has False)"),
    (PROTOCOL + ["--n_critics", "3"], "n_critics=3"),
    (PROTOCOL + ["--critic_lr", "0.001"], "one --learning_rate"),
    (PROTOCOL + ["--hidden_dims", "[256, 128]"], "one width repeated"),
    (PROTOCOL + ["--online_eval_every", "10000"], "online_steps (25000) must be a positive multiple of "
                                                  "online_eval_every (10000)"),
    (PROTOCOL + ["--offline_updates", "0"], "offline_updates (0) must be a positive multiple"),
    (PROTOCOL + ["--initial_collection_steps", "100"], "initial_collection_steps (100) must be >= 128"),
])
def test_refuses_what_the_official_scripts_cannot_run(tmp_path, capsys, overrides, message):
    rc = run_reference.main(["pex", "pex", "--config_path", CONFIG, "--run_dir", str(tmp_path), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and message in err[0]
    assert (tmp_path / "eval.jsonl").read_text() == ""


def test_official_pex_learns_on_our_data(tiny_dataset, tmp_path):
    pytest.importorskip("torch")
    refs = os.environ.get("O2O_PARITY_REFS")
    if not refs:
        pytest.skip("reference checkouts not available: set O2O_PARITY_REFS to a directory holding them")
    ds_id = tiny_dataset("hopper", "medium")
    os.environ["O2O_PARITY_REFERENCE_DIR"] = refs
    try:
        rc = run_reference.main(["pex", "pex", "--config_path", str(ROOT / "configs" / "pex" / "quickstart.yaml"),
                                 "--dataset_id", ds_id, "--seed", "1", "--run_dir", str(tmp_path),
                                 "--clip_actions", "false", "--offline_updates", "40", "--update_block", "20",
                                 "--offline_eval_every", "20", "--online_steps", "200", "--online_eval_every", "100",
                                 "--initial_collection_steps", "128", "--eval_episodes", "1",
                                 "--hidden_dims", "[64, 64]"])
    finally:
        os.environ.pop("O2O_PARITY_REFERENCE_DIR", None)
    assert rc == 0
    records = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    # online: one update per env step once the replay holds more than 128 transitions (steps 130..200: 71)
    assert [(r["phase"], r["updates"], r["env_steps"]) for r in records] == [
        ("offline", 20, 0), ("offline", 40, 0), ("online", 40, 100), ("online", 111, 200)]
    lo, hi = data.reference_scores(ds_id)
    for r in records:
        assert r["episodes"] == 1 and r["normalized_score"] == pytest.approx(100 * (r["return"] - lo) / (hi - lo))
    info = json.loads((tmp_path / "reference.json").read_text())
    assert info["commit"] == common.REFERENCES["pex"][1] and info["updates"] == 111
    assert "--hidden_dim" in info["reference_argv"]["online"] and (tmp_path / "reference" / "offline" /
                                                                    "offline_ckpt").exists()
