"""IQL and Cal-QL against CORL (`algorithms/finetune/iql.py`, `algorithms/finetune/cal_ql.py` at the pinned commit).

One update on each side from the same weights (CORL's torch networks, copied into our flax trees; target critics
perturbed so they are no copy of the critics), the same batch and the same noise (CORL's Normal/uniform draws and
our jax.random draws come from one set of arrays). Compared: the losses, Adam's first moments after the step
(m = 0.1 g: the gradients, also where CORL's .grad holds extra terms) and the updated parameters, trees leaf by
leaf; both sides' Adam states preset alike (common.ADAM_NU0_LINEAR, common.ADAM_LATE_STEP). The data rows feed one
synthetic dataset (in the d4rl stand-in's layout) to CORL's reward / return functions and to ours.
"""
import warnings

import numpy as np

from . import common as C

IQL_LAYERS = ["TorchLinear_0", "TorchLinear_1", "TorchLinear_2"]
B = C.BATCH


def _reference(reference_dir, file: str):
    path = C.reference_checkout("corl", reference_dir)
    import pyrallis  # noqa: F401  (imported before reference_on_path so they stay loaded afterwards)
    import torch  # noqa: F401
    with C.reference_on_path(path, C.reference_stand_ins()):
        return C.load_file(path / "algorithms" / "finetune" / file, "corl_" + file[:-3])


def _norm(batch, key):
    return (batch[key] - batch["obs_mean"]) / batch["obs_std"]


# ---------------------------------------------------------------------------------------------- IQL
def _iql_step(ref, iql, cfg, batch, lr_steps: int = 0, dropout_masks=()):
    """One update of CORL's ImplicitQLearning and of our iql_update from the same weights and batch; the actor
    LR schedule first advanced by `lr_steps` on both sides. Returns {quantity: (ours, CORL)}."""
    import torch
    import jax
    obs_dim, act_dim = batch["obs"].shape[1], batch["act"].shape[1]
    torch.manual_seed(0)
    actor = ref.GaussianPolicy(obs_dim, act_dim, 1.0, dropout=cfg.actor_dropout)
    qf, vf = ref.TwinQ(obs_dim, act_dim), ref.ValueFunction(obs_dim)
    adam = lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr)  # noqa: E731
    trainer = ref.ImplicitQLearning(
        max_action=1.0, actor=actor, actor_optimizer=adam(actor, cfg.actor_lr), q_network=qf,
        q_optimizer=adam(qf, cfg.critic_lr), v_network=vf, v_optimizer=adam(vf, cfg.value_lr), iql_tau=cfg.expectile,
        beta=cfg.beta, max_steps=cfg.offline_updates, discount=cfg.discount, tau=cfg.tau, device="cpu")
    C.perturb_(trainer.q_target)
    for opt in (trainer.actor_optimizer, trainer.q_optimizer, trainer.v_optimizer):
        C.preset_adam_torch(opt, C.ADAM_NU0_LINEAR, C.ADAM_LATE_STEP)
    with warnings.catch_warnings():  # scheduler stepped without optimizer steps: only its LR is wanted
        warnings.simplefilter("ignore")
        for _ in range(lr_steps):
            trainer.actor_lr_schedule.step()
    lr_ref = trainer.actor_optimizer.param_groups[0]["lr"]

    nets = {"actor": ([C.linear_layers(actor.net)], IQL_LAYERS), "value": ([C.linear_layers(vf.v)], IQL_LAYERS),
            "critic": ([C.linear_layers(qf.q1), C.linear_layers(qf.q2)], IQL_LAYERS),
            "target": ([C.linear_layers(trainer.q_target.q1), C.linear_layers(trainer.q_target.q2)], IQL_LAYERS)}
    scalars = {"actor": {"log_std": actor.log_std}}
    before = C.torch_trees(nets, scalars)
    h = iql.make_hyper(cfg, obs_dim, act_dim)
    txs = iql.optimizers(h)
    late = lambda k: C.preset_adam_optax(  # noqa: E731
        txs[k].init(before[k]), C.ADAM_NU0_LINEAR, C.ADAM_LATE_STEP)
    tr = {k: iql.Trainable(before[k], late(k)) for k in ("actor", "critic", "value")}
    adam_state, sched = tr["actor"].opt_state  # the actor LR schedule at step lr_steps
    tr["actor"] = tr["actor"]._replace(opt_state=(adam_state, sched._replace(count=np.int32(lr_steps))))
    state = iql.IQLState(tr["actor"], tr["critic"], tr["value"], before["target"], jax.random.PRNGKey(0),
                         np.int32(0), batch["obs_mean"], batch["obs_std"])

    masks = [np.asarray(m) for m in dropout_masks]
    ref_batch = [C.torch_f32(x) for x in (_norm(batch, "obs"), batch["act"], batch["rew"][:, None],
                                          _norm(batch, "next_obs"), batch["done"][:, None])]
    with C.torch_noise(C.Noise(bernoulli=masks)) as noise:
        log = trainer.train(ref_batch)
        noise.check_used()
    ours_batch = iql.Buffer(*(batch[k] for k in ("obs", "act", "rew", "next_obs", "done")))
    with C.jax_noise(C.Noise(bernoulli=masks)) as noise:
        new, metrics = iql.iql_update(state, ours_batch, jax.random.PRNGKey(1), h)
        noise.check_used()

    after = C.torch_trees(nets, scalars)
    m_ref = {k: C.torch_trees({k: nets[k]}, {k: scalars.get(k, {})}, C.adam_first_moment(opt))[k] for k, opt in
             (("actor", trainer.actor_optimizer), ("critic", trainer.q_optimizer), ("value", trainer.v_optimizer))}
    q = {"value loss": (metrics["value_loss"], log["value_loss"]),
         "critic loss": (metrics["critic_loss"], log["q_loss"]),
         "actor loss": (metrics["actor_loss"], log["actor_loss"])}
    for k, net in (("value", "V"), ("critic", "Q"), ("actor", "actor")):
        q[f"{net} Adam m (grad)"] = (getattr(new, k).opt_state[0].mu, m_ref[k])
    for k, net in (("value", "V"), ("critic", "Q"), ("actor", "actor")):
        q[f"{net} params after"] = (getattr(new, k).params, after[k])
    q["target Q after"] = (new.critic_target, after["target"])
    q["actor LR of the step"] = (float(iql.actor_lr_schedule(h)(np.int32(lr_steps))), lr_ref)
    return q


def iql_data_rows(ref, iql, rng, rows: list) -> list:
    """Reward transforms on one synthetic dataset each (AntMaze r - 1; locomotion scaled by the return range),
    served to CORL in D4RL's layout."""
    cmp = lambda *a, **k: C.compare_all(rows, "iql", "CORL", *a, **k)  # noqa: E731
    ant = C.synthetic_data(C.antmaze_episodes(rng, 100), 100)
    d = C.qlearning_dataset(ant)
    ref.modify_reward(d, "antmaze-umaze-v2")
    cfg = iql.TrainConfig(reward_scale=1.0, reward_bias=-1.0)
    cmp("data", "AntMaze: r - 1", {"rewards": (iql.prepare_rewards(cfg, ant)[0], d["rewards"])})
    loco = C.synthetic_data(C.locomotion_episodes(rng), 1000)
    d = C.qlearning_dataset(loco)
    mod = ref.modify_reward(d, "hopper-medium-v2")
    cfg = iql.TrainConfig(reward_bias=0.0, normalize_reward_by_returns=True)
    returns = C.ours("data").episode_returns(loco)
    cmp("data", "locomotion: r * 1000 / (max - min episode return)", {
        "return range (data.episode_returns)": ([returns.min(), returns.max()], [mod["min_ret"], mod["max_ret"]]),
        "rewards (iql.prepare_rewards)": (iql.prepare_rewards(cfg, loco)[0], d["rewards"])},
        note="CORL: episodes end at a terminal or after 1000 rows, the unfinished last one is dropped; the data "
             "ends with a cut fragment")
    return rows


def step_iql(reference_dir=None) -> list:
    """IQL (algorithms/iql.py) vs CORL finetune/iql.py: data rows, offline and online steps in the AntMaze, Adroit
    and locomotion settings of CORL's configs (our configs' values)."""
    ref = _reference(reference_dir, "iql.py")
    iql = C.ours("iql")
    rows, rng = [], np.random.default_rng(0)
    cmp = lambda *a, **k: C.compare_all(rows, "iql", "CORL", *a, **k)  # noqa: E731

    iql_data_rows(ref, iql, rng, rows)

    # updates
    ant_cfg = dict(expectile=0.9, beta=10.0, offline_updates=1000)
    setting = "AntMaze (expectile 0.9, beta 10, r - 1, states normalised)"
    cmp("offline", setting, _iql_step(ref, iql, iql.TrainConfig(**ant_cfg), C.random_batch(rng, 29, 8, True)))
    online = C.random_batch(rng, 29, 8, True, online_rows=64)
    k = 1000 + 200  # the 201st online update after 1000 offline updates
    setting = f"AntMaze, online update {k - 1000 + 1} after 1000 offline (batch with online success terminals)"
    cmp("online", setting + ", corl_cosine_restart", _iql_step(
        ref, iql, iql.TrainConfig(**ant_cfg, corl_cosine_restart=True), online, lr_steps=k))
    cmp("online", setting + ", default", _iql_step(ref, iql, iql.TrainConfig(**ant_cfg), online, lr_steps=k),
        by_design="deviation 1 (constant online actor LR; CORL's cosine restarts)")
    adroit = C.random_batch(rng, 45, 24, False)
    masks = [rng.random((B, 256)) >= 0.1 for _ in range(2)]  # keep masks of the actor's two dropout layers
    cmp("offline", "Adroit (expectile 0.8, beta 3, actor dropout 0.1, same dropout masks)", _iql_step(
        ref, iql, iql.TrainConfig(expectile=0.8, beta=3.0, actor_dropout=0.1, offline_updates=1000), adroit,
        dropout_masks=masks))
    cmp("offline", "locomotion (expectile 0.7, beta 3)", _iql_step(
        ref, iql, iql.TrainConfig(expectile=0.7, beta=3.0, offline_updates=1000), C.random_batch(rng, 11, 3, False)))
    return rows


# ---------------------------------------------------------------------------------------------- Cal-QL
def _calql_layers(actor, critics):
    n_actor, n_critic = len(C.linear_layers(actor.base_network)), len(C.linear_layers(critics[0].network))
    return ([f"MLP_0/Dense_{i}" for i in range(n_actor)], [f"MLP_0/Dense_{i}" for i in range(n_critic)])


def _calql_step(ref, cal_ql, cfg, batch, calibrate_ref: bool, calibrate_ours: bool):
    """One update of CORL's CalQL and of our calql_update from the same weights, batch and noise."""
    import torch
    import jax
    obs_dim, act_dim, n = batch["obs"].shape[1], batch["act"].shape[1], cfg.cql_n_actions
    torch.manual_seed(0)
    actor = ref.TanhGaussianPolicy(obs_dim, act_dim, 1.0, orthogonal_init=True)
    critics = [ref.FullyConnectedQFunction(obs_dim, act_dim, True, len(cfg.critic_hidden)) for _ in range(2)]
    if [layer.out_features for layer in C.linear_layers(actor.base_network)[:-1]] != list(cfg.policy_hidden):
        raise ValueError(f"CORL's actor is 3x256 (hard-coded): policy_hidden must be that, got {cfg.policy_hidden}")
    trainer = ref.CalQL(
        critic_1=critics[0], critic_1_optimizer=torch.optim.Adam(critics[0].parameters(), cfg.critic_lr),
        critic_2=critics[1], critic_2_optimizer=torch.optim.Adam(critics[1].parameters(), cfg.critic_lr),
        actor=actor, actor_optimizer=torch.optim.Adam(actor.parameters(), cfg.policy_lr), target_entropy=-act_dim,
        discount=cfg.discount, alpha_multiplier=cfg.alpha_multiplier, use_automatic_entropy_tuning=cfg.auto_alpha,
        backup_entropy=cfg.backup_entropy, policy_lr=cfg.policy_lr, qf_lr=cfg.critic_lr,
        soft_target_update_rate=cfg.tau, bc_steps=0, target_update_period=1, cql_n_actions=n,
        cql_importance_sample=cfg.cql_importance_sample, cql_lagrange=cfg.cql_lagrange,
        cql_target_action_gap=cfg.cql_target_action_gap, cql_temp=cfg.cql_temp, cql_alpha=cfg.cql_weight,
        cql_max_target_backup=cfg.cql_max_target_backup, cql_clip_diff_min=cfg.cql_clip_diff_min,
        cql_clip_diff_max=cfg.cql_clip_diff_max, device="cpu")
    C.perturb_(trainer.target_critic_1, seed=1)
    C.perturb_(trainer.target_critic_2, seed=2)
    for opt in (trainer.actor_optimizer, trainer.critic_1_optimizer, trainer.critic_2_optimizer,
                trainer.alpha_optimizer, trainer.alpha_prime_optimizer):
        C.preset_adam_torch(opt, C.ADAM_NU0_LINEAR, C.ADAM_LATE_STEP)
    if not calibrate_ref:
        trainer.switch_calibration()  # CORL at the start of the online phase

    a_names, q_names = _calql_layers(actor, critics)
    nets = {"actor": ([C.linear_layers(actor.base_network)], a_names),
            "critic": ([C.linear_layers(c.network) for c in critics], q_names),
            "target": ([C.linear_layers(trainer.target_critic_1.network),
                        C.linear_layers(trainer.target_critic_2.network)], q_names)}
    scalars = {"actor": {"log_std_multiplier": actor.log_std_multiplier.constant,
                         "log_std_offset": actor.log_std_offset.constant}}
    before = C.torch_trees(nets, scalars)
    before["log_alpha"] = C.to_numpy(trainer.log_alpha.constant).astype(np.float32)
    before["log_alpha_prime"] = C.to_numpy(trainer.log_alpha_prime.constant).astype(np.float32)
    h = cal_ql.make_hyper(cfg, obs_dim, act_dim)
    txs = cal_ql.optimizers(h)
    late = lambda k: C.preset_adam_optax(  # noqa: E731
        txs[k].init(before[k]), C.ADAM_NU0_LINEAR, C.ADAM_LATE_STEP)
    tr = {k: cal_ql.Trainable(before[k], late(k)) for k in ("actor", "critic", "log_alpha", "log_alpha_prime")}
    state = cal_ql.CalQLState(tr["actor"], tr["critic"], tr["log_alpha"], tr["log_alpha_prime"], before["target"],
                              jax.random.PRNGKey(0), np.int32(0), np.zeros(obs_dim, np.float32),
                              np.ones(obs_dim, np.float32))

    rng = np.random.default_rng(7)
    draws = dict(normal=[rng.normal(size=(B, act_dim))] + [rng.normal(size=(B, n, act_dim)) for _ in range(3)],
                 uniform=[rng.random((B, n, act_dim))])  # order: pi(s), backup pi(s'), CQL random, pi(s), pi(s')
    with C.torch_noise(C.Noise(**draws)) as noise:
        log = trainer.train([C.torch_f32(x) for x in (batch["obs"], batch["act"], batch["rew"][:, None],
                                                      batch["next_obs"], batch["done"][:, None], batch["mc"][:, None])])
        noise.check_used()
    ours_batch = cal_ql.Buffer(*(batch[k] for k in ("obs", "act", "rew", "next_obs", "done", "mc")))
    with C.jax_noise(C.Noise(**draws)) as noise:
        new, metrics = cal_ql.calql_update(state, ours_batch, jax.random.PRNGKey(1), calibrate_ours, cfg.cql_weight, h)
        noise.check_used()

    after = C.torch_trees(nets, scalars)
    opts = {"actor": [trainer.actor_optimizer], "critic": [trainer.critic_1_optimizer, trainer.critic_2_optimizer]}
    m_ref = {"actor": C.torch_trees({"actor": nets["actor"]}, scalars,
                                    C.adam_first_moment(opts["actor"][0]))["actor"],
             "critic": C.stack_members([C.dense_tree(C.linear_layers(c.network), q_names, C.adam_first_moment(o))
                                        for c, o in zip(critics, opts["critic"])])}
    scalar_m = lambda s, o: o.state[s.constant]["exp_avg"]  # noqa: E731
    qf_total = log["qf1_loss"] + log["qf2_loss"] + log["cql_min_qf1_loss"] + log["cql_min_qf2_loss"]
    q = {"actor loss": (metrics["actor_loss"], log["policy_loss"]),
         "alpha loss": (metrics["alpha_loss"], log["alpha_loss"]),
         "critic loss (Bellman + CQL, mean of 2)": (metrics["critic_loss"], qf_total / 2),
         "Bellman loss (mean of 2)": (metrics["bellman_loss"], (log["qf1_loss"] + log["qf2_loss"]) / 2),
         "CQL diff (mean of 2)": (metrics["cql_diff"], (log["cql_qf1_diff"] + log["cql_qf2_diff"]) / 2),
         "alpha' loss": (metrics["alpha_prime_loss"], log["alpha_prime_loss"]),
         "actor Adam m (grad)": (new.actor.opt_state[0].mu, m_ref["actor"]),
         "Q Adam m (grad)": (new.critic.opt_state[0].mu, m_ref["critic"]),
         "log alpha Adam m (grad)": (new.log_alpha.opt_state[0].mu, scalar_m(trainer.log_alpha,
                                                                             trainer.alpha_optimizer)),
         "actor params after": (new.actor.params, after["actor"]),
         "Q params after": (new.critic.params, after["critic"]),
         "target Q after": (new.critic_target, after["target"]),
         "log alpha after": (new.log_alpha.params, trainer.log_alpha.constant)}
    if cfg.cql_lagrange:
        q["log alpha' Adam m (grad)"] = (new.log_alpha_prime.opt_state[0].mu,
                                         scalar_m(trainer.log_alpha_prime, trainer.alpha_prime_optimizer))
        q["log alpha' after"] = (new.log_alpha_prime.params, trainer.log_alpha_prime.constant)
    else:
        del q["alpha' loss"]
    return q


def _calql_batch(rng, obs_dim, act_dim, sparse, online_rows=0):
    """_batch plus MC returns: failed episodes (-500), discounted returns, values above Q (calibration binds);
    online rows get 0 (CORL stores no MC return online)."""
    batch = C.random_batch(rng, obs_dim, act_dim, sparse, online_rows)
    if sparse:
        batch["rew"] = batch["rew"] * 10.0 + 5.0  # (r - 1) -> 10 r - 5
    kind = rng.integers(0, 3, B)
    mc = np.where(kind == 0, -500.0, np.where(kind == 1, -rng.uniform(0, 400, B), rng.uniform(-2, 4, B)))
    mc[B - online_rows:] = 0.0
    batch["mc"] = mc.astype(np.float32)
    return batch


def calql_data_rows(ref, cal_ql, rng, rows: list) -> list:
    """Rewards (10 r - 5) and MC returns (failure rule) of one synthetic AntMaze dataset (time limit 100), served
    to CORL in D4RL's layout."""
    import types
    cmp = lambda *a, **k: C.compare_all(rows, "cal_ql", "CORL", *a, **k)  # noqa: E731
    limit = 100
    ant = C.synthetic_data(C.antmaze_episodes(rng, limit), limit)
    d = C.qlearning_dataset(ant)
    ref.modify_reward(d, "antmaze-umaze-v2", reward_scale=10.0, reward_bias=-5.0)
    config = types.SimpleNamespace(is_sparse_reward=True, reward_scale=10.0, reward_bias=-5.0, discount=0.99)
    env = types.SimpleNamespace(_max_episode_steps=limit, ref_min_score=0.0)
    mc_ref = np.asarray(ref.get_return_to_go(d, env, config))
    base = dict(reward_scale=10.0, reward_bias=-5.0)
    rew, _, mc_last = cal_ql.prepare_offline(cal_ql.TrainConfig(**base, mc_failure_rule="last"), ant)
    cmp("data", "AntMaze: 10 r - 5, MC returns (5 synthetic episodes)", {
        "rewards": (rew, d["rewards"]), "MC returns, mc_failure_rule last": (mc_last, mc_ref)},
        note="episodes: all-fail to the time limit, success terminal, success mid-episode then fail, success at "
             "the limit, cut all-fail fragment")
    mc_all = cal_ql.prepare_offline(cal_ql.TrainConfig(**base), ant)[2]
    cmp("data", "AntMaze: MC returns, default", {"MC returns, mc_failure_rule all": (mc_all, mc_ref)},
        by_design="official Cal-QL's failure rule (all rewards of the episode fail; CORL: its last reward), "
                  "differs on the success-then-fail episode")
    return rows


def step_cal_ql(reference_dir=None) -> list:
    """Cal-QL (algorithms/cal_ql.py) vs CORL finetune/cal_ql.py (CORL's variant of Cal-QL; the official JAX code is
    compared by calql_official.py): data rows (10 r - 5, MC returns with the failure rule) and offline / online
    updates with CORL's AntMaze and Adroit configs."""
    ref = _reference(reference_dir, "cal_ql.py")
    cal_ql = C.ours("cal_ql")
    rows, rng = [], np.random.default_rng(1)
    cmp = lambda *a, **k: C.compare_all(rows, "cal_ql", "CORL", *a, **k)  # noqa: E731

    calql_data_rows(ref, cal_ql, rng, rows)

    # updates
    corl_ant = dict(policy_hidden=[256] * 3, critic_hidden=[256] * 5, cql_clip_diff_min=-200.0, cql_weight=5.0,
                    cql_lagrange=True, cql_target_action_gap=0.8, normalize=False, reward_scale=10.0,
                    reward_bias=-5.0)
    setting = "AntMaze, CORL config (Lagrange, gap 0.8, max backup, clip_diff_min -200, actor 3x256, Q 5x256)"
    cmp("offline", setting, _calql_step(ref, cal_ql, cal_ql.TrainConfig(**corl_ant), _calql_batch(rng, 29, 8, True),
                                        True, True))
    online = _calql_batch(rng, 29, 8, True, online_rows=128)
    setting = "AntMaze online (128 offline + 128 online rows, online MC 0)"
    cmp("online", setting + ", online_calibration false", _calql_step(
        ref, cal_ql, cal_ql.TrainConfig(**corl_ant, online_calibration=False), online, False, False))
    cmp("online", setting + ", default", _calql_step(ref, cal_ql, cal_ql.TrainConfig(**corl_ant), online, False,
                                                     True),
        by_design="deviation 1 (calibration stays on online, official; CORL switches it off)")
    corl_adroit = dict(policy_hidden=[256] * 3, critic_hidden=[256] * 3, cql_clip_diff_min=-200.0, cql_weight=1.0,
                       cql_lagrange=False, reward_scale=1.0, reward_bias=0.0)
    cmp("offline", "Adroit cloned, CORL config (fixed CQL weight 1, Q 3x256, raw rewards)", _calql_step(
        ref, cal_ql, cal_ql.TrainConfig(**corl_adroit), _calql_batch(rng, 45, 24, False), True, True))
    return rows


# ---------------------------------------------------------------------------------------------- learning runs
def learn_iql(cfg, reference_dir, log) -> dict:
    """CORL finetune/iql.py's own train() on our dataset with our config's hyper-parameters (parity.py learn).

    CORL evaluates every `eval_freq` updates in both phases (one update per env step online): our
    offline_eval_every and online_eval_every must be equal. Its actor LR is a CosineAnnealingLR stepped through
    both phases (our `corl_cosine_restart: true`); its networks are 2 critics of 256x256 (fixed)."""
    C.require(cfg, "CORL finetune/iql.py", n_critics=2, hidden_dims=(256, 256), exp_adv_max=100.0, reward_scale=1.0,
              reward_bias=0.0, offline_cosine=True, terminate_on_success=False, num_seeds=1)
    if cfg.offline_eval_every != cfg.online_eval_every:
        raise ValueError(f"CORL evaluates every eval_freq updates in both phases: set offline_eval_every "
                         f"({cfg.offline_eval_every}) = online_eval_every ({cfg.online_eval_every})")
    path = C.reference_checkout("corl", reference_dir)
    lo, hi = C.ours("data").reference_scores(cfg.dataset_id)

    def on_log(logged, step):
        if "eval/d4rl_normalized_score" in logged:
            score = float(logged["eval/d4rl_normalized_score"])
            online = step > cfg.offline_updates
            log("online" if online else "offline", step, step - cfg.offline_updates if online else 0, score,
                lo + score / 100.0 * (hi - lo))
    import pyrallis  # noqa: F401
    import torch  # noqa: F401
    with C.reference_on_path(path, C.learning_stand_ins(cfg.dataset_id, on_log)):
        ref = C.load_file(path / "algorithms" / "finetune" / "iql.py", "corl_iql")
        config = ref.TrainConfig(
            device="cpu", env=cfg.dataset_id, seed=cfg.seed, eval_seed=cfg.eval_seed, eval_freq=cfg.offline_eval_every,
            n_episodes=cfg.eval_episodes, offline_iterations=cfg.offline_updates, online_iterations=cfg.online_steps,
            actor_dropout=cfg.actor_dropout, batch_size=cfg.batch_size, discount=cfg.discount, tau=cfg.tau,
            beta=cfg.beta, iql_tau=cfg.expectile, normalize=cfg.normalize,
            normalize_reward=cfg.normalize_reward_by_returns, vf_lr=cfg.value_lr, qf_lr=cfg.critic_lr,
            actor_lr=cfg.actor_lr)
        ref.train.__wrapped__(config)  # under @pyrallis.wrap(): the undecorated function takes the config
    return {"reference_config": {k: v for k, v in vars(config).items() if not k.startswith("_")},
            "updates": cfg.offline_updates + cfg.online_steps}
