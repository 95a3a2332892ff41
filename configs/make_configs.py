"""Write one complete YAML per (algorithm, dataset): configs/<algo>/<dataset id>.yaml, configs/<algo>/quickstart.yaml.

    python configs/make_configs.py            # (re)write the YAMLs
    python configs/make_configs.py --check    # exit 1 if a YAML differs from what this script writes

Every value comes from the algorithm's TrainConfig defaults (the main benchmark's values, AntMaze for both
algorithms) plus the per-group overrides below, so the YAMLs cannot drift from the dataclasses: change a
default or an override here and re-run. Sources of the overrides: the official Cal-QL scripts and CORL's IQL
configs.
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


O2TD3 = {
    # OCR-CFT config/finetune/O2TD3/<env>/medium_v2.yaml, medium_replay_v2.yaml (= the TrainConfig defaults)
    "locomotion": dict(),
    # official O2TD3 AntMaze configs exist only for umaze and umaze-diverse (identical values); they are used for
    # all six mazes here (medium/large are NOT official O2TD3 settings). Reward r - 1, no critic LayerNorm,
    # 1M alignment steps, 200k online steps, 100 episodes every 5000 env steps.
    "antmaze": dict(reward_bias=-1.0, terminate_on_success=True, critic_layernorm=False, align_updates=1_000_000,
                    online_steps=200_000, online_eval_every=5000, eval_episodes=100),
}
# official expert_v2.yaml / medium_expert_v2.yaml: less exploration noise, much tighter threshold schedule
O2TD3_EXPERT = dict(explore_noise=0.05, threshold=2.5e-5, end_threshold=6.25e-4)
O2TD3_QUICKSTART = dict(offline_updates=20_000, ope_updates=5000, align_updates=10_000, online_steps=20_000,
                        end_steps=20_000, offline_eval_every=5000, online_eval_every=2000, eval_episodes=10,
                        run_dir="runs/quickstart/o2td3")

ACA = {
    # official configs/{offline,online}/mjc_m.yaml (MuJoCo medium) = the TrainConfig defaults: ML weight 30, squashed
    # policy, target entropy -|A|, beta 7, interpolation [1, 40, 0.5], n_trajs 0 (online buffer starts empty)
    "locomotion": dict(),
    # official configs/{offline,online}/antmaze.yaml (one file for all mazes): Gaussian with a std parameter,
    # target entropy -0.5|A|, beta 3, interpolation [1, 200, 0.5], n_trajs 0; rewards r - 1 online only (run_aca.py)
    "antmaze": dict(squashed_policy=False, target_entropy_coef=0.5, beta=3.0, interpolation=[1.0, 200.0, 0.5],
                    online_reward_bias=-1.0, terminate_on_success=True),
}
# official mjc_mr.yaml: medium-replay seeds the online buffer with the top-50 offline episodes;
# mjc_me.yaml / mjc_e.yaml: beta 15, w fixed at 1, top-50 seeding
ACA_PER_DATASET = {ds: (dict(n_trajs=50) if "medium-replay" in ds else
                        dict(beta=15.0, interpolation=[1.0, 100.0, 1.0], n_trajs=50))
                   for ds in LOCOMOTION if "replay" in ds or "expert" in ds}
ACA_QUICKSTART = dict(ACA["locomotion"], offline_updates=20_000, online_steps=20_000, offline_eval_every=10_000,
                      online_eval_every=5000, eval_episodes=10, hidden_dims=[128, 128], run_dir="runs/quickstart/aca")

PEX = {
    # official README locomotion example (`--tau 0.9 --beta 10.0`, 10 episodes); raw rewards, no state normalisation,
    # evaluation every 10k offline updates / env steps (official --eval_period); per-task paper values unverified
    "locomotion": dict(expectile=0.9, beta=10.0, reward_bias=0.0, terminate_on_success=False,
                       offline_eval_every=10_000, online_eval_every=10_000, eval_episodes=10),
    # official README AntMaze commands (`--tau 0.9 --beta 10.0 --eval_episode_num 100`), r - 1 (= the defaults)
    "antmaze": dict(),
}
PEX_QUICKSTART = dict(PEX["locomotion"], offline_updates=20_000, online_steps=20_000, run_dir="runs/quickstart/pex")

O2PPO = {
    # OCR-CFT config/finetune/O2PPO/<env>/medium_v2.yaml (K_epochs 10, end_steps 250k, 10 episodes every 2500 env
    # steps) and offline/iql.py's MuJoCo defaults (expectile 0.7, beta 3, raw rewards) = the TrainConfig defaults
    "locomotion": dict(),
    # official O2PPO antmaze/*.yaml (100 episodes; else as MuJoCo) + config/offline/iql/antmaze/*.yaml (expectile 0.9,
    # beta 10, IQL rewards r - 1; PPO and the value re-evaluation use the raw 0/1 rewards)
    "antmaze": dict(eval_episodes=100, expectile=0.9, beta=10.0, iql_reward_bias=-1.0, terminate_on_success=True),
}
# official per-dataset values: halfcheetah use_reward_scaling (dynamic); *expert*: end_steps 500k;
# hopper *expert*: K_epochs 5 and reset_std(log 0.05) of actor and reference
O2PPO_PER_DATASET = {ds: {**(dict(dynamic_reward_scaling=True) if "halfcheetah" in ds else {}),
                          **(dict(end_steps=500_000) if "expert" in ds else {}),
                          **(dict(ppo_epochs=5, std_cap=0.05) if "hopper" in ds and "expert" in ds else {})}
                     for ds in LOCOMOTION if "halfcheetah" in ds or "expert" in ds}
O2PPO_QUICKSTART = dict(offline_updates=40_000, offline_eval_every=20_000, reevaluation_updates=20_000,
                        reevaluation_eval_every=10_000, online_steps=100_000, end_steps=100_000, evaluate_freq=5000,
                        run_dir="runs/quickstart/o2ppo")

O2SAC = {
    # OCR-CFT config/finetune/O2SAC/<env>/medium_v2.yaml, medium_replay_v2.yaml + offline/cql.py MuJoCo defaults
    # (= the TrainConfig defaults)
    "locomotion": dict(),
    # official O2SAC antmaze/*.yaml (single critic, 5 x 256 LayerNorm critics, 1M alignment, 200k online, 100
    # episodes every 5000 env steps, warmup 5000, log_freq 50k, 10 r - 5, no state normalisation) + official
    # config/offline/cql/antmaze/*.yaml (weight 5, Lagrange gap 0.8, max backup, clip -200, 5 x 256, policy lr 1e-4);
    # CQL evaluations every 50k updates (official: 100 episodes every 5k, only logged)
    "antmaze": dict(double_critic=False, critic_hidden=[256] * 5, align_steps=1_000_000, online_steps=200_000,
                    online_eval_every=5000, eval_episodes=100, warmup_steps=5000, reconstruct_eval_every=50_000,
                    normalize=False, reward_scale=10.0, reward_bias=-5.0, terminate_on_success=True,
                    offline_eval_every=50_000, cql_policy_lr=1e-4, cql_weight=5.0, cql_lagrange=True,
                    cql_target_action_gap=0.8, cql_max_target_backup=True, cql_clip_diff_min=-200.0,
                    cql_critic_hidden=[256] * 5),
}
# official expert_v2.yaml / medium_expert_v2.yaml: alpha 0.5, KL thresholds 0.005 -> 0.125;
# antmaze medium-* / large-*: alpha 0.5, lambda 2 (umaze, umaze-diverse: alpha 0.2, lambda 1 = defaults)
O2SAC_PER_DATASET = {**{ds: dict(alpha=0.5, threshold=0.005, end_threshold=0.125) for ds in LOCOMOTION
                        if "expert" in ds},
                     **{ds: dict(alpha=0.5, lmbda=2.0) for ds in ANTMAZE if "umaze" not in ds}}
O2SAC_QUICKSTART = dict(offline_updates=4000, ope_steps=2000, align_steps=4000, online_steps=5000, utd=2,
                        end_steps=5000, update_block=500, offline_eval_every=2000, reconstruct_eval_every=2000,
                        online_eval_every=1000, eval_episodes=5, policy_hidden=[128] * 3, critic_hidden=[128] * 3,
                        cql_critic_hidden=[128] * 3, cql_policy_lr=1e-4, run_dir="runs/quickstart/o2sac")

# ---- registry: one entry per algorithm -------------------------------------------------------------------
# module: algorithms/<module>.py; groups: overrides per dataset group (a group missing here gets no configs);
# per_dataset: extra overrides for single datasets; quickstart: the quickstart overrides (dataset_id included).
# Each algorithm adds its own entry below; keep entries self-contained so they can be edited independently.
ALGOS = {
    "iql": dict(module="iql", groups=IQL, per_dataset={}, quickstart=IQL_QUICKSTART),
    "cal_ql": dict(module="cal_ql", groups=CAL_QL,
                   per_dataset={ds: {"online_steps": n} for ds, n in CAL_QL_ONLINE_STEPS.items()},
                   quickstart=CAL_QL_QUICKSTART),
    "o2td3": dict(module="o2td3", groups=O2TD3,
                  per_dataset={ds: O2TD3_EXPERT for ds in LOCOMOTION if "expert" in ds},
                  quickstart=O2TD3_QUICKSTART),
    "aca": dict(module="aca", groups=ACA, per_dataset=ACA_PER_DATASET, quickstart=ACA_QUICKSTART),
    "pex": dict(module="pex", groups=PEX, per_dataset={}, quickstart=PEX_QUICKSTART),
    "o2ppo": dict(module="o2ppo", groups=O2PPO, per_dataset=O2PPO_PER_DATASET, quickstart=O2PPO_QUICKSTART),
    "o2sac": dict(module="o2sac", groups=O2SAC, per_dataset=O2SAC_PER_DATASET, quickstart=O2SAC_QUICKSTART),
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
