"""Write one complete YAML per (algorithm, dataset): configs/<algo>/<dataset id>.yaml, configs/<algo>/quickstart.yaml.

    python configs/make_configs.py            # (re)write the YAMLs
    python configs/make_configs.py --check    # exit 1 if a YAML differs from what this script writes

Every value comes from the algorithm's TrainConfig defaults (the main benchmark's values, AntMaze for both
algorithms) plus the per-group overrides below, so the YAMLs cannot drift from the dataclasses: change a
default or an override here and re-run. Sources of the overrides: ALGORITHMS.md sections 4 (Cal-QL) and 5
(IQL), i.e. the official Cal-QL scripts and CORL's IQL configs.
"""
import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "algorithms"))

import pyrallis  # noqa: E402

LOCOMOTION = [f"o2o/{env}/{level}-v0" for env in ("hopper", "walker2d", "halfcheetah")
              for level in ("medium", "medium-replay", "medium-expert", "expert")]
ANTMAZE = [f"D4RL/antmaze/{m}-v1" for m in
           ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")]
ADROIT = [f"D4RL/{task}/cloned-v2" for task in ("pen", "door", "relocate")]
QUICKSTART_DATASET = "o2o/hopper/medium-v0"

IQL = {
    # IQL paper / CORL script defaults for MuJoCo: expectile 0.7, beta 3, rewards scaled by 1000 / return range
    "locomotion": dict(expectile=0.7, beta=3.0, reward_bias=0.0, normalize_reward_by_returns=True,
                       terminate_on_success=False, offline_eval_every=50_000, online_eval_every=10_000,
                       eval_episodes=10),
    # CORL configs/finetune/iql/antmaze/*: expectile 0.9, beta 10, r - 1, 100 episodes every 50k (= defaults)
    "antmaze": dict(),
    # CORL configs/finetune/iql/<task>/cloned_v1.yaml: expectile 0.8, beta 3, dropout 0.1, raw rewards, 10 ep / 5k
    "adroit": dict(expectile=0.8, beta=3.0, actor_dropout=0.1, reward_bias=0.0, terminate_on_success=False,
                   offline_eval_every=5000, online_eval_every=5000, eval_episodes=10),
}
IQL_QUICKSTART = dict(IQL["locomotion"], offline_updates=20_000, online_steps=20_000, offline_eval_every=10_000,
                      online_eval_every=10_000, eval_episodes=10, run_dir="runs/quickstart/iql")

CAL_QL = {
    # not in the official repo (issue nakamotoo/Cal-QL#5): CQL's MuJoCo settings, unverified
    "locomotion": dict(normalize=True, reward_scale=1.0, reward_bias=0.0, mc_failure_rule="none",
                       terminate_on_success=False, cql_lagrange=False, cql_weight=5.0, critic_hidden=[256, 256],
                       offline_eval_every=50_000, online_eval_every=10_000, eval_episodes=10),
    # official scripts/run_antmaze.sh (= defaults)
    "antmaze": dict(),
    # official scripts/run_adroit.sh network sizes and schedule; Minari's dense cloned data with raw rewards
    "adroit": dict(policy_hidden=[512, 512], critic_hidden=[512, 512, 512], cql_weight=1.0, cql_lagrange=False,
                   offline_updates=20_000, offline_eval_every=2000, online_eval_every=2000, eval_episodes=20,
                   reward_scale=1.0, reward_bias=0.0, mc_failure_rule="none", terminate_on_success=False),
}
CAL_QL_ONLINE_STEPS = {"D4RL/pen/cloned-v2": 200_000}  # official: pen 2e5, door / relocate 1e6
CAL_QL_QUICKSTART = dict(CAL_QL["locomotion"], offline_updates=4000, online_steps=4000, update_block=500,
                         offline_eval_every=2000, online_eval_every=2000, eval_episodes=5,
                         policy_hidden=[128, 128], critic_hidden=[128, 128], run_dir="runs/quickstart/cal_ql")


# ---- registry: one entry per algorithm -------------------------------------------------------------------
# module: algorithms/<module>.py; groups: overrides per dataset group (a group missing here gets no configs);
# per_dataset: extra overrides for single datasets; quickstart: the quickstart overrides (dataset_id included).
# Each algorithm adds its own entry below; keep entries self-contained so they can be edited independently.
ALGOS = {
    "iql": dict(module="iql", groups=IQL, per_dataset={}, quickstart=IQL_QUICKSTART),
    "cal_ql": dict(module="cal_ql", groups=CAL_QL,
                   per_dataset={ds: {"online_steps": n} for ds, n in CAL_QL_ONLINE_STEPS.items()},
                   quickstart=CAL_QL_QUICKSTART),
}
# ---- end of registry --------------------------------------------------------------------------------------


def group(dataset_id):
    if dataset_id in LOCOMOTION:
        return "locomotion"
    return "antmaze" if "/antmaze/" in dataset_id else "adroit"


def configs():
    import importlib
    out = {}
    for algo, spec in ALGOS.items():
        module = importlib.import_module(spec["module"])
        for ds in LOCOMOTION + ANTMAZE + ADROIT:
            if group(ds) in spec["groups"]:
                overrides = {**spec["groups"][group(ds)], **spec["per_dataset"].get(ds, {})}
                out[Path(algo) / f"{ds}.yaml"] = module.TrainConfig(dataset_id=ds, **overrides)
        out[Path(algo) / "quickstart.yaml"] = module.TrainConfig(
            **{"dataset_id": QUICKSTART_DATASET, **spec["quickstart"]})
    return out


def render(cfg) -> str:
    buf = io.StringIO()
    pyrallis.dump(cfg, buf)
    header = "# generated by configs/make_configs.py from the TrainConfig defaults: edit there and re-run\n"
    return header + buf.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only compare, exit 1 on a difference")
    args = p.parse_args(argv)
    here = Path(__file__).resolve().parent
    stale = []
    for rel, cfg in configs().items():
        path, text = here / rel, render(cfg)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(rel))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print("out of date (run python configs/make_configs.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
