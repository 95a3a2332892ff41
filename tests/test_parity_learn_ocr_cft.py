"""Learning parity against OCR-CFT (benchmarks/parity_refs/ocr_cft.py learn_o2td3 / learn_o2sac / learn_o2ppo): the
config refusals (before any reference import or data load), and one tiny real run per algorithm of the reference's
own offline + fine-tuning scripts on a tiny dataset (needs torch and $O2O_PARITY_REFS; skipped otherwise), checking
the records' phases, update / env-step counts and score formula against our scripts' conventions.
"""
import json
import os

import pytest

import data
from parity_refs import common, run_reference

ROOT = common.REPO_ROOT
O2TD3 = ["--store_executed_action", "false"]  # the switch the protocol sets (official: noise-free action stored)
O2PPO = ["--reference_advantage_broadcast_bug", "true", "--mc_returns_across_timeouts", "true"]


def _config(algo, name="o2o/hopper/medium-replay-v0.yaml"):
    return str(ROOT / "configs" / algo / name)


def _refused(capsys, tmp_path, algo, *args, config=None) -> str:
    rc = run_reference.main(["ocr_cft", algo, "--config_path", config or _config(algo), "--run_dir", str(tmp_path),
                             *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert not (tmp_path / "eval.jsonl").exists() or (tmp_path / "eval.jsonl").read_text() == ""
    return err[0]


# ---- refusals: fields the reference hard-codes, switches, evaluation schedules
def test_o2td3_refusals(tmp_path, capsys):
    err = _refused(capsys, tmp_path, "o2td3")
    assert "store_executed_action=True" in err and "parity protocol" in err
    err = _refused(capsys, tmp_path, "o2td3", *O2TD3, "--critic_hidden", "[128, 128]", "--lambda_lr", "1e-4")
    assert "critic_hidden=(128, 128)" in err and "lambda_lr=0.0001" in err
    err = _refused(capsys, tmp_path, "o2td3", *O2TD3, "--offline_updates", "3000", "--update_block", "1000",
                   "--offline_eval_every", "2000")
    assert "offline_updates (3000) must be a positive multiple of offline_eval_every (2000)" in err
    err = _refused(capsys, tmp_path, "o2td3", *O2TD3, "--online_steps", "2500", "--online_eval_every", "1000")
    assert "online_steps (2500)" in err


def test_o2sac_refusals(tmp_path, capsys):
    err = _refused(capsys, tmp_path, "o2sac", config=_config("o2sac", "quickstart.yaml"))  # 128-wide networks
    assert "policy_hidden=(128, 128, 128)" in err
    assert "utd=2" in _refused(capsys, tmp_path, "o2sac", "--utd", "2")
    err = _refused(capsys, tmp_path, "o2sac", "--critic_hidden", "[256, 256, 128]")
    assert "critic_hidden=[256, 256, 128]" in err
    err = _refused(capsys, tmp_path, "o2sac", "--align_steps", "6000", "--reconstruct_eval_every", "4000")
    assert "align_steps (6000) must be a positive multiple of reconstruct_eval_every (4000)" in err
    err = _refused(capsys, tmp_path, "o2sac", "--dataset_id", "D4RL/antmaze/umaze-v1",
                   config=_config("o2sac", "D4RL/antmaze/umaze-v1.yaml"))
    assert "MuJoCo locomotion datasets only" in err


def test_o2ppo_refusals(tmp_path, capsys):
    err = _refused(capsys, tmp_path, "o2ppo")
    assert "reference_advantage_broadcast_bug=False" in err and "mc_returns_across_timeouts=False" in err
    assert "reevaluation_lr=0.0003" in _refused(capsys, tmp_path, "o2ppo", *O2PPO, "--reevaluation_lr", "3e-4")
    assert "value_hidden_dims=[256, 128]" in _refused(capsys, tmp_path, "o2ppo", *O2PPO, "--value_hidden_dims",
                                                      "[256, 128]")
    err = _refused(capsys, tmp_path, "o2ppo", *O2PPO, "--online_steps", "5000", "--evaluate_freq", "2000")
    assert "online_steps (5000) must be a positive multiple of evaluate_freq (2000)" in err


# ---- tiny real runs of the reference (torch + checkout)
@pytest.fixture
def reference_run(tiny_dataset, tmp_path):
    """run(algo, config, *overrides) -> the records of a reference run on the tiny hopper dataset (torch on one
    thread: the test machine's cores are shared)."""
    torch = pytest.importorskip("torch")
    refs = os.environ.get("O2O_PARITY_REFS")
    if not refs:
        pytest.skip("reference checkouts not available: set O2O_PARITY_REFS to a directory holding them")
    ds_id = tiny_dataset("hopper", "medium")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["O2O_PARITY_REFERENCE_DIR"] = refs

    def run(algo, config, *args):
        rc = run_reference.main(["ocr_cft", algo, "--config_path", _config(algo, config), "--dataset_id", ds_id,
                                 "--seed", "1", "--run_dir", str(tmp_path), "--eval_episodes", "1", *args])
        assert rc == 0
        records = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
        lo, hi = data.reference_scores(ds_id)
        for r in records:
            assert r["normalized_score"] == pytest.approx(100 * (r["return"] - lo) / (hi - lo))
        info = json.loads((tmp_path / "reference.json").read_text())
        assert info["commit"] == common.REFERENCES["ocr_cft"][1] and info["evaluations"] == len(records)
        return records, info
    yield run
    os.environ.pop("O2O_PARITY_REFERENCE_DIR", None)
    torch.set_num_threads(threads)


def test_ocr_cft_o2td3_learns_on_our_data(reference_run):
    records, info = reference_run(
        "o2td3", "quickstart.yaml", *O2TD3, "--update_block", "20", "--offline_updates", "40",
        "--offline_eval_every", "20", "--ope_updates", "20", "--align_updates", "40", "--warmup_steps", "30",
        "--online_steps", "60", "--online_eval_every", "30")
    assert [(r["phase"], r["updates"], r["env_steps"]) for r in records] == [
        ("offline", 20, 0), ("offline", 40, 0), ("reevaluation", 20, 0), ("alignment", 20, 0), ("alignment", 40, 0),
        ("online", 0, 30), ("online", 30, 60)]
    assert records[2]["return"] == records[1]["return"]  # re-evaluation reuses the offline actor's score (as ours)
    ref = info["reference_config"]["finetune/O2TD3.py"]
    assert (ref["log_freq"], ref["ope_steps"], ref["eval_freq"], ref["policy_lr"]) == (20, 20, 30, 1e-4)


def test_ocr_cft_o2sac_learns_on_our_data(reference_run):
    records, info = reference_run(
        "o2sac", "o2o/hopper/medium-replay-v0.yaml", "--update_block", "20", "--offline_updates", "40",
        "--offline_eval_every", "20", "--ope_steps", "20", "--align_steps", "20", "--reconstruct_eval_every", "20",
        "--warmup_steps", "10", "--online_steps", "20", "--online_eval_every", "10")
    assert [(r["phase"], r["updates"], r["phase_updates"], r["env_steps"]) for r in records] == [
        ("offline", 20, 20, 0), ("offline", 40, 40, 0), ("reevaluation", 60, 20, 0), ("alignment", 80, 20, 0),
        ("online", 80, 0, 10), ("online", 180, 100, 20)]  # utd 10 after warm-up
    assert info["reference_config"]["offline/cql.py"]["cql_alpha"] == 10.0


def test_ocr_cft_o2ppo_learns_on_our_data(reference_run):
    records, info = reference_run(
        "o2ppo", "quickstart.yaml", *O2PPO, "--update_block", "20", "--offline_updates", "40",
        "--offline_eval_every", "20", "--reevaluation_updates", "40", "--reevaluation_eval_every", "20",
        "--rollout_length", "64", "--minibatch_size", "32", "--ppo_epochs", "2", "--online_steps", "128",
        "--evaluate_freq", "64")
    assert [(r["phase"], r["updates"], r["env_steps"]) for r in records] == [
        ("offline", 20, 0), ("offline", 40, 0), ("reevaluation", 20, 0), ("reevaluation", 40, 0),
        ("online", 4, 64), ("online", 8, 128)]  # 2 epochs x 2 minibatches per rollout
    assert info["reference_config"]["finetune/O2PPO.py"]["batch_size"] == 64
