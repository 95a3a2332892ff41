"""What the Ray backend of sweep.py costs per run on this machine, against the local backend, on the smoke protocol.

    python benchmarks/ray_overhead.py [--rounds 2] [--only algo=iql]

Each round runs the smoke protocol (benchmarks/protocols/smoke.yaml, its dataset built with --build_size transitions
in a temporary Minari store, output in a temporary directory) with the local
backend, then with `--backend ray` (a local Ray cluster started by the sweep), as two fresh `sweep.py` processes.
Per backend: the sweep's wall time, the sum of its runs' own wall times (done.json: the script's process), and their
difference per run (the runner's overhead: for Ray the cluster start-up, scheduling and worker start-up). Writes
benchmarks/results/ray_overhead.json and the `ray_overhead` section of docs/cluster.md.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "ray_overhead.json"
DOC = ROOT / "docs" / "cluster.md"


def one(backend: str, work: Path, only: list) -> dict:
    proto = yaml.safe_load((HERE / "protocols" / "smoke.yaml").read_text())
    proto["output_root"] = str(work / backend)
    path = work / f"smoke_{backend}.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(proto))
    cmd = [sys.executable, str(HERE / "sweep.py"), str(path), "--results_dir", str(work)] + \
        [x for o in only for x in ("--only", o)]
    cmd += ["--backend", "ray", "--cpus_per_run", "2"] if backend == "ray" else []
    t0 = time.time()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    total = time.time() - t0
    if out.returncode != 0:
        raise SystemExit(f"{backend} sweep failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    runs = [json.loads(p.read_text()) for p in (work / backend).rglob("done.json")]
    inside = sum(r["wall_time_s"] for r in runs)
    m = re.search(r"ray: connected in ([0-9.]+) s", out.stdout)
    return {"backend": backend, "runs": len(runs), "sweep_s": round(total, 1), "runs_s": round(inside, 1),
            "overhead_per_run_s": round((total - inside) / len(runs), 2),
            "ray_connect_s": float(m.group(1)) if m else None}


def markdown(res: dict) -> str:
    lines = [f"Measured {res['date']} by `python benchmarks/ray_overhead.py` ({res['rounds']} rounds, local and Ray "
             f"alternating; {res['cpus']} CPUs, load average {res['load_before']} before, {res['load_after']} after; "
             f"protocol smoke{' ' + ' '.join(res['only']) if res['only'] else ''}, {res['measurements'][0]['runs']} "
             f"runs per sweep, its dataset built with {res.get('dataset_size', '?')} transitions). Overhead per run = "
             "(sweep wall time - the runs' own wall times) / runs.", "",
             "| round | backend | sweep wall time (s) | runs' own time (s) | overhead per run (s) | ray.init (s) |",
             "|---|---|---|---|---|---|"]
    for i, m in enumerate(res["measurements"]):
        lines.append(f"| {i // 2 + 1} | {m['backend']} | {m['sweep_s']} | {m['runs_s']} | {m['overhead_per_run_s']} | "
                     f"{m['ray_connect_s'] if m['ray_connect_s'] is not None else '–'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", action="append", default=[], help="as sweep.py --only (default: the whole protocol)")
    p.add_argument("--build_size", type=int, default=20000, help="transitions of the smoke dataset built for it")
    p.add_argument("--no_doc", dest="doc", action="store_false")
    args = p.parse_args(argv)
    measurements = []
    with tempfile.TemporaryDirectory() as tmp:
        # the smoke protocol's dataset, built small in a store of its own (the overhead does not depend on its size)
        os.environ["MINARI_DATASETS_PATH"] = str(Path(tmp) / "minari")
        sys.path.insert(0, str(ROOT / "algorithms"))
        import data
        data.ensure_dataset(yaml.safe_load((HERE / "protocols" / "smoke.yaml").read_text())["datasets"][0],
                            build_size=args.build_size)
        load_before = [round(x, 2) for x in os.getloadavg()]
        for r in range(args.rounds):
            for backend in ("local", "ray"):
                m = one(backend, Path(tmp) / f"round{r}", args.only)
                print(m, flush=True)
                measurements.append(m)
    res = {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "only": args.only, "cpus": os.cpu_count(),
           "dataset_size": args.build_size,
           "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
           "measurements": measurements}
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    if args.doc:
        sys.path.insert(0, str(HERE))
        from readme_tables import update_readme
        return update_readme("ray_overhead", markdown(res), DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
