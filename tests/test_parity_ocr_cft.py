"""Step parity of O2SAC, O2TD3 and O2PPO with the official OCR-CFT code (benchmarks/parity_refs/ocr_cft.py).

Without the reference: the adapter's weight layouts fit our networks (same tree, same outputs, exact round trip),
and the shared helpers it relies on (integer draws inside lax.scan, preset Adam states) do what they say. With the
reference (a directory holding ocr_cft/ in $O2O_PARITY_REFS, and torch): every row of each algorithm at the
reference behaviour is within tolerance. All need torch (not installed in CI): skipped without it.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parity
from parity_refs import common, ocr_cft


def _mlp(torch, sizes, layer_norm):
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.LayerNorm(b)] if layer_norm else []) + [torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-2], sizes[-1]))


def _scrambled(torch, module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


@pytest.mark.parametrize("algo", ["o2sac", "o2td3"])
def test_critic_layout_fits_ours_and_round_trips(algo):
    """A torch [Linear, LayerNorm, ReLU] x 2 + Linear critic pair -> our vmapped LayerNorm ensemble: the same tree,
    the same Q values, and back into torch exactly."""
    torch = pytest.importorskip("torch")
    mod = common.ours(algo)
    torch.manual_seed(0)
    critics = [_scrambled(torch, _mlp(torch, [7, 16, 16, 1], True)) for _ in range(2)]
    if algo == "o2sac":
        net, tree_fn, prefix = mod.critic_ensemble((16, 16), 2, True), ocr_cft.sac_critic_tree, "MLP_0/"
    else:
        net, tree_fn, prefix = mod.critic_ensemble((16, 16), True, 2), ocr_cft.td3_tree, ""
    rng = np.random.default_rng(0)
    obs, act = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)
    template = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)), jnp.zeros((1, 2)))["params"]
    params = ocr_cft.fit(template, ocr_cft.ensemble_tree(critics, tree_fn))
    ours = np.asarray(net.apply({"params": params}, obs, act))
    ref = np.stack([c(torch.as_tensor(np.concatenate([obs, act], -1)))[:, 0].detach().numpy() for c in critics])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    back, params = _mlp(torch, [7, 16, 16, 1], True), jax.tree.map(np.array, params)
    dense, norms = [f"{prefix}Dense_{i}" for i in range(3)], [f"{prefix}LayerNorm_{i}" for i in range(2)]
    common.load_dense_tree(params, dense, common.linear_layers(back), member=1)
    common.load_layer_norm_tree(params, norms, [m for m in back.modules() if isinstance(m, torch.nn.LayerNorm)],
                                member=1)
    for a, b in zip(critics[1].parameters(), back.parameters()):
        assert torch.equal(a, b)


def test_actor_layouts_fit_ours():
    """The tanh-Gaussian actor (MLP + log-std scalars, O2SAC) and the Gaussian actor (tanh-mean MLP + log-std vector,
    O2PPO) of the adapter's layout give our actors' outputs."""
    torch = pytest.importorskip("torch")
    o2sac, o2ppo = common.ours("o2sac"), common.ours("o2ppo")
    torch.manual_seed(0)
    obs = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    x = torch.as_tensor(obs)

    sac = torch.nn.Module()
    sac.base_network = _scrambled(torch, _mlp(torch, [5, 16, 16, 4], False))
    sac.log_std_multiplier, sac.log_std_offset = torch.nn.Module(), torch.nn.Module()
    sac.log_std_multiplier.constant = torch.nn.Parameter(torch.tensor(0.7))
    sac.log_std_offset.constant = torch.nn.Parameter(torch.tensor(-0.4))
    net = o2sac.TanhGaussianActor(2, (16, 16))
    params = ocr_cft.fit(net.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"], ocr_cft.sac_actor_tree(sac))
    mean, log_std = net.apply({"params": params}, obs)
    out = sac.base_network(x).detach().numpy()
    np.testing.assert_allclose(mean, out[:, :2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_std, np.clip(0.7 * out[:, 2:] - 0.4, -20, 2), rtol=1e-5, atol=1e-6)

    ppo = torch.nn.Module()
    ppo.net = _scrambled(torch, _mlp(torch, [5, 16, 16, 2], False))
    ppo.log_std = torch.nn.Parameter(torch.tensor([-0.3, 0.2]))
    net = o2ppo.GaussianActor(2, (16, 16))
    params = ocr_cft.fit(net.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"], ocr_cft.ppo_tree(ppo))
    mean, log_std = net.apply({"params": params}, obs)
    np.testing.assert_allclose(mean, torch.tanh(ppo.net(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(log_std, np.float32([-0.3, 0.2]))


def test_indices_serve_both_sides_inside_scan():
    torch = pytest.importorskip("torch")
    perms, rows = [np.array([2, 0, 1]), np.array([1, 2, 0])], [(5, np.array([4, 0])), (9, np.array([8, 3]))]
    ours, ref = common.Indices(rows, perms), common.Indices(rows, perms)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    with common.jax_indices(ours):
        _, got = jax.lax.scan(lambda c, k: (c, jax.random.permutation(k, 3)), 0, keys)
        drawn = [jax.random.randint(jax.random.PRNGKey(0), (2,), 0, high) for high in (9, 5)]
    np.testing.assert_array_equal(got, perms)
    np.testing.assert_array_equal(drawn, [[8, 3], [4, 0]])  # matched by upper bound, not by order
    with common.torch_indices(ref):
        assert [torch.randperm(3).tolist() for _ in range(2)] == [p.tolist() for p in perms]
        assert np.random.randint(0, 5, size=2).tolist() == [4, 0] and np.random.randint(9, size=2).tolist() == [8, 3]
    ours.check_used()
    ref.check_used()


def test_preset_adam_states_step_alike():
    """One step from the preset states of torch's Adam and optax's adam moves a parameter alike, tiny gradients
    included, and leaves 0.1 x the gradient as the first moment."""
    torch = pytest.importorskip("torch")
    import optax
    g = np.array([3e-1, -2e-3, 1e-9, -1e-12, 0.0], np.float32)
    p0 = np.linspace(-1, 1, 5).astype(np.float32)
    tx = optax.adam(1e-3)
    state = common.preset_adam_optax(tx.init(jnp.asarray(p0)))
    updates, state = tx.update(jnp.asarray(g), state)
    ours = optax.apply_updates(jnp.asarray(p0), updates)
    p = torch.nn.Parameter(torch.as_tensor(p0.copy()))
    opt = torch.optim.Adam([p], lr=1e-3)
    common.preset_adam_torch(opt)
    p.grad = torch.as_tensor(g)
    opt.step()
    np.testing.assert_allclose(ours, p.detach().numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(common.optax_first_moment(state), 0.1 * g, rtol=1e-6)
    np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), 0.1 * g, rtol=1e-6)


def test_compare_trees_worst_leaf_and_floor():
    """Each leaf relative to itself (the tiny scalar 10 % off is the worst); with `floor`, a leaf's
    scale is at least floor x the tree's largest value (a near-zero gradient sum is judged by its summands' scale)."""
    ours = {"kernel": np.float32([10.0, -10.0]), "bias": np.float32([1.001e-2]), "scalar": np.float32(1.0e-6)}
    ref = {"kernel": np.float32([10.0, -10.0]), "bias": np.float32([1.0e-2]), "scalar": np.float32(1.1e-6)}
    rows = []
    row = common.compare_trees(rows, "a", "r", "p", "s", "grad", ours, ref)
    assert not row["passed"] and "scalar" in row["note"] and row["max_rel_diff"] == pytest.approx(1 / 11, rel=1e-3)
    row = common.compare_trees(rows, "a", "r", "p", "s", "grad", ours, ref, floor=1e-2)
    assert "bias" in row["note"] and row["max_rel_diff"] == pytest.approx(1e-4, rel=1e-3) and not row["passed"]
    assert rows[-1] is row and len(rows) == 2


@pytest.mark.parametrize("algo", ["o2sac", "o2td3", "o2ppo"])
def test_step_parity_with_the_official_code(algo):
    pytest.importorskip("torch")
    root = os.environ.get("O2O_PARITY_REFS")
    if not root:
        pytest.skip("reference checkouts not available: set O2O_PARITY_REFS to a directory holding ocr_cft/")
    try:
        common.reference_checkout("ocr_cft", root, clone=False)
    except common.ReferenceMissing as e:
        pytest.skip(str(e))
    rows = ocr_cft.STEPS[algo](reference_dir=root)
    assert rows
    failed = [r for r in rows if parity.verdict(r) == "FAIL"]
    assert not failed, "\n".join(f"{r['phase']} | {r['setting']} | {r['quantity']}: {r['max_rel_diff']:.2e}"
                                 for r in failed)
    by_design = [r for r in rows if parity.verdict(r) != "pass"]
    assert all("default" in r["setting"] for r in by_design)  # only our defaults may differ
