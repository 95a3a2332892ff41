"""FLOP audit of the seven offline updates: the matrix products each update computes against the ones its algorithm
needs, written into benchmarks/results/flop_audit.json and docs/speed.md (section `flop_audit`).

    python benchmarks/flop_audit.py                       # all seven (lowering only, ~30 s on one core)
    python benchmarks/flop_audit.py --algos iql,o2td3 --out /tmp/audit.json --no_docs

Each algorithm's offline update is built exactly as benchmarks/bench_updates.py builds it (its Hopper config,
synthetic Hopper-shaped data, batch 256) and ONE update on one batch is lowered (not compiled). Measured:
  * XLA's FLOP count of the lowered program (bench_updates.flops_of: matrix products plus elementwise ops);
  * its matrix-product FLOPs alone, read from the StableHLO text: every `stablehlo.dot_general` costs
    2 x (product of the result dims) x (product of the lhs contracting dims) (batch dims are in the result). A dot in
    a private function counts once per call; a `stablehlo.case` (lax.cond) counts its costliest branch, as XLA's
    cost analysis does (o2td3's policy_freq actor step: counted as if it ran at every update).
Minimum: an analytic list of the matrix products the algorithm needs for one update (named items, from reading the
update and the algorithm's definition in the file's header and docs/<algo>.md), the network sizes read from the
update's Hyper. Cost model: a layer of fan-in i, fan-out o on R rows costs 2 R i o forward; its backward 2 R i o for
the weight gradient plus 2 R i o for the input gradient, without the input gradient of a network's first layer when
its input needs none; an ensemble of n members costs n times that. A loss that only differentiates through a network
into its input (an actor loss through Q(s, pi(s))) gets the input-gradient terms only (of the first layer: the action
columns). An item run every k-th update (o2td3's delayed actor step) counts 1/k per update.
Excess: what the update computes beyond that minimum, as named items computed with the same cost model, each with
the reason it stays. measured matmul = minimum + listed excess, up to
`unexplained` (expected 0); tests/test_flop_audit.py checks that every algorithm stays within it.
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

import jax

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_updates as B  # noqa: E402
from readme_tables import DOCS, update_readme  # noqa: E402

SECTION = "flop_audit"
TOLERANCE = 1e-6  # relative slack of the test's bounds: the count and the model are exact, so any added product fails
NOTE_THRESHOLD = 0.01  # the docs table says 'not a waste' of excess items above this share of the minimum
NAMES = {"iql": "IQL", "cal_ql": "Cal-QL", "o2sac": "O2SAC", "o2td3": "O2TD3", "o2ppo": "O2PPO", "aca": "ACA",
         "pex": "PEX"}
UPDATES = {"iql": "iql_update", "cal_ql": "calql_update (CQL + calibration)", "o2sac": "cql_update (CQL)",
           "o2td3": "td3bc_update (TD3+BC)", "o2ppo": "iql_update (IQL)", "aca": "offline_update (SAC+ML)",
           "pex": "iql_update (IQL)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algos", default=",".join(B.ALGOS), help=f"comma-separated subset of {','.join(B.ALGOS)}")
    p.add_argument("--out", default=str(HERE / "results" / "flop_audit.json"))
    p.add_argument("--no_docs", action="store_true", help="do not rewrite the docs/speed.md table")
    p.add_argument("--table_only", action="store_true", help="only rewrite the docs table from --out")
    args = p.parse_args(argv)
    unknown = set(args.algos.split(",")) - set(B.ALGOS)
    if unknown:
        p.error(f"--algos: unknown {sorted(unknown)}; choose from {','.join(B.ALGOS)}")
    return args


# ---------------------------------------------------------------------------------------------- measured
_TENSOR = r"tensor<([^>]*)>"
_SYMBOL = r'"[^"]+"|[\w.$-]+'  # a function's name: @main, @relu_0, @"<lambda>"


def _shape(t):
    """'256x14xf32' -> (256, 14); 'f32' -> ()."""
    return tuple(int(d) for d in t.split("x")[:-1])


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


def _dot(line):
    """The record of the dot on a StableHLO line (None if it has none)."""
    m = re.search(r"stablehlo\.dot(_general)?\b", line)
    if not m:
        return None
    types = re.search(rf":\s*\({_TENSOR},\s*{_TENSOR}\)\s*->\s*{_TENSOR}", line)
    if not types:
        raise ValueError(f"cannot read the operand types of: {line.strip()[:200]}")
    lhs, rhs, result = (_shape(t) for t in types.groups())
    if m.group(1):
        c = re.search(r"contracting_dims\s*=\s*\[([\d,\s]*)\]", line)
        contracting = [int(i) for i in c.group(1).split(",") if i.strip()] if c else []
    else:  # stablehlo.dot: the lhs's last dimension
        contracting = [len(lhs) - 1]
    return {"lhs": lhs, "rhs": rhs, "result": result,
            "flops": 2 * _prod(result) * _prod(lhs[i] for i in contracting)}


def _program_tree(text):
    """{function name: its body} of a StableHLO module; a body is a list of items: ('dot', record), ('call', name)
    or ('op', kind, [bodies of its regions]) with kind 'case' (lax.cond / switch: stablehlo.case or stablehlo.if)
    or 'seq' (any other op with regions: while, reduce, ...)."""
    functions, root = {}, []
    stack, ops = [root], [None]  # the open regions' item lists and the op each belongs to
    for line in text.splitlines():
        dot = _dot(line)
        if dot is not None:
            stack[-1].append(("dot", dot))
        for callee in re.findall(rf"(?:^|[\s=])(?:func\.)?call @({_SYMBOL})\(", line):
            stack[-1].append(("call", callee))
        closed, closed_at, last_new = None, -1, None
        for pos, ch in enumerate(line):
            if ch == "{":
                if closed is not None and re.fullmatch(r"\s*(,|do)?\s*", line[closed_at + 1:pos]):
                    op = closed  # `}, {` / `} do {`: the next region of the same op
                else:
                    kind = "case" if re.search(r"stablehlo\.(case|if)\b", line) else "seq"
                    op = ("op", kind, [])
                    stack[-1].append(op)
                    last_new = op
                stack.append([])
                ops.append(op)
            elif ch == "}":
                if len(stack) == 1:
                    raise ValueError("unbalanced braces in the StableHLO text")
                body, op = stack.pop(), ops.pop()
                op[2].append(body)
                closed, closed_at = op, pos
        name = re.search(rf"func\.func\s+(?:\w+\s+)?@({_SYMBOL})", line)
        if name and last_new is not None:
            functions[name.group(1)] = last_new  # its body: the op's first region, filled when it closes
    if len(stack) != 1:
        raise ValueError("unbalanced braces in the StableHLO text")
    return {k: op[2][0] for k, op in functions.items() if op[2]}


def matmul_flops(text, entry="main"):
    """(matrix-product FLOPs, dots) of a lowered program's StableHLO text, from function `entry`: each dot once per
    execution, a private function's dots once per call, a case op's costliest branch only (XLA's rule: the dots of
    that branch are marked conditional). dots: records with lhs, rhs, result shapes, flops, conditional."""
    functions = _program_tree(text)
    if entry not in functions:
        raise ValueError(f"no function @{entry} in the program")
    memo = {}

    def body_cost(items, conditional, seen):
        total, dots = 0, []
        for item in items:
            if item[0] == "dot":
                total += item[1]["flops"]
                dots.append({**item[1], "conditional": conditional})
            elif item[0] == "call":
                if item[1] in seen:
                    raise ValueError(f"recursive call of @{item[1]}")
                f, d = function_cost(item[1], seen)
                total += f
                dots += [{**x, "conditional": x["conditional"] or conditional} for x in d]
            else:
                _, kind, regions = item
                costs = [body_cost(r, conditional or kind == "case", seen) for r in regions]
                if kind == "case":
                    f, d = max(costs, key=lambda c: c[0]) if costs else (0, [])
                    total, dots = total + f, dots + d
                else:
                    for f, d in costs:
                        total, dots = total + f, dots + d
        return total, dots

    def function_cost(name, seen=frozenset()):
        if name not in memo:
            if name not in functions:  # an external function (custom call target): no dots of ours
                return 0, []
            memo[name] = body_cost(functions[name], False, seen | {name})
        return memo[name]

    return function_cost(entry)


# ---------------------------------------------------------------------------------------------- cost model
class Net:
    """An MLP: input width, hidden widths, output heads (each a layer on the last hidden layer), `members` copies
    (a vmapped ensemble on shared inputs)."""

    def __init__(self, name, in_dim, hidden, heads, members=1):
        self.name, self.in_dim, self.hidden, self.heads, self.members = name, in_dim, tuple(hidden), heads, members
        widths = (in_dim, *hidden)
        self.layers = list(zip(widths[:-1], widths[1:])) + [(widths[-1], o) for o in heads]

    def _sum(self, layers):
        return self.members * sum(i * o for i, o in layers)

    def forward(self, rows):
        return 2 * rows * self._sum(self.layers)

    def weight_grads(self, rows):
        return 2 * rows * self._sum(self.layers)

    def input_grads(self, rows, first_cols=0):
        """The input gradients of every layer but the first, plus those of `first_cols` of the first layer's inputs
        (e.g. the action columns of a Q network's [s, a] input)."""
        return 2 * rows * (self._sum(self.layers[1:]) + self.members * first_cols * self.layers[0][1])

    def backward(self, rows):
        """Weight gradients of every layer, input gradients of every layer but the first (the input needs none)."""
        return self.weight_grads(rows) + self.input_grads(rows)

    def first_layer(self, rows, cols):
        """One product of the first layer restricted to `cols` of its inputs."""
        return 2 * rows * self.members * cols * self.layers[0][1]

    def describe(self):
        heads = "+".join(map(str, self.heads))
        return (f"{self.name}: {' -> '.join(map(str, (self.in_dim, *self.hidden, heads)))}"
                + (f", {self.members} members" if self.members > 1 else ""))


def item(name, flops, every=1):
    """A needed product: `flops` when it runs, every `every`-th update."""
    return {"item": name, "flops": int(flops), "every": every}


def excess(name, flops, why):
    """Products beyond the minimum, and why they stay."""
    return {"item": name, "flops": int(flops), "why": why}


# ---------------------------------------------------------------------------------------------- the minimum
def iql_family(h, n_critics, batch):
    """IQL (iql.py, and the IQL pre-training of o2ppo.py and pex.py): V by expectile regression on the target Q,
    Q by TD to the pre-update V(s'), AWR actor on the data action (mean head; state-independent log-std)."""
    b, o, a = batch, h.obs_dim, h.act_dim
    q = Net("Q", o + a, h.hidden_dims, (1,), n_critics)
    v = Net("V", o, h.hidden_dims, (1,))
    pi = Net("actor", o, h.hidden_dims, (a,))
    need = [item("target Q ensemble forward on (s, a)", q.forward(b)),
            item("V forward on s' (pre-update V, no gradient)", v.forward(b)),
            item("V forward + backward on s", v.forward(b) + v.backward(b)),
            item("Q ensemble forward + backward on (s, a)", q.forward(b) + q.backward(b)),
            item("actor forward + backward on s (AWR log-likelihood of a)", pi.forward(b) + pi.backward(b))]
    return [q, v, pi], need, []


def audit_iql(h, module):
    return iql_family(h, h.n_critics, h.batch_size)


def audit_o2ppo(h, module):
    import inspect
    twin = inspect.signature(module.critic_ensemble).parameters["n"].default  # IQL's twin Q (no config field)
    return iql_family(h, twin, h.iql_batch_size)


def audit_pex(h, module):
    return iql_family(h, h.n_critics, h.batch_size)


def cql_family(h, policy_hidden, critic_hidden, n_critics, n_actions, max_backup):
    """CQL / Cal-QL: one gradient of all losses. Tanh-Gaussian actor (one head of 2|A|: mean and log-std), Q
    ensemble on [s, a]; the actor loss through min_i Q_i(s, a~) with the critic's parameters frozen."""
    b, o, a = h.batch_size, h.obs_dim, h.act_dim
    pi = Net("actor", o, policy_hidden, (2 * a,))
    q = Net("Q", o + a, critic_hidden, (1,), n_critics)
    k = n_actions if max_backup else 1
    need = [item("actor forward on s and s' (pi(.|s) and pi(.|s') samples)", pi.forward(2 * b)),
            item("actor backward on s (actor loss)", pi.backward(b)),
            item("Q ensemble forward on (s, a~), a~ ~ pi(.|s), critic frozen (actor loss)", q.forward(b)),
            item("Q ensemble input gradient dQ/da~ (no weight gradient; first layer: the action columns)",
                 q.input_grads(b, first_cols=a)),
            item(f"target Q ensemble forward on (s', a'), the best of {k} a' per s' (max backup)" if max_backup
                 else "target Q ensemble forward on (s', a'), one a' per s'", q.forward(b * k)),
            item(f"Q ensemble forward + backward at s on 1 + 3 x {n_actions} actions per state (data, random, "
                 "pi(.|s'), pi(.|s))", q.forward(b * (1 + 3 * n_actions)) + q.backward(b * (1 + 3 * n_actions)))]
    extra = [
        excess("actor loss's dQ/da: the first layer's input gradient also for the state columns", q.first_layer(b, o),
               "the gradient of the concatenated [s, a] input is computed whole, then sliced; splitting the first "
               "layer's kernel into state and action rows would avoid it (< 0.1%: not worth a change)")]
    return [pi, q], need, extra


def audit_cal_ql(h, module):
    return cql_family(h, h.policy_hidden, h.critic_hidden, h.n_critics, h.cql_n_actions,
                      h.cql_max_target_backup)


def audit_o2sac(h, module):
    return cql_family(h, h.policy_hidden, h.cql_critic_hidden, h.cql_n_critics, h.cql_n_actions,
                      h.cql_max_target_backup)


def audit_o2td3(h, module):
    """TD3+BC: target actor and target critics on s', critic step; every policy_freq-th update the actor step by
    DPG through Q_1 (one member) plus BC, then the Polyak updates (no products)."""
    b, o, a, k = h.batch_size, h.obs_dim, h.act_dim, h.policy_freq
    pi = Net("actor", o, h.actor_hidden, (a,))
    q = Net("Q", o + a, h.critic_hidden, (1,), h.n_critics)
    q1 = Net("Q_1", o + a, h.critic_hidden, (1,))
    branch = [item("actor forward on s (actor step)", pi.forward(b), k),
              item("Q_1 forward on (s, pi(s)) (actor step; critic frozen)", q1.forward(b), k),
              item("Q_1 input gradient dQ_1/da (first layer: the action columns)", q1.input_grads(b, a), k),
              item("actor backward on s (actor step)", pi.backward(b), k)]
    need = [item("target actor forward on s'", pi.forward(b)),
            item("target Q ensemble forward on (s', a')", q.forward(b)),
            item("Q ensemble forward + backward on (s, a)", q.forward(b) + q.backward(b)), *branch]
    in_branch = sum(x["flops"] for x in branch)
    nth = {1: "update", 2: "2nd update", 3: "3rd update"}.get(k, f"{k}th update")
    extra = [excess(f"actor step (lax.cond) counted at every update; it runs every {nth}",
                    in_branch * (k - 1) // k,
                    "XLA's cost analysis (and this count) takes the costliest branch of the policy_freq cond; at run "
                    f"time the branch runs on every {nth}, as TD3 prescribes"),
             excess("actor step's dQ_1/da: the first layer's input gradient also for the state columns",
                    q1.first_layer(b, o),
                    "the gradient of the concatenated [s, a] input is computed whole, then sliced (inside the "
                    "branch, so counted at every update)")]
    return [pi, q], need, extra


def audit_aca(h, module):
    """SAC+ML with the baseline ensemble Z(s): actor on s and s' once, temperature, critic, Z and actor steps."""
    b, o, a = h.batch_size, h.obs_dim, h.act_dim
    pi = Net("actor", o, h.hidden_dims, (a, a) if h.squashed_policy else (a,))
    q = Net("Q", o + a, h.hidden_dims, (1,), h.n_critics)
    z = Net("Z", o, h.hidden_dims, (1,), h.n_critics)
    need = [item("actor forward on s and s' (pre-update actor: temperature, a', a'', log pi(a|s), actor loss via "
                 "its VJP)",
                 pi.forward(2 * b)),
            item("target Q ensemble forward on (s', a')", q.forward(b)),
            item("Q ensemble forward + backward on (s, a)", q.forward(b) + q.backward(b)),
            item("Z ensemble forward on s' (current Z, no gradient)", z.forward(b)),
            item("Z ensemble forward + backward on s", z.forward(b) + z.backward(b)),
            item("Q ensemble (updated) forward on (s, a^), a^ ~ pi(.|s), critic frozen (actor loss)", q.forward(b)),
            item("Q ensemble input gradient dQ/da^ (first layer: the action columns)", q.input_grads(b, a)),
            item("actor backward on s (SAC + ML loss)", pi.backward(b))]
    extra = [
        excess("actor loss's dQ/da: the first layer's input gradient also for the state columns", q.first_layer(b, o),
               "the gradient of the concatenated [s, a] input is computed whole, then sliced")]
    return [pi, q, z], need, extra


AUDITS = {"iql": audit_iql, "cal_ql": audit_cal_ql, "o2sac": audit_o2sac, "o2td3": audit_o2td3,
          "o2ppo": audit_o2ppo, "aca": audit_aca, "pex": audit_pex}


# ---------------------------------------------------------------------------------------------- audit
def audit(name):
    """Measured and minimum FLOPs of algorithm `name`'s offline update (one update on one batch, lowered)."""
    setup = B.SETUPS[name](B.parse_args(["--rows", "2000", "--block", "2"]))
    h = setup.one.static["h"]
    lowered = setup.one.lower(jax.eval_shape(setup.init, B.KEY))
    measured, dots = matmul_flops(lowered.as_text())
    nets, need, extra = AUDITS[name](h, setup.module)
    minimum = sum(x["flops"] / x["every"] for x in need)
    explained = sum(x["flops"] for x in extra)
    for x in extra:
        x["fraction_of_minimum"] = x["flops"] / minimum
    return {**setup.info, "update": UPDATES[name], "networks": [n.describe() for n in nets],
            "xla_flops": B.flops_of(lowered), "matmul_flops": measured,
            "matmul_flops_in_conditional": sum(d["flops"] for d in dots if d["conditional"]),
            "minimum_flops": minimum, "ratio": measured / minimum, "explained_excess_flops": explained,
            "unexplained_flops": measured - minimum - explained,
            "minimum": need, "excess": extra,
            "dots": [{"lhs": d["lhs"], "rhs": d["rhs"], "result": d["result"], "mflops": d["flops"] / 1e6,
                      **({"conditional": True} if d["conditional"] else {})} for d in dots]}


def table(result):
    lines = [f"Generated {result['time'][:10]} by `python benchmarks/flop_audit.py` (JAX {result['jax']}; one "
             "lowered update of each algorithm's Hopper config, batch 256; GFLOP per update).", "",
             "| algorithm | update | XLA total | matmul, measured | matmul, minimum | measured / minimum | "
             "excess (share of the minimum) |", "|---|---|---|---|---|---|---|"]
    for name, r in result["algorithms"].items():
        notes = []
        for x in r["excess"]:
            share = x["fraction_of_minimum"]
            text = f"{x['item']} ({100 * share:+.1f}%)" if share >= 0.001 else f"{x['item']} (< 0.1%)"
            if share >= NOTE_THRESHOLD:
                text += ": not a waste"
            notes.append(text)
        if abs(r["unexplained_flops"]) > TOLERANCE * r["minimum_flops"]:
            notes.append(f"UNEXPLAINED {r['unexplained_flops'] / 1e9:+.3f} GFLOP")
        lines.append(f"| {NAMES[name]} | {r['update']} | {r['xla_flops'] / 1e9:.3f} | {r['matmul_flops'] / 1e9:.3f} | "
                     f"{r['minimum_flops'] / 1e9:.3f} | {r['ratio']:.3f} | {'; '.join(notes) or 'none'} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        result = json.loads(out.read_text())
    else:
        result = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__,
                  "cost_model": "layer i -> o on R rows: forward 2 R i o; backward 2 R i o (weights) + 2 R i o "
                                "(inputs; none for a first layer whose input needs no gradient); x ensemble members",
                  "tolerance": TOLERANCE, "algorithms": {}}
        for name in args.algos.split(","):
            r = audit(name)
            result["algorithms"][name] = r
            print(f"{name}: XLA {r['xla_flops'] / 1e9:.3f} GFLOP, matmul {r['matmul_flops'] / 1e9:.3f} (minimum "
                  f"{r['minimum_flops'] / 1e9:.3f}, x{r['ratio']:.3f}; explained excess "
                  f"{r['explained_excess_flops'] / 1e9:.3f}, unexplained {r['unexplained_flops'] / 1e9:+.4f})",
                  flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    if args.no_docs:
        return 0
    return update_readme(SECTION, table(result), DOCS / "speed.md")


if __name__ == "__main__":
    sys.exit(main())
