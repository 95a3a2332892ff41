"""Speed table of the seven algorithms on this machine, written into docs/speed.md (section `speed`) by one command.

    python benchmarks/speed_table.py --bench --quickstart all     # everything (~1 h on 2 cores)
    python benchmarks/speed_table.py --bench                      # re-time the updates, quickstarts kept
    python benchmarks/speed_table.py --bench --bench_args "--block 200 --seconds 5"   # quicker (~5 min idle)
    python benchmarks/speed_table.py --quickstart iql,pex         # re-run two quickstarts
    python benchmarks/speed_table.py                              # only rewrite the table from the JSON files

Columns, per algorithm:
- offline updates/s, GFLOP per update and achieved GFLOP/s / matmul GFLOP/s: `bench_updates.py` (pure offline
  updates on synthetic Hopper-shaped data, batch 256, the Hopper config's networks; the float32 matmul rates of
  256x256x256 and 2560x256x256 measured in the same run: the shapes of a batch-256 layer and of the CQL-based
  updates' 10-action evaluations). --bench re-runs it into benchmarks/results/bench_updates.json.
- env+act ms per online step and its ratio to one update; online env steps/s at the config's updates per env step
  (also from bench_updates.py: a real Hopper-v5 env stepped with the algorithm's jitted act call).
- quickstart: wall time of `python algorithms/<algo>.py --config_path configs/<algo>/quickstart.yaml` (the
  dataset already built) and its normalised score at the end of pre-training -> at the end of fine-tuning, from
  benchmarks/results/quickstart_times.json; --quickstart runs the named ones again (into runs/speed_quickstart/)
  and records their numbers with the machine's load average.
Every number comes from those JSON files: the table is never edited by hand.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from readme_tables import DOCS, update_readme  # noqa: E402

ROOT = HERE.parent
RESULTS = HERE / "results"
ALGOS = ("iql", "cal_ql", "o2sac", "o2td3", "o2ppo", "aca", "pex")
NAMES = {"iql": "IQL", "cal_ql": "Cal-QL", "o2sac": "O2SAC", "o2td3": "O2TD3", "o2ppo": "O2PPO", "aca": "ACA",
         "pex": "PEX"}
SECTION = "speed"


def read_records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_quickstart(algo: str, out_root: Path) -> dict:
    """Run one quickstart to the end (fresh run dir) and return its timing and scores."""
    run_dir = out_root / algo
    cmd = [sys.executable, "algorithms/" + f"{algo}.py", "--config_path", f"configs/{algo}/quickstart.yaml",
           "--run_dir", str(run_dir), "--wandb_mode", "disabled"]
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: the time of the whole quickstart
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    load_before, t0 = os.getloadavg(), time.time()
    with open(out_root / f"{algo}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"quickstart of {algo} failed (exit {rc}); see {out_root / f'{algo}.log'}")
    records = read_records(run_dir / "eval.jsonl")
    before = [r for r in records if r["phase"] != "online"]
    online = [r for r in records if r["phase"] == "online"]
    return {"command": " ".join(cmd[1:5]), "seconds": round(seconds, 1),
            "seconds_in_run": records[-1].get("wall_time"),  # the script's own clock (without interpreter start)
            "score_before_online": before[-1]["normalized_score"] if before else None,
            "score_final": online[-1]["normalized_score"] if online else None,
            "online_env_steps": online[-1]["env_steps"] if online else 0,
            "time": time.strftime("%Y-%m-%d %H:%M"), "load_average_before": load_before,
            "load_average_after": os.getloadavg()}


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def table(bench: dict, quick: dict) -> str:
    matmul = {m["shape"]: m["gflops"] for m in bench.get("matmul", [])}
    lines = ["| algorithm | offline updates/s | GFLOP / update | GFLOP/s ÷ matmul 256³ / 2560×256² | env+act ms / step "
             "| ÷ update time | online env steps/s | quickstart (min) | quickstart score |",
             "|---|---|---|---|---|---|---|---|---|"]
    footnotes = []
    for algo in ALGOS:
        b, q = bench.get(algo, {}), quick.get(algo)
        note = b.get("online_note", "")
        bound = "≥ " if "lower bound" in note else ""  # (o2sac: its offline CQL update stands in for the online one)
        if note:
            footnotes.append(f"{NAMES[algo]}: {note}.")
        achieved = b.get("achieved_gflops")
        ratios = "–" if achieved is None or len(matmul) < 2 else " / ".join(
            f"{achieved / g:.2f}" for g in matmul.values())
        score = "–" if q is None else f"{fmt(q['score_before_online'], '.1f')} → {fmt(q['score_final'], '.1f')}"
        lines.append(" | ".join([
            f"| {NAMES[algo]}", fmt(b.get("updates_per_s"), ".0f"),
            fmt(b["flops_per_update"] / 1e9 if "flops_per_update" in b else None, ".2f"),
            ratios,
            fmt(b.get("step_ms"), ".2f"), bound + fmt(b.get("online_overhead_fraction"), ".3f"),
            bound + fmt(b.get("env_steps_per_s"), ".0f") + (f" ({b['updates_per_env_step']} upd/step)"
                                                            if b.get("updates_per_env_step") else " (env + act)"),
            "–" if q is None else f"{q['seconds'] / 60:.1f}", score]) + " |")
    when = bench.get("time", "never")
    load = bench.get("load_average_before")
    rates = ", ".join(
        f"{m['shape']}: {m['gflops']:.0f} GFLOP/s" + (
            f" (median of {len(m['gflops_samples'])} samples taken between the algorithms, "
            f"{min(m['gflops_samples']):.0f}-{max(m['gflops_samples']):.0f})" if m.get("gflops_samples") else "")
        for m in bench.get("matmul", []))
    notes = [f"Updates and online steps: `benchmarks/results/bench_updates.json`, measured {when} "
             f"(load average before: {', '.join(f'{x:.1f}' for x in load) if load else '–'}; matmul {rates}). "
             + (bench.get("online_note", "") + ". " if bench.get("online_note") else "") + " ".join(footnotes)]
    seeds = bench.get("iql", {}).get("num_seeds", {})
    if seeds:
        base = seeds.get("1", {}).get("aggregate_updates_per_s")
        notes.append("IQL with N seeds in one process (vmapped, `--num_seeds`): aggregate " + ", ".join(
            f"{v['aggregate_updates_per_s']:.0f}" + (f" ({v['aggregate_updates_per_s'] / base:.2f}×)" if base else "")
            for v in seeds.values()) + f" updates/s for N = {', '.join(seeds)}."
            + (f" In the same run, 4 batched 256×256×256 matmuls (a layer of 4 vmapped seeds) ran at "
               f"{bench['matmul_batched']['ratio_to_single']:.2f}× the GFLOP/s of one: the ceiling of the vmapped "
               "speed-up for matmul-bound updates on this CPU." if "matmul_batched" in bench else ""))
    profiled = [a for a in ALGOS if "op_share" in bench.get(a, {}).get("profile", {})]
    if profiled and matmul:
        rate256 = next(iter(matmul.values()))
        parts = []
        for a in profiled:
            pr = bench[a]["profile"]
            share = pr["op_share"]
            parts.append(f"{NAMES[a]}: matmul ops {100 * share['matmul']:.0f}% of the op time, running at "
                         f"{pr['matmul_gflops_within_ops']:.0f} GFLOP/s ({pr['matmul_gflops_within_ops'] / rate256:.2f}× "
                         f"the 256³ rate); copies (layout transposes) {100 * share['copy']:.0f}%, other ops "
                         f"(elementwise, Adam, RNG, gathers) {100 * share['other']:.0f}%, scan control "
                         f"{100 * share['loop']:.0f}%")
        notes.append("Where an update's time goes (`jax.profiler` trace of one block, XLA's op events summed by kind; "
                     "ops overlap on the two cores, so these are shares of op time): " + "; ".join(parts) + ".")
    ceilings = []
    for a in ALGOS:
        b = bench.get(a, {})
        if "dots_only" in b and "dots_as_gemms" in b and matmul:
            d, g = b["dots_only"], b["dots_as_gemms"]
            ratios = " / ".join(f"{g['gflops'] / rate:.2f}" for rate in matmul.values())
            ceilings.append(f"{NAMES[a]}: its {d['dots']} dots alone {d['updates_per_s']:.1f} updates/s, as plain "
                            f"matmuls {g['updates_per_s']:.1f} ({ratios} of the 256³ / 2560×256² rates); the full "
                            f"update runs at {b['updates_per_s'] / max(d['updates_per_s'], g['updates_per_s']):.2f}× "
                            "the faster of the two")
    if ceilings:
        notes.append("The matmuls' own ceiling, timed in the same run: a program doing nothing but the update's dots "
                     "(shapes and dimension numbers read from its compiled HLO; once as XLA lays them out, once each "
                     "as a plain [B, M, K] @ [B, K, N] matmul that needs no transpose), i.e. the update's speed if "
                     "every other op were free. " + "; ".join(ceilings) + ".")
    if quick:
        loads = sorted({round(q["load_average_before"][0], 1) for q in quick.values()})
        notes.append("Quickstarts: `benchmarks/results/quickstart_times.json`, measured "
                     f"{', '.join(sorted({q['time'][:10] for q in quick.values()}))} (1-min load average before "
                     f"each: {', '.join(map(str, loads))}); time includes loading the already-built dataset and "
                     "compiling; score is the normalised score at the end of pre-training → at the end of "
                     "fine-tuning (one seed, the quickstart's tiny budget).")
    missing = [NAMES[a] for a in ALGOS if a not in quick]
    if missing:
        notes.append(f"Quickstart not measured by this command yet: {', '.join(missing)}.")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--bench", action="store_true", help="re-run bench_updates.py for the seven algorithms")
    p.add_argument("--bench_args", default="", help="extra bench_updates.py arguments, e.g. '--block 200'")
    p.add_argument("--quickstart", default="", help="comma-separated algorithms (or 'all') whose quickstart to run")
    p.add_argument("--results_dir", default=str(RESULTS))
    p.add_argument("--readme", default=str(DOCS / "speed.md"), help="page whose `speed` section is replaced")
    p.add_argument("--no_readme", action="store_true")
    args = p.parse_args(argv)
    results = Path(args.results_dir)
    bench_file, quick_file = results / "bench_updates.json", results / "quickstart_times.json"
    todo = list(ALGOS) if args.quickstart == "all" else [a for a in args.quickstart.split(",") if a]
    unknown = [a for a in todo if a not in ALGOS]
    if unknown:
        print(f"error: --quickstart {','.join(unknown)}: not one of {', '.join(ALGOS)}", file=sys.stderr)
        return 2
    if args.bench:
        import bench_updates
        bench_updates.main(bench_updates.parse_args(["--out", str(bench_file)] + args.bench_args.split()))
    quick = json.loads(quick_file.read_text()) if quick_file.exists() else {}
    out_root = ROOT / "runs" / "speed_quickstart"
    out_root.mkdir(parents=True, exist_ok=True)
    for algo in todo:
        print(f"quickstart {algo} ...", flush=True)
        quick[algo] = run_quickstart(algo, out_root)
        quick_file.write_text(json.dumps(quick, indent=1) + "\n")  # after each one: a stop keeps the finished ones
        print(f"quickstart {algo}: {quick[algo]['seconds'] / 60:.1f} min, score "
              f"{quick[algo]['score_before_online']} -> {quick[algo]['score_final']}", flush=True)
    bench = json.loads(bench_file.read_text()) if bench_file.exists() else {}
    md = table(bench, quick)
    print(md)
    return 0 if args.no_readme else update_readme(SECTION, md, Path(args.readme))


if __name__ == "__main__":
    sys.exit(main())
