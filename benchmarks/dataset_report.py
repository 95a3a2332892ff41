"""Measure the local dataset suite and write `benchmarks/results/datasets.{json,md}` + the table in docs/datasets.md.

    python benchmarks/dataset_report.py --env hopper            # build all levels from scratch, measure
    python benchmarks/dataset_report.py --env all --store /tmp/minari_report

For each environment: the shipped policies' returns (from `behavior_policies/<env>/policies.json`,
measured by `make_datasets.py --select` over 100 episodes) and, per level, the build time on this
machine (fresh store, 2 rollout workers), the disk size, the number of transitions and episodes, and the
dataset's normalised score (mean return of its complete episodes: terminated or 1000 steps long).
Results of earlier runs for other environments are kept, so environments can be measured one at a time.
"""
import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "algorithms"))
import data  # noqa: E402
import make_datasets  # noqa: E402
from readme_tables import DOCS, replace_section  # noqa: E402

RESULTS = HERE / "results" / "datasets.json"
DOC = DOCS / "datasets.md"  # the page with the generated `datasets` and `behavior` sections


def complete_episode_returns(ds):
    ends = np.where(ds.episode_ends)[0]
    starts = np.r_[0, ends[:-1] + 1]
    return np.array([ds.rewards[a:b + 1].sum() for a, b in zip(starts, ends)
                     if ds.terminals[b] or b - a + 1 == 1000])


def dir_size_mb(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2 ** 20


def measure_env(env, workers):
    info = make_datasets.policy_info(env)
    out = {"policies": {k: info[k]["returns"] for k in ("random", "medium", "expert")},
           "policies_deterministic": {k: info[k]["returns_deterministic"] for k in ("medium", "expert")},
           "medium_step": info["medium"]["step"], "expert_step": info["expert"]["step"],
           "ref_min_score": info["ref_min_score"], "ref_max_score": info["ref_max_score"], "levels": {}}
    for level in ("random", "medium", "medium-replay", "expert", "medium-expert"):  # combined after its parts
        dataset_id = data.local_id(env, level)
        if data.dataset_dir(dataset_id).exists():
            shutil.rmtree(data.dataset_dir(dataset_id))
        t0 = time.time()
        make_datasets.build(env, level, workers=workers)  # medium-expert: its parts exist, so this combines
        build_s = time.time() - t0
        hdf5_mb = dir_size_mb(data.dataset_dir(dataset_id) / "data")
        t0 = time.time()
        ds = data.load_dataset(dataset_id)
        flatten_s = time.time() - t0
        returns = complete_episode_returns(ds)
        out["levels"][level] = {
            "transitions": len(ds), "episodes": int(ds.episode_ends.sum()), "build_s": round(build_s, 1),
            "disk_mb": round(hdf5_mb, 1), "first_load_s": round(flatten_s, 1),
            "score_mean": float(data.normalized_score(dataset_id, returns.mean())),
            "score_std": float(np.std(data.normalized_score(dataset_id, returns))),
            "complete_episodes": len(returns), "parts_prebuilt": level == "medium-expert"}
        print(env, level, out["levels"][level], flush=True)
    return out


def markdown(results):
    lines = ["| env | policy | return, stochastic as in the data (mean ± std, 100 ep.) | return, deterministic "
             "(100 ep.) | SAC step |", "|---|---|---|---|---|"]
    for env, r in results["envs"].items():
        for name in ("random", "medium", "expert"):
            p, d = r["policies"][name], r["policies_deterministic"].get(name)
            step = {"medium": r["medium_step"], "expert": r["expert_step"]}.get(name, "–")
            det = f"{d['mean']:.1f} ± {d['std']:.1f}" if d else "–"
            lines.append(f"| {env} | {name} | {p['mean']:.1f} ± {p['std']:.1f} | {det} | {step} |")
    lines += ["", "| dataset | transitions | episodes | normalised score of its episodes | build time (s) "
              "| disk (MB) | first load (s) |", "|---|---|---|---|---|---|---|"]
    for env, r in results["envs"].items():
        for level, d in r["levels"].items():
            build = f"{d['build_s']:.0f}"
            if level == "medium-expert":
                build += " (combining its parts)" if d.get("parts_prebuilt") else " (incl. building expert)"
            lines.append(f"| `{data.local_id(env, level)}` | {d['transitions']:,} | {d['episodes']:,} | "
                         f"{d['score_mean']:.1f} ± {d['score_std']:.1f} | {build} | {d['disk_mb']:.0f} | "
                         f"{d['first_load_s']:.1f} |")
    lines.append("")
    lines.append(f"Measured by `python benchmarks/dataset_report.py --env <env>` on {results['machine']} "
                 "(build times with 2 rollout workers while other jobs shared the CPU; indicative).")
    return "\n".join(lines)


def training_curves(envs, png):
    """Plot each environment's SAC training curve (deterministic and stochastic evaluation returns)."""
    import csv
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows_md = ["| run | env steps trained | last eval return (det. / stoch., 5 ep.) | best stoch. return (step) |",
               "|---|---|---|---|"]
    fig, axes = plt.subplots(1, len(envs), figsize=(4.5 * len(envs), 3.2), squeeze=False)
    for ax, (env, path) in zip(axes[0], envs.items()):
        with open(path) as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        step = np.array([r["step"] for r in rows])
        det, sto = np.array([r["return_det"] for r in rows]), np.array([r["return_stoch"] for r in rows])
        ax.plot(step / 1e3, det, label="deterministic")
        ax.plot(step / 1e3, sto, label="stochastic")
        ax.set(title=env, xlabel="env steps (k)", ylabel="return")
        ax.legend(fontsize=8)
        best = int(np.argmax(sto))
        rows_md.append(f"| {env} | {int(step[-1]):,} | {det[-1]:.0f} / {sto[-1]:.0f} | {sto[best]:.0f} "
                       f"({int(step[best]):,}) |")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return "\n".join(rows_md)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="hopper", help=f"one of {list(data.LOCAL_ENVS)} or 'all'")
    p.add_argument("--store", default=None, help="Minari store to build into (default: a new temp dir)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--curves", nargs="*", default=None, metavar="RUN=PROGRESS_CSV",
                   help="only plot training curves (default: the committed behavior_policies/*/progress.csv)")
    args = p.parse_args()
    if args.curves is not None:
        found = dict(c.split("=", 1) for c in args.curves) or {
            e: str(make_datasets.POLICY_ROOT / e / "progress.csv") for e in data.LOCAL_ENVS
            if (make_datasets.POLICY_ROOT / e / "progress.csv").exists()}
        png = HERE / "results" / "behavior_curves.png"
        png.parent.mkdir(exist_ok=True)
        md = training_curves(found, png) + "\n\n![SAC training curves](../benchmarks/results/behavior_curves.png)"
        replace_section("behavior", md, DOC)
        print(md)
        return
    envs = list(data.LOCAL_ENVS) if args.env == "all" else [args.env]
    if args.store is None:
        import tempfile
        args.store = tempfile.mkdtemp(prefix="o2o_report_")
    os.environ["MINARI_DATASETS_PATH"] = args.store
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"envs": {}}
    results["machine"] = f"{os.cpu_count()} CPU cores"
    for env in envs:
        results["envs"][env] = measure_env(env, args.workers)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (RESULTS.with_suffix(".md")).write_text(md + "\n")
    replace_section("datasets", md, DOC)
    print(md)


if __name__ == "__main__":
    main()
