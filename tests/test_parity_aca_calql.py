"""Step parity of ACA and Cal-QL against their official code (benchmarks/parity_refs/aca.py, calql_official.py).

The parity runs need the reference checkouts: set O2O_PARITY_REFS to a directory holding aca/ and calql/ (the pinned
commits of parity_refs/common.REFERENCES). ACA's reference side also needs d3rlpy 1.1.0 in its own virtualenv
(benchmarks/parity-requirements.txt, section ACA; O2O_ACA_PYTHON). Without them those tests are skipped; the
weight-layout round trips and the hand-computed Monte-Carlo returns below need no reference.
"""
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import aca
import cal_ql
from parity_refs import aca as aca_parity
from parity_refs import calql_official

REFS = os.environ.get("O2O_PARITY_REFS")


def _checkout(name: str) -> Path:
    if not REFS or not (Path(REFS) / name).is_dir():
        pytest.skip(f"set O2O_PARITY_REFS to a directory holding the {name}/ reference checkout")
    return Path(REFS) / name


def _assert_all_pass(rows):
    assert rows, "no rows"
    bad = [f"{r['phase']} / {r['setting']} / {r['quantity']}: {r['max_rel_diff']:.2e} > {r['tol']:g}"
           for r in rows if not r["passed"]]
    assert not bad, "\n".join(bad)


def test_calql_official_step_parity():
    path = _checkout("calql")  # JAX reference: runs in this process
    _assert_all_pass(calql_official.step_cal_ql(reference_dir=path))


def test_aca_step_parity():
    path = _checkout("aca")
    pytest.importorskip("torch")
    try:
        aca_parity.reference_python()
    except aca_parity.common.ReferenceMissing as e:
        pytest.skip(str(e))
    _assert_all_pass(aca_parity.step_aca(reference_dir=path))


# ---- no reference needed ----
@pytest.mark.parametrize("squashed", [True, False])
def test_aca_torch_layout_round_trip(squashed):
    cfg = aca.TrainConfig(hidden_dims=[16, 8], squashed_policy=squashed)
    h = aca.make_hyper(cfg, 5, 3)
    state = aca.init_state(h, jax.random.PRNGKey(0), np.zeros(5), np.ones(5))
    nh = len(h.hidden_dims)
    for kind, tree in (("actor", state.actor.params), ("critic", state.critic.params),
                       ("baseline", state.baseline.params), ("log_temp", state.log_temp.params)):
        sd = aca_parity.to_torch(kind, tree, nh, squashed)
        back = aca_parity.from_torch(kind, sd, nh, squashed)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), tree, back)
    sd = aca_parity.to_torch("critic", state.critic.params, nh)
    assert sd["_q_funcs.1._encoder._fcs.0.weight"].shape == (16, 5 + 3)  # torch Linear: [out, in]
    assert sd["_q_funcs.1._fc.weight"].shape == (1, 8)
    actor = aca_parity.to_torch("actor", state.actor.params, nh, squashed)
    assert ("_logstd.weight" in actor) == squashed and ("_logstd" in actor) != squashed


def test_calql_official_layout_round_trip():
    cfg = cal_ql.TrainConfig(policy_hidden=[8, 8], critic_hidden=[8, 4])
    h = cal_ql.make_hyper(cfg, 5, 3)
    state = cal_ql.init_state(h, jax.random.PRNGKey(0), np.zeros(5), np.ones(5), 1.0)
    variables = calql_official.to_official(state.actor.params, state.critic.params, h.n_critics)
    assert set(variables) == {"policy", "qf1", "qf2"}
    assert variables["qf2"]["params"]["FullyConnectedNetwork_0"]["Dense_0"]["kernel"].shape == (8, 8)
    actor, critic = calql_official.from_official(variables, h.n_critics)
    for ours, back in ((state.actor.params, actor), (state.critic.params, critic)):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, back)


def test_calql_mc_returns_by_hand():
    """AntMaze (10 r - 5, gamma 0.99, rule 'all'): one success, one all-fail and one mixed episode."""
    rewards = np.array([-5, -5, 5, -5, -5, -5, -5, 5, -5], np.float32)
    ends = np.array([0, 0, 1, 0, 0, 1, 0, 0, 1], bool)
    g = cal_ql.mc_returns(rewards, ends, 0.99, "all", -5.0)
    success = [-5 + 0.99 * (-5 + 0.99 * 5), -5 + 0.99 * 5, 5]
    all_fail = [-500.0] * 3
    mixed = [-5 + 0.99 * (5 - 0.99 * 5), 5 - 0.99 * 5, -5]  # not all failures: plain return (CORL's 'last' differs)
    np.testing.assert_allclose(g, success + all_fail + mixed, rtol=1e-6)
    np.testing.assert_allclose(cal_ql.mc_returns(rewards, ends, 0.99, "last", -5.0)[6:], -500.0)
