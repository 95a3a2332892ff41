"""The run plumbing below the "Run plumbing" banner is the same text in all seven algorithm files: a fix is made once
and copied, and a forker sees at a glance what is boilerplate. A drifted copy is named with the functions that differ."""
import ast
import difflib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["iql", "cal_ql", "aca", "pex", "o2sac", "o2td3", "o2ppo"]
BANNER = "# Run plumbing:"


def plumbing(name: str) -> str:
    """The text from the banner to the `if __name__ == "__main__":` line."""
    src = (ROOT / "algorithms" / f"{name}.py").read_text()
    assert src.count(BANNER) == 1, f"{name}.py: expected one '{BANNER}' banner"
    start = src.rindex("\n# ====", 0, src.index(BANNER))
    return src[start: src.index('\nif __name__ == "__main__":')]


def definitions(text: str) -> dict:
    tree = ast.parse(text)
    return {node.name: ast.get_source_segment(text, node) for node in tree.body if hasattr(node, "name")}


@pytest.mark.parametrize("name", SCRIPTS[1:])
def test_plumbing_is_identical_in_every_script(name):
    ours, reference = plumbing(name), plumbing(SCRIPTS[0])
    if ours != reference:
        a, b = definitions(reference), definitions(ours)
        drifted = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        diff = "\n".join(list(difflib.unified_diff(reference.splitlines(), ours.splitlines(), "iql.py", f"{name}.py",
                                                   lineterm=""))[:40])
        pytest.fail(f"{name}.py's run plumbing differs from iql.py's in: {', '.join(drifted)}; copy the fixed version "
                    f"into every file\n{diff}")


@pytest.mark.parametrize("name", SCRIPTS)
def test_plumbing_comes_last_and_entry_point_is_main(name):
    src = (ROOT / "algorithms" / f"{name}.py").read_text()
    tail = src[src.index('\nif __name__ == "__main__":'):]
    assert tail.strip().splitlines() == ['if __name__ == "__main__":', "    main(train, parse_config())"]
    assert src.index("\ndef train(") < src.index(BANNER), f"{name}.py: train() must come before the plumbing"
    assert "import pickle" not in src, f"{name}.py: checkpoints are data-only (JSON + npz), no pickle"


# Helpers above the banner that several files share word for word (the files that need another version keep their
# own, e.g. o2td3's make_hyper has the offline/online switch): a fix to one copy must be made to every copy.
ALL = tuple(SCRIPTS)
SHARED = {
    "Trainable": ALL, "_step": ALL,
    "make_hyper": ("iql", "cal_ql", "aca", "pex", "o2sac", "o2ppo"),
    "buffer_insert": ("iql", "cal_ql", "aca", "pex", "o2sac", "o2td3"),
    "gaussian_log_prob": ("iql", "cal_ql", "aca", "pex", "o2sac", "o2ppo"),
    "evaluate": ("iql", "cal_ql", "aca", "o2sac", "o2td3"),
    "block_metrics": ("iql", "cal_ql", "aca", "pex", "o2ppo"),
    "summarize": ("iql", "cal_ql", "aca", "pex"),
    "Logger": ("iql", "cal_ql", "o2ppo"),
    "householder_q": ("cal_ql", "o2sac", "o2td3", "o2ppo"),
    "orthogonal_kernel_init": ("cal_ql", "o2sac", "o2td3", "o2ppo"),
    "expectile_loss": ("iql", "pex", "o2ppo"),
    "score_of": ("o2sac", "o2td3", "o2ppo"),
    "cql_logsumexp": ("cal_ql", "o2sac"),
    "matmul": ("iql", "aca", "pex", "o2ppo"),
    "dot_general": ("cal_ql", "o2sac", "o2td3"),
}


def above_banner(name: str) -> dict:
    src = (ROOT / "algorithms" / f"{name}.py").read_text()
    return definitions(src[:src.index(BANNER)])


@pytest.mark.parametrize("helper", sorted(SHARED))
def test_shared_helpers_are_identical(helper):
    copies = {name: above_banner(name).get(helper) for name in SHARED[helper]}
    missing = [name for name, text in copies.items() if text is None]
    assert not missing, f"{helper} is no longer defined in {', '.join(missing)}.py: update SHARED in this test"
    first = SHARED[helper][0]
    drifted = [name for name, text in copies.items() if text != copies[first]]
    assert not drifted, (f"{helper} in {', '.join(n + '.py' for n in drifted)} differs from {first}.py's: make the "
                         "fix in every copy")
