"""Benchmark sweep: run algorithms x datasets x seeds from a protocol YAML, resumably, and collect one CSV.

    python benchmarks/sweep.py reduced --dry_run       # the plan of benchmarks/protocols/reduced.yaml
    python benchmarks/sweep.py reduced                 # run it: finished runs skipped, unfinished ones resumed
    python benchmarks/sweep.py reduced --only algo=iql,dataset=o2o/hopper/medium-v0 --only algo=cal_ql
    python benchmarks/sweep.py reduced --collect       # only (re)build benchmarks/results/sweep_reduced.csv
    python benchmarks/report.py reduced                # table, curves and README section from that CSV
    python benchmarks/sweep.py reduced --backend ray [--address auto] [--cpus_per_run C] [--gpus_per_run G]
                                                       # one Ray task per run, same plan and results (docs/cluster.md)

A protocol (benchmarks/protocols/*.yaml) names `algorithms` (each with overrides of its TrainConfig, e.g.
budgets; an entry `o2td3-naive: {script: o2td3, ...}` runs a variant of algorithms/o2td3.py under its own
label; an entry's own `command` replaces the protocol's for its runs, e.g. to run a reference implementation
with the same config and overrides (benchmarks/parity.py learn), and its own `datasets` (a subset of the
protocol's) limits it to those, and its own `seeds` replaces the protocol's (e.g. more seeds where an effect
is close to seed noise); `implementation: <label>` names the side an entry is in parity.py's comparison
(not passed to the script); `offline_from: <entry>` starts each of its runs from that earlier entry's
offline checkpoint of the
same dataset and seeds, `--offline_checkpoint <its run dir>/checkpoints/offline`, so variants that differ
only online share one pre-training and start from the same offline policy), `datasets`, `seeds`, optional
`common` overrides for every algorithm, `env` variables, `output_root` and `command` (the command template;
placeholders {python} {algo} {config} {seed} {run_dir} {dataset}). Each run is one subprocess, by default

    python algorithms/<algo>.py --config_path configs/<algo>/<dataset>.yaml --seed S \
        --run_dir <output_root>/<algo>/<dataset>/seed<S> [--key value ...] [--resume]

with HF_HUB_OFFLINE=1 and WANDB_MODE=disabled unless the environment or the protocol's `env` sets them; its
console output is appended to <run_dir>/sweep.log. An algorithm whose overrides set `num_seeds: N` (scripts
with `--num_seeds`: iql, cal_ql) trains up to N consecutive protocol seeds in one process (`--seed S
--num_seeds k`, run dir .../seeds<S>-<S+k-1>, evaluations in <run_dir>/seed<S>/eval.jsonl).

A run is *finished* when <run_dir>/done.json exists: the runner writes it (the run's arguments and a summary)
only after the subprocess exits 0 having written every eval.jsonl. A run dir with checkpoints but no
done.json is continued with `--resume`; a finished run whose arguments differ from the protocol's is an
error (delete it or change `output_root`), never silently reused.

Before anything runs, every input is checked: an unknown algorithm or dataset id, a missing config of an
algorithm that has configs, an override key that is not a field of the algorithm's TrainConfig (read from
the script's source) are errors. An algorithm of the collection whose script or configs do not exist yet
is reported and skipped (an error with --strict).

Wall time: the records' `wall_time` (seconds since the run started, summed over resumed attempts) when they
carry one. Else the runner's: while a run goes it polls its eval.jsonl files and stores, per line, the
seconds of run time (summed over attempts) in <run_dir>/eval_times.json.

CSV (one row per evaluation): algorithm, dataset, seed, finished, phase, step, online_step, updates,
env_steps, normalized_score, return, wall_time, wall_time_source. `step` is the record's own `step` if it
logs one, else `updates` before the online phase and `env_steps` during it; `online_step` is the env step
within the online phase (the record's `online_step`, else `env_steps`), empty for offline evaluations.
"""
import argparse
import ast
import csv
import difflib
import functools
import io
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ROOT / "benchmarks" / "protocols"
RESULTS = ROOT / "benchmarks" / "results"
KNOWN_ALGORITHMS = ("iql", "cal_ql", "o2sac", "o2td3", "o2ppo", "aca", "pex")  # the collection (some still coming)
RESERVED = ("config_path", "seed", "run_dir", "resume", "overwrite", "dataset_id")  # set by the runner, not by overrides
DEFAULT_ENV = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
DEFAULT_COMMAND = ["{python}", "algorithms/{algo}.py", "--config_path", "{config}", "--seed", "{seed}",
                   "--run_dir", "{run_dir}"]
PROTOCOL_KEYS = {"name", "description", "output_root", "seeds", "datasets", "algorithms", "common", "env",
                 "command"}
CSV_COLUMNS = ["algorithm", "dataset", "seed", "finished", "phase", "step", "online_step", "updates", "env_steps",
               "normalized_score", "return", "wall_time", "wall_time_source"]


class SweepError(Exception):
    """A bad protocol, filter or run directory; raised before any run starts."""


# ---------------------------------------------------------------------------------------------- protocol
def protocol_path(name_or_path: str) -> Path:
    """`reduced` -> benchmarks/protocols/reduced.yaml; a path is returned as it is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise SweepError(f"protocol file {p} does not exist")
        return p
    cand = PROTOCOLS / f"{name_or_path}.yaml"
    if not cand.exists():
        known = sorted(q.stem for q in PROTOCOLS.glob("*.yaml"))
        raise SweepError(f"no protocol '{name_or_path}' ({cand} does not exist); known: {known}")
    return cand


def load_protocol(name_or_path) -> dict:
    """The protocol YAML as a dict with defaults filled in (`name` = file stem)."""
    path = protocol_path(str(name_or_path))
    with open(path) as f:
        proto = yaml.safe_load(f) or {}
    if not isinstance(proto, dict):
        raise SweepError(f"{path}: a protocol is a mapping, got {type(proto).__name__}")
    bad = set(proto) - PROTOCOL_KEYS
    if bad:
        raise SweepError(f"{path}: unknown protocol keys {sorted(bad)}; allowed: {sorted(PROTOCOL_KEYS)}")
    for key in ("algorithms", "datasets", "seeds"):
        if not proto.get(key):
            raise SweepError(f"{path}: `{key}` is missing or empty")
    algos = proto["algorithms"]
    if isinstance(algos, list):  # a plain list of names = no overrides
        algos = {a: {} for a in algos}
    if not isinstance(algos, dict):
        raise SweepError(f"{path}: `algorithms` maps algorithm -> overrides (or is a list of names)")
    proto["algorithms"] = {a: dict(o or {}) for a, o in algos.items()}
    for a, o in proto["algorithms"].items():
        if not all(isinstance(k, str) for k in o):
            raise SweepError(f"{path}: overrides of {a} must be a mapping of field names")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in proto["seeds"]):
        raise SweepError(f"{path}: `seeds` must be a list of integers, got {proto['seeds']}")
    if len(set(proto["seeds"])) != len(proto["seeds"]) or len(set(proto["datasets"])) != len(proto["datasets"]):
        raise SweepError(f"{path}: `seeds` and `datasets` must not repeat entries")
    proto.setdefault("name", path.stem)
    proto.setdefault("output_root", f"runs/sweep_{proto['name']}")
    proto["common"] = dict(proto.get("common") or {})
    proto["env"] = {str(k): str(v) for k, v in (proto.get("env") or {}).items()}
    proto["command"] = list(proto.get("command") or DEFAULT_COMMAND)
    try:
        proto["path"] = str(path.resolve().relative_to(ROOT))
    except ValueError:
        proto["path"] = str(path)
    return proto


def config_fields(script: Path) -> set:
    """Field names of `class TrainConfig` in an algorithm script, read from its source (no import, no JAX)."""
    tree = ast.parse(script.read_text(), filename=str(script))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "TrainConfig":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    raise SweepError(f"{script}: no top-level `class TrainConfig` to check the protocol's overrides against")


def known_datasets(root: Path) -> set:
    """Dataset ids of configs/make_configs.py plus those of any config YAML under root/configs/<algo>/."""
    sys.path.insert(0, str(ROOT / "configs"))
    import make_configs  # noqa: E402  (only dataset lists; imports no algorithm)
    out = set(make_configs.LOCOMOTION + make_configs.ANTMAZE + make_configs.ADROIT)
    for algo_dir in (root / "configs").glob("*"):
        if algo_dir.is_dir():
            out |= {str(p.relative_to(algo_dir).with_suffix("")) for p in algo_dir.rglob("*.yaml")
                    if p.name != "quickstart.yaml"}
    return out


def cli_value(v) -> str:
    """A YAML value as pyrallis reads it on the command line."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


def _suggest(word, choices) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=3)
    return f"; did you mean {' or '.join(close)}?" if close else ""


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Run:
    algo: str
    dataset: str
    seeds: list  # consecutive seeds trained together (one unless the protocol sets num_seeds)
    script: Path  # relative to root
    config: Path  # relative to root
    run_dir: Path  # relative to root (or absolute when output_root is)
    overrides: dict
    status: str = "new"  # new | resume | done
    multi_seed: bool = False  # the protocol sets num_seeds: pass --num_seeds len(seeds)
    source: Path = None  # offline_from: the run dir whose checkpoints/offline this run starts from
    command: list = None  # the entry's own command template (else the protocol's)

    @property
    def seed(self) -> int:
        return self.seeds[0]

    @property
    def label(self) -> str:
        return f"{self.algo} {self.dataset} seed{'s' if len(self.seeds) > 1 else ''} " + ",".join(map(str, self.seeds))

    def eval_files(self) -> list:
        """(seed, eval.jsonl path relative to the run dir) per seed."""
        if len(self.seeds) == 1:
            return [(self.seed, Path("eval.jsonl"))]
        return [(s, Path(f"seed{s}") / "eval.jsonl") for s in self.seeds]

    def args(self, command) -> list:
        """The command line without --resume (also what done.json records); the entry's own `command`, if it has
        one, replaces the protocol's `command`."""
        command = self.command or command
        fmt = dict(python=sys.executable, algo=self.script.stem, config=str(self.config), seed=self.seed,
                   run_dir=str(self.run_dir), dataset=self.dataset)
        out = [str(part).format(**fmt) for part in command]
        if self.multi_seed:
            out += ["--num_seeds", str(len(self.seeds))]
        if self.source is not None:
            out += ["--offline_checkpoint", str(self.source / "checkpoints" / "offline")]
        for k, v in self.overrides.items():
            out += [f"--{k}", cli_value(v)]
        return out


@dataclass
class Plan:
    protocol: dict
    root: Path
    runs: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # messages about algorithms not ready yet

    def recorded_args(self, run):
        """The arguments compared with done.json: the command minus the interpreter path."""
        args = run.args(self.protocol["command"])
        return args[1:] if (run.command or self.protocol["command"])[0] == "{python}" else args


def parse_only(only: list) -> dict:
    """['algo=iql,dataset=x', 'algo=cal_ql'] -> list of filters; a run passes if it matches any filter."""
    alias = {"algo": "algo", "algorithm": "algo", "dataset": "dataset", "seed": "seed"}
    filters = []
    for spec in only or []:
        f = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in alias or not value.strip():
                raise SweepError(f"--only {spec!r}: expected key=value[,key=value] with keys algo, dataset, seed")
            f.setdefault(alias[key.strip()], set()).add(value.strip())
        filters.append(f)
    return filters


def seed_groups(seeds: list, n: int) -> list:
    """Split seeds into runs of up to n consecutive integers: [0, 1, 2, 3, 7], 3 -> [[0, 1, 2], [3], [7]]."""
    groups = []
    for s in seeds:
        if groups and len(groups[-1]) < n and s == groups[-1][-1] + 1:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def build_plan(protocol: dict, root: Path = ROOT, only=None, strict=False, check_overrides=True) -> Plan:
    """All runs of the protocol (after --only), each with its status; every input error raised at once.

    check_overrides=False (collecting results) skips the override-key check of the algorithms' TrainConfigs."""
    root = Path(root)
    errors, plan = [], Plan(protocol, root)
    algos, datasets, seeds = protocol["algorithms"], list(protocol["datasets"]), list(protocol["seeds"])
    present = {p.stem for p in (root / "algorithms").glob("*.py") if p.stem != "data"}
    # an entry's name is its label; `script: <algo>` runs a variant of another script (e.g. an ablation)
    scripts = {a: str((o or {}).get("script", a)) for a, o in algos.items()}
    for a in algos:
        if scripts[a] not in KNOWN_ALGORITHMS and scripts[a] not in present:
            hint = _suggest(scripts[a], set(KNOWN_ALGORITHMS) | present)
            errors.append(f"unknown algorithm '{scripts[a]}' (no algorithms/{scripts[a]}.py){hint}")
    known = known_datasets(root)
    for d in datasets:
        if d not in known:
            errors.append(f"unknown dataset id '{d}'{_suggest(d, known)} (known ids: configs/make_configs.py)")
    filters = parse_only(only)
    all_seeds = set(seeds).union(*((o or {}).get("seeds") for o in algos.values()
                                   if isinstance((o or {}).get("seeds"), list)))
    for f in filters:
        for key, universe in (("algo", algos), ("dataset", datasets), ("seed", [str(s) for s in sorted(all_seeds)])):
            for v in f.get(key, ()):
                if v not in universe:
                    errors.append(f"--only {key}={v}: not in the protocol ({', '.join(map(str, universe))})")
    if errors:
        raise SweepError("\n  ".join(["protocol " + protocol["path"] + ":"] + errors))

    for a, overrides in algos.items():
        if filters and not any(a in f.get("algo", {a}) for f in filters):
            continue  # not selected by --only: neither checked nor run
        script = Path("algorithms") / f"{scripts[a]}.py"
        cfg_dir = root / "configs" / scripts[a]
        if not (root / script).exists() or not any(cfg_dir.rglob("*.yaml")):
            what = f"{script} does not exist" if not (root / script).exists() else f"configs/{a}/ has no YAML"
            msg = f"{a}: {what} yet; skipped"
            (errors if strict else plan.skipped).append(msg + (" (--strict)" if strict else ""))
            continue
        fields = config_fields(root / script) if check_overrides else None
        merged = {**protocol["common"], **(overrides or {})}
        merged.pop("script", None)
        merged.pop("implementation", None)  # a report's label of the entry (parity.py), not a config field
        command = merged.pop("command", None)
        entry_datasets = merged.pop("datasets", None)
        entry_seeds = merged.pop("seeds", None)
        if entry_seeds is not None and (not isinstance(entry_seeds, list) or not entry_seeds or len(set(entry_seeds))
                                        != len(entry_seeds) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                       for s in entry_seeds)):
            errors.append(f"{a}: seeds must be a non-empty list of distinct integers, got {entry_seeds!r}")
            entry_seeds = None
        if entry_datasets is not None and (not isinstance(entry_datasets, list) or set(entry_datasets) - set(datasets)):
            errors.append(f"{a}: datasets must be a list of the protocol's datasets, got {entry_datasets!r}")
            entry_datasets = None
        if command is not None and (not isinstance(command, list) or not command):
            errors.append(f"{a}: command must be a non-empty list (a command template), got {command!r}")
            command = None
        num_seeds = merged.pop("num_seeds", None)
        source = merged.pop("offline_from", None)
        if source is not None:
            order = list(algos)
            src_seeds = {**protocol["common"], **(algos.get(source) or {})}.get("num_seeds")
            if source not in algos or order.index(source) >= order.index(a):
                errors.append(f"{a}: offline_from '{source}' must name an entry listed before it"
                              f"{_suggest(str(source), order[:order.index(a)])}")
            elif src_seeds != num_seeds:
                errors.append(f"{a}: offline_from '{source}' trains num_seeds {src_seeds} per run and {a} "
                              f"{num_seeds}: give both the same num_seeds (their runs pair up seed by seed)")
            if "offline_checkpoint" in merged:
                errors.append(f"{a}: set offline_from or offline_checkpoint, not both")
        if num_seeds is not None and (not isinstance(num_seeds, int) or isinstance(num_seeds, bool) or num_seeds < 1):
            errors.append(f"{a}: num_seeds must be a positive integer, got {num_seeds!r}")
            num_seeds = 1
        if num_seeds is not None and check_overrides and "num_seeds" not in fields:
            errors.append(f"{a}: override 'num_seeds' is not a field of TrainConfig in {script} (this script trains "
                          "one seed per process: drop num_seeds)")
        for k in merged if check_overrides else []:
            if k in RESERVED:
                errors.append(f"{a}: override '{k}' is set by the runner (reserved: {', '.join(RESERVED)})")
            elif k not in fields:
                where = "common" if k in protocol["common"] and k not in overrides else a
                errors.append(f"{a}: override '{k}' (from `{where}`) is not a field of TrainConfig in "
                              f"{script}{_suggest(k, fields)}")
        for d in datasets if entry_datasets is None else [d for d in datasets if d in entry_datasets]:
            config = Path("configs") / scripts[a] / f"{d}.yaml"
            if not (root / config).exists():
                errors.append(f"{a}: no config {config} for dataset '{d}' (generate it with "
                              "configs/make_configs.py, or drop the dataset)")
                continue
            # a group runs whole if --only selects one of its seeds
            for group in seed_groups(seeds if entry_seeds is None else entry_seeds, num_seeds or 1):
                if filters and not any(a in f.get("algo", {a}) and d in f.get("dataset", {d})
                                       and any(str(s) in f.get("seed", {str(s)}) for s in group) for f in filters):
                    continue
                name = f"seed{group[0]}" if len(group) == 1 else f"seeds{group[0]}-{group[-1]}"
                run_dir = Path(protocol["output_root"]) / a / d / name
                plan.runs.append(Run(a, d, group, script, config, run_dir, merged, multi_seed=num_seeds is not None,
                                     source=None if source is None else
                                     Path(protocol["output_root"]) / source / d / name, command=command))
    if errors:
        raise SweepError("\n  ".join(["protocol " + protocol["path"] + ":"] + errors))

    for run in plan.runs:
        rd = root / run.run_dir
        done = rd / "done.json"
        if done.exists():
            run.status = "done"
            recorded = json.loads(done.read_text()).get("args")
            if recorded != plan.recorded_args(run):
                errors.append(f"{rd} finished with other arguments than the protocol's:\n    done: "
                              f"{shlex.join(map(str, recorded or []))}\n    now:  "
                              f"{shlex.join(plan.recorded_args(run))}\n    delete that run dir (or its "
                              "done.json to resume it with the new arguments) or change output_root")
        elif ((rd / "checkpoints").is_dir() and any((rd / "checkpoints").iterdir())) or \
                any(_count_lines(rd / f) for _, f in run.eval_files()):
            run.status = "resume"  # (a run killed before its first checkpoint restarts: the script says so)
    if errors:
        raise SweepError("\n  ".join(errors))
    return plan


CHECK_CODE = """
import json, sys, importlib
sys.path.insert(0, "algorithms")
failures = []
for script, args in json.loads(sys.argv[1]):
    try:
        importlib.import_module(script).parse_config(args)
    except BaseException as e:  # pyrallis exits (SystemExit) on an unknown field; __post_init__ raises ValueError
        failures.append([script, args, f"{type(e).__name__}: {e}"])
print(json.dumps(failures))
"""


def check_configs(plan: Plan, env: dict):
    """Parse every unfinished run's command line with its script's own `parse_config` (config file + overrides +
    the dataclass's validation), in one subprocess, before anything runs: a value the script rejects (e.g. an
    evaluation interval that is not a multiple of its update block) fails the sweep now, not hours later.
    Scripts without a top-level `parse_config` are not checked."""
    todo = [(r.script.stem, r.args(plan.protocol["command"])) for r in plan.runs if r.status != "done"]
    todo = [(script, args[args.index(f"algorithms/{script}.py") + 1:]) for script, args in todo
            if f"algorithms/{script}.py" in args and "def parse_config(" in (plan.root / "algorithms" /
                                                                              f"{script}.py").read_text()]
    if not todo:
        return
    out = subprocess.run([sys.executable, "-c", CHECK_CODE, json.dumps(todo)], cwd=plan.root, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SweepError(f"checking the runs' configs failed:\n{out.stderr[-2000:]}")
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    if failures:
        raise SweepError("\n  ".join(["these runs' configs are rejected by their scripts (fix the protocol):"] + [
            f"algorithms/{script}.py {shlex.join(args)}\n    -> {msg}" for script, args, msg in failures]))


def describe(plan: Plan, commands: bool = True) -> str:
    lines = [f"protocol {plan.protocol['name']} ({plan.protocol['path']}): {len(plan.runs)} runs, output "
             f"{plan.protocol['output_root']}"]
    lines += [f"  skipped: {m}" for m in plan.skipped]
    for st in ("done", "resume", "new"):
        n = sum(r.status == st for r in plan.runs)
        if n:
            lines.append(f"  {st}: {n}")
    for run in plan.runs if commands else []:
        args = run.args(plan.protocol["command"]) + (["--resume"] if run.status == "resume" else [])
        lines.append(f"[{run.status:6s}] {shlex.join(args)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- running
def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _write_json(path: Path, obj):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class EvalTimer:
    """Runner-side wall time per eval line of each of a run's eval.jsonl files (seconds of run time, summed over
    attempts, time between attempts excluded). A fallback for scripts whose records carry no `wall_time`."""

    def __init__(self, run_dir: Path, files: list, fresh: bool):
        self.run_dir, self.path, self.files = run_dir, run_dir / "eval_times.json", [str(f) for f in files]
        old = json.loads(self.path.read_text()) if self.path.exists() and not fresh else {}
        self.attempts, self.times = old.get("attempts", []), old.get("eval_wall_time", {})
        self.before = sum(a["seconds"] for a in self.attempts)

    def poll(self, elapsed: float):
        changed = False
        for f in self.files:
            n, times = _count_lines(self.run_dir / f), self.times.get(f, [])
            if n != len(times):  # new lines timed now; dropped lines (truncated on resume) forgotten
                self.times[f] = times[:n] + [round(self.before + elapsed, 2)] * max(0, n - len(times))
                changed = True
        if changed:
            self.save()

    def finish(self, elapsed: float, returncode):
        self.poll(elapsed)
        self.attempts.append({"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() - elapsed)),
                              "seconds": round(elapsed, 2), "returncode": returncode})
        self.save()
        return self.before + elapsed

    def save(self):
        _write_json(self.path, {"attempts": self.attempts, "eval_wall_time": self.times})


def run_env(protocol: dict) -> dict:
    env = dict(os.environ)
    for k, v in DEFAULT_ENV.items():
        env.setdefault(k, v)
    env.update(protocol["env"])
    return env


_procs, _procs_lock, _stopping = set(), threading.Lock(), threading.Event()


def _start_child(cpus=None):
    """In the child before exec: exit with the parent (below), and the CPU affinity of a pinned run."""
    _exit_with_parent()
    if cpus:
        os.sched_setaffinity(0, cpus)


def _exit_with_parent():
    """In the child before exec (Linux): SIGTERM it when the sweep dies, even by SIGKILL, so no run is orphaned
    (a SIGTERMed run writes a checkpoint at its next block boundary and exits)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _load_prctl():
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def run_one(plan: Plan, run: Run, env: dict, wrap=(), poll_s: float = 1.0, cpus=None) -> tuple:
    """Run (or resume) one run as a subprocess; write done.json on success. Returns (run, ok, message).
    `cpus`: the CPUs the run is pinned to (its affinity; OMP_NUM_THREADS = their number unless env sets it)."""
    rd = plan.root / run.run_dir
    rd.mkdir(parents=True, exist_ok=True)
    resume = run.status == "resume"
    if cpus:
        env = {"OMP_NUM_THREADS": str(len(cpus)), **env}
    cmd = list(wrap) + run.args(plan.protocol["command"]) + (["--resume"] if resume else [])
    timer = EvalTimer(rd, [f for _, f in run.eval_files()], fresh=not resume)
    with open(rd / "sweep.log", "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} sweep.py: {shlex.join(cmd)}\n")
        log.flush()
        t0 = time.time()
        if _stopping.is_set():
            return run, False, "not started (interrupted)"
        proc = subprocess.Popen(cmd, cwd=plan.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=functools.partial(_start_child, cpus))
        with _procs_lock:
            _procs.add(proc)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    timer.poll(time.time() - t0)
        finally:
            with _procs_lock:
                _procs.discard(proc)
        total = timer.finish(time.time() - t0, rc)
    if rc != 0:
        return run, False, f"exit code {rc}; see {rd / 'sweep.log'}"
    missing = [str(f) for _, f in run.eval_files() if _count_lines(rd / f) == 0]
    if missing:
        return run, False, f"exited 0 but wrote no {', '.join(missing)}; see {rd / 'sweep.log'}"

    def final(records, online):
        return next((r.get("normalized_score", r.get("return")) for r in reversed(records)
                     if (r.get("phase") == "online") == online), None)
    per_seed = {}
    for seed, f in run.eval_files():
        records = read_records(rd / f)
        per_seed[str(seed)] = {"evals": len(records), "offline_final": final(records, False),
                               "online_final": final(records, True)}
    _write_json(rd / "done.json", {
        "algorithm": run.algo, "dataset": run.dataset, "seeds": run.seeds, "args": plan.recorded_args(run),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_time_s": round(total, 1),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()], **({"cpus": sorted(cpus)} if cpus else {}),
        "cpu": cpu_description(), "attempts": len(timer.attempts), "per_seed": per_seed})
    return run, True, f"done in {total / 60:.1f} min (this attempt {timer.attempts[-1]['seconds'] / 60:.1f} min)"


ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "avx_vnni")


def cpu_description() -> dict:
    """The CPU model and the vector-instruction flags that change XLA:CPU's code: bf16 runs were seen to differ
    between machines whose float32 runs were bit-identical."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return {"model": platform.processor() or platform.machine()}
    field = lambda name: next((line.split(":", 1)[1].strip() for line in info.splitlines()  # noqa: E731
                               if line.startswith(name)), "")
    flags = set(field("flags").split())
    return {"model": field("model name") or platform.machine(), "isa": [f for f in ISA_FLAGS if f in flags]}


def prepare_datasets(plan: Plan, env: dict):
    """Build/fetch each dataset once before parallel runs (concurrent first builds of one dataset would race)."""
    code = ("import sys; sys.path.insert(0, 'algorithms'); import data; "
            "[data.ensure_dataset(d) for d in sys.argv[1:]]")
    todo = sorted({r.dataset for r in plan.runs if r.status != "done"})
    if todo:
        print(f"preparing datasets {todo}", flush=True)
        out = subprocess.run([sys.executable, "-c", code, *todo], cwd=plan.root, env=env)
        if out.returncode != 0:
            print("warning: preparing the datasets failed (see above); the runs will report it", flush=True)


def cpu_groups(jobs: int) -> list:
    """This process's CPUs split into `jobs` disjoint groups of equal size (for --pin)."""
    cpus = sorted(os.sched_getaffinity(0))
    if jobs > len(cpus):
        raise SweepError(f"--pin: {jobs} runs at a time need at least {jobs} CPUs, this process has {len(cpus)}")
    size = len(cpus) // jobs
    return [set(cpus[i * size:(i + 1) * size]) for i in range(jobs)]


def execute(plan: Plan, jobs: int = 1, wrap=(), poll_s: float = 1.0, pin: bool = False) -> list:
    """Run every unfinished run of the plan, `jobs` at a time. Returns [(run, ok, message)]. `pin`: each running
    run gets its own equal share of the CPUs (affinity; OMP_NUM_THREADS to match), so concurrent runs do not
    compete for cores (e.g. --jobs 2 on 2 cores: one core each)."""
    env = run_env(plan.protocol)
    todo = [r for r in plan.runs if r.status != "done"]
    if jobs > 1 and todo:
        prepare_datasets(plan, env)
    results = []
    finished = {r.run_dir: threading.Event() for r in todo}  # set when a run of this sweep ends (ok or not)
    free = queue.Queue()
    for group in cpu_groups(jobs) if pin else [None] * max(1, jobs):
        free.put(group)

    def one(i_run):
        i, run = i_run
        tag = f"[{i + 1}/{len(todo)}] {run.label}"
        try:
            if run.source is not None:
                if run.source in finished:
                    finished[run.source].wait()  # submitted earlier, so already running or done: no deadlock
                if not (plan.root / run.source / "done.json").exists():
                    res = (run, False, f"needs {run.source} finished first (offline_from); it is not")
                    print(f"{tag}: FAILED: {res[2]}", flush=True)
                    return res
            print(f"{tag}: {'resuming' if run.status == 'resume' else 'starting'}", flush=True)
            cpus = free.get()
            try:
                res = run_one(plan, run, env, wrap, poll_s, cpus)
            finally:
                free.put(cpus)
            print(f"{tag}: {'ok, ' if res[1] else 'FAILED: '}{res[2]}", flush=True)
            return res
        finally:
            finished[run.run_dir].set()
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        results = list(pool.map(one, enumerate(todo)))
    except KeyboardInterrupt:
        _stopping.set()
        with _procs_lock:
            for proc in _procs:  # only the runs this process started (each in its own session)
                os.killpg(proc.pid, signal.SIGTERM)
        print("interrupted: running runs stop at their next checkpoint; re-run the same command to resume them",
              flush=True)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return results


# ---------------------------------------------------------------------------------------------- Ray backend
class RunFailed(Exception):
    """A run's process failed (Ray retries the task: the retry resumes from the run's checkpoints)."""


def ray_run(root: str, protocol_path: str, run_dir: str, poll_s: float = 1.0) -> str:
    """Body of one Ray task, on whichever node Ray picks: the run's status is read again from the (shared) run dir,
    so a retried task resumes (--resume) what its killed attempt checkpointed, and a finished run is not redone.
    Exactly the local backend's run_one: the same command, done.json, eval_times.json and sweep.log."""
    protocol = load_protocol(protocol_path)
    plan = build_plan(protocol, Path(root))
    run = next((r for r in plan.runs if str(r.run_dir) == run_dir), None)
    if run is None:
        raise RunFailed(f"{run_dir} is not a run of {protocol_path} any more")
    if run.status == "done":
        return "already finished"
    if run.source is not None and not (plan.root / run.source / "done.json").exists():
        raise RunFailed(f"needs {run.source} finished first (offline_from); it is not")
    _wait_for_lock(plan.root / run.run_dir)
    try:
        _, ok, message = run_one(plan, run, run_env(protocol), (), poll_s)
    except KeyboardInterrupt:  # ray.cancel: the run writes a checkpoint at its next block boundary and exits
        with _procs_lock:
            procs = list(_procs)
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=300)
        raise
    if not ok:
        raise RunFailed(message)
    return message


def _wait_for_lock(run_dir: Path, timeout: float = 600.0):
    """Wait until no process holds the run dir's lock (the scripts' flock on run_dir/.lock): the process of a lost
    task's attempt stops at its next block boundary (SIGTERM from PR_SET_PDEATHSIG) before the retry may start."""
    import fcntl
    path, t0 = run_dir / ".lock", time.time()
    if not path.exists():
        return
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                return
            except OSError:
                if time.time() - t0 > timeout:
                    return  # the script itself refuses with the holder's pid
                time.sleep(1.0)


def execute_ray(plan: Plan, address=None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0, retries: int = 2,
                poll_s: float = 1.0, init_kwargs=None) -> list:
    """Every unfinished run of the plan as one Ray task (resources cpus_per_run / gpus_per_run; a failed or lost
    task retried up to `retries` times, resuming). `address`: 'auto' or HOST:PORT joins a running cluster; None
    starts a local one. Every node must see the repository and `output_root` at the same paths (a shared
    filesystem, e.g. the image's /o2o-jax with output_root on a shared mount). Returns [(run, ok, message)]."""
    import ray
    bench = str(Path(__file__).resolve().parent)

    def task(root, protocol_path, run_dir, poll_s_, *after):  # pickled by value: imports this module on the worker
        import sys as _sys
        if bench not in _sys.path:
            _sys.path.insert(0, bench)
        import sweep as _sweep
        return _sweep.ray_run(root, protocol_path, run_dir, poll_s_)

    todo = [r for r in plan.runs if r.status != "done"]
    if todo:  # datasets built once, here, into the (shared) store: concurrent first builds of one dataset would race
        prepare_datasets(plan, run_env(plan.protocol))
    t0 = time.time()
    if not ray.is_initialized():
        ray.init(address=address, **(init_kwargs or {}))
    print(f"ray: connected in {time.time() - t0:.1f} s; cluster resources {ray.cluster_resources()}", flush=True)
    remote = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=retries,
                        retry_exceptions=True)(task)
    protocol_path = str(Path(plan.protocol["path"]) if Path(plan.protocol["path"]).is_absolute()
                        else plan.root / plan.protocol["path"])
    refs = {}
    for run in todo:  # an offline_from run waits for its source's task (Ray resolves the argument first)
        after = [refs[run.source]] if run.source in refs else []
        refs[run.run_dir] = remote.remote(str(plan.root), protocol_path, str(run.run_dir), poll_s, *after)
        print(f"submitted {run.label}", flush=True)
    by_ref = {ref: run for run, ref in zip(todo, refs.values())}
    pending, results = list(by_ref), []
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            run = by_ref[ready[0]]
            try:
                res = (run, True, ray.get(ready[0]))
            except Exception as e:  # noqa: BLE001 - RunFailed or a lost worker, after the retries
                cause = getattr(e, "cause", None) or e
                res = (run, False, str(cause).strip().splitlines()[-1])
            results.append(res)
            print(f"[{len(results)}/{len(todo)}] {run.label}: {'ok, ' if res[1] else 'FAILED: '}{res[2]}", flush=True)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref)  # the running runs checkpoint and stop; re-run the sweep to resume them
        print("interrupted: running runs stop at their next checkpoint; re-run the same command to resume them",
              flush=True)
        raise
    return results


# ---------------------------------------------------------------------------------------------- collect
def read_records(path: Path) -> list:
    """Complete JSON lines of an eval.jsonl (a half-written last line of a running run is ignored)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def _fmt(v) -> str:
    return "" if v is None else repr(float(v)) if isinstance(v, float) else str(v)


def run_rows(plan: Plan, run: Run) -> list:
    rd = plan.root / run.run_dir
    timed = json.loads((rd / "eval_times.json").read_text()).get("eval_wall_time", {}) \
        if (rd / "eval_times.json").exists() else {}
    return [row for seed, f in run.eval_files() for row in
            _rows(run, seed, read_records(rd / f), timed.get(str(f), []))]


def _rows(run: Run, seed: int, records: list, times: list) -> list:
    rows = []
    for i, r in enumerate(records):
        online = r.get("phase") == "online"
        step = r.get("step", r.get("env_steps") if online else r.get("updates"))
        online_step = r.get("online_step", r.get("env_steps", r.get("step"))) if online else None
        if "wall_time" in r:
            wall, source = r["wall_time"], "record"
        elif i < len(times):
            wall, source = times[i], "runner"
        else:
            wall, source = None, ""
        rows.append({"algorithm": run.algo, "dataset": run.dataset, "seed": seed,
                     "finished": int(run.status == "done"), "phase": r.get("phase", ""), "step": step,
                     "online_step": online_step, "updates": r.get("updates"), "env_steps": r.get("env_steps"),
                     "normalized_score": r.get("normalized_score"), "return": r.get("return"),
                     "wall_time": wall, "wall_time_source": source})
    return rows


def csv_path(protocol: dict, results_dir: Path = RESULTS) -> Path:
    return Path(results_dir) / f"sweep_{protocol['name']}.csv"


def collect(plan: Plan, results_dir: Path = RESULTS) -> Path:
    """(Re)write the protocol's CSV from its run dirs: a pure function of their files (idempotent)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    n = 0
    for run in plan.runs:
        for row in run_rows(plan, run):
            writer.writerow({k: _fmt(v) for k, v in row.items()})
            n += 1
    out = csv_path(plan.protocol, results_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".csv.tmp")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, out)
    started = sum(1 for r in plan.runs for _, f in r.eval_files() if (plan.root / r.run_dir / f).exists())
    print(f"wrote {out}: {n} evaluations of {started} seed runs "
          f"({sum(len(r.seeds) for r in plan.runs if r.status == 'done')} finished)", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- CLI
def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None, root: Path = ROOT, results_dir: Path = RESULTS) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("protocol", help="protocol name in benchmarks/protocols/ (e.g. reduced) or a YAML path")
    p.add_argument("--dry_run", action="store_true", help="print the plan (status, command of each run) only")
    p.add_argument("--collect", action="store_true", help="only (re)build the results CSV from the run dirs")
    p.add_argument("--only", action="append", metavar="algo=A,dataset=D,seed=S",
                   help="run a subset; repeat for a union (a key may repeat inside one filter)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1: the CPU is shared)")
    p.add_argument("--strict", action="store_true", help="an algorithm without script/configs is an error")
    p.add_argument("--wrap", default="", help="prefix every run's command, e.g. --wrap 'nice -n 10'")
    p.add_argument("--results_dir", default=None, help="where the CSV goes (default benchmarks/results)")
    p.add_argument("--pin", action="store_true", help="give each of the --jobs running runs its own share of the "
                                                      "CPUs (affinity), e.g. --jobs 2 --pin: one core each on 2")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: subprocesses on this machine (--jobs at a time); ray: one Ray task per run")
    p.add_argument("--address", default=None, help="ray: 'auto' or HOST:PORT of a running cluster (default: start a "
                                                     "local one)")
    p.add_argument("--cpus_per_run", type=float, default=1.0, help="ray: CPUs each run declares")
    p.add_argument("--gpus_per_run", type=float, default=0.0, help="ray: GPUs each run declares")
    p.add_argument("--retries", type=int, default=2, help="ray: retries of a failed or lost run (each resumes)")
    args = p.parse_args(argv)
    results_dir = Path(args.results_dir) if args.results_dir else results_dir
    if args.backend == "ray" and (args.wrap or args.jobs != 1 or args.pin):
        print("error: --wrap, --jobs and --pin are local-backend options (Ray schedules by --cpus_per_run / "
              "--gpus_per_run)", file=sys.stderr)
        return 2
    if args.backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            print("error: --backend ray needs Ray: pip install -r requirements.txt (it pins ray)", file=sys.stderr)
            return 2
    try:
        if args.pin:
            cpu_groups(args.jobs)
        protocol = load_protocol(args.protocol)
        plan = build_plan(protocol, root, only=args.only, strict=args.strict)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(plan, commands=args.dry_run), flush=True)
    if args.dry_run:
        return 0
    if args.collect:
        collect(build_plan(protocol, root, check_overrides=False), results_dir)  # all runs, whatever --only says
        return 0
    try:
        check_configs(plan, run_env(protocol))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # a killed sweep stops its runs too (they resume later)
    if args.backend == "ray":
        results = execute_ray(plan, args.address, args.cpus_per_run, args.gpus_per_run, args.retries)
    else:
        try:
            results = execute(plan, args.jobs, shlex.split(args.wrap), pin=args.pin)
        except SweepError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    failed = [(r, m) for r, ok, m in results if not ok]
    collect(build_plan(protocol, root, check_overrides=False), results_dir)
    print(f"{len(results) - len(failed)} runs finished now, {sum(r.status == 'done' for r in plan.runs)} were "
          f"already finished, {len(failed)} failed" + "".join(f"\n  {r.label}: {m}" for r, m in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    import sweep as _module  # run as the module `sweep`, not __main__: Ray workers import the same names
    sys.exit(_module.main())
