"""Report of a benchmark sweep from its CSV: Markdown table and learning curves, written as the `results` section of
docs/benchmarks.md, and a short table (pre-training -> online last) as the README's `results_headline` section.

    python benchmarks/report.py reduced              # results/sweep_reduced.csv -> .md, _curves.png, docs/, README
    python benchmarks/report.py reduced --no_readme  # only the files in benchmarks/results/
    python benchmarks/report.py smoke --include_unfinished --no_readme

The CSV comes from `python benchmarks/sweep.py <protocol>` (or `--collect`). Per algorithm x dataset, over the
seeds whose runs finished (mean ± sample std, ddof 1), in normalised score:
  pre-training  the last evaluation of the offline phase (`phase: offline`: the pre-trained or loaded policy);
  before online the last evaluation before the online phase (after any transition phase, e.g. OCR-CFT's
                re-evaluation and alignment; equal to pre-training for the others);
  online last   the last online evaluation;
  online best   each seed's best online evaluation (optimistic: chosen on the evaluations themselves);
  online min    each seed's lowest online evaluation (a collapse at any time of the online phase);
  early dip     each seed's lowest online evaluation in the first 10% of its online steps, i.e. up to and
                including its first evaluation at or after 10% of its last online step (evaluations fall at
                episode ends, so a fixed cut could hold none);
  online steps  the last online evaluation's env step; wall time: the run's wall time at its last evaluation.
Curves: score vs online env steps, starting at the offline-end score at step 0; each seed is interpolated
linearly onto the union of the seeds' evaluation steps (up to the shortest seed's last one); mean ± std band.
Every number is computed from the CSV: never edit the generated table by hand.
"""
import argparse
import csv
import math
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from readme_tables import DOCS, README, update_readme  # noqa: E402
from sweep import RESULTS, ROOT, SweepError, csv_path, load_protocol  # noqa: E402

SECTION, HEADLINE = "results", "results_headline"  # in docs/benchmarks.md, in README.md
DIP_FRACTION = 0.1
NOT_BUDGET = {"wandb_mode"}  # overrides not worth stating in the README text


# ---------------------------------------------------------------------------------------------- numbers
def _num(v) -> float:
    return float(v) if v not in (None, "") else math.nan


def read_rows(path: Path) -> list:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["seed"], r["finished"] = int(r["seed"]), int(r["finished"])
        for k in ("online_step", "normalized_score", "wall_time"):
            r[k] = _num(r.get(k))
    return rows


def seed_summary(rows: list) -> dict:
    """One seed's numbers from its CSV rows (in eval.jsonl order)."""
    offline = [r["normalized_score"] for r in rows if r["phase"] != "online"]
    pretrain = [r["normalized_score"] for r in rows if r["phase"] == "offline"]
    online = sorted(((r["online_step"], r["normalized_score"]) for r in rows if r["phase"] == "online"),
                    key=lambda t: t[0])
    out = {"offline": offline[-1] if offline else math.nan, "pretrain": pretrain[-1] if pretrain else math.nan,
           "last": math.nan, "min": math.nan, "best": math.nan,
           "dip": math.nan, "steps": math.nan,
           "wall": max((r["wall_time"] for r in rows if not math.isnan(r["wall_time"])), default=math.nan)}
    if online:
        steps, scores = np.array([s for s, _ in online]), np.array([v for _, v in online])
        first_after = int(np.argmax(steps >= DIP_FRACTION * steps[-1]))  # exists: the last step qualifies
        out.update(last=scores[-1], best=np.nanmax(scores), min=np.nanmin(scores),
                   dip=np.nanmin(scores[:first_after + 1]), steps=steps[-1])
        x0 = [] if math.isnan(out["offline"]) else [0.0]
        out["curve"] = (np.array(x0 + list(steps), float), np.array(([out["offline"]] if x0 else []) + list(scores)))
    return out


def summarize(rows: list, include_unfinished: bool = False) -> dict:
    """{(algorithm, dataset): {seed: seed_summary}} over finished runs (or all)."""
    groups = {}
    for r in rows:
        if r["finished"] or include_unfinished:
            groups.setdefault((r["algorithm"], r["dataset"]), {}).setdefault(r["seed"], []).append(r)
    return {key: {s: seed_summary(rs) for s, rs in sorted(seeds.items())} for key, seeds in groups.items()}


def mean_std(values) -> tuple:
    v = np.array([x for x in values if not math.isnan(x)], float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def mean_curve(curves: list):
    """Seeds' (x, y) curves interpolated onto the union of their x up to the shortest one's end: x, mean, std."""
    end = min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([x[x <= end] for x, _ in curves]))
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(0), ys.std(0, ddof=1) if len(curves) > 1 else np.zeros_like(grid)


# ---------------------------------------------------------------------------------------------- output
def fmt(m, s, digits=1) -> str:
    if math.isnan(m):
        return "–"
    return f"{m:.{digits}f}" + ("" if math.isnan(s) else f" ± {s:.{digits}f}")


def _short(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1000 and v % 1000 == 0:
        return f"{v // 1000}k"
    return str(v).replace(" ", "")


def ordered(keys, preferred):
    return [k for k in preferred if k in keys] + sorted(k for k in keys if k not in preferred)


def table(summary: dict, algos: list, datasets: list) -> str:
    lines = ["| algorithm | dataset | seeds | pre-training | before online | online last | online best "
             "| early dip (first 10%) | online min | online steps | wall time (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in datasets:
        for a in algos:
            seeds = summary.get((a, d))
            if not seeds:
                continue
            col = {k: mean_std([s[k] for s in seeds.values()]) for k in ("pretrain", "offline", "last", "best",
                                                                        "dip", "min", "steps", "wall")}
            steps = "–" if math.isnan(col["steps"][0]) else f"{col['steps'][0]:,.0f}"
            wall = col["wall"]
            lines.append(f"| {a} | `{d}` | {len(seeds)} | {fmt(*col['pretrain'][:2])} | {fmt(*col['offline'][:2])} | "
                         f"{fmt(*col['last'][:2])} | "
                         f"{fmt(*col['best'][:2])} | {fmt(*col['dip'][:2])} | {fmt(*col['min'][:2])} | {steps} | "
                         f"{fmt(wall[0] / 60, wall[1] / 60, 0)} |")
    return "\n".join(lines)


def plot(summary: dict, algos: list, datasets: list, png: Path, scripts: dict = None):
    """One panel per dataset, a line per entry; a variant (`script: <algo>`) is dashed in its algorithm's colour."""
    scripts = scripts or {}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [d for d in datasets if any((a, d) in summary for a in algos)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6.0 * max(1, len(panels)), 3.6), squeeze=False)
    bases = list(dict.fromkeys(scripts.get(a, a) for a in algos))
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(bases)}
    for ax, d in zip(axes[0], panels):
        for a in algos:
            curves = [s["curve"] for s in summary.get((a, d), {}).values() if "curve" in s]
            if not curves:
                continue
            x, m, sd = mean_curve(curves)
            base = scripts.get(a, a)
            ax.plot(x / 1e3, m, color=colors[base], linestyle="-" if base == a else "--", label=f"{a} ({len(curves)})")
            ax.fill_between(x / 1e3, m - sd, m + sd, color=colors[base], alpha=0.12, linewidth=0)
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)  # budgets differ (PPO: 5x more steps): log beyond 1k
        ticks = [t for t in (0, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= ax.get_xlim()[1]]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set(title=d, xlabel="online env steps (k, log scale above 1k)", ylabel="normalised score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, title="entry (seeds)", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown(protocol: dict, summary: dict, rows: list, algos: list, datasets: list, csv_file: Path,
             png: Path, include_unfinished: bool, page_dir: Path = ROOT) -> str:
    """The full report; `page_dir`: the directory of the page it goes in (the curves' image link is relative to it)."""
    rel = lambda p: str(p.resolve().relative_to(ROOT)) if p.resolve().is_relative_to(ROOT) else str(p)  # noqa
    planned = sum(len(o.get("seeds") or protocol["seeds"]) * len(o.get("datasets") or protocol["datasets"])
                  for o in (o or {} for o in protocol["algorithms"].values()))
    runs = {(r["algorithm"], r["dataset"], r["seed"]) for r in rows}
    finished = {(r["algorithm"], r["dataset"], r["seed"]) for r in rows if r["finished"]}
    missing = [a for a in protocol["algorithms"] if not any(k[0] == a for k in summary)]
    algo_overrides = {a: o or {} for a, o in protocol["algorithms"].items()}
    listed = lambda o: ", ".join(f"{k} {_short(v)}" for k, v in o.items() if k not in NOT_BUDGET)  # noqa
    budgets = "\n".join(f"- `{a}`: {listed(o) or 'config defaults'}" for a, o in algo_overrides.items())
    common = listed(protocol.get("common", {}))
    if common:
        budgets = f"- every entry: {common}\n" + budgets
    sources = {r["wall_time_source"] for r in rows if r.get("wall_time_source")}
    out = [f"Protocol `{protocol['name']}` (`{protocol['path']}`): seeds {', '.join(map(str, protocol['seeds']))}; "
           f"datasets {', '.join(f'`{d}`' for d in protocol['datasets'])}; {len(finished)} of {planned} planned "
           f"runs finished" + (f" ({len(runs - finished)} unfinished runs included)" if include_unfinished
                               and runs - finished else "") + ".",
           "", "Budgets (overrides of `configs/<algo>/<dataset>.yaml`; `script`: the variant's algorithm file; "
           "`offline_from`: starts from that entry's offline checkpoint, same dataset and seeds):", "", budgets, "",
           table(summary, algos, datasets), "",
           "D4RL-normalised scores (0 = random, 100 = expert reference of the dataset), deterministic evaluation; "
           "mean ± sample std over seeds. *pre-training*: last evaluation of the offline phase (for an entry with "
           "`offline_from`, the policy loaded from that entry's offline checkpoint); *before online*: last "
           "evaluation before fine-tuning (after OCR-CFT's re-evaluation / alignment); *online last*: the "
           "final evaluation (the headline number); *online best*: each seed's best online evaluation "
           "(optimistic); *early dip*: each seed's lowest evaluation in the first 10% of its online steps (with "
           "few online steps this window can end before updates start, e.g. a 1k-step warm-up of a 10k budget); "
           "*online min*: each seed's lowest online evaluation. "
           "Budgets differ between algorithms (see above), so compare at equal *online steps* on the curves."]
    if sources == {"runner"}:
        out[-1] += " Wall time is measured by the sweep runner (eval records carry no time), on a shared 2-core CPU."
    elif sources:
        out[-1] += " Wall time on a shared 2-core CPU."
    seeds_per_run = {a: {**protocol.get("common", {}), **o}.get("num_seeds") for a, o in algo_overrides.items()}
    shared = [f"`{a}` ({n} seeds)" for a, n in seeds_per_run.items() if isinstance(n, int) and n > 1]
    counts = set(seeds_per_run.values())
    if shared and len(counts) == 1:
        out[-1] += (f" Every entry trains its {counts.pop()} seeds together in one process (num_seeds); the wall "
                    "time is that process's.")
    elif shared:
        out[-1] += (" Seeds trained together in one process (num_seeds) share that process's wall time: "
                    + ", ".join(shared) + ".")
    if missing:
        out.append(f"\nNo results yet: {', '.join(missing)}.")
    out += ["", f"![learning curves]({os.path.relpath(png.resolve(), Path(page_dir).resolve())})", "",
            f"Generated by `python benchmarks/report.py {protocol['name']}` from `{rel(csv_file)}` "
            f"(`python benchmarks/sweep.py {protocol['name']} --collect`); not edited by hand."]
    return "\n".join(out)


def headline(protocol: dict, summary: dict, algos: list, datasets: list, link: str) -> str:
    """The README's short table: pre-training -> online last (mean; ± sample std of the last) per entry and dataset."""
    lines = ["| algorithm | " + " | ".join(f"`{d}`" for d in datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for a in algos:
        cells = []
        for d in datasets:
            seeds = list(summary.get((a, d), {}).values())
            pre, last = (mean_std([s[k] for s in seeds]) for k in ("pretrain", "last"))
            cells.append(f"{fmt(pre[0], math.nan)} → {fmt(*last[:2])}" if seeds else "–")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\nProtocol `{protocol['name']}`: D4RL-normalised score at the end of pre-training → at the final online "
        "evaluation (*online last*, ± its sample std), mean over the seeds whose runs finished. Budgets differ "
        f"between entries; budgets, all columns and learning curves: [{link}]({link}). Generated by "
        f"`python benchmarks/report.py {protocol['name']}`; not edited by hand.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("protocol", help="protocol name in benchmarks/protocols/ (e.g. reduced) or a YAML path")
    p.add_argument("--csv", default=None, help="results CSV (default: <results_dir>/sweep_<protocol>.csv)")
    p.add_argument("--results_dir", default=str(RESULTS), help="where the CSV is and the .md / .png go")
    p.add_argument("--doc", default=str(DOCS / "benchmarks.md"), help="page whose `results` section is replaced")
    p.add_argument("--readme", default=str(README), help="README whose `results_headline` section is replaced")
    p.add_argument("--no_readme", action="store_true", help="do not touch the README or the --doc page")
    p.add_argument("--include_unfinished", action="store_true", help="also use runs without done.json")
    args = p.parse_args(argv)
    try:
        protocol = load_protocol(args.protocol)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results_dir = Path(args.results_dir)
    csv_file = Path(args.csv) if args.csv else csv_path(protocol, results_dir)
    if not csv_file.exists():
        print(f"error: {csv_file} does not exist; run `python benchmarks/sweep.py {protocol['name']}` "
              "(or with --collect)", file=sys.stderr)
        return 2
    rows = read_rows(csv_file)
    summary = summarize(rows, args.include_unfinished)
    if not summary:
        print(f"error: {csv_file} has no {'' if args.include_unfinished else 'finished '}runs "
              "(--include_unfinished uses runs still going)", file=sys.stderr)
        return 2
    algos = ordered({a for a, _ in summary}, list(protocol["algorithms"]))
    datasets = ordered({d for _, d in summary}, list(protocol["datasets"]))
    png = results_dir / f"sweep_{protocol['name']}_curves.png"
    plot(summary, algos, datasets, png, {a: str((o or {}).get("script", a)) for a, o in protocol["algorithms"].items()})
    md_file = results_dir / f"sweep_{protocol['name']}.md"
    md_file.write_text(markdown(protocol, summary, rows, algos, datasets, csv_file, png, args.include_unfinished,
                                results_dir) + "\n")
    print(md_file.read_text())
    print(f"wrote {md_file} and {png}")
    if args.no_readme:
        return 0
    doc, readme = Path(args.doc), Path(args.readme)
    md = markdown(protocol, summary, rows, algos, datasets, csv_file, png, args.include_unfinished, doc.parent)
    short = headline(protocol, summary, algos, datasets, os.path.relpath(doc.resolve(), readme.resolve().parent))
    return max(update_readme(SECTION, md, doc), update_readme(HEADLINE, short, readme))


if __name__ == "__main__":
    sys.exit(main())
