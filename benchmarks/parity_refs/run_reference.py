"""One training run of a reference implementation, on our dataset, with our config's hyper-parameters: the
reference side of `benchmarks/parity.py learn` (the sweep runner starts it like one of our scripts).

    python benchmarks/parity_refs/run_reference.py REFERENCE ALGO --config_path C --seed S --run_dir R \
        [--key value ...] [--resume]

The config file and overrides are parsed by algorithms/ALGO.py's own `parse_config` (one source of truth for the
hyper-parameters of both sides); the adapter (`learn_<ALGO>` in parity_refs/<REFERENCE>.py) maps them onto the
reference's config, refusing a field the reference cannot represent, and runs the reference's own training function
on our dataset and env (common.learning_stand_ins). Each evaluation becomes one line of <run_dir>/eval.jsonl in our
scripts' layout (phase, updates, env_steps, normalized_score, return, wall_time). The references keep no resumable
state: --resume (the sweep passes it to a run killed midway) restarts the run from scratch.
Reference checkouts: $O2O_PARITY_REFERENCE_DIR (set by parity.py learn --reference_dir), else the cache directory.
"""
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# benchmarks/ instead of this script's directory: parity_refs/ holds adapters named like reference packages (pex)
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from parity_refs import common  # noqa: E402

REFERENCES = ("corl", "calql_official", "ocr_cft", "pex", "aca")


class EvalLog:
    """Writes our eval.jsonl records for a reference run; wall_time = seconds since the run started."""

    def __init__(self, run_dir: Path, seed: int):
        self.path, self.seed, self.t0, self.count = run_dir / "eval.jsonl", seed, time.time(), 0
        self.path.write_text("")  # a restarted run starts its records again

    def __call__(self, phase: str, updates: int, env_steps: int, normalized_score: float, return_: float, **extra):
        record = {"seed": self.seed, "phase": phase, "updates": int(updates), "env_steps": int(env_steps),
                  "normalized_score": float(normalized_score), "return": float(return_), **extra,
                  "wall_time": round(time.time() - self.t0, 2)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.count += 1
        print(f"eval: {record}", flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in REFERENCES:
        print(f"usage: run_reference.py {{{'|'.join(REFERENCES)}}} ALGO --config_path C --seed S --run_dir R "
              "[--key value ...] [--resume]", file=sys.stderr)
        return 2
    reference, algo, rest = argv[0], argv[1], argv[2:]
    resume = "--resume" in rest
    rest = [a for a in rest if a != "--resume"]
    try:
        cfg = common.ours(algo).parse_config(rest)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    adapter = importlib.import_module(f"parity_refs.{reference}")
    learn = getattr(adapter, f"learn_{algo}", None)
    if learn is None:
        print(f"error: parity_refs/{reference}.py has no learn_{algo}: no learning run of {algo} against {reference}",
              file=sys.stderr)
        return 2
    run_dir = Path(cfg.run_dir).resolve()  # absolute: adapters may change the working directory
    cfg.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        print("run_reference.py: the reference keeps no resumable state; restarting the run from scratch", flush=True)
    log = EvalLog(run_dir, cfg.seed)
    t0 = time.time()
    try:
        info = learn(cfg, os.environ.get("O2O_PARITY_REFERENCE_DIR") or None, log) or {}
    except (common.ReferenceMissing, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    url, commit = common.REFERENCES[common.REFERENCE_KEY.get(reference, reference)]
    info.update(reference=reference, url=url, commit=commit, algo=algo, seed=cfg.seed, evaluations=log.count,
                train_seconds=round(time.time() - t0, 1), python=platform.python_version(),
                torch=sys.modules["torch"].__version__ if "torch" in sys.modules else None)
    (run_dir / "reference.json").write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
