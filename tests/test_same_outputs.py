"""benchmarks/same_outputs.py: what differs is named; bad inputs are refused in one line before any run."""
import subprocess
import sys

from conftest import ROOT
import same_outputs


def test_differences_name_the_part_and_keys():
    state = "checkpoints/latest/state.npz"
    want = {"seeds1": {"result": {"score": 1.0}, "files": {"eval.jsonl": [1], state: {"a": "x"}}}}
    got = {"seeds1": {"result": {"score": 1.0}, "files": {"eval.jsonl": [1], state: {"a": "y"}}}}
    assert same_outputs.differences(want, want) == []
    assert same_outputs.differences(want, got) == ["seeds1 files: checkpoints/latest/state.npz"]
    assert same_outputs.differences(want, {}) == ["seeds1 result: score", "seeds1 files: checkpoints/latest/state.npz, "
                                                  "eval.jsonl"]


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "same_outputs.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_check_without_a_recording_and_unknown_algorithm_are_refused(tmp_path):
    p = cli("check", "--dir", str(tmp_path), "--algos", "iql")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"same_outputs.py: error: --dir {tmp_path}: no recorded outputs for iql; run `record` before the change")
    p = cli("record", "--dir", str(tmp_path), "--algos", "iql,sac")
    assert p.returncode == 2 and "--algos: unknown ['sac']" in p.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "minari").exists()  # nothing built before the refusal
