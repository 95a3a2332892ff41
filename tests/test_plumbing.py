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
