"""Benchmark sweep and report: the report's numbers on a hand-made CSV, the runner's skip/resume logic with a fake
algorithm script, --collect idempotence, clear input errors, and one tiny real IQL run through the smoke protocol."""
import csv
import os
import signal
import subprocess
import sys
import time
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import report
import sweep

ROOT = Path(__file__).resolve().parent.parent
DATASET = "o2o/hopper/medium-v0"

# A stand-in for algorithms/<algo>.py: same CLI shape, eval.jsonl (run_dir/seed<S>/eval.jsonl with --num_seeds > 1)
# + checkpoints, --resume continues from the checkpointed eval count; a file `crash_after` in the run dir makes
# one attempt exit 3 after that many evals, a file `kill_parent` makes it SIGKILL the process that started it (a
# lost Ray worker; never with the local backend: that is the test). Its records carry no wall_time.
FAKE_SCRIPT = '''
import argparse, json, sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrainConfig:
    dataset_id: str = ""
    seed: int = 0
    run_dir: str = ""
    resume: bool = False
    offline_updates: int = 2  # offline evaluations
    online_steps: int = 3  # online evaluations, 100 env steps apart
    num_seeds: int = 1  # seeds seed..seed+num_seeds-1 in one process
    offline_checkpoint: str = ""  # must exist when given (exit 4 otherwise)


p = argparse.ArgumentParser()
for name in ("--config_path", "--run_dir", "--offline_checkpoint"):
    p.add_argument(name)
for name in ("--seed", "--offline_updates", "--online_steps", "--num_seeds"):
    p.add_argument(name, type=int, default=TrainConfig.__dict__.get(name[2:], 0))
p.add_argument("--resume", action="store_true")
a = p.parse_args()
rd, start = Path(a.run_dir), 0
if a.offline_checkpoint and not Path(a.offline_checkpoint).exists():
    sys.exit(4)
rd.mkdir(parents=True, exist_ok=True)
with open(rd / "calls.log", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
import os
(rd / "affinity").write_text(json.dumps([sorted(os.sched_getaffinity(0)), os.environ.get("OMP_NUM_THREADS")]))
if (rd / "hang").exists():  # for the orphan test: say who we are, then wait to be killed
    import os, time
    (rd / "pid").write_text(str(os.getpid()))
    time.sleep(600)
seeds = [a.seed + i for i in range(a.num_seeds)]
evs = {s: rd / "eval.jsonl" if a.num_seeds == 1 else rd / f"seed{s}" / "eval.jsonl" for s in seeds}
ck = rd / "checkpoints" / "n"
if a.resume and ck.exists():
    start = int(ck.read_text())
for ev in evs.values():
    ev.parent.mkdir(exist_ok=True)
    lines = ev.read_text().splitlines()[:start] if ev.exists() else []
    ev.write_text("".join(line + "\\n" for line in lines))
crash = int((rd / "crash_after").read_text()) if (rd / "crash_after").exists() else -1
(rd / "crash_after").unlink(missing_ok=True)
kill = int((rd / "kill_parent").read_text()) if (rd / "kill_parent").exists() else -1
(rd / "kill_parent").unlink(missing_ok=True)
plan = [("offline", u, 0) for u in range(1, a.offline_updates + 1)] + \\
       [("online", a.offline_updates, 100 * s) for s in range(1, a.online_steps + 1)]
for i in range(start, len(plan)):
    phase, updates, env_steps = plan[i]
    for seed, ev in evs.items():
        with open(ev, "a") as f:
            f.write(json.dumps({"phase": phase, "updates": updates, "env_steps": env_steps,
                                "normalized_score": 10.0 * i + seed, "return": 100.0 * i}) + "\\n")
    ck.parent.mkdir(exist_ok=True)
    ck.write_text(str(i + 1))
    if i + 1 == a.offline_updates:
        (ck.parent / "offline").write_text("offline state")
    if i + 1 - start == crash:
        sys.exit(3)
    if i + 1 - start == kill:
        import os, signal, time
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)  # ended by PR_SET_PDEATHSIG (set by sweep.py) when its parent dies
'''


@pytest.fixture
def fake_root(tmp_path):
    """A project root with one fake algorithm `fake` and its config for DATASET; a protocol for it."""
    root = tmp_path / "root"
    (root / "algorithms").mkdir(parents=True)
    (root / "algorithms" / "fake.py").write_text(FAKE_SCRIPT)
    cfg = root / "configs" / "fake" / f"{DATASET}.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"dataset_id: {DATASET}\n")
    proto = {"name": "fake", "output_root": "out", "seeds": [0, 1], "datasets": [DATASET],
             "algorithms": {"fake": {"online_steps": 3}}}
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(proto))
    return root, path


def write_protocol(path, **changes):
    proto = yaml.safe_load(path.read_text())
    proto.update(changes)
    path.write_text(yaml.safe_dump(proto))
    return path


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_pin_gives_each_running_run_its_own_cpus(fake_root, tmp_path):
    import os
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    root, proto = fake_root
    assert sweep.main([str(proto), "--jobs", "2", "--pin"], root=root, results_dir=tmp_path) == 0
    seen = [json.loads((root / "out" / "fake" / DATASET / f"seed{s}" / "affinity").read_text()) for s in (0, 1)]
    (a, omp_a), (b, omp_b) = seen
    assert a and b and not set(a) & set(b) and omp_a == str(len(a)) and omp_b == str(len(b))
    done = json.loads((root / "out" / "fake" / DATASET / "seed0" / "done.json").read_text())
    assert done["cpus"] == a
    n = len(os.sched_getaffinity(0))
    assert sweep.main([str(proto), "--jobs", str(n + 1), "--pin"], root=root, results_dir=tmp_path) == 2
    assert sweep.cpu_groups(2)[0] | sweep.cpu_groups(2)[1] <= set(os.sched_getaffinity(0))
    with pytest.raises(sweep.SweepError, match="need at least"):
        sweep.cpu_groups(n + 1)


# ---- report
def fake_csv(path):
    """Algorithm A: 3 finished seeds (+1 unfinished, ignored); B: 1 seed. Online evals at 600/1100/3000/5000/10000."""
    online = {0: [30, 20, 5, 85, 80], 1: [35, 25, 0, 100, 90], 2: [40, 30, -5, 90, 70], 3: [0, 0, 0, 0, 0]}
    rows = []
    for seed, scores in online.items():
        rows.append(dict(algorithm="A", seed=seed, phase="offline", step=1000, normalized_score=10))
        rows.append(dict(algorithm="A", seed=seed, phase="offline", step=2000, normalized_score=50 + 10 * seed))
        rows.append(dict(algorithm="A", seed=seed, phase="alignment", step=2500, normalized_score=70 + seed))
        for i, (step, score) in enumerate(zip([600, 1100, 3000, 5000, 10000], scores)):
            rows.append(dict(algorithm="A", seed=seed, phase="online", step=step, online_step=step,
                             normalized_score=score, wall_time=60 * (10 + seed) * (i + 1) / 5))
    for i, (step, score) in enumerate([(0, 40), (2000, 10), (4000, 60)]):
        rows.append(dict(algorithm="B", seed=0, phase="offline" if i == 0 else "online", step=step,
                         online_step=step if i else "", normalized_score=score, wall_time=100.0 * i))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, sweep.CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({"dataset": DATASET, "finished": int(r["seed"] != 3), "wall_time_source": "runner", **r})


def test_report_numbers_curves_and_readme(tmp_path):
    fake_csv(tmp_path / "sweep_fake.csv")
    proto = tmp_path / "fake.yaml"
    proto.write_text(yaml.safe_dump({"name": "fake", "seeds": [0, 1, 2], "datasets": [DATASET],
                                     "algorithms": {"A": {"online_steps": 10000, "wandb_mode": "disabled"},
                                                    "B": None, "C": {"offline_updates": 50000}}}))
    readme, doc = tmp_path / "README.md", tmp_path / "docs" / "benchmarks.md"
    readme.write_text("# x\n<!-- results_headline:begin -->\nold\n<!-- results_headline:end -->\ntail\n")
    doc.parent.mkdir()
    doc.write_text("# y\n<!-- results:begin -->\nold\n<!-- results:end -->\ntail\n")
    args = [str(proto), "--results_dir", str(tmp_path), "--readme", str(readme), "--doc", str(doc)]
    assert report.main(args) == 0
    md = (tmp_path / "sweep_fake.md").read_text()
    row_a = next(line for line in md.splitlines() if line.startswith("| A |"))
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    # seeds, pre-training, before online, online last, best (85/100/90), dip over evals <= 1100 (20/25/30), steps, wall
    assert cells[2:] == ["3", "60.0 ± 10.0", "71.0 ± 1.0", "80.0 ± 10.0", "91.7 ± 7.6", "25.0 ± 5.0", "0.0 ± 5.0",
                         "10,000", "11 ± 1"]  # ... dip, online min (5/0/-5), steps, wall
    row_b = next(line for line in md.splitlines() if line.startswith("| B |"))
    assert [c.strip() for c in row_b.strip("|").split("|")][2:9] == ["1", "40.0", "40.0", "60.0", "60.0", "10.0",
                                                                      "10.0"]
    assert "seeds 0, 1, 2" in md and "online_steps 10k" in md and "offline_updates 50k" in md
    assert "wandb_mode" not in md and "No results yet: C." in md and "last" in md and "best" in md
    png = tmp_path / "sweep_fake_curves.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    assert "![learning curves](sweep_fake_curves.png)" in md  # image links relative to the page they are in
    text = doc.read_text()  # the full report in the docs page
    assert "old" not in text and row_a in text and text.endswith("<!-- results:end -->\ntail\n")
    assert "![learning curves](../sweep_fake_curves.png)" in text
    text = readme.read_text()  # the README's short table: pre-training -> online last ± std, and a link to the page
    assert "old" not in text and text.endswith("<!-- results_headline:end -->\ntail\n")
    assert "| A | 60.0 → 80.0 ± 10.0 |" in text and "| B | 40.0 → 60.0 |" in text and "| C |" not in text
    assert "[docs/benchmarks.md](docs/benchmarks.md)" in text
    readme.write_text("# no markers\n")  # the files are still written; the missing markers are a clear error
    assert report.main(args) == 2


def test_committed_generated_sections_match_their_generators():
    """Each generated section sits once, in the page its generator writes by default (README.md: the short results
    table; docs/: the long ones), and holds exactly what the generator writes from the committed results files."""
    import re
    import dataset_report
    import precision
    import speed_table
    from readme_tables import DOCS, README
    sections = {}
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        for m in re.finditer(r"<!-- (\w+):begin -->\n(.*?)\n<!-- \1:end -->", page.read_text(), re.S):
            assert m.group(1) not in sections, f"section {m.group(1)} twice"
            sections[m.group(1)] = (page, m.group(2))
    results = ROOT / "benchmarks" / "results"
    protocol = sweep.load_protocol("reduced")
    rows = report.read_rows(results / "sweep_reduced.csv")
    summary = report.summarize(rows)
    algos = report.ordered({a for a, _ in summary}, list(protocol["algorithms"]))
    datasets = report.ordered({d for _, d in summary}, list(protocol["datasets"]))
    png = results / "sweep_reduced_curves.png"
    expected = {
        "results_headline": (README, report.headline(protocol, summary, algos, datasets, "docs/benchmarks.md")),
        "results": (DOCS / "benchmarks.md", report.markdown(protocol, summary, rows, algos, datasets,
                                                            results / "sweep_reduced.csv", png, False, DOCS)),
        "speed": (DOCS / "speed.md", speed_table.table(json.loads((results / "bench_updates.json").read_text()),
                                                       json.loads((results / "quickstart_times.json").read_text()))),
        "datasets": (dataset_report.DOC, dataset_report.markdown(json.loads((results / "datasets.json").read_text()))),
        **{s: (DOCS / "benchmarks.md", (results / f"{s}_probe.md").read_text())
           for s in ("pex_switch", "alignment", "cal_ql_offline")},
        "precision": (DOCS / "speed.md", precision.table(json.loads((results / "precision.json").read_text())))}
    for name, (page, text) in expected.items():
        assert sections[name][0] == page, (name, sections[name][0])
        assert sections[name][1] == text.strip(), f"section {name} differs from what its generator writes"
    assert sections["behavior"][0] == dataset_report.DOC  # needs the training curves' files: its place only


def test_mean_curve_interpolates_onto_common_steps():
    x, m, s = report.mean_curve([(np.array([0.0, 10.0]), np.array([0.0, 10.0])),
                                 (np.array([0.0, 5.0, 12.0]), np.array([0.0, 10.0, 12.0]))])
    np.testing.assert_allclose(x, [0, 5, 10])  # up to the shorter seed's end
    np.testing.assert_allclose(m, [0, 7.5, (10 + 10 + 2 * 5 / 7) / 2])
    np.testing.assert_allclose(s[1], np.std([5, 10], ddof=1))


# ---- runner
def test_finished_runs_skipped_unfinished_resumed(fake_root, tmp_path):
    root, proto = fake_root
    results = tmp_path / "results"
    seed1 = root / "out" / "fake" / DATASET / "seed1"
    seed1.mkdir(parents=True)
    (seed1 / "crash_after").write_text("2")  # the first attempt of seed 1 dies after 2 evaluations
    assert sweep.main([str(proto)], root=root, results_dir=results) == 1
    seed0 = root / "out" / "fake" / DATASET / "seed0"
    assert (seed0 / "done.json").exists() and not (seed1 / "done.json").exists()
    assert len(sweep.read_records(seed1 / "eval.jsonl")) == 2

    plan = sweep.build_plan(sweep.load_protocol(proto), root)
    assert [r.status for r in plan.runs] == ["done", "resume"]
    assert sweep.main([str(proto)], root=root, results_dir=results) == 0
    calls0, calls1 = ((d / "calls.log").read_text().splitlines() for d in (seed0, seed1))
    assert len(calls0) == 1  # finished: not run again
    assert len(calls1) == 2 and "--resume" not in calls1[0] and calls1[1].endswith("--resume")
    evals = sweep.read_records(seed1 / "eval.jsonl")
    assert [e["normalized_score"] for e in evals] == [1, 11, 21, 31, 41]  # continued, nothing repeated
    done = json.loads((seed1 / "done.json").read_text())
    assert done["attempts"] == 2 and done["per_seed"]["1"] == {"evals": 5, "offline_final": 11, "online_final": 41}
    assert done["args"][:2] == ["algorithms/fake.py", "--config_path"] and "--online_steps" in done["args"]
    times = json.loads((seed1 / "eval_times.json").read_text())["eval_wall_time"]["eval.jsonl"]
    assert len(times) == 5 and times == sorted(times)
    assert sweep.main([str(proto)], root=root, results_dir=results) == 0  # all finished: nothing runs
    assert len((seed1 / "calls.log").read_text().splitlines()) == 2


def test_killed_sweep_leaves_no_orphan_run(fake_root, tmp_path):
    """SIGKILL of the sweep (no chance to clean up) still ends its running run: the run is told to stop (SIGTERM)
    when its parent dies, so a re-run of the sweep never finds a second process on the same run directory."""
    root, proto = fake_root
    write_protocol(proto, seeds=[0])
    seed0 = root / "out" / "fake" / DATASET / "seed0"
    seed0.mkdir(parents=True)
    (seed0 / "hang").write_text("")
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import sweep; "
            "sweep.main([sys.argv[2]], root=Path(sys.argv[3]), results_dir=Path(sys.argv[4]))")
    sweeper = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "benchmarks"), str(proto), str(root),
                                str(tmp_path / "results")])
    deadline = time.time() + 60
    while not (seed0 / "pid").exists() and time.time() < deadline:
        time.sleep(0.2)
    child = int((seed0 / "pid").read_text())
    sweeper.kill()
    sweeper.wait()

    def alive(pid):
        try:
            return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    if alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the run outlived the killed sweep")


def test_collect_is_idempotent(fake_root, tmp_path):
    root, proto = fake_root
    results = tmp_path / "results"
    assert sweep.main([str(proto)], root=root, results_dir=results) == 0
    out = results / "sweep_fake.csv"
    first = out.read_bytes()
    assert sweep.main([str(proto), "--collect"], root=root, results_dir=results) == 0
    assert sweep.main([str(proto), "--collect"], root=root, results_dir=results) == 0
    assert out.read_bytes() == first
    rows = read_csv(out)
    assert list(rows[0]) == sweep.CSV_COLUMNS and len(rows) == 2 * 5
    offline = [r for r in rows if r["phase"] == "offline"]
    online = [r for r in rows if r["phase"] == "online"]
    assert all(r["online_step"] == "" and r["step"] == r["updates"] for r in offline)
    assert [r["online_step"] for r in online[:3]] == ["100", "200", "300"]
    assert all(r["finished"] == "1" and r["wall_time_source"] == "runner" and float(r["wall_time"]) >= 0
               for r in rows)
    assert {(r["seed"], r["normalized_score"]) for r in rows if r["online_step"] == "300"} == {("0", "40.0"),
                                                                                               ("1", "41.0")}


def test_num_seeds_groups_consecutive_seeds(fake_root, tmp_path):
    root, proto = fake_root
    write_protocol(proto, seeds=[0, 1, 2, 5], algorithms={"fake": {"num_seeds": 2}})
    plan = sweep.build_plan(sweep.load_protocol(proto), root)
    assert [(r.seeds, r.run_dir.name) for r in plan.runs] == [([0, 1], "seeds0-1"), ([2], "seed2"), ([5], "seed5")]
    assert "--seed 0 --run_dir out/fake/o2o/hopper/medium-v0/seeds0-1 --num_seeds 2" in " ".join(
        plan.runs[0].args(plan.protocol["command"]))
    assert "--num_seeds 1" in " ".join(plan.runs[1].args(plan.protocol["command"]))
    only = sweep.build_plan(sweep.load_protocol(proto), root, only=["seed=1"])
    assert [r.seeds for r in only.runs] == [[0, 1]]  # a group runs whole
    assert sweep.main([str(proto)], root=root, results_dir=tmp_path) == 0
    group = root / "out" / "fake" / DATASET / "seeds0-1"
    assert (group / "seed1" / "eval.jsonl").exists()
    assert sorted(json.loads((group / "done.json").read_text())["per_seed"]) == ["0", "1"]
    rows = read_csv(tmp_path / "sweep_fake.csv")
    assert sorted({r["seed"] for r in rows}) == ["0", "1", "2", "5"] and len(rows) == 4 * 5
    assert {r["normalized_score"] for r in rows if r["seed"] == "1" and r["online_step"] == "300"} == {"41.0"}
    assert all(r["wall_time"] for r in rows)
    write_protocol(proto, algorithms={"fake": {"num_seeds": 0}})
    with pytest.raises(sweep.SweepError, match="num_seeds must be a positive integer"):
        sweep.build_plan(sweep.load_protocol(proto), root)


def test_offline_from_starts_a_variant_from_its_sources_offline_checkpoint(fake_root, tmp_path, capsys):
    root, proto = fake_root
    write_protocol(proto, seeds=[0, 1, 2], algorithms={
        "fake": {"num_seeds": 2},
        "fake-variant": {"script": "fake", "num_seeds": 2, "offline_from": "fake", "online_steps": 2}})
    plan = sweep.build_plan(sweep.load_protocol(proto), root)
    variant = [r for r in plan.runs if r.algo == "fake-variant"]
    assert [r.source for r in variant] == [Path("out/fake") / DATASET / n for n in ("seeds0-1", "seed2")]
    src2 = root / "out" / "fake" / DATASET / "seed2"
    src2.mkdir(parents=True)
    (src2 / "crash_after").write_text("1")  # the source of seed 2 fails before its offline checkpoint
    assert sweep.main([str(proto)], root=root, results_dir=tmp_path) == 1
    out = capsys.readouterr().out
    assert f"fake-variant {DATASET} seed 2: FAILED: needs out/fake/{DATASET}/seed2 finished first" in out
    group = root / "out" / "fake-variant" / DATASET / "seeds0-1"
    call = (group / "calls.log").read_text()
    assert f"--offline_checkpoint out/fake/{DATASET}/seeds0-1/checkpoints/offline" in call
    assert (group / "done.json").exists() and not (root / "out" / "fake-variant" / DATASET / "seed2").exists()
    assert sweep.main([str(proto)], root=root, results_dir=tmp_path) == 0  # source resumed, then its variant
    assert (root / "out" / "fake-variant" / DATASET / "seed2" / "done.json").exists()
    bad = [({"a-variant": {"script": "fake", "offline_from": "fake"}, "fake": {}}, "must name an entry listed "
             "before it"),  # (write_protocol sorts the keys)
           ({"fake": {}, "v": {"script": "fake", "offline_from": "fak"}}, "must name an entry.*did you mean fake"),
           ({"fake": {"num_seeds": 2}, "v": {"script": "fake", "offline_from": "fake"}},
            "num_seeds 2 per run and v None"),
           ({"fake": {}, "v": {"script": "fake", "offline_from": "fake", "offline_checkpoint": "x"}},
            "offline_from or offline_checkpoint, not both")]
    for algorithms, message in bad:
        write_protocol(proto, algorithms=algorithms)
        with pytest.raises(sweep.SweepError, match=message):
            sweep.build_plan(sweep.load_protocol(proto), root)


def test_changed_protocol_does_not_reuse_finished_runs(fake_root, tmp_path):
    root, proto = fake_root
    assert sweep.main([str(proto), "--only", "seed=0"], root=root, results_dir=tmp_path) == 0
    write_protocol(proto, algorithms={"fake": {"online_steps": 4}})
    with pytest.raises(sweep.SweepError, match="finished with other arguments"):
        sweep.build_plan(sweep.load_protocol(proto), root)


def test_dry_run_and_only(fake_root, tmp_path, capsys):
    root, proto = fake_root
    assert sweep.main([str(proto), "--dry_run", "--only", "algo=fake,seed=1"], root=root, results_dir=tmp_path) == 0
    out = capsys.readouterr().out
    assert "1 runs" in out and "--seed 1 --run_dir out/fake/o2o/hopper/medium-v0/seed1 --online_steps 3" in out
    assert not (root / "out").exists()
    assert sweep.main([str(proto), "--only", "seed=7"], root=root, results_dir=tmp_path) == 2
    assert "--only seed=7: not in the protocol" in capsys.readouterr().err
    write_protocol(proto, command=["nice", "{python}", "scripts/{algo}.py", "{dataset}", "{seed}", "{run_dir}"])
    plan = sweep.build_plan(sweep.load_protocol(proto), root)  # the command template is injectable
    assert plan.runs[1].args(plan.protocol["command"])[2:] == ["scripts/fake.py", DATASET, "1",
                                                               f"out/fake/{DATASET}/seed1", "--online_steps", "3"]


def test_bad_inputs_fail_before_anything_runs(fake_root, capsys):
    root, proto = fake_root
    cases = [
        (dict(algorithms={"fak": {}}), "unknown algorithm 'fak'.*did you mean fake"),
        (dict(datasets=["o2o/hoper/medium-v0"]), "unknown dataset id 'o2o/hoper/medium-v0'.*did you mean"),
        (dict(algorithms={"fake": {"online_stepz": 3}}), "override 'online_stepz'.*not a field of TrainConfig in "
                                                         "algorithms/fake.py.*did you mean online_steps"),
        (dict(algorithms={"fake": {"seed": 3}}), "override 'seed' is set by the runner"),
        (dict(datasets=[DATASET, "o2o/walker2d/medium-v0"]), r"no config configs/fake/o2o/walker2d/medium-v0.yaml"),
    ]
    for changes, message in cases:
        write_protocol(proto, **{"datasets": [DATASET], "algorithms": {"fake": {}}, **changes})
        with pytest.raises(sweep.SweepError, match=message):
            sweep.build_plan(sweep.load_protocol(proto), root)
        assert sweep.main([str(proto)], root=root) == 2
        assert "error:" in capsys.readouterr().err and not (root / "out").exists()
    # an algorithm of the collection that is not written yet: reported and skipped, an error with --strict
    write_protocol(proto, datasets=[DATASET], algorithms={"fake": {}, "o2sac": {"ope_steps": 10}})
    plan = sweep.build_plan(sweep.load_protocol(proto), root)
    assert {r.algo for r in plan.runs} == {"fake"}
    assert "o2sac: algorithms/o2sac.py does not exist yet" in plan.skipped[0]
    with pytest.raises(sweep.SweepError, match="o2sac.*--strict"):
        sweep.build_plan(sweep.load_protocol(proto), root, strict=True)
    with pytest.raises(sweep.SweepError, match="unknown protocol keys"):
        sweep.build_plan(sweep.load_protocol(write_protocol(proto, seed=[0])), root)


def test_values_the_script_rejects_fail_before_anything_runs(tmp_path, capsys):
    """Each run's command line is parsed by its script's own parse_config (config + overrides + validation) first."""
    proto = tmp_path / "smoke.yaml"
    proto.write_text((ROOT / "benchmarks" / "protocols" / "smoke.yaml").read_text())
    protocol = yaml.safe_load(proto.read_text())
    protocol["algorithms"]["iql"]["offline_eval_every"] = 30  # not a multiple of update_block 50
    write_protocol(proto, output_root=str(tmp_path / "runs"), algorithms={"iql": protocol["algorithms"]["iql"]})
    assert sweep.main([str(proto)], results_dir=tmp_path) == 2
    err = capsys.readouterr().err
    assert "rejected by their scripts" in err and "offline_eval_every=30 must be a multiple of update_block=50" in err
    assert not (tmp_path / "runs").exists()


def test_shipped_protocols_check_against_the_real_scripts():
    """reduced/smoke: the seven algorithms, their datasets; overrides valid for the scripts that exist."""
    for name, n_datasets, n_seeds in (("reduced", 3, 3), ("smoke", 1, 2)):
        proto = sweep.load_protocol(name)
        scripts = {a: (o or {}).get("script", a) for a, o in proto["algorithms"].items()}
        assert {"iql", "cal_ql", "o2sac", "o2td3", "o2ppo", "aca", "pex"} <= set(proto["algorithms"])
        assert set(scripts.values()) == set(sweep.KNOWN_ALGORITHMS)  # variants run one of the seven scripts
        assert len(proto["datasets"]) == n_datasets and len(proto["seeds"]) == n_seeds
        ready = [a for a, s in scripts.items() if (ROOT / "algorithms" / f"{s}.py").exists()
                 and any((ROOT / "configs" / s).rglob("*.yaml"))]  # the others are skipped until they land
        plan = sweep.build_plan(proto, ROOT)
        assert sorted({r.algo for r in plan.runs}) == sorted(ready)
        assert sum(len(r.seeds) for r in plan.runs) == len(ready) * n_datasets * n_seeds
        for run in plan.runs:  # a variant runs its script with that script's config, under its own label
            args = run.args(proto["command"])
            assert f"algorithms/{scripts[run.algo]}.py" in args and str(run.config).startswith(
                f"configs/{scripts[run.algo]}/") and f"/{run.algo}/" in str(run.run_dir)
    assert sweep.cli_value([128, 128]) == "[128, 128]" and sweep.cli_value(False) == "false"


# ---- one real run
def test_tiny_iql_sweep_and_report(tiny_dataset, tmp_path):
    """The smoke protocol's IQL run (2 seeds in one process) on the tiny dataset, through sweep.py (a real
    subprocess) and report.py."""
    assert tiny_dataset("hopper", "medium") == DATASET
    proto = tmp_path / "smoke.yaml"
    proto.write_text((ROOT / "benchmarks" / "protocols" / "smoke.yaml").read_text())
    write_protocol(proto, output_root=str(tmp_path / "runs"))
    assert sweep.main([str(proto), "--only", "algo=iql"], results_dir=tmp_path) == 0
    assert (tmp_path / "runs" / "iql" / DATASET / "seeds0-1" / "seed1" / "eval.jsonl").exists()
    rows = read_csv(tmp_path / "sweep_smoke.csv")
    for seed in ("0", "1"):
        mine = [r for r in rows if r["seed"] == seed]
        assert [(r["phase"], r["updates"], r["online_step"]) for r in mine[:2]] == [("offline", "50", ""),
                                                                                    ("offline", "100", "")]
        assert mine[-1]["phase"] == "online" and mine[-1]["online_step"] == "100"
    assert all(math.isfinite(float(r["normalized_score"])) and r["wall_time_source"] == "record" for r in rows)
    assert report.main([str(proto), "--results_dir", str(tmp_path), "--no_readme"]) == 0
    assert "| iql | `o2o/hopper/medium-v0` | 2 |" in (tmp_path / "sweep_smoke.md").read_text()


# ---- bench_updates
def test_bench_updates_all_algorithms_tiny(tmp_path):
    """bench_updates.py on tiny sizes: every algorithm's offline update block is compiled, timed and costed, its
    act function + a real Hopper env timed per env step; IQL also with 2 seeds vmapped."""
    import bench_updates
    out = tmp_path / "b.json"
    result = bench_updates.main(bench_updates.parse_args(
        ["--rows", "2000", "--block", "5", "--seconds", "0", "--env_steps", "20", "--num_seeds", "1,2",
         "--out", str(out)]))
    saved = json.loads(out.read_text())
    for name in ("iql", "cal_ql", "o2sac", "o2td3", "o2ppo", "aca", "pex"):
        r = saved[name]
        assert math.isfinite(r["updates_per_s"]) and r["updates_per_s"] > 0, name
        assert r["flops_per_update"] > 0 and r["flops_compiled_block"] > 0, name
        assert math.isfinite(r["fraction_of_matmul_gflops"]) and r["fraction_of_matmul_gflops"] > 0, name
        assert r["step_ms"] > 0 and r["act_ms"] > 0 and r["env_ms"] > 0, name
        assert r["online_overhead_fraction"] > 0 and r["env_steps_per_s"] > 0, name
        assert r["env_steps_timed"] == 20, name
    assert set(result["iql"]["num_seeds"]) == {1, 2} and set(saved["iql"]["num_seeds"]) == {"1", "2"}
    for name in ("iql", "cal_ql"):  # the default --profile: the traced block's op time by kind
        prof = saved[name]["profile"]
        assert prof["op_ms_per_update"]["matmul"] > 0 and prof["op_ms_per_update"]["other"] > 0, name
        assert abs(sum(prof["op_share"].values()) - 1) < 1e-6 and prof["op_share"]["unmatched"] < 0.05, name
        assert prof["matmul_gflops_within_ops"] > 0 and prof["wall_ms_per_update_traced"] > 0, name
        for key in ("dots_only", "dots_as_gemms"):  # the update's dots alone: same count and FLOPs both ways
            assert saved[name][key]["dots"] >= 6 and saved[name][key]["updates_per_s"] > 0, (name, key)
        assert saved[name]["dots_only"]["flops"] == saved[name]["dots_as_gemms"]["flops"]
        # the dots are (nearly) all of XLA's FLOP count of one update
        assert 0.9 < saved[name]["dots_only"]["flops"] / saved[name]["flops_per_update"] <= 1.0, name
    assert "profile" not in saved["o2td3"]
    assert saved["matmul_batched"]["shape"] == "4x256x256x256" and saved["matmul_batched"]["ratio_to_single"] > 0
    o2sac_cfg = yaml.safe_load((ROOT / "configs" / "o2sac" / "o2o" / "hopper" / "medium-v0.yaml").read_text())
    assert saved["o2sac"]["updates_per_env_step"] == o2sac_cfg["utd"]  # the config's UTD
    assert saved["o2ppo"]["updates_per_env_step"] is None  # on-policy: env + act only
    # the speed table (docs/speed.md) from that JSON and a quickstart record (speed_table.py, nothing re-run)
    import speed_table
    (tmp_path / "bench_updates.json").write_text(out.read_text())
    (tmp_path / "quickstart_times.json").write_text(json.dumps({"iql": {
        "seconds": 330.0, "score_before_online": 40.0, "score_final": 55.5, "time": "2026-01-01 00:00",
        "load_average_before": [1.0, 1.0, 1.0]}}))
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- speed:begin -->\nold\n<!-- speed:end -->\n")
    assert speed_table.main(["--results_dir", str(tmp_path), "--readme", str(readme)]) == 0
    text = readme.read_text()
    iql_row = next(line for line in text.splitlines() if line.startswith("| IQL |"))
    assert f"| {saved['iql']['updates_per_s']:.0f} |" in iql_row and iql_row.endswith("| 5.5 | 40.0 → 55.5 |")
    assert "| O2SAC |" in text and "≥" in next(line for line in text.splitlines() if line.startswith("| O2SAC |"))
    assert "Quickstart not measured by this command yet: Cal-QL, O2SAC" in text and "old" not in text
    assert "4 batched 256×256×256 matmuls" in text
    assert "IQL: matmul ops " in text and "Cal-QL: matmul ops " in text  # the profile sentence
    assert "IQL: its " in text and "dots alone" in text  # the dots-only ceiling sentence
    assert speed_table.main(["--results_dir", str(tmp_path), "--readme", str(readme), "--quickstart", "iqll"]) == 2


def test_bench_updates_op_kinds():
    """HLO instructions sorted into matmul (a dot, or a fusion calling a computation with one), copy, loop, other."""
    import bench_updates
    hlo = """HloModule m

%fused_computation.1 (p0: f32[8,4], p1: f32[4,2]) -> f32[8,2] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,2]{1,0} parameter(1)
  ROOT %dot.3 = f32[8,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (p0: f32[8,2]) -> f32[2,8] {
  %p0 = f32[8,2]{1,0} parameter(0)
  ROOT %transpose.1 = f32[2,8]{1,0} transpose(%p0), dimensions={1,0}
}

ENTRY %main (a: f32[8,4], b: f32[4,2]) -> f32[2,8] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,2]{1,0} parameter(1)
  %ynn_fusion.7 = f32[8,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1
  %dot.9 = f32[8,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %copy_bitcast_fusion = f32[2,8]{1,0} fusion(%ynn_fusion.7), kind=kLoop, calls=%fused_computation.2
  %copy.4 = f32[8,2]{0,1} copy(%dot.9)
  %maximum_fusion.2 = f32[8,2]{1,0} fusion(%dot.9), kind=kLoop, calls=%fused_computation.2
  ROOT %while.5 = f32[2,8]{1,0} while(%copy_bitcast_fusion), condition=%c, body=%b
}
"""
    kinds = bench_updates.op_kinds(hlo)
    assert kinds["ynn_fusion.7"] == "matmul" and kinds["dot.9"] == "matmul" and kinds["dot.3"] == "matmul"
    assert kinds["copy_bitcast_fusion"] == "copy" and kinds["copy.4"] == "copy"
    assert kinds["maximum_fusion.2"] == "other" and kinds["while.5"] == "loop" and kinds["transpose.1"] == "other"
    # the dots with their operand shapes (parameters of a fused computation, instructions of the entry)
    specs = bench_updates.dot_specs(hlo)
    assert len(specs) == 2
    assert ((8, 4), (4, 2), (((1,), (0,)), ((), ()))) in specs
    # a batched dot contracting the rows of both operands (a weight gradient), as a plain matmul: [2, 5, 7] @ [2, 7, 3]
    spec = ((2, 7, 5), (2, 7, 3), (((1,), (1,)), ((0,), (0,))))
    assert bench_updates.canonical(spec) == ((2, 5, 7), (2, 7, 3), (((2,), (1,)), ((0,), (0,))))
    r = bench_updates.dots_only_rate([spec], seconds=0.01)
    assert r["dots"] == 1 and r["flops"] == 2 * 2 * 5 * 7 * 3
    assert bench_updates.dots_only_rate([spec], seconds=0.01, as_gemms=True)["flops"] == r["flops"]


# ---- probes
def test_pex_switch_probe_summary_and_markdown(tmp_path):
    """The probe's table from hand-made eval logs; an online update during the probe is an error."""
    import probes
    run = tmp_path / "probe"
    for s, (off, sw, frac) in enumerate([(50.0, 20.0, 0.1), (60.0, 1.5, 0.4)]):
        (run / f"seed{s}").mkdir(parents=True)
        rows = [{"phase": "offline", "updates": 100, "normalized_score": off},
                {"phase": "online", "updates": 100, "normalized_score": sw, "new_policy_fraction": frac,
                 "q_offline_action": 3.0, "q_new_action": 2.5}]
        (run / f"seed{s}" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = probes.pex_summary(run, 2)
    assert [r["switch_score"] for r in rows] == [20.0, 1.5] and rows[1]["new_policy_fraction"] == 0.4
    text = probes.pex_markdown({"o2o/hopper/medium-v0": {"reduced": rows}}, 2, 5)
    assert "| `o2o/hopper/medium-v0` | reduced | 50.0 / 60.0 | 20.0 / 1.5 | 0.10 / 0.40 | 3.0, 2.5 / 3.0, 2.5 |" in text
    with open(run / "seed1" / "eval.jsonl", "a") as f:
        f.write(json.dumps({"phase": "online", "updates": 150, "normalized_score": 3.0, "new_policy_fraction": 0.5,
                            "q_offline_action": 3.0, "q_new_action": 2.5}) + "\n")
    with pytest.raises(SystemExit, match="online updates happened"):
        probes.pex_summary(run, 2)


def test_alignment_probe_summary_and_markdown(tmp_path):
    """The alignment probe's curves per phase from hand-made O2SAC-style eval logs; seeds must share a schedule."""
    import probes
    run = tmp_path / "probe"
    for s in range(2):
        (run / f"seed{s}").mkdir(parents=True)
        rows = [{"phase": "offline", "updates": 100, "normalized_score": 20.0 + s}]
        rows += [{"phase": "reevaluation", "phase_updates": n, "updates": 100 + n, "normalized_score": 20.0 + s}
                 for n in (50, 100)]
        rows += [{"phase": "alignment", "phase_updates": n, "updates": 200 + n, "normalized_score": v + s}
                 for n, v in ((50, 10.0), (100, 16.0))]
        (run / f"seed{s}" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = probes.alignment_summary(run, 2)
    assert summary["pre_training"] == [20.0, 21.0]
    assert summary["alignment"] == {"updates": [50, 100], "scores": [[10.0, 16.0], [11.0, 17.0]]}
    text = probes.alignment_markdown({"o2o/hopper/medium-v0": {"o2sac": {"0.1k": summary}}}, 2, 5)
    assert "| `o2o/hopper/medium-v0` | o2sac | 0.1k | 20.5 ± 0.7 | 20.5 ± 0.7 | 0.05k: 10.5 ± 0.7; 0.1k: 16.5 ± 0.7 |" \
        in text
    with open(run / "seed1" / "eval.jsonl", "a") as f:
        f.write(json.dumps({"phase": "alignment", "phase_updates": 150, "updates": 350, "normalized_score": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="alignment evaluations are at different updates"):
        probes.alignment_summary(run, 2)


def test_calql_offline_probe_table_from_finished_runs(tmp_path, monkeypatch):
    """cal_ql-offline: finished runs are not re-run; the table gives score (episode length) per eval, mean over seeds."""
    import argparse
    import probes
    monkeypatch.setattr(probes, "CALQL_VARIANTS", {"quickstart": [], "policy_lr 3e-5": ["--policy_lr", "3e-5"]})
    for name, base in (("quickstart", 0.0), ("policy_lr_3e-5", 10.0)):
        run = tmp_path / "cal_ql-offline" / name
        for s in range(2):
            (run / f"seed{s}").mkdir(parents=True)
            rows = [{"phase": "offline", "updates": n, "normalized_score": base + n / 1000 + s, "length": 20 + s}
                    for n in (2000, 4000)]
            (run / f"seed{s}" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        # training metrics as `probes.py record` writes them; the 4k block twice (a resumed run logs it again)
        blocks = [{"offline/updates": n, "offline/bound_rate": base + n / 1e4 + k, "offline/q_data": 50.0,
                   "offline/q_rand": 47.5, "offline/mc_return": 250.0, "offline/cql_diff": -1.25}
                  for n, k in ((2000, 0), (4000, 0), (4000, 1))]
        (run / "metrics.jsonl").write_text("".join(json.dumps(b) + "\n" for b in blocks + [{"eval/return": 1.0}]))
        (run / "done").write_text("{}")
    args = argparse.Namespace(out_root=str(tmp_path), calql_seeds=2, eval_episodes=5)
    data, md = probes.calql_offline(args)
    assert data["results"]["quickstart"]["scores"] == [[2.0, 4.0], [3.0, 5.0]]
    assert data["results"]["quickstart"]["diagnostics"][0]["bound_rate"] == 0.2
    assert "| quickstart | 2k: 2.5 (20); 4k: 4.5 (20) | 1.40 | 50 | 2.5 | 250 | -1.2 |" in md
    assert "| policy_lr 3e-5 | 2k: 12.5 (20); 4k: 14.5 (20) | 11.40 | 50 | 2.5 | 250 | -1.2 |" in md


def test_probe_record_writes_the_training_metrics(tiny_dataset, tmp_path):
    """`probes.py record <script>` runs the script with its wandb metrics also in run_dir/metrics.jsonl, and leaves
    the module's Logger as it was."""
    import cal_ql
    import probes
    log = cal_ql.Logger.log
    probes.main(["record", "cal_ql", "--dataset_id", tiny_dataset("hopper", "medium"), "--run_dir", str(tmp_path),
                 "--offline_updates", "100", "--update_block", "50", "--offline_eval_every", "100",
                 "--online_steps", "0", "--eval_episodes", "1", "--policy_hidden", "[32,32]", "--critic_hidden",
                 "[32,32]", "--cql_n_actions", "4", "--wandb_mode", "disabled"])
    assert cal_ql.Logger.log is log
    records = probes.read_jsonl(tmp_path / "metrics.jsonl")
    blocks = probes.last_per_update(records, "offline/updates")
    assert sorted(blocks) == [50, 100] and 0.0 <= blocks[100]["offline/bound_rate"] <= 1.0
    assert any("eval/normalized_score" in r for r in records)
