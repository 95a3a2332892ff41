"""benchmarks/peers.py's tables from a result (no timing here: the run itself is a benchmark), and the committed
sections it generates."""
import json
from pathlib import Path

import peers

ROOT = Path(__file__).resolve().parent.parent


def fake():
    row = lambda ups, flops, commit: {"updates_per_s": ups, "flops": flops, "info": {"commit": commit},  # noqa: E731
                                      "rates": [ups]}
    return {"date": "2026-12-07", "rounds": 3, "seconds": 8.0, "cpus": 2, "matmul_gflops": [150.0, 140.0, 160.0],
            "load_before": [1.0, 1.0, 1.0], "load_after": [1.1, 1.0, 1.0],
            "updates": {"iql": {"ours": row(240.0, 0.5e9, "abc1234"), "ours_bf16": row(250.0, 0.5e9, "abc1234"),
                                "unifloral": row(200.0, 0.5e9, "f2dc127"),
                                "jax_corl": row(160.0, 0.6e9, "d747dd8"), "corl_t2": row(100.0, 0.5e9, "6afec90")},
                        "cal_ql": {"ours": row(16.0, 7.6e9, "abc1234"), "corl_t2": row(8.0, 8.4e9, "6afec90"),
                                   "corl_t1": {"error": "RuntimeError: worker failed"}}}}


def test_tables():
    text = peers.markdown(fake())
    assert "| iql | unifloral | f2dc127 | 200.0 | 1.20x (1.25x) | 0.500 | 100.0 | 0.667 |" in text
    assert "| iql | iql.py (IQL), bf16 | abc1234 | 250.0 | – |" in text
    assert "| cal_ql | corl_t1 | – | not run: RuntimeError: worker failed |" in text
    head = peers.headline(fake())
    assert "| iql | 240.0 / 250.0 | 200.0 (unifloral) | 1.20x / 1.25x | 100.0 | 2.40x / 2.50x |" in head
    assert "| cal_ql | 16.0 | – | – | 8.0 | 2.00x |" in head


def test_ours_builds_in_both_precisions():
    """The worker's build of our update (a tiny block on a small synthetic table): runs, counts FLOPs, records the
    precision."""
    import types
    for precision in ("float32", "bf16"):
        built = peers.build_ours("iql", types.SimpleNamespace(block=2, rows=1000), precision)
        built.step()
        assert built.per_call == 2 and built.info["precision"] == precision
        assert 0.4e9 < built.flops < 0.7e9


def test_committed_sections_match_the_generator():
    path = ROOT / "benchmarks" / "results" / "peers.json"
    if not path.exists():
        import pytest
        pytest.skip("no peers.json committed")
    res = json.loads(path.read_text())
    for page, name, text in ((ROOT / "docs" / "speed.md", "peers", peers.markdown(res)),
                             (ROOT / "README.md", "peers_headline", peers.headline(res))):
        section = page.read_text().split(f"<!-- {name}:begin -->\n")[1].split(f"\n<!-- {name}:end -->")[0]
        assert section == text.strip(), name
