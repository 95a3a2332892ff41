"""Do two versions of the algorithm files run the same update programs, equally fast? For a change that should not
move speed (a restructure, a rename), measured in one run, the two versions interleaved.

    python benchmarks/compare_commits.py BEFORE AFTER                     # programs only (~1 min)
    python benchmarks/compare_commits.py BEFORE AFTER --rounds 3 --algos iql,o2td3   # and their speed

BEFORE / AFTER: git commits, or `.` for this checkout as it is (uncommitted edits included). Each other commit is
checked out into a temporary git worktree, removed at the end. For each algorithm and version, a child process run
in that version's tree builds the offline update block exactly as that version's `benchmarks/bench_updates.py`
does (its own adapter: one seed, synthetic Hopper-shaped data, the Hopper config) and lowers it to StableHLO.
* `same program`: the two versions' lowered programs are equal once function and module names are numbered in order
  of appearance (a renamed Python function changes its symbol, not the computation). Equal programs compile to the
  same executable, so their speed can only differ by noise.
* with `--rounds R`: R rounds, each timing every algorithm in both versions (the order of the two alternating
  between rounds, so drift hits both alike): updates/s of the compiled block over `--seconds` after a warm-up block;
  the median of the rounds per version and the ratio AFTER / BEFORE.
Writes a JSON (`--out`) and prints a table. The load average before and after is recorded: other processes on the
machine slow every timing.
"""
import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALGOS = ("iql", "cal_ql", "o2sac", "o2td3", "o2ppo", "aca", "pex")


def normalized(text: str) -> str:
    """The StableHLO text with every @symbol numbered in order of first appearance and no module name."""
    names = {}
    text = re.sub(r"^module @[\w.$-]+", "module", text, flags=re.M)
    return re.sub(r"@([\w.$-]+)", lambda m: "@f%d" % names.setdefault(m.group(1), len(names)), text)


def child(args):
    """In a version's tree: lower (and with --seconds > 0, time) one algorithm's offline update block; prints JSON."""
    sys.path[:0] = [str(Path.cwd() / "benchmarks"), str(Path.cwd() / "algorithms")]
    import bench_updates as bu
    import jax
    bargs = bu.parse_args(["--rows", str(args.rows), "--block", str(args.block), "--algos", args.child,
                           "--seconds", str(max(args.seconds, 0.1)), "--profile", ""])
    setup = bu.SETUPS[args.child](bargs)
    state = jax.jit(lambda key: setup.module.stack_seeds([setup.init(key)]))(jax.random.PRNGKey(0))
    lowered = setup.block(1).lower(state)
    out = {"program_sha1": hashlib.sha1(normalized(lowered.as_text()).encode()).hexdigest()}
    if args.seconds > 0:
        compiled = lowered.compile()
        call = setup.block(1)
        out["updates_per_s"], out["blocks"] = bu.time_blocks(lambda s: compiled(s, *call.args), state, args.block,
                                                             args.seconds)
    print("RESULT " + json.dumps(out))


def run_child(tree: Path, algo: str, args, seconds: float) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare_commits.py"), "--child", algo, "--rows", str(args.rows),
           "--block", str(args.block), "--seconds", str(seconds)]
    p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{algo} in {tree}: the child failed (exit {p.returncode}):\n{tail}")
    return json.loads(line[len("RESULT "):])


def checkout(ref: str, tmp: Path) -> tuple:
    """(tree, commit label): `.` is this checkout; another ref a detached worktree in tmp."""
    if ref == ".":
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return ROOT, head.stdout.strip() + ("+edits" if dirty else "")
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit("error: git is not installed; compare_commits.py needs it to check out the commits")
    if sha.returncode != 0:
        sys.exit(f"error: {ref!r} is not a commit of this repository (git rev-parse failed); pass a commit or `.`")
    tree = tmp / sha.stdout.strip()
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), ref], cwd=ROOT, check=True)
    return tree, sha.stdout.strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before", nargs="?")
    p.add_argument("after", nargs="?")
    p.add_argument("--algos", default=",".join(ALGOS), help="comma-separated subset of " + ",".join(ALGOS))
    p.add_argument("--rounds", type=int, default=0, help="interleaved timing rounds (0: programs only)")
    p.add_argument("--seconds", type=float, default=5.0, help="timing per algorithm, version and round")
    p.add_argument("--block", type=int, default=200, help="updates per jitted block")
    p.add_argument("--rows", type=int, default=100_000, help="synthetic dataset rows")
    p.add_argument("--out", default="", help="JSON output (default: print only)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if not (args.before and args.after):
        p.error("give two versions: BEFORE AFTER (commits, or `.` for this checkout)")
    algos = [a for a in args.algos.split(",") if a]
    unknown = sorted(set(algos) - set(ALGOS))
    if unknown:
        p.error(f"--algos: unknown {unknown}; choose from {','.join(ALGOS)}")
    tmp = Path(tempfile.mkdtemp(prefix="compare_commits_"))
    trees = []
    try:
        trees = [checkout(ref, tmp) for ref in (args.before, args.after)]
        result = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "before": trees[0][1], "after": trees[1][1],
                  "block": args.block, "rows": args.rows, "seconds": args.seconds, "rounds": args.rounds,
                  "load_average_before": os.getloadavg(), "algorithms": {}}
        for algo in algos:
            shas = [run_child(tree, algo, args, 0)["program_sha1"] for tree, _ in trees]
            result["algorithms"][algo] = {"same_program": shas[0] == shas[1], "program_sha1": shas, "rates": [[], []]}
            print(f"{algo}: {'same program' if shas[0] == shas[1] else 'PROGRAMS DIFFER'}", flush=True)
        for r in range(args.rounds):
            for algo in algos:
                for v in ((0, 1) if r % 2 == 0 else (1, 0)):
                    rate = run_child(trees[v][0], algo, args, args.seconds)["updates_per_s"]
                    result["algorithms"][algo]["rates"][v].append(rate)
                    print(f"round {r + 1} {algo} {trees[v][1]}: {rate:.1f} updates/s", flush=True)
        result["load_average_after"] = os.getloadavg()
    finally:
        for tree, _ in trees:
            if tree != ROOT:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n| algorithm | same program | updates/s {trees[0][1]} | updates/s {trees[1][1]} | after / before |")
    print("|---|---|---|---|---|")
    for algo, a in result["algorithms"].items():
        med = [statistics.median(x) if x else None for x in a["rates"]]
        a["median_updates_per_s"] = med
        a["ratio"] = med[1] / med[0] if all(med) else None
        cells = [f"{m:.1f}" if m else "–" for m in med] + [f"{a['ratio']:.3f}" if a["ratio"] else "–"]
        print(f"| {algo} | {'yes' if a['same_program'] else 'NO'} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(a["same_program"] for a in result["algorithms"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
