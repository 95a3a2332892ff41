"""benchmarks/parity.py and its adapters' shared code (benchmarks/parity_refs/common.py), without network.

The reference-side tests need torch (pytest.importorskip) and, for the step tests, the reference checkouts in
$O2O_PARITY_REFS (a directory holding corl/, pex/, ...); they are skipped otherwise.
"""
import json
import os

import numpy as np
import pytest

import data
import parity
from parity_refs import common


def _refs(name):
    root = os.environ.get("O2O_PARITY_REFS")
    if not root:
        pytest.skip("reference checkouts not available: set O2O_PARITY_REFS to a directory holding them")
    try:
        return common.reference_checkout(name, root, clone=False)
    except common.ReferenceMissing as e:
        pytest.skip(str(e))


def test_d4rl_stand_in_serves_load_dataset(tiny_dataset):
    ds = data.load_dataset(tiny_dataset("hopper", "medium"))
    served = common.d4rl_stand_in(ds).qlearning_dataset(env=None)
    assert set(served) == {"observations", "actions", "next_observations", "rewards", "terminals", "timeouts"}
    for key, arr in served.items():
        assert np.array_equal(arr, getattr(ds, key)) and arr.dtype == getattr(ds, key).dtype, key
    served["rewards"] -= 1.0  # copies: a reference modifying its dict in place leaves our data alone
    assert not np.array_equal(served["rewards"], ds.rewards)


def test_weight_copy_round_trips_and_matches_flax():
    torch = pytest.importorskip("torch")
    import iql
    names = ["TorchLinear_0", "TorchLinear_1"]
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1)) for _ in range(3)]
    tree = common.dense_tree(common.linear_layers(nets[0]), names)
    common.load_dense_tree(tree, names, common.linear_layers(nets[1]))
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    ensemble = common.stack_members([tree, common.dense_tree(common.linear_layers(nets[2]), names)])
    common.load_dense_tree(ensemble, names, common.linear_layers(nets[1]), member=1)
    for a, b in zip(nets[2].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    ours = iql.VNet((7,)).apply({"params": tree}, x)
    np.testing.assert_allclose(np.asarray(ours), nets[0](torch.as_tensor(x))[:, 0].detach().numpy(), rtol=1e-5,
                               atol=1e-6)


def test_same_noise_on_both_sides():
    torch = pytest.importorskip("torch")
    import jax
    rng = np.random.default_rng(0)
    eps, u, gate = rng.normal(size=(3, 2)), rng.random((3, 2)), rng.random(3)
    loc, scale = rng.normal(size=(3, 2)).astype(np.float32), rng.uniform(0.5, 1, (3, 2)).astype(np.float32)
    logits = rng.normal(size=(3, 2)).astype(np.float32)
    with common.torch_noise(common.Noise(normal=[eps], uniform=[u], categorical=[gate])) as noise:
        t_sample = torch.distributions.Normal(torch.as_tensor(loc), torch.as_tensor(scale)).sample()
        t_uniform = torch.empty(3, 2).uniform_(-1, 1)
        t_cat = torch.distributions.Categorical(logits=torch.as_tensor(logits)).sample()
        noise.check_used()
    with common.jax_noise(common.Noise(normal=[eps], uniform=[u], categorical=[gate])) as noise:
        key = jax.random.PRNGKey(0)
        j_sample = loc + scale * jax.random.normal(key, (3, 2))
        j_uniform = jax.random.uniform(key, (3, 2), minval=-1.0, maxval=1.0)
        j_cat = jax.random.categorical(key, logits)
        noise.check_used()
    np.testing.assert_allclose(t_sample.numpy(), np.asarray(j_sample), rtol=1e-6)
    np.testing.assert_array_equal(t_uniform.numpy(), np.asarray(j_uniform))
    np.testing.assert_array_equal(t_cat.numpy(), np.asarray(j_cat))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(j_cat), (gate >= probs[:, 0]).astype(int))


def _row(passed, note="", rel=1e-7):
    return {"algo": "x", "reference": "R", "phase": "offline", "setting": "s", "quantity": "q",
            "max_rel_diff": rel if passed else 0.5, "max_abs_diff": 0.0, "tol": 1e-5, "passed": passed, "note": note}


def test_verdicts_and_summary():
    by_design = _row(False, "default differs by design: deviation 1")
    assert [parity.verdict(r) for r in (_row(True), by_design, _row(False))] == ["pass", "differs by design", "FAIL"]
    ran = [{"reference": "corl", "status": "ran", "message": ""}]
    ok = {"rows": [_row(True, rel=3e-7), by_design], "runs": ran}
    assert parity.summary("iql", ok) == ("iql: PASS (2 rows, 1 within tolerance, 1 rows of our default setting differ "
                                         "by design, largest relative difference 3.0e-07)")
    assert parity.summary("iql", {"rows": [_row(True), _row(False)], "runs": ran}).startswith("iql: FAIL")
    missing = {"rows": [], "runs": [{"reference": "aca", "status": "not run", "message": "fetch it"}]}
    assert parity.summary("aca", missing) == "aca: not run (not run: fetch it)"
    half = {"rows": [_row(True)], "runs": ran + missing["runs"]}
    assert parity.summary("cal_ql", half).startswith("cal_ql: PASS") and "aca not run: fetch it" in \
        parity.summary("cal_ql", half)
    entry = {**ok, "date": "today", "versions": {"jax": "1"}}
    md = parity.markdown({"algorithms": {"iql": entry, "aca": {**missing, "date": "", "versions": {}}}})
    assert "| R | offline | s | q | 3.00e-07 | 1e-05 | pass |" in md and "| differs by design |" in md
    assert "- aca: not run" in md


def test_driver_records_missing_reference(tmp_path):
    out = tmp_path / "out"
    assert parity.main(["step", "iql", "--reference_dir", str(tmp_path / "none"), "--out", str(out)]) == 0
    text = (out / "step.md").read_text()
    assert "iql: not run" in text and "git clone https://github.com/tinkoff-ai/CORL" in text
    assert "iql" in json.loads((out / "step.json").read_text())["algorithms"]


def test_reference_checkout_missing_says_what_to_fetch(tmp_path):
    (tmp_path / "pex").mkdir()  # a directory of other checkouts is not mistaken for CORL's
    (tmp_path / "pex" / "setup.py").write_text("")
    url, commit = common.REFERENCES["corl"]
    with pytest.raises(common.ReferenceMissing, match=f"git clone {url} .*{commit}"):
        common.reference_checkout("corl", tmp_path, clone=False)
    assert common.reference_checkout("pex", tmp_path, clone=False) == tmp_path / "pex"  # plain export: trusted


def test_iql_step_and_data_rows_against_corl():
    """One IQL update (AntMaze) and the data rows of IQL and Cal-QL (reward transforms, return range, Monte-Carlo
    returns with CORL's failure rule) against the CORL checkout."""
    pytest.importorskip("torch")
    path = _refs("corl")
    from parity_refs import corl
    ref, iql, rng = corl._reference(path, "iql.py"), common.ours("iql"), np.random.default_rng(0)
    rows = common.compare_all([], "iql", "CORL", "offline", "AntMaze", corl._iql_step(
        ref, iql, iql.TrainConfig(offline_updates=1000), common.random_batch(rng, 29, 8, True)))
    data_rows = corl.iql_data_rows(ref, iql, rng, [])
    data_rows += corl.calql_data_rows(corl._reference(path, "cal_ql.py"), common.ours("cal_ql"), rng, [])
    failed = [r for r in rows + data_rows if parity.verdict(r) == "FAIL"]
    assert failed == []
