"""Parity with the reference implementations: one update step (`step`) and whole training runs (`learn`).

    python benchmarks/parity.py step iql|cal_ql|aca|pex|o2sac|o2td3|o2ppo|all [--reference_dir DIR] [--out DIR]
    python benchmarks/parity.py learn iql|...|all [--reference_dir DIR] [--report_only]
    python benchmarks/parity.py aca_returns [--runs_root DIR]   # ACA's training returns and final policies

`learn` trains ours and the reference on the same datasets with the same hyper-parameters, budgets and evaluation
schedule (protocol benchmarks/protocols/parity_learn.yaml, run by the sweep runner: resumable, finished runs kept;
the reference side through parity_refs/run_reference.py), then writes benchmarks/results/parity/learn.{csv,json,md,
png}: every evaluation, the overlay of both implementations' curves (mean +- std over seeds), and per algorithm and
dataset both final scores, the difference with a 95% bootstrap interval, the verdict fixed in advance (`match` when
the interval contains 0 or lies within +-5 normalised points) and the wall time and updates/s of both sides.
Each finished run's record files (eval.jsonl, done.json, eval_times.json, config.yaml; not its checkpoints) are
kept under <out>/records/ and committed with the report: a later report, on a machine without the run directories,
reads them from there, and refuses to drop a finished run that the committed learn.csv holds.

`step`:
An adapter per reference (benchmarks/parity_refs/) builds the reference's networks and ours with the same weights,
feeds both the same batch and the same noise, runs one update on each side and compares the losses, the gradients
(Adam's first moments) and the updated parameters; each row is the largest difference relative to the reference's
largest magnitude. Tolerance: 1e-5 relative (parity_refs/common.TOLERANCE), float32 round-off of one update: torch
and XLA sum in different orders (1e-7..1e-6 here), while a wrong formula, order or hyper-parameter moves a quantity
by far more. Rows labelled "default differs by design" run our default where a documented deviation changes the
update: reported, not failures. Writes <out>/step.json (rows, reference commits, versions) and <out>/step.md.
--reference_dir DIR: checkouts named corl/, calql/, ocr_cft/, pex/, aca/ (or one checkout); default: the cache
directory of parity_refs/common.py, cloned when the network answers. A missing reference is reported as not run.
Results of earlier runs for other algorithms are kept in step.json / step.md (one section per algorithm).
"""
import argparse
import csv
import importlib
import importlib.util
import io
import os
import shutil
import signal
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from parity_refs import common  # noqa: E402
import sweep  # noqa: E402

# algorithm -> (adapter module in parity_refs, function); several adapters = several references
ADAPTERS = {
    "iql": [("corl", "step_iql")],
    "cal_ql": [("calql_official", "step_cal_ql"), ("corl", "step_cal_ql")],
    "aca": [("aca", "step_aca")],
    "pex": [("pex", "step_pex")],
    "o2sac": [("ocr_cft", "step_o2sac")],
    "o2td3": [("ocr_cft", "step_o2td3")],
    "o2ppo": [("ocr_cft", "step_o2ppo")],
}
DEFAULT_OUT = HERE / "results" / "parity"
REFERENCE_OF = common.REFERENCE_KEY  # adapter module -> its key in common.REFERENCES (else the same name)
BY_DESIGN = "default differs by design"


# ---- verdicts (pure functions of the rows, tested in tests/test_parity.py) ----
def verdict(row: dict) -> str:
    """'pass' within tolerance; 'differs by design' for a failing row labelled as our default's documented
    deviation; else 'FAIL'."""
    if row["passed"]:
        return "pass"
    return "differs by design" if row.get("note", "").lower().startswith(BY_DESIGN) else "FAIL"


def summary(algo: str, entry: dict) -> str:
    """One line per algorithm: PASS / FAIL / not run, with row counts."""
    runs = entry.get("runs", [])
    missing = [r for r in runs if r["status"] != "ran"]
    rows = entry.get("rows", [])
    verdicts = [verdict(r) for r in rows]
    fails, design = verdicts.count("FAIL"), verdicts.count("differs by design")
    worst = max((r["max_rel_diff"] for r, v in zip(rows, verdicts) if v != "differs by design"), default=None)
    counts = f"{len(rows)} rows, {len(rows) - fails - design} within tolerance" + (
        f", {design} rows of our default setting differ by design" if design else "") + (
        f", largest relative difference {worst:.1e}" if worst is not None else "")
    if not rows and missing:
        return f"{algo}: not run ({'; '.join(r['status'] + ': ' + r['message'] for r in missing)})"
    status = "FAIL" if fails or any(r["status"] == "error" for r in runs) else "PASS"
    text = f"{algo}: {status} ({counts}" + (f"; {fails} FAIL" if fails else "") + ")"
    if missing:
        text += " - also " + "; ".join(f"{r['reference']} {r['status']}: {r['message']}" for r in missing)
    return text


def markdown(results: dict) -> str:
    """step.md: a summary line per algorithm, then a table per algorithm."""
    lines = ["# Step parity: one update of ours vs the reference", "",
             "Generated by `python benchmarks/parity.py step ...` (do not edit). Relative difference = largest "
             "|ours - reference| / largest |reference| of the quantity (a parameter tree: its worst leaf). "
             f"Tolerance {common.TOLERANCE:g}: float32 round-off of one update. \"differs by design\": our default "
             "where a documented deviation changes the update (the same setting with the switch set to the reference "
             "behaviour is listed just before it).", "", "## Summary", ""]
    algos = [a for a in ADAPTERS if a in results["algorithms"]]
    lines += [f"- {summary(a, results['algorithms'][a])}" for a in algos] + [""]
    for algo in algos:
        entry = results["algorithms"][algo]
        lines += [f"## {algo}", "", f"Run {entry['date']}; " + ", ".join(
            f"{k} {v}" for k, v in entry["versions"].items()) + ".", ""]
        for run in entry["runs"]:
            if run["status"] != "ran":
                lines += [f"- {run['reference']}: {run['status']}: {run['message']}", ""]
        if not entry["rows"]:
            continue
        lines += ["| reference | phase | setting | quantity | max rel diff | tol | verdict | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in entry["rows"]:
            note = r.get("note", "").replace("|", "/")
            lines.append(f"| {r['reference']} | {r['phase']} | {r['setting']} | {r['quantity']} | "
                         f"{r['max_rel_diff']:.2e} | {r['tol']:g} | {verdict(r)} | {note} |")
        lines.append("")
    return "\n".join(lines)


def readme_table(results: dict) -> str:
    """The README's parity section: per algorithm, its references (pinned commits), the verdict and the worst row."""
    lines = ["Step parity: one update of each file against its reference, same weights, batch and noise (`python "
             "benchmarks/parity.py step all --reference_dir DIR`; every row in "
             "[benchmarks/results/parity/step.md](benchmarks/results/parity/step.md)). Tolerance "
             f"{results.get('tolerance', common.TOLERANCE):g} relative (float32 round-off of one update) unless a "
             "row's note gives a reason.", "",
             "| algorithm | reference (commit) | rows within tolerance | our default differs by design | largest "
             "relative difference | verdict |", "|---|---|---|---|---|---|"]
    names = {"corl": "CORL", "calql": "Cal-QL (official)", "ocr_cft": "OCR-CFT", "pex": "PEX (official)",
             "aca": "ACA (official)"}
    refs = results.get("references", {})
    for algo in ADAPTERS:
        entry = results["algorithms"].get(algo)
        if entry is None:
            lines.append(f"| {algo} | – | – | – | – | not run yet |")
            continue
        used = sorted({REFERENCE_OF.get(m, m) for m, _ in ADAPTERS[algo]})
        ref = ", ".join(f"{names.get(r, r)} ({refs.get(r, {}).get('commit', '?')[:7]})" for r in used)
        verdicts = [verdict(r) for r in entry["rows"]]
        fails, design = verdicts.count("FAIL"), verdicts.count("differs by design")
        worst = max((r["max_rel_diff"] for r, v in zip(entry["rows"], verdicts) if v != "differs by design"),
                    default=None)
        status = summary(algo, entry).split(":", 2)[1].split("(")[0].strip()
        lines.append(f"| {algo} | {ref} | {len(verdicts) - fails - design} / {len(verdicts)} | {design} | "
                     f"{'–' if worst is None else f'{worst:.1e}'} | {status} |")
    return "\n".join(lines)


# ---- running ----
def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("numpy", "jax", "flax", "optax", "torch"):
        try:
            out[name] = importlib.import_module(name).__version__
        except ImportError:
            out[name] = "not installed"
    return out


def run_algo(algo: str, reference_dir=None) -> dict:
    """Rows and per-reference run status of one algorithm's adapters."""
    entry = {"rows": [], "runs": [], "date": time.strftime("%Y-%m-%d %H:%M"), "versions": versions()}
    for mod_name, fn in ADAPTERS[algo]:
        run = {"reference": mod_name, "status": "ran", "message": ""}
        t0 = time.time()
        try:
            adapter = importlib.import_module(f"parity_refs.{mod_name}")
            rows = getattr(adapter, fn)(reference_dir=reference_dir)
            entry["rows"] += rows
            run["message"] = f"{len(rows)} rows in {time.time() - t0:.0f} s"
        except common.ReferenceMissing as e:
            run.update(status="not run", message=str(e))
        except ModuleNotFoundError as e:
            if e.name == f"parity_refs.{mod_name}":
                run.update(status="not run", message=f"no adapter benchmarks/parity_refs/{mod_name}.py yet")
            elif e.name and e.name.split(".")[0] == "torch":
                run.update(status="not run", message="torch is not installed: pip install -r "
                                                     "benchmarks/parity-requirements.txt")
            else:
                raise
        except Exception as e:  # noqa: BLE001 - one broken adapter must not hide the others' results
            traceback.print_exc()
            run.update(status="error", message=f"{type(e).__name__}: {e}")
        print(f"{algo} / {mod_name}: {run['status']}" + (f" ({run['message']})" if run["message"] else ""))
        entry["runs"].append(run)
    return entry


# ---------------------------------------------------------------------------------------------- learning parity
LEARN_PROTOCOL = "parity_learn"
MATCH_BAND = 5.0  # normalised points: "match" when the 95% interval of the difference lies within +-MATCH_BAND
MIN_SEEDS = 3
LEARN_COLUMNS = ["implementation", "entry"] + sweep.CSV_COLUMNS
REFERENCE_NAMES = {"corl": "CORL", "calql_official": "Cal-QL (official)", "ocr_cft": "OCR-CFT",
                   "pex": "PEX (official)", "aca": "ACA (official)", "float32": "ours in float32"}


def implementation(entry: dict) -> str:
    """'ours', the entry's own `implementation` label (e.g. float32 against ours in bf16), or the reference adapter
    an entry's command runs (run_reference.py REFERENCE ALGO ...)."""
    if entry.get("implementation"):
        return str(entry["implementation"])
    command = entry.get("command")
    if not command:
        return "ours"
    i = next(i for i, part in enumerate(command) if str(part).endswith("run_reference.py"))
    return str(command[i + 1])


def learn_entries(protocol: dict, algo: str) -> list:
    """The protocol's entries (ours and references) of one algorithm, or of all with algo 'all'."""
    return [name for name, o in protocol["algorithms"].items()
            if algo == "all" or str(o.get("script", name)) == algo]


def bootstrap_diff(ours: list, ref: list, n: int = 10000, seed: int = 0) -> tuple:
    """(mean(ours) - mean(ref), 2.5th and 97.5th percentiles of that difference when each side's seeds are
    resampled with replacement, n times)."""
    a, b = np.asarray(ours, float), np.asarray(ref, float)
    rng = np.random.default_rng(seed)
    diffs = a[rng.integers(0, len(a), (n, len(a)))].mean(1) - b[rng.integers(0, len(b), (n, len(b)))].mean(1)
    return float(a.mean() - b.mean()), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def learn_verdict(n_ours: int, n_ref: int, lo: float, hi: float, min_seeds: int = MIN_SEEDS) -> str:
    """Fixed before any run: 'match' when the 95% interval of ours - reference contains 0 or lies within
    +-MATCH_BAND normalised points, 'differs' otherwise; 'incomplete' below min_seeds finished seeds a side."""
    if min(n_ours, n_ref) < min_seeds:
        return f"incomplete ({n_ours} / {n_ref} seeds)"
    return "match" if lo <= 0.0 <= hi or (lo >= -MATCH_BAND and hi <= MATCH_BAND) else "differs"


def learn_rows(plan) -> list:
    """Every evaluation of the plan's runs (sweep's CSV rows) with the implementation and protocol entry."""
    out = []
    for run in plan.runs:
        entry = plan.protocol["algorithms"][run.algo]
        for row in sweep.run_rows(plan, run):
            out.append({**row, "implementation": implementation(entry), "entry": run.algo,
                        "algorithm": run.script.stem})
    return out


def _final(rows: list, online: bool):
    rows = [r for r in rows if (r["phase"] == "online") == online and r["normalized_score"] is not None]
    return rows[-1]["normalized_score"] if rows else None


def learn_summary(plan, rows: list) -> list:
    """Per algorithm and dataset: each side's finished seeds, final offline and online scores, wall time and
    updates/s, and the difference of the final online scores with its bootstrap interval and verdict."""
    done, last_attempt = {}, {}  # (entry, dataset, seed) -> done.json of a finished run / its last attempt's s
    for run in plan.runs:
        path = plan.root / run.run_dir / "done.json"
        if path.exists():
            timer = plan.root / run.run_dir / "eval_times.json"
            attempts = json.loads(timer.read_text()).get("attempts", []) if timer.exists() else []
            for seed in run.seeds:
                done[(run.algo, run.dataset, seed)] = json.loads(path.read_text())
                last_attempt[(run.algo, run.dataset, seed)] = attempts[-1]["seconds"] if attempts else \
                    done[(run.algo, run.dataset, seed)]["wall_time_s"]
    by = {}
    for r in rows:
        by.setdefault((r["algorithm"], r["dataset"], r["implementation"], r["entry"]), {}).setdefault(
            r["seed"], []).append(r)
    out = []
    for algo, dataset in dict.fromkeys((a, d) for a, d, _, _ in by):
        sides = {}
        for (a, d, impl, entry), per_seed in by.items():
            if (a, d) != (algo, dataset):
                continue
            fin = {s: rs for s, rs in per_seed.items() if (entry, d, s) in done}
            walls = [done[(entry, d, s)]["wall_time_s"] if impl == "ours" else last_attempt[(entry, d, s)]
                     for s in fin]  # a reference restarts from scratch: only its last attempt counts
            updates = [max(r["updates"] or 0 for r in rs) for rs in fin.values()]
            sides[impl] = {
                "entry": entry, "seeds": sorted(fin), "online": [_final(rs, True) for rs in fin.values()],
                "offline": [_final(rs, False) for rs in fin.values()], "wall_time_s": walls,
                "updates_per_s": [u / w for u, w in zip(updates, walls) if w],
                "load_avg_at_end": [done[(entry, d, s)].get("load_avg_at_end", [None])[0] for s in fin]}
        ours = sides.get("ours")
        for impl, ref in sides.items():
            if impl == "ours" or ours is None:
                continue
            item = {"algorithm": algo, "dataset": dataset, "reference": impl, "ours": ours, "ref": ref}
            for phase in ("offline", "online"):
                a = [x for x in ours[phase] if x is not None]
                b = [x for x in ref[phase] if x is not None]
                if a and b:
                    diff, lo, hi = bootstrap_diff(a, b)
                    item[phase] = {"ours_mean": float(np.mean(a)), "ours_std": float(np.std(a, ddof=1)) if len(a) > 1
                                   else 0.0, "ref_mean": float(np.mean(b)), "ref_std": float(np.std(b, ddof=1))
                                   if len(b) > 1 else 0.0, "diff": diff, "ci95": [lo, hi],
                                   "verdict": learn_verdict(len(a), len(b), lo, hi)}
            if ours["wall_time_s"] and ref["wall_time_s"]:
                item["speedup_wall"] = float(np.mean(ref["wall_time_s"]) / np.mean(ours["wall_time_s"]))
            out.append(item)
    return out


def learn_markdown(summary: list, protocol: dict) -> str:
    lines = ["# Learning parity: ours vs the reference, same data, hyper-parameters and budgets", "",
             f"Generated by `python benchmarks/parity.py learn ...` (do not edit) from the runs of protocol "
             f"`{protocol['path']}` (budgets and switches there). Scores: D4RL-normalised, the last evaluation of "
             f"each phase, mean ± std over finished seeds. Difference = ours − reference, with a 95% bootstrap "
             f"interval (seeds resampled on each side). Verdict fixed before the runs: *match* when the interval "
             f"contains 0 or lies within ±{MATCH_BAND:g} points, else *differs*. Wall time: the whole process "
             f"(start-up, data load, compilation, evaluations; a reference run restarted from scratch: its last "
             f"attempt); updates/s = all updates of the run / wall time. "
             f"Runs: two at a time, each pinned to its own CPU core (OMP_NUM_THREADS=1; `parity.py learn --jobs 2`), "
             f"ours and the reference alike: each side's speed is one core's.", "",
             "| algorithm | dataset | reference | seeds | offline: ours / reference | online: ours / reference | "
             "online difference [95% CI] | verdict | wall time per run, min: ours / reference (speed-up) | "
             "updates/s: ours / reference | highest load average at a run's end |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for it in summary:
        o, r = it["ours"], it["ref"]
        off, on = it.get("offline"), it.get("online")
        fmt = (lambda p: f"{p['ours_mean']:.1f} ± {p['ours_std']:.1f} / {p['ref_mean']:.1f} ± {p['ref_std']:.1f}"
               if p else "–")
        diff = f"{on['diff']:+.1f} [{on['ci95'][0]:+.1f}, {on['ci95'][1]:+.1f}]" if on else "–"
        verdict_ = on["verdict"] if on else "not run"
        wall = (f"{np.mean(o['wall_time_s']) / 60:.1f} / {np.mean(r['wall_time_s']) / 60:.1f} "
                f"({it['speedup_wall']:.1f}x)" if "speedup_wall" in it else "–")
        ups = (f"{np.mean(o['updates_per_s']):.0f} / {np.mean(r['updates_per_s']):.0f}"
               if o["updates_per_s"] and r["updates_per_s"] else "–")
        lines.append(f"| {it['algorithm']} | {it['dataset']} | {REFERENCE_NAMES.get(it['reference'], it['reference'])}"
                     f" | {len(o['seeds'])} / {len(r['seeds'])} | {fmt(off)} | {fmt(on)} | {diff} | {verdict_} | "
                     f"{wall} | {ups} | {_max_load(o, r)} |")
    return "\n".join(lines) + "\n"


def _max_load(*sides) -> str:
    """The highest 1-minute load average at the end of a finished run of these sides (2 cores here: above ~2.5 the
    run shared the CPU with other work and its wall time is inflated)."""
    loads = [x for side in sides for x in side.get("load_avg_at_end", []) if x is not None]
    return f"{max(loads):.1f}" if loads else "–"


def side_label(protocol, entry: str, impl: str) -> str:
    """'ours', 'ours in bf16' (a protocol entry of ours with another precision, as in precision_learn), or the
    reference's name."""
    if impl != "ours":
        return REFERENCE_NAMES.get(impl, impl)
    precision = ((protocol or {}).get("algorithms", {}).get(entry) or {}).get("precision", "float32")
    return "ours" if precision == "float32" else f"ours in {precision}"


def learn_plot(rows: list, path: Path, protocol: dict = None):
    """Overlay per algorithm and dataset: mean ± std over seeds of each implementation's evaluations against the
    training step: the updates of each phase in turn (offline, then re-evaluation, alignment where the algorithm has
    them), then the online env steps; dashed lines mark the phase ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys((r["algorithm"], r["dataset"]) for r in rows))
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (algo, dataset) in zip(axes[0], groups):
        mine = [r for r in rows if (r["algorithm"], r["dataset"]) == (algo, dataset)]
        done = {r["implementation"] for r in mine if r["finished"]}
        mine = [r for r in mine if r["finished"] or r["implementation"] not in done]  # finished runs, where any
        offsets, end = {}, 0  # where each phase starts on the x axis (phases in the order the runs log them)
        for phase in dict.fromkeys(r["phase"] for r in mine):
            offsets[phase] = end
            if phase != "online":
                end += max((r["updates"] or 0) for r in mine if r["phase"] == phase)
        offsets["online"] = end
        for impl in dict.fromkeys(r["implementation"] for r in mine):
            per_seed = {}
            for r in mine:
                if r["implementation"] == impl and r["normalized_score"] is not None:
                    x = offsets[r["phase"]] + (r["env_steps"] if r["phase"] == "online" else r["updates"])
                    per_seed.setdefault(r["seed"], []).append((x, r["normalized_score"]))
            n = min(len(v) for v in per_seed.values())  # the i-th evaluation of every seed
            xs = np.median([[x for x, _ in v[:n]] for v in per_seed.values()], 0)
            ys = np.array([[y for _, y in v[:n]] for v in per_seed.values()])
            label = side_label(protocol, next(r["entry"] for r in mine if r["implementation"] == impl), impl)
            ax.plot(xs, ys.mean(0), label=f"{label} ({len(per_seed)} seeds)")
            ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2)
        for phase, start in offsets.items():
            if start > 0:
                ax.axvline(start, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{algo}: {dataset}", fontsize=9)
        ax.set_xlabel("updates of each phase, then + online env steps")
        ax.set_ylabel("normalised score")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learn_readme(summary: list) -> str:
    lines = ["Learning parity: ours and the reference trained with the same data, hyper-parameters, budgets and "
             "evaluations, at least 3 seeds a side (`python benchmarks/parity.py learn all --reference_dir DIR`; every "
             "evaluation, the curves and the budgets in [benchmarks/results/parity/learn.md]"
             "(benchmarks/results/parity/learn.md)). Final online score, mean ± std; verdict fixed in advance: "
             f"*match* when the 95% bootstrap interval of the difference contains 0 or lies within ±{MATCH_BAND:g}.",
             "", "| algorithm | dataset | reference | final score: ours / reference | difference [95% CI] | verdict | "
             "speed-up (wall time per run) |", "|---|---|---|---|---|---|---|"]
    for it in summary:
        on = it.get("online")
        if not on:
            continue
        lines.append(f"| {it['algorithm']} | {it['dataset']} | {REFERENCE_NAMES.get(it['reference'], it['reference'])}"
                     f" | {on['ours_mean']:.1f} ± {on['ours_std']:.1f} / {on['ref_mean']:.1f} ± "
                     f"{on['ref_std']:.1f} | "
                     f"{on['diff']:+.1f} [{on['ci95'][0]:+.1f}, {on['ci95'][1]:+.1f}] | {on['verdict']} | "
                     + (f"{it['speedup_wall']:.1f}x |" if "speedup_wall" in it else "– |"))
    done = {(it["algorithm"], it["dataset"]) for it in summary if it.get("online")}
    todo = [a for a in ADAPTERS if not any(algo == a for algo, _ in done)]
    if todo:
        lines += ["", f"Not finished yet (the runs resume where they stopped): {', '.join(todo)}."]
    return "\n".join(lines)


class ReportError(RuntimeError):
    """The report would drop finished runs that the committed report holds."""


def record_files(run) -> list:
    """The files of a finished run that the report reads (paths relative to its run dir; not its checkpoints)."""
    return ["done.json", "eval_times.json", "config.yaml"] + [str(f) for _, f in run.eval_files()]


def kept_dir(out: Path, run) -> Path:
    """Where the report keeps a finished run's record files: out/records/<algorithm entry>/<dataset>/<seed dir>."""
    return out / "records" / run.algo / run.dataset / run.run_dir.name


def use_kept_records(plan, out: Path) -> int:
    """Runs finished in the run directories have their record files copied to `kept_dir` (committed with the
    report); runs not finished there but kept are read from the kept copy, so a report can be rebuilt, and grown by
    new seeds, on a machine that no longer holds the runs. Returns how many runs come from kept records."""
    served = 0
    for run in plan.runs:
        live, kept = plan.root / run.run_dir, kept_dir(out, run)
        if (live / "done.json").exists():
            for name in record_files(run):
                if (live / name).exists():
                    (kept / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(live / name, kept / name)
        elif (kept / "done.json").exists():
            if json.loads((kept / "done.json").read_text()).get("args") != plan.recorded_args(run):
                print(f"warning: the kept record {kept} ran with other arguments than the protocol's; not used")
                continue
            run.run_dir, run.status, served = kept.resolve(), "done", served + 1
    return served


def check_nothing_dropped(out: Path, present: set):
    """Refuse to overwrite a committed learn.csv whose finished runs ((entry, dataset, seed) keys) are not all in
    `present`."""
    old = out / "learn.csv"
    if not old.exists():
        return
    before = {(r["entry"], r["dataset"], str(r["seed"])) for r in csv.DictReader(old.open()) if r["finished"] == "1"}
    lost = sorted(before - present)
    if lost:
        raise ReportError(f"{old} holds {len(lost)} finished runs that neither the run directories nor the kept "
                          f"records in {out / 'records'} hold (e.g. {', '.join(' '.join(k) for k in lost[:3])}); point "
                          "--runs_root at the checkout that ran them, or delete learn.csv to drop them knowingly")


def learn_report(protocol: dict, out: Path, readme: bool = True, root: Path = sweep.ROOT) -> list:
    """(Re)write learn.csv/json/md/png from the finished runs of the whole protocol (a pure function of their record
    files: the run directories' or, for runs no longer there, the copies kept under out/records); returns the
    summary."""
    plan = sweep.build_plan(protocol, root, check_overrides=False)
    kept = use_kept_records(plan, out)
    rows = learn_rows(plan)
    check_nothing_dropped(out, {(r["entry"], r["dataset"], str(r["seed"])) for r in rows if r["finished"]})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, LEARN_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: sweep._fmt(r[k]) for k in LEARN_COLUMNS})
    out.mkdir(parents=True, exist_ok=True)
    (out / "learn.csv").write_text(buf.getvalue())
    summary = learn_summary(plan, rows)
    (out / "learn.json").write_text(json.dumps({"protocol": protocol["path"], "match_band": MATCH_BAND,
                                                "summary": summary}, indent=1) + "\n")
    (out / "learn.md").write_text(learn_markdown(summary, protocol) + "\n![curves](learn.png)\n")
    learn_plot(rows, out / "learn.png", protocol)
    if readme and out.resolve() == DEFAULT_OUT.resolve():
        from readme_tables import replace_section
        replace_section("parity_learn", learn_readme(summary))
    print(f"wrote {out / 'learn.csv'} ({len(rows)} evaluations), learn.json, learn.md, learn.png"
          + (f" ({kept} runs from the records kept in {out / 'records'})" if kept else ""))
    for it in summary:
        on = it.get("online")
        print(f"  {it['algorithm']} {it['dataset']} vs {it['reference']}: " +
              (f"{on['diff']:+.1f} [{on['ci95'][0]:+.1f}, {on['ci95'][1]:+.1f}] {on['verdict']}" if on else "no runs"))
    return summary


def learn(algo: str, reference_dir=None, out: Path = DEFAULT_OUT, report_only: bool = False,
          protocol_name: str = LEARN_PROTOCOL, readme: bool = True, jobs: int = 2, pin: bool = True) -> int:
    """Run (or resume) the learning-parity runs of `algo`, ours and reference interleaved seed by seed, `jobs` at
    a time (pinned: each run on its own share of the CPUs, so two runs on 2 cores get one core each), then rewrite
    the report from all finished runs."""
    try:
        protocol = sweep.load_protocol(protocol_name)
        entries = learn_entries(protocol, algo)
        if not entries:
            raise sweep.SweepError(f"protocol {protocol['path']} has no entry for {algo}")
        plan = sweep.build_plan(protocol, sweep.ROOT, only=[f"algo={e}" for e in entries])
        use_kept_records(plan, out)  # runs finished on another machine (kept records) are not run again
        # before any run: the report written at the end must not drop a finished run the committed one holds
        full = sweep.build_plan(protocol, sweep.ROOT, check_overrides=False)
        use_kept_records(full, out)
        check_nothing_dropped(out, {(r.algo, r.dataset, str(s)) for r in full.runs if r.status == "done" or
                                    (not report_only and r.algo in entries) for s in r.seeds})
    except (sweep.SweepError, ReportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ok = True
    if not report_only:
        if reference_dir:
            os.environ["O2O_PARITY_REFERENCE_DIR"] = str(Path(reference_dir).resolve())
        order = list(protocol["algorithms"])
        family = {e: str(protocol["algorithms"][e].get("script", e)) for e in order}
        # dataset by dataset (every algorithm on the first dataset before any on the second), and within an
        # algorithm ours then the reference seed by seed: machine drift hits both sides alike
        plan.runs.sort(key=lambda r: (protocol["datasets"].index(r.dataset),
                                      order.index(next(e for e in order if family[e] == family[r.algo])), r.seed,
                                      order.index(r.algo)))
        print(sweep.describe(plan, commands=False), flush=True)
        signal.signal(signal.SIGTERM, sweep._interrupt)
        try:
            results = sweep.execute(plan, jobs, pin=pin)
        except KeyboardInterrupt:
            report(protocol, out, readme)
            return 130
        failed = [(r, m) for r, good, m in results if not good]
        for r, m in failed:
            print(f"FAILED {r.label}: {m}", file=sys.stderr)
        ok = not failed
    return 0 if report(protocol, out, readme) and ok else 1


def report(protocol: dict, out: Path, readme: bool, root: Path = sweep.ROOT) -> bool:
    """learn_report, its refusal to drop committed runs as one line on stderr (False)."""
    try:
        learn_report(protocol, out, readme, root)
        return True
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return False


def _online_rows_returns(run_dir: Path, seed: int):
    """Our ACA run's training episodes from its online buffer checkpoints (checkpoints/buffer/seed<S>/rows_*.npz,
    one row per stored transition, in env-step order): (row index of each episode's last row, episode return).
    Episodes are split where a row's observation is not the previous row's next observation. A row index stands
    for its env step: rows lag env steps by the transitions not stored (with `d3rlpy_terminals: true` a time-limited
    episode's last one, whose reward is then missing from that episode's return)."""
    files = sorted((run_dir / "checkpoints" / "buffer" / f"seed{seed}").glob("rows_*.npz"))
    if not files:
        return None
    parts = [np.load(f) for f in files]
    obs, nxt = (np.concatenate([z[k] for z in parts]) for k in ("obs", "next_obs"))
    rew = np.concatenate([z["rew"] for z in parts]).astype(np.float64)
    ends = np.append(np.flatnonzero(np.any(obs[1:] != nxt[:-1], axis=1)), len(rew) - 1)
    return ends, np.add.reduceat(rew, np.concatenate([[0], ends[:-1] + 1]))


def _official_rollout_returns(run_dir: Path):
    """The official ACA run's d3rlpy log rollout_return.csv: {epoch: mean return of the training episodes that
    ended in that epoch} (an epoch = the evaluation interval in env steps)."""
    found = sorted(run_dir.glob("reference/d3rlpy_logs/ACA/*/*/exp/rollout_return.csv"))
    if not found:
        return None
    rows = list(csv.reader(found[0].open()))
    return {int(r[0]): float(r[2]) for r in rows}


def _aca_final_policies(dirs: dict) -> dict:
    """{seed: parity_refs.aca.final_policy_scores + each side's logged final score} for the seeds whose official
    run saved its last online model (model_<online_steps>.pt) and whose run of ours is finished; {} without torch."""
    if importlib.util.find_spec("torch") is None:
        print("aca_returns: torch is not installed here; the final-policy comparison is left out", file=sys.stderr)
        return {}
    from parity_refs import aca as aca_ref
    out = {}
    for seed, by in sorted(dirs.items()):
        if "ours" not in by or "official" not in by:
            continue
        (ours_dir, steps), (ref_dir, _) = by["ours"], by["official"]
        model = sorted(ref_dir.glob(f"reference/d3rlpy_logs/ACA/*/*/exp/model_{steps}.pt"))
        if not model or not (ours_dir / "checkpoints" / "latest").exists():
            continue
        logged = [_final([r for r in sweep.read_records(d / "eval.jsonl")], True) for d in (ours_dir, ref_dir)]
        out[seed] = {**aca_ref.final_policy_scores(ours_dir, model[0]), "logged": logged}
        print(f"  seed {seed}: deterministic {out[seed]['ours']['deterministic_mean']:.1f} / "
              f"{out[seed]['official']['deterministic_mean']:.1f}", flush=True)
    return out


def aca_train_returns(protocol: dict, out: Path, root: Path = sweep.ROOT, refs: tuple | None = None,
                      final_policies: bool = True) -> dict:
    """ACA's online *training* episodes (the sampling policy, every episode of the online phase), ours against the
    official, per evaluation interval: the mean normalised return of the episodes ending in it, per seed, then the
    difference of the means with its bootstrap interval. Ours from the online buffer checkpoints, the official
    from d3rlpy's rollout_return log. With final_policies (and torch), both sides' final online policies scored by
    our evaluator (_aca_final_policies). Writes <out>/aca_train_returns.{json,md}. refs: the normalisation's (min,
    max) returns (default: the dataset's)."""
    plan = sweep.build_plan(protocol, root, check_overrides=False)
    sides, dirs = {"ours": {}, "official": {}}, {}
    entry = {**protocol.get("common", {}), **protocol["algorithms"]["aca"]}
    every = int(entry["online_eval_every"])
    n = int(entry["online_steps"]) // every
    dataset = entry.get("datasets", protocol["datasets"])[0]
    for run in plan.runs:
        if run.script.stem != "aca" or not (plan.root / run.run_dir / "done.json").exists():
            continue
        rd = plan.root / run.run_dir
        side = "ours" if implementation(protocol["algorithms"][run.algo]) == "ours" else "official"
        dirs.setdefault(run.seed, {})[side] = (rd, int(entry["online_steps"]))
        if side == "ours":
            got = _online_rows_returns(rd, run.seed)
            if got is not None:
                ends, rets = got
                sides["ours"][run.seed] = [float(rets[(ends // every) == w].mean()) if ((ends // every) == w).any()
                                           else None for w in range(n)]
        else:
            got = _official_rollout_returns(rd)
            if got is not None:
                sides["official"][run.seed] = [got.get(w + 1) for w in range(n)]
    if refs is None:
        sys.path.insert(0, str(HERE.parent / "algorithms"))
        import data
        refs = data.reference_scores(dataset)
    norm = {k: {s: [None if x is None else 100.0 * (x - refs[0]) / (refs[1] - refs[0]) for x in v]
                for s, v in per.items()} for k, per in sides.items()}
    finals = _aca_final_policies(dirs) if final_policies else {}
    # seeds whose runs are not here (another machine, a new checkout): their numbers from the committed JSON
    kept = out / "aca_train_returns.json"
    old = json.loads(kept.read_text()) if kept.exists() else {}
    if old and old.get("protocol") == protocol["path"]:
        for k in norm:
            for s, v in old["per_seed_normalized"].get(k, {}).items():
                norm[k].setdefault(int(s), v)
        for s, v in old.get("final_policies", {}).items():
            finals.setdefault(int(s), v)
    norm = {k: dict(sorted(v.items())) for k, v in norm.items()}
    finals = dict(sorted(finals.items()))
    if not norm["ours"] or not norm["official"]:
        print("aca_train_returns: no finished ACA runs with online buffers and official d3rlpy logs", file=sys.stderr)
        return {}
    windows = []
    for w in range(len(next(iter(norm["ours"].values())))):
        a = [v[w] for v in norm["ours"].values() if v[w] is not None]
        b = [v[w] for v in norm["official"].values() if v[w] is not None]
        diff, lo, hi = bootstrap_diff(a, b)
        windows.append({"env_steps": [w * every, (w + 1) * every], "ours_mean": float(np.mean(a)),
                        "ours_std": float(np.std(a, ddof=1)), "official_mean": float(np.mean(b)),
                        "official_std": float(np.std(b, ddof=1)), "n": [len(a), len(b)], "diff": diff,
                        "ci95": [lo, hi]})
    result = {"dataset": dataset, "protocol": protocol["path"], "per_seed_normalized": norm, "windows": windows,
              "final_policies": finals}
    out.mkdir(parents=True, exist_ok=True)
    (out / "aca_train_returns.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# ACA: online training-episode returns and final policies, ours vs the official code", "",
             "Generated by `python benchmarks/parity.py aca_returns` (do not edit) from the finished ACA runs of "
             f"protocol `{protocol['path']}` ({dataset}). Each row: the episodes of the online phase (the sampling policy "
             "that collects the data, not the deterministic evaluation) that ended in that interval of env steps (ours: "
             "the row index of the online buffer, which lags the env step by the few transitions not stored); "
             "per seed the mean D4RL-normalised return, then mean ± std over seeds and the difference ours − "
             "official with a 95% bootstrap interval (seeds resampled). Ours: from the online buffer checkpoints; "
             "the official: d3rlpy's `rollout_return` log.", "",
             "| env steps | seeds | ours | official | difference [95% CI] |", "|---|---|---|---|---|"]
    for it in windows:
        lines.append(f"| {it['env_steps'][0]}-{it['env_steps'][1]} | {it['n'][0]} / {it['n'][1]} | "
                     f"{it['ours_mean']:.1f} ± {it['ours_std']:.1f} | {it['official_mean']:.1f} ± "
                     f"{it['official_std']:.1f} | {it['diff']:+.1f} [{it['ci95'][0]:+.1f}, {it['ci95'][1]:+.1f}] |")
    if finals:
        lines += ["", "## The final online policies, both scored by our evaluator", "",
                  "The official run's last model (saved by the adapter at the end of `fit_online`) converted to our "
                  "network and our final checkpoint, each evaluated by our evaluator: the deterministic tanh(mean) "
                  "policy over five evaluation seeds (the protocol's `eval_seed` and the next four, 10 episodes "
                  "each), the sampling policy over the first two; `std`: the mean policy standard deviation (before "
                  "tanh) at the first 20k dataset states. 'as logged': each side's own final evaluation in the "
                  "learning-parity runs.", "",
                  "| seed | deterministic: ours / official | as logged: ours / official | episode length: ours / "
                  "official | sampled: ours / official | std: ours / official |", "|---|---|---|---|---|---|"]
        for seed, f in sorted(finals.items()):
            o, t = f["ours"], f["official"]
            lines.append(f"| {seed} | {o['deterministic_mean']:.1f} / {t['deterministic_mean']:.1f} | "
                         f"{f['logged'][0]:.1f} / {f['logged'][1]:.1f} | {o['length_mean']:.0f} / "
                         f"{t['length_mean']:.0f} | {o['sampled_mean']:.1f} / {t['sampled_mean']:.1f} | "
                         f"{o['policy_std_mean']:.2f} / {t['policy_std_mean']:.2f} |")
        lines.append("")
        gap = lambda f: f["deterministic_mean"] - f["sampled_mean"]  # noqa: E731
        for name, get in (("deterministic", lambda f: f["deterministic_mean"]),
                          ("sampled", lambda f: f["sampled_mean"]), ("deterministic - sampled", gap)):
            a = [get(f["ours"]) for f in finals.values()]
            b = [get(f["official"]) for f in finals.values()]
            diff, lo, hi = bootstrap_diff(a, b)
            lines.append(f"- mean over {len(a)} seeds, {name}: ours {np.mean(a):+.1f}, official {np.mean(b):+.1f}, "
                         f"difference {diff:+.1f} [{lo:+.1f}, {hi:+.1f}] (95% bootstrap interval)")
    planned = len(entry.get("seeds", protocol["seeds"]))
    done_both = len(set(norm["ours"]) & set(norm["official"]))
    if done_both < planned:  # a protocol reports its results when every planned run has finished
        lines[1:1] = ["", f"**Incomplete: {done_both} of {planned} seeds finished on both sides; not a result until "
                          "all have.**"]
    (out / "aca_train_returns.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(windows) - 2:]) + f"\nwrote {out / 'aca_train_returns.json'} and .md")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("step", help="one update of ours vs one update of the reference")
    step.add_argument("algo", choices=list(ADAPTERS) + ["all"])
    step.add_argument("--reference_dir", default=None, help="directory holding the reference checkouts")
    step.add_argument("--out", default=str(DEFAULT_OUT), help="output directory of step.json / step.md")
    step.add_argument("--no_readme", dest="readme", action="store_false", help="do not rewrite README's section")
    lrn = sub.add_parser("learn", help="training runs of ours and the reference, same data, settings and budgets")
    lrn.add_argument("algo", choices=list(ADAPTERS) + ["all"])
    lrn.add_argument("--reference_dir", default=None, help="directory holding the reference checkouts")
    lrn.add_argument("--out", default=str(DEFAULT_OUT), help="output directory of learn.{csv,json,md,png}")
    lrn.add_argument("--report_only", action="store_true", help="only rewrite the report from the finished runs")
    lrn.add_argument("--protocol", default=LEARN_PROTOCOL, help="protocol name or YAML path (default parity_learn)")
    lrn.add_argument("--no_readme", dest="readme", action="store_false", help="do not rewrite README's section")
    lrn.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    lrn.add_argument("--runs_root", default=None, help="with --report_only: the checkout whose output_root holds "
                                                       "the runs (e.g. a git worktree that ran them)")
    lrn.add_argument("--no_pin", dest="pin", action="store_false",
                     help="do not pin each running run to its own share of the CPUs")
    acr = sub.add_parser("aca_returns", help="ACA's online training-episode returns and final policies, ours vs "
                                             "the official runs")
    acr.add_argument("--runs_root", default=None, help="the checkout whose output_root holds the learn runs")
    acr.add_argument("--protocol", default=LEARN_PROTOCOL, help="protocol name or YAML path (default parity_learn)")
    acr.add_argument("--out", default=str(DEFAULT_OUT), help="output directory of aca_train_returns.{json,md}")
    args = parser.parse_args(argv)
    if args.command == "aca_returns":
        found = aca_train_returns(sweep.load_protocol(args.protocol), Path(args.out),
                                  Path(args.runs_root) if args.runs_root else sweep.ROOT)
        return 0 if found else 1
    if args.command == "learn":
        if args.runs_root and not args.report_only:
            parser.error("--runs_root goes with --report_only (runs are made in this checkout)")
        if args.runs_root:
            return 0 if report(sweep.load_protocol(args.protocol), Path(args.out), args.readme,
                               Path(args.runs_root)) else 1
        return learn(args.algo, args.reference_dir, Path(args.out), args.report_only, args.protocol, args.readme,
                     args.jobs, args.pin)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "step.json"
    for algo in ADAPTERS if args.algo == "all" else [args.algo]:
        entry = run_algo(algo, args.reference_dir)
        # re-read just before writing: other runs (other algorithms) may have written meanwhile
        results = json.loads(path.read_text()) if path.exists() else {"algorithms": {}}
        results["references"] = {k: {"url": u, "commit": c} for k, (u, c) in common.REFERENCES.items()}
        results["tolerance"] = common.TOLERANCE
        results["algorithms"][algo] = entry
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(path)
        (out / "step.md").write_text(markdown(results))
        if args.readme and out.resolve() == DEFAULT_OUT.resolve():  # the README quotes the committed results only
            from readme_tables import replace_section
            replace_section("parity", readme_table(results))
    ran = [a for a in ADAPTERS if args.algo in (a, "all")]
    lines = [summary(a, results["algorithms"][a]) for a in ran]
    print("\n".join(lines) + f"\nwrote {path} and {out / 'step.md'}")
    return 1 if any(": FAIL" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
