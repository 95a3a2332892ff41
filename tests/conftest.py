"""Test set-up: no network, no wandb, a temporary Minari store, tiny datasets built from the shipped policies."""
import json
import os
import sys
from pathlib import Path

import pytest

from hang_watchdog import pytest_runtest_logreport, pytest_runtest_protocol  # noqa: F401  (a hung test ends the session)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "algorithms"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

TINY_SIZE = 3000  # transitions per tiny local dataset


@pytest.fixture(scope="session", autouse=True)
def minari_store(tmp_path_factory):
    """Every test session gets its own empty Minari store (CI also sets a temporary one)."""
    path = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


@pytest.fixture(scope="session")
def tiny_dataset(minari_store):
    """Factory: build (once per session) a tiny local dataset and return its id, e.g. tiny_dataset('hopper', 'medium')."""
    import make_datasets

    def make(env="hopper", level="medium", size=TINY_SIZE):
        return make_datasets.build(env, level, size=size, workers=1)
    return make


def read_evals(run_dir, timing=False):
    """The records of a run's eval.jsonl (one JSON object per evaluation), without the wall-clock field
    `wall_time` unless timing=True (so records of two runs can be compared for equality)."""
    records = [json.loads(line) for line in (Path(run_dir) / "eval.jsonl").read_text().splitlines()]
    return records if timing else [{k: v for k, v in r.items() if k != "wall_time"} for r in records]


def kill_after_checkpoints(module, config, kill_after, monkeypatch):
    """Run `module.train(config)` and simulate a kill right after its `kill_after`-th checkpoint."""
    save, calls = module.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        calls.append(1)
        if len(calls) == kill_after:
            raise KeyboardInterrupt("simulated kill")
    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        module.train(config)
    monkeypatch.setattr(module, "save_checkpoint", save)


def seed_dirs(run_dir, seeds=None):
    """Where a run's eval.jsonl files are: the run dir (one seed) or its seed<S>/ sub-directories (--num_seeds N)."""
    return [Path(run_dir)] if seeds is None else [Path(run_dir) / f"seed{s}" for s in seeds]


def buffer_rows(run_dir, seed=0):
    """How many online transitions a run's checkpoint holds for one seed (its checkpoints/buffer/seed<S>/rows_*.npz)."""
    import numpy as np
    files = (Path(run_dir) / "checkpoints" / "buffer" / f"seed{seed}").glob("rows_*.npz")
    return sum(np.load(f)["rew"].shape[0] for f in files)


def assert_resume_matches(module, make_config, kill_after, monkeypatch, expected_dir, seeds=None, after_kill=None):
    """Kill `module.train(make_config())` right after its `kill_after`-th checkpoint, check that it stopped early,
    resume it with `make_config(resume=True)` and check that it ends with exactly the evaluation records of the
    uninterrupted run in `expected_dir` (per seed<S>/ sub-directory for `seeds`). `after_kill(run_dir)` may
    inspect the killed run's checkpoint first."""
    config = make_config()
    kill_after_checkpoints(module, config, kill_after, monkeypatch)
    got, expected = seed_dirs(config.run_dir, seeds), seed_dirs(expected_dir, seeds)
    if after_kill is not None:
        after_kill(Path(config.run_dir))
    assert len(read_evals(got[-1])) < len(read_evals(expected[-1]))
    module.train(make_config(resume=True))
    assert [read_evals(d) for d in got] == [read_evals(d) for d in expected]


def assert_nan_loss_stops(module, config, match):
    """A NaN loss stops `module.train(config)` with a FloatingPointError naming the loss and the update (`match`),
    before any checkpoint is written over a good one."""
    with pytest.raises(FloatingPointError, match=match):
        module.train(config)
    assert not (Path(config.run_dir) / "checkpoints" / "latest").exists()


def stop_after_calls(monkeypatch, module, name, calls):
    """Send this process SIGINT (as Ctrl-C does) when `module.name` is called for the `calls`-th time."""
    import signal
    fn, count = getattr(module, name), []

    def wrapped(*args, **kwargs):
        count.append(1)
        if len(count) == calls:
            os.kill(os.getpid(), signal.SIGINT)
        return fn(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapped)


def assert_ctrl_c_resumes(module, make_config, function, calls, monkeypatch, expected_dir, seeds=None):
    """Send SIGINT (as Ctrl-C does) while `module.function` runs for the `calls`-th time: train() must stop with a
    checkpoint (Interrupted, restoring the SIGINT handler), and `--resume` must then end with exactly the evaluation
    records of the uninterrupted run in `expected_dir`."""
    import signal
    fn = getattr(module, function)
    stop_after_calls(monkeypatch, module, function, calls)
    config = make_config()
    with pytest.raises(module.Interrupted, match="checkpoint written .* --resume"):
        module.train(config)
    monkeypatch.setattr(module, function, fn)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    got, expected = seed_dirs(config.run_dir, seeds), seed_dirs(expected_dir, seeds)
    assert len(read_evals(got[-1])) < len(read_evals(expected[-1]))
    module.train(make_config(resume=True))
    assert [read_evals(d) for d in got] == [read_evals(d) for d in expected]
