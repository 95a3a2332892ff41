"""Does a change keep every algorithm's outputs bit for bit? Record tiny runs before the change, check after it.

    python benchmarks/same_outputs.py record --dir /tmp/before            # all seven, ~5 min here
    ... change the code ...
    python benchmarks/same_outputs.py check --dir /tmp/before             # names what differs, exit 1 if any
    python benchmarks/same_outputs.py record --dir /tmp/before --algos iql,pex

Each algorithm runs twice with the test suite's tiny budgets (`TINY` of tests/test_<algo>.py) on a tiny local
hopper dataset: one seed, and `--num_seeds 2`; pex fine-tunes a tiny iql.py pre-training, as its tests do.
Compared: every evaluation record (without wall times), train()'s result, a hash of every array of every
checkpoint file (states, online buffer rows) and each checkpoint's meta.json (without times and the wandb id).
On CPU a refactor that keeps the computation keeps all of these; speed: benchmarks/compare_commits.py. The tiny
datasets are built in a Minari store of this tool's own (`--dir`/minari), never the user's.
"""
import argparse
import hashlib
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ALGOS = ("iql", "cal_ql", "aca", "pex", "o2sac", "o2td3", "o2ppo")


def _drop_volatile(obj):
    return {k: v for k, v in obj.items() if "time" not in k and k != "wandb_id"}


def digest(run_dir: Path) -> dict:
    """The run directory's outputs: array hashes of every .npz, eval records, meta.json."""
    out = {}
    for f in sorted(run_dir.rglob("*")):
        rel = str(f.relative_to(run_dir))
        if f.suffix == ".npz":
            with np.load(f) as z:
                out[rel] = {k: hashlib.sha1(np.ascontiguousarray(z[k]).tobytes()).hexdigest() for k in sorted(z.files)}
        elif f.name in ("eval.jsonl", "meta.json"):
            out[rel] = [json.loads(line) for line in f.read_text().splitlines()]
    return out


def run(algo: str, dataset_id: str) -> dict:
    tests = importlib.import_module(f"test_{algo}")
    module = importlib.import_module(algo)
    res = {}
    for n in (1, 2):
        with tempfile.TemporaryDirectory() as d:
            extra = {"num_seeds": n} if n > 1 else {}
            if algo == "pex":
                import iql
                src = Path(d) / "iql"
                iql.train(iql.TrainConfig(dataset_id=dataset_id, run_dir=str(src), **{**tests.IQL_TINY, **extra}))
                extra["offline_checkpoint"] = str(src / "checkpoints" / "offline")
            result = module.train(tests.tiny_config(dataset_id, Path(d) / "run", **extra))
            one = {"result": result, "files": digest(Path(d) / "run")}
            text = json.dumps(one, default=str).replace(str(Path(d).resolve()), "<TMP>").replace(d, "<TMP>")
            res[f"seeds{n}"] = json.loads(text, object_hook=_drop_volatile)
    return res


def differences(want: dict, got: dict) -> list:
    """'seeds<N> <part>: <keys>' for every part that differs."""
    out = []
    for seeds in sorted(want.keys() | got.keys()):
        for part in ("result", "files"):
            w, g = want.get(seeds, {}).get(part, {}), got.get(seeds, {}).get(part, {})
            keys = sorted(k for k in w.keys() | g.keys() if w.get(k) != g.get(k))
            if keys:
                out.append(f"{seeds} {part}: {', '.join(keys[:6])}" + (" ..." if len(keys) > 6 else ""))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("record", "check"))
    p.add_argument("--dir", required=True, help="where the recorded outputs are (record: written, check: read)")
    p.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset of " + ",".join(ALGOS))
    args = p.parse_args(argv)
    algos = [a for a in args.algos.split(",") if a]
    unknown = sorted(set(algos) - set(ALGOS))
    if unknown:
        p.error(f"--algos: unknown {unknown}; choose from {','.join(ALGOS)}")
    out = Path(args.dir)
    if args.mode == "check":
        missing = [a for a in algos if not (out / f"{a}.json").is_file()]
        if missing:
            p.error(f"--dir {out}: no recorded outputs for {', '.join(missing)}; run `record` before the change")
    (out / "minari").mkdir(parents=True, exist_ok=True)
    os.environ.update(MINARI_DATASETS_PATH=str(out / "minari"), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    sys.path[:0] = [str(ROOT / "algorithms"), str(ROOT / "benchmarks"), str(ROOT / "tests")]
    import make_datasets
    from conftest import TINY_SIZE
    dataset_id = make_datasets.build("hopper", "medium", size=TINY_SIZE, workers=1)
    failed = []
    for algo in algos:
        got = json.loads(json.dumps(run(algo, dataset_id), sort_keys=True))
        path = out / f"{algo}.json"
        if args.mode == "record":
            path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
            print(f"{algo}: recorded in {path}", flush=True)
            continue
        diff = differences(json.loads(path.read_text()), got)
        print(f"{algo}: " + ("identical" if not diff else "DIFFERS in " + "; ".join(diff)), flush=True)
        failed += [algo] if diff else []
    if failed:
        print(f"outputs differ: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
