"""Test set-up: no network, no wandb, a temporary Minari store, tiny datasets built from the shipped policies."""
import json
import os
import sys
from pathlib import Path

import pytest

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
