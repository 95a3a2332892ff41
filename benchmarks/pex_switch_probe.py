"""PEX at the offline -> online switch: how the composite policy scores before any online update.

    python benchmarks/pex_switch_probe.py                    # walker2d medium + hopper medium-replay, 3 seeds
    python benchmarks/pex_switch_probe.py --datasets o2o/walker2d/medium-v0 --official_updates 10000

At the switch PEX adds a randomly initialised policy pi beside the frozen offline policy pi_off and picks each
action by softmax(inv_temperature * Q) over the two candidates. Whether the pre-trained critic ranks pi's
untrained actions below pi_off's decides how much the composite policy loses before learning anything. Every
probe run is `algorithms/pex.py` with `online_steps == initial_collection_steps` (no online update) and one
evaluation at the end (the official evaluation: epsilon-greedy 0.1 for the new policy's action and the gate),
so it measures the gate alone:

  * `reduced` : from the reduced protocol's IQL offline checkpoint (what the `pex` sweep entry loads: iql.py's
                normalised states and return-scaled rewards), evaluation epsilon 0.1 (official);
  * `reduced-greedy` : the same with `eval_epsilon 0` (argmax gate, the new policy's mean);
  * `official` : pex.py's own IQL pre-training with its official locomotion settings (raw rewards, no state
                 normalisation, expectile 0.9, beta 10) for `--official_updates` updates, then the same probe.

Each line of the table: pi_off's deterministic score at the end of pre-training, the composite policy's score at
the switch, and the fraction of evaluation actions the gate took from the untrained policy. Runs go to
runs/pex_switch_probe/ (a finished run is skipped); results to benchmarks/results/pex_switch_probe.{json,md} and
the README section `pex_switch` (`--no_readme` leaves the README alone).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from readme_tables import update_readme  # noqa: E402
from sweep import RESULTS, ROOT, load_protocol  # noqa: E402

PROBE_STEPS = 600  # online env steps, all of them initial collection: no online update happens


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reduced_checkpoint(dataset: str, seeds: int) -> Path:
    """The reduced protocol's IQL offline checkpoint for `dataset` (what its `pex` entry loads)."""
    root = Path(load_protocol("reduced")["output_root"])
    path = ROOT / root / "iql" / dataset / f"seeds0-{seeds - 1}" / "checkpoints" / "offline"
    if not path.exists():
        raise SystemExit(f"no IQL offline checkpoint at {path}: run `python benchmarks/sweep.py reduced --only "
                         f"algo=iql,dataset={dataset}` first (or drop --datasets {dataset})")
    return path


def variants(dataset: str, seeds: int, official_updates: int) -> dict:
    """name -> extra pex.py arguments (on top of the dataset's config and the probe's schedule)."""
    ckpt = str(reduced_checkpoint(dataset, seeds))
    from_iql = ["--offline_checkpoint", ckpt, "--normalize", "true", "--normalize_reward_by_returns", "true"]
    return {
        "reduced": from_iql,
        "reduced-greedy": from_iql + ["--eval_epsilon", "0"],
        "official": ["--offline_updates", str(official_updates), "--offline_eval_every", str(official_updates)],
    }


def run_probe(dataset: str, name: str, extra: list, seeds: int, episodes: int, out_root: Path) -> Path:
    run_dir = out_root / dataset / name
    if all((run_dir / f"seed{s}" / "eval.jsonl").exists() for s in range(seeds)) and (run_dir / "done").exists():
        print(f"done already: {dataset} {name}")
        return run_dir
    cmd = [sys.executable, "algorithms/pex.py", "--config_path", f"configs/pex/{dataset}.yaml", "--seed", "0",
           "--num_seeds", str(seeds), "--run_dir", str(run_dir), "--wandb_mode", "disabled",
           "--eval_episodes", str(episodes), "--online_steps", str(PROBE_STEPS),
           "--initial_collection_steps", str(PROBE_STEPS), "--online_eval_every", str(PROBE_STEPS)] + extra
    print(f"running: {dataset} {name}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    t0 = time.time()
    with open(run_dir / "probe.log", "w") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{dataset} {name}: pex.py failed (exit {rc}); see {run_dir / 'probe.log'}")
    (run_dir / "done").write_text(json.dumps({"cmd": cmd, "wall_time_s": round(time.time() - t0, 1)}))
    return run_dir


def summarize(run_dir: Path, seeds: int) -> list:
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


def markdown(results: dict, seeds: int, episodes: int) -> str:
    lines = [f"PEX at the switch, no online update ({seeds} seeds, {episodes} evaluation episodes each; "
             "`python benchmarks/pex_switch_probe.py`).", "",
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="o2o/walker2d/medium-v0,o2o/hopper/medium-replay-v0")
    p.add_argument("--num_seeds", type=int, default=3)
    p.add_argument("--eval_episodes", type=int, default=5)
    p.add_argument("--official_updates", type=int, default=10000, help="pex.py's own IQL pre-training updates")
    p.add_argument("--out_root", default="runs/pex_switch_probe")
    p.add_argument("--results", default=str(RESULTS / "pex_switch_probe"))
    p.add_argument("--no_readme", action="store_true", help="do not rewrite the README section `pex_switch`")
    args = p.parse_args(argv)
    results = {}
    for dataset in args.datasets.split(","):
        results[dataset] = {}
        for name, extra in variants(dataset, args.num_seeds, args.official_updates).items():
            run_dir = run_probe(dataset, name, extra, args.num_seeds, args.eval_episodes, ROOT / args.out_root)
            results[dataset][name] = summarize(run_dir, args.num_seeds)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"official_updates": args.official_updates,
                                                    "probe_steps": PROBE_STEPS, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, args.num_seeds, args.eval_episodes))
    print(out.with_suffix(".md").read_text())
    return 0 if args.no_readme else update_readme("pex_switch", out.with_suffix(".md").read_text())


if __name__ == "__main__":
    sys.exit(main())
