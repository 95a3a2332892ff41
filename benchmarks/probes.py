"""Probes: short runs of the algorithm scripts that isolate one phase of a method, to explain a benchmark result.

    python benchmarks/probes.py pex-switch     # PEX before its first online update (~10 min on 2 cores)
    python benchmarks/probes.py alignment      # OCR-CFT re-evaluation + alignment with more updates (~15 min)
    python benchmarks/probes.py cal_ql-offline # Cal-QL's quickstart pre-training, one setting changed at a time (~50 min)
    python benchmarks/probes.py all

pex-switch and alignment start from the reduced protocol's offline checkpoints (`python benchmarks/sweep.py reduced`
first). Each probe runs its scripts under runs/probes/<probe>/ (a finished run is skipped, so a stopped probe
resumes) and writes benchmarks/results/<section>_probe.{json,md} and the section <section> of docs/benchmarks.md
(pex_switch, alignment, cal_ql_offline; `--no_readme`: not).

pex-switch. At the switch PEX adds a randomly initialised policy pi beside the frozen offline policy pi_off and picks
each action by softmax(inv_temperature * Q) over the two candidates. Whether the pre-trained critic ranks pi's
untrained actions below pi_off's decides how much the composite policy loses before learning anything. Every run
is `algorithms/pex.py` with `online_steps == initial_collection_steps` (no online update) and one evaluation at the
end (the official evaluation: epsilon-greedy 0.1 for the new policy's action and the gate):
  * `reduced`: from the reduced protocol's IQL offline checkpoint (what its `pex` entry loads: iql.py's normalised
    states and return-scaled rewards), evaluation epsilon 0.1 (official);
  * `reduced-greedy`: the same with `eval_epsilon 0` (argmax gate, the new policy's mean);
  * `official`: pex.py's own IQL pre-training with its official locomotion settings (raw rewards, no state
    normalisation, expectile 0.9, beta 10) for `--official_updates` updates, then the same probe.

alignment. In the reduced protocol OCR-CFT's value alignment (O2SAC, O2TD3) lowers the score before any online
step, with 2k (O2SAC) / 5k (O2TD3) re-evaluation and alignment updates where the official configs use 500k each.
This probe re-runs both phases from the same offline checkpoints with `--align_updates` updates each (no online
phase) and evaluates every `--align_eval_every` updates, to see whether the drop shrinks with the budget.

cal_ql-offline. Cal-QL's quickstart pre-training (4k updates) leaves a policy that falls at once on hopper medium,
where O2SAC's CQL phase learns within the same budget. This probe changes one of Cal-QL's official settings at a
time (the ones where the two differ: policy LR, max-target backup, CQL weight, the Monte-Carlo calibration, depth,
initialisation) or triples the updates. Its runs go through `probes.py record`, which keeps the training metrics
the scripts send to wandb in run_dir/metrics.jsonl, so the table also gives how often the Monte-Carlo bound is
active (`bound_rate`), Q of the data actions and the Monte-Carlo return G at the end of pre-training.
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from readme_tables import DOCS, update_readme  # noqa: E402
from sweep import RESULTS, ROOT, cli_value, load_protocol  # noqa: E402

PEX_STEPS = 600  # pex-switch: online env steps, all of them initial collection (no online update happens)


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reduced_run(entry: str, dataset: str, seeds: int) -> Path:
    """The reduced protocol's run directory of `entry` on `dataset` (seeds 0..seeds-1 in one process)."""
    root = Path(load_protocol("reduced")["output_root"])
    run = ROOT / root / entry / dataset / f"seeds0-{seeds - 1}"
    if not (run / "checkpoints" / "offline").exists():
        raise SystemExit(f"no offline checkpoint in {run}: run `python benchmarks/sweep.py reduced --only "
                         f"algo={entry},dataset={dataset}` first")
    return run


def protocol_overrides(entry: str) -> list:
    """The reduced protocol's overrides of `entry` that fix its network shapes (so its checkpoint loads)."""
    spec = load_protocol("reduced")["algorithms"][entry] or {}
    out = []
    for key in ("cql_critic_hidden", "critic_hidden", "policy_hidden", "hidden_dims"):
        if key in spec:
            out += [f"--{key}", cli_value(spec[key])]
    return out


def run_script(script: str, dataset: str, run_dir: Path, args: list, seeds: int, episodes: int,
               record: bool = False) -> Path:
    """`algorithms/<script>.py` with `configs/<script>/<dataset>.yaml` (or `quickstart.yaml`: dataset "quickstart")
    and `args`, seeds 0..seeds-1 in one process; skipped when done. `record`: through `probes.py record`, which
    also writes the training metrics to run_dir/metrics.jsonl."""
    if (run_dir / "done").exists():
        print(f"done already: {run_dir}")
        return run_dir
    launch = ["benchmarks/probes.py", "record", script] if record else [f"algorithms/{script}.py"]
    cmd = [sys.executable, *launch, "--config_path", f"configs/{script}/{dataset}.yaml",
           "--seed", "0", "--num_seeds", str(seeds), "--run_dir", str(run_dir), "--wandb_mode", "disabled",
           "--eval_episodes", str(episodes)] + args
    resume = (run_dir / "checkpoints" / "latest").exists()
    print(("resuming: " if resume else "running: ") + str(run_dir.relative_to(ROOT)), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.time()
    with open(run_dir / "probe.log", "a") as log:
        rc = subprocess.run(cmd + (["--resume"] if resume else []), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{script} failed (exit {rc}); see {run_dir / 'probe.log'}")
    (run_dir / "done").write_text(json.dumps({"cmd": cmd, "wall_time_s": round(time.time() - t0, 1)}))
    return run_dir


def record(script: str, argv: list) -> None:
    """Run algorithms/<script>.py (parse_config + train, as its __main__ does) with every dict its Logger sends to
    wandb also appended to <run_dir>/metrics.jsonl (numbers only): the training metrics (block means) without wandb.
    A resumed run appends again from its checkpoint, so keep the last record per update count."""
    sys.path.insert(0, str(ROOT / "algorithms"))
    module = importlib.import_module(script)
    cfg = module.parse_config(argv)
    path = Path(cfg.run_dir) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = module.Logger.log

    def log_and_record(self, metrics: dict):
        log(self, metrics)
        with open(path, "a") as f:
            f.write(json.dumps({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}) + "\n")
    module.Logger.log = log_and_record
    try:
        module.train(cfg)
    finally:
        module.Logger.log = log


# ---- pex-switch
def pex_variants(dataset: str, seeds: int, official_updates: int) -> dict:
    """name -> extra pex.py arguments (on top of the dataset's config and the probe's schedule)."""
    ckpt = str(reduced_run("iql", dataset, seeds) / "checkpoints" / "offline")
    from_iql = ["--offline_checkpoint", ckpt, "--normalize", "true", "--normalize_reward_by_returns", "true"]
    return {
        "reduced": from_iql,
        "reduced-greedy": from_iql + ["--eval_epsilon", "0"],
        "official": ["--offline_updates", str(official_updates), "--offline_eval_every", str(official_updates)],
    }


def pex_summary(run_dir: Path, seeds: int) -> list:
    rows = []
    for s in range(seeds):
        records = read_jsonl(run_dir / f"seed{s}" / "eval.jsonl")
        offline = [r for r in records if r["phase"] == "offline"]
        online = [r for r in records if r["phase"] == "online"]
        if not offline or not online:
            raise SystemExit(f"{run_dir}/seed{s}: expected an offline and an online evaluation")
        if online[-1]["updates"] != offline[-1]["updates"]:
            raise SystemExit(f"{run_dir}/seed{s}: online updates happened during the probe")
        rows.append({"seed": s, "offline_score": offline[-1]["normalized_score"],
                     "switch_score": online[-1]["normalized_score"],
                     "new_policy_fraction": online[-1]["new_policy_fraction"],
                     "q_offline_action": online[-1]["q_offline_action"],
                     "q_new_action": online[-1]["q_new_action"]})
    return rows


def pex_markdown(results: dict, seeds: int, episodes: int) -> str:
    lines = [f"PEX at the switch, no online update ({seeds} seeds, {episodes} evaluation episodes each; "
             "`python benchmarks/probes.py pex-switch`).", "",
             "| dataset | pre-training | pi_off score | composite score at the switch | new-policy actions | "
             "mean Q(s, a_off) / Q(s, a_new) |", "|---|---|---|---|---|---|"]
    for dataset, by_name in results.items():
        for name, rows in by_name.items():
            def per_seed(key, fmt="{:.1f}"):
                return " / ".join(fmt.format(r[key]) for r in rows)
            q = " / ".join(f"{r['q_offline_action']:.1f}, {r['q_new_action']:.1f}" for r in rows)
            lines.append(f"| `{dataset}` | {name} | {per_seed('offline_score')} | {per_seed('switch_score')} | "
                         f"{per_seed('new_policy_fraction', '{:.2f}')} | {q} |")
    lines += ["", "Per seed (0 / 1 / 2). reduced: the reduced protocol's IQL pre-training (iql.py, 10k updates), "
              "official evaluation (epsilon 0.1); reduced-greedy: the same with the argmax gate; official: pex.py's "
              "own pre-training with the official locomotion settings. Q values are in each run's reward units."]
    return "\n".join(lines) + "\n"


def pex_switch(args) -> tuple:
    results = {}
    for dataset in args.datasets.split(","):
        results[dataset] = {}
        for name, extra in pex_variants(dataset, args.num_seeds, args.official_updates).items():
            schedule = ["--online_steps", str(PEX_STEPS), "--initial_collection_steps", str(PEX_STEPS),
                        "--online_eval_every", str(PEX_STEPS)]
            run_dir = run_script("pex", dataset, ROOT / args.out_root / "pex-switch" / dataset / name,
                                 schedule + extra, args.num_seeds, args.eval_episodes)
            results[dataset][name] = pex_summary(run_dir, args.num_seeds)
    meta = {"official_updates": args.official_updates, "probe_steps": PEX_STEPS}
    return {**meta, "results": results}, pex_markdown(results, args.num_seeds, args.eval_episodes)


# ---- alignment
def alignment_args(script: str, updates: int, every: int) -> list:
    if script == "o2td3":
        return ["--ope_updates", str(updates), "--align_updates", str(updates), "--offline_eval_every", str(every),
                "--online_steps", "0"]
    return ["--ope_steps", str(updates), "--align_steps", str(updates), "--reconstruct_eval_every", str(every),
            "--online_steps", "0"]


def phase_curve(records: list, phase: str) -> list:
    """[(updates into the phase, normalised score)] of one seed's evaluations in `phase`."""
    return [(r.get("phase_updates", r["updates"]), r["normalized_score"]) for r in records if r["phase"] == phase]


def alignment_summary(run_dir: Path, seeds: int) -> dict:
    per_seed = [read_jsonl(run_dir / f"seed{s}" / "eval.jsonl") for s in range(seeds)]
    offline = [[r for r in recs if r["phase"] == "offline"][-1]["normalized_score"] for recs in per_seed]
    curves = {}
    for phase in ("reevaluation", "alignment"):
        seed_curves = [phase_curve(recs, phase) for recs in per_seed]
        steps = [u for u, _ in seed_curves[0]]
        if any([u for u, _ in c] != steps for c in seed_curves):
            raise SystemExit(f"{run_dir}: the seeds' {phase} evaluations are at different updates")
        curves[phase] = {"updates": steps, "scores": [[s for _, s in c] for c in seed_curves]}
    return {"pre_training": offline, **curves}


def ms(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def alignment_markdown(results: dict, seeds: int, episodes: int) -> str:
    lines = [f"OCR-CFT re-evaluation (PR) and value alignment (VA) from the reduced protocol's offline checkpoints, no "
             f"online phase ({seeds} seeds, {episodes} evaluation episodes; `python benchmarks/probes.py alignment`). "
             "Normalised score, mean ± std over seeds.", "",
             "| dataset | algorithm | PR / VA updates | pre-training | end of PR | VA: score after n updates |",
             "|---|---|---|---|---|---|"]
    for dataset, by_algo in results.items():
        for algo, runs in by_algo.items():
            for label, r in runs.items():
                pr = np.asarray(r["reevaluation"]["scores"])[:, -1]
                va = np.asarray(r["alignment"]["scores"])
                va_text = "; ".join(f"{n / 1000:g}k: {ms(va[:, i])}" for i, n in enumerate(r["alignment"]["updates"]))
                lines.append(f"| `{dataset}` | {algo} | {label} | {ms(r['pre_training'])} | {ms(pr)} | {va_text} |")
    lines += ["", "`reduced`: the reduced protocol's own runs (their PR/VA budget); the other rows are this probe's runs "
              "from the same offline checkpoints. PR does not update the actor in either method; VA does."]
    return "\n".join(lines) + "\n"


def alignment(args) -> tuple:
    results = {}
    reduced_budget = {"o2td3": "ope_updates", "o2sac": "ope_steps"}
    for dataset in args.align_datasets.split(","):
        results[dataset] = {}
        for script in ("o2td3", "o2sac"):
            source = reduced_run(script, dataset, args.num_seeds)
            spec = load_protocol("reduced")["algorithms"][script]
            runs = {f"reduced ({spec[reduced_budget[script]] / 1000:g}k)": alignment_summary(source, args.num_seeds)}
            n = args.align_updates[script]
            run_dir = run_script(script, dataset, ROOT / args.out_root / "alignment" / dataset / f"{script}-{n}",
                                 ["--offline_checkpoint", str(source / "checkpoints" / "offline")]
                                 + protocol_overrides(script) + alignment_args(script, n, args.align_eval_every[script]),
                                 args.num_seeds, args.eval_episodes)
            runs[f"{n / 1000:g}k"] = alignment_summary(run_dir, args.num_seeds)
            results[dataset][script] = runs
    return {"align_updates": args.align_updates, "results": results}, alignment_markdown(
        results, args.num_seeds, args.eval_episodes)


# ---- cal_ql-offline
CALQL_VARIANTS = {  # name -> overrides of the quickstart config (official Cal-QL settings otherwise)
    "quickstart": [],
    "policy_lr 3e-5": ["--policy_lr", "3e-5"],
    "no max-target backup": ["--cql_max_target_backup", "false"],
    "cql_weight 10": ["--cql_weight", "10"],
    "3x updates": ["--offline_updates", "12000"],
    # where O2SAC's CQL phase (which learns this dataset in 4k updates) differs in other ways
    "no calibration (plain CQL)": ["--calibration", "false"],
    "3 hidden layers": ["--policy_hidden", "[128,128,128]", "--critic_hidden", "[128,128,128]"],
    "no orthogonal init": ["--orthogonal_init", "false"],
}


CALQL_DIAGNOSTICS = ("bound_rate", "q_data", "q_rand", "mc_return", "cql_diff")  # offline/<name> block means, metrics.jsonl


def last_per_update(records: list, key: str) -> dict:
    """{update count: the last record with that `key` value} (a resumed run logs its blocks again)."""
    return {int(r[key]): r for r in records if key in r}


def calql_offline(args) -> tuple:
    """Cal-QL's quickstart pre-training (hopper medium, 128-wide networks) with one setting changed at a time."""
    results = {}
    for name, extra in CALQL_VARIANTS.items():
        run_dir = ROOT / args.out_root / "cal_ql-offline" / name.replace(" ", "_").replace("(", "").replace(")", "")
        run_script("cal_ql", "quickstart", run_dir, ["--online_steps", "0", "--offline_eval_every", "2000"] + extra,
                   args.calql_seeds, args.eval_episodes, record=True)
        per_seed = [[r for r in read_jsonl(run_dir / f"seed{s}" / "eval.jsonl") if r["phase"] == "offline"]
                    for s in range(args.calql_seeds)]
        blocks = last_per_update(read_jsonl(run_dir / "metrics.jsonl"), "offline/updates")
        results[name] = {"updates": [r["updates"] for r in per_seed[0]],
                         "scores": [[r["normalized_score"] for r in recs] for recs in per_seed],
                         "lengths": [[r["length"] for r in recs] for recs in per_seed],
                         # training metrics of the block ending at each evaluation (mean over seeds)
                         "diagnostics": [{k: blocks[r["updates"]][f"offline/{k}"] for k in CALQL_DIAGNOSTICS}
                                         for r in per_seed[0]]}
    lines = [f"Cal-QL pre-training on `o2o/hopper/medium-v0` with the quickstart config (128-wide networks), one "
             f"setting changed per row ({args.calql_seeds} seeds, {args.eval_episodes} episodes; `python "
             "benchmarks/probes.py cal_ql-offline`). Normalised score (mean episode length) after n updates, mean over "
             "seeds; then, for the last block of updates before the final evaluation (mean over the block and the "
             "seeds): bound rate = fraction of the CQL term's policy-action Q values below the Monte-Carlo return G "
             "(where the calibration replaces Q by G; logged with the calibration off too), Q(s, a) of the data "
             "actions, how far Q at uniform random actions lies below it, the batch's mean G, and the CQL gap "
             "logsumexp - Q(s, a).", "",
             "| variant | score after n offline updates | bound rate | Q(s, a) | Q(s, a) - Q(s, random) | G | CQL gap |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        sc, ln, d = np.asarray(r["scores"]), np.asarray(r["lengths"]), r["diagnostics"][-1]
        lines.append(f"| {name} | " + "; ".join(f"{n / 1000:g}k: {sc[:, i].mean():.1f} ({ln[:, i].mean():.0f})"
                                               for i, n in enumerate(r["updates"]))
                     + f" | {d['bound_rate']:.2f} | {d['q_data']:.0f} | {d['q_data'] - d['q_rand']:.1f} | "
                       f"{d['mc_return']:.0f} | {d['cql_diff']:.1f} |")
    return {"variants": CALQL_VARIANTS, "results": results}, "\n".join(lines) + "\n"


PROBES = {"pex-switch": (pex_switch, "pex_switch"), "alignment": (alignment, "alignment"),
          "cal_ql-offline": (calql_offline, "cal_ql_offline")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["record"]:  # internal: run_script(record=True)
        record(argv[1], argv[2:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("probe", choices=list(PROBES) + ["all"])
    p.add_argument("--datasets", default="o2o/walker2d/medium-v0,o2o/hopper/medium-replay-v0", help="pex-switch")
    p.add_argument("--official_updates", type=int, default=10000, help="pex-switch: pex.py's own IQL pre-training")
    p.add_argument("--align_datasets", default="o2o/hopper/medium-replay-v0", help="alignment")
    p.add_argument("--align_updates", type=json.loads, default={"o2td3": 20000, "o2sac": 10000},
                   help="alignment: PR and VA updates each, per script (JSON)")
    p.add_argument("--align_eval_every", type=json.loads, default={"o2td3": 5000, "o2sac": 2000},
                   help="alignment: updates between evaluations, per script (JSON)")
    p.add_argument("--calql_seeds", type=int, default=2, help="cal_ql-offline: seeds per variant")
    p.add_argument("--num_seeds", type=int, default=3)
    p.add_argument("--eval_episodes", type=int, default=5)
    p.add_argument("--out_root", default="runs/probes")
    p.add_argument("--results_dir", default=str(RESULTS))
    p.add_argument("--readme", default=str(DOCS / "benchmarks.md"), help="page whose probe sections are replaced")
    p.add_argument("--no_readme", action="store_true")
    args = p.parse_args(argv)
    rc = 0
    for name in (list(PROBES) if args.probe == "all" else [args.probe]):
        fn, section = PROBES[name]
        data, md = fn(args)
        out = Path(args.results_dir) / f"{section}_probe"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(md)
        print(md)
        if not args.no_readme:
            rc = max(rc, update_readme(section, md, Path(args.readme)))
    return rc


if __name__ == "__main__":
    sys.exit(main())
