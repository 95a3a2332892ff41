"""Runs never lose work: damaged checkpoints, refusal to overwrite, the run-directory lock, Ctrl-C, early checks.

The plumbing involved is the same text in all seven scripts (tests/test_plumbing.py), so the scenarios run on IQL's
tiny config; the Ctrl-C test runs every script, because each script's loops decide where a stop lands.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import iql
from conftest import assert_ctrl_c_resumes, kill_after_checkpoints, read_evals
from test_iql import TINY, tiny_config

ROOT = Path(__file__).resolve().parent.parent
config = tiny_config  # IQL's tiny budgets (tests/test_iql.py)


@pytest.fixture(scope="module")
def dataset_id(tiny_dataset):
    return tiny_dataset("hopper", "medium")


@pytest.fixture(scope="module")
def reference(dataset_id, tmp_path_factory):
    """An uninterrupted run: its directory and evaluation records."""
    run_dir = tmp_path_factory.mktemp("runs_reference")
    iql.train(config(dataset_id, run_dir))
    return run_dir, read_evals(run_dir)


def killed_run(dataset_id, run_dir, monkeypatch, checkpoints):
    """A run killed right after its `checkpoints`-th checkpoint write (nothing else runs, as with SIGKILL)."""
    kill_after_checkpoints(iql, config(dataset_id, run_dir), checkpoints, monkeypatch)


@pytest.mark.parametrize("damage", ["between_renames", "latest_state_missing", "latest_state_garbled",
                                    "latest_and_old_damaged"])
def test_damaged_checkpoint_falls_back_to_an_intact_one(dataset_id, reference, tmp_path, monkeypatch, capsys, damage):
    """--resume with a damaged `latest` resumes from `latest.old` or `offline` and still ends with the uninterrupted
    run's records; nothing is deleted on the way."""
    run_dir = tmp_path / "run"
    killed_run(dataset_id, run_dir, monkeypatch, checkpoints=5)  # offline, latest, then online checkpoints
    latest = run_dir / "checkpoints" / "latest"
    if damage == "between_renames":  # killed after `latest` -> `latest.old`, before `latest.tmp` -> `latest`
        os.replace(latest, latest.with_name("latest.old"))
    elif damage == "latest_state_missing":
        (latest / "state.npz").unlink()
    elif damage == "latest_state_garbled":
        raw = bytearray((latest / "state.npz").read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 64] = b"\0" * 64
        (latest / "state.npz").write_bytes(bytes(raw))
    else:
        (latest / "meta.json").write_text("{not json")
        shutil.copytree(latest, latest.with_name("latest.old"))
    iql.train(config(dataset_id, run_dir, resume=True))
    out = capsys.readouterr().out
    if damage != "between_renames":
        assert f"checkpoint {latest} is not usable" in out
    assert read_evals(run_dir) == reference[1]


def test_resume_with_no_intact_checkpoint_deletes_nothing(dataset_id, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    killed_run(dataset_id, run_dir, monkeypatch, checkpoints=3)
    for name in ("latest", "offline"):
        (run_dir / "checkpoints" / name / "state.npz").unlink()
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    with pytest.raises(iql.RunError, match="no intact checkpoint.*--overwrite"):
        iql.train(config(dataset_id, run_dir, resume=True))
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_previous_run_is_never_silently_replaced(dataset_id, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    before = (run_dir / "eval.jsonl").read_text()
    with pytest.raises(iql.RunError, match="holds a previous run; add --resume .* or --overwrite"):
        iql.train(config(dataset_id, run_dir))
    assert (run_dir / "eval.jsonl").read_text() == before
    iql.train(config(dataset_id, run_dir, overwrite=True))
    assert read_evals(run_dir) == reference[1]


def test_checkpoints_are_data_only(reference, tmp_path):
    latest = reference[0] / "checkpoints" / "latest"
    assert (latest / "meta.json").exists() and not list(latest.glob("*.pkl"))
    old = tmp_path / "old"
    shutil.copytree(latest, old)
    (old / "meta.json").rename(old / "meta.pkl")
    with pytest.raises(iql.RunError, match="old pickle format"):
        iql.load_meta(old)


def test_second_process_on_a_run_dir_is_refused_and_a_stale_lock_taken_over(dataset_id, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write('4242'); "
        "f.flush(); print('locked', flush=True); time.sleep(600)"), str(run_dir / ".lock")], stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(iql.RunError, match=r"in use by another process \(pid 4242\)"):
            iql.train(config(dataset_id, run_dir, resume=True))
    finally:
        holder.kill()  # SIGKILL: the lock file stays, its lock goes with the process
        holder.wait()
    assert (run_dir / ".lock").exists()
    result = iql.train(config(dataset_id, run_dir, resume=True))  # finished run: nothing to do, but allowed
    assert result["after_finetuning"] is not None


def test_bad_resume_fails_before_loading_data(dataset_id, reference, tmp_path, monkeypatch):
    """Config mismatch, unwritable run dir: one error, before the dataset is touched."""
    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the checks")
    monkeypatch.setattr(iql.data, "load_dataset", no_data)
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    with pytest.raises(iql.RunError, match="dataset_id: 'o2o/hopper/medium-v0' -> 'o2o/walker2d/medium-v0'"):
        iql.train(config("o2o/walker2d/medium-v0", run_dir, resume=True))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(iql.RunError, match="not writable"):
        iql.train(config(dataset_id, blocker / "run"))


@pytest.mark.parametrize("function,calls", [("scan_updates", 2), ("update_online", 3)])
def test_ctrl_c_checkpoints_and_resumes_exactly(dataset_id, reference, tmp_path, monkeypatch, function, calls):
    """SIGINT stops at the next block boundary (online: the next episode end) with a checkpoint; --resume then
    ends with exactly the uninterrupted run's records."""
    assert_ctrl_c_resumes(iql, lambda **kw: config(dataset_id, tmp_path / "run", **kw), function, calls, monkeypatch,
                          reference[0])


def test_command_line_errors_are_one_line(dataset_id, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    cmd = [sys.executable, str(ROOT / "algorithms" / "iql.py"), "--dataset_id", dataset_id, "--run_dir", str(run_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"error: run_dir {run_dir} holds a previous run; add --resume to "
                                               "continue it or --overwrite to delete it and start again"]


def test_ctrl_c_on_the_command_line(dataset_id, tmp_path):
    """The real thing: SIGINT to a running script ends it with exit code 130 and one line saying how to continue;
    --resume then finishes the run."""
    import signal
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "algorithms" / "iql.py"), "--dataset_id", dataset_id, "--run_dir", str(run_dir)]
    cmd += [f"--{k}={v}" for k, v in {**TINY, "offline_updates": 5000, "hidden_dims": "[32,32]"}.items()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    while not proc.stdout.readline().startswith("[eval] seed 0 offline updates=100"):  # training is under way
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("stopped: checkpoint written after ")
    assert "--resume" in err.strip().splitlines()[-1] and "Traceback" not in err
    out = subprocess.run(cmd + ["--resume", "--offline_updates=200"], capture_output=True, text=True,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    assert out.returncode == 1 and "offline_updates: 5000 -> 200" in out.stderr  # a changed budget is refused
