import copy
import os
import random
from dataclasses import replace

import pytest
import torch

import common
import rollout
import tasks
import train_ppo
import train_rm
from conftest import one_line_failure, tiny_config
from dist_helpers import run_on_two_ranks
from model import ScalarModel, Transformer
from test_train_rm import RM_TINY
from test_train_sft import TINY_MODEL

CPU = torch.device("cpu")
TOK, TASK = tasks.Tokenizer(), tasks.Addition(2)
PPO_TINY = TINY_MODEL + ["--n_digits", "2", "--eval_size", "8", "--quiet", "--batch_size", "8",
                         "--num_minibatches", "2", "--ppo_epochs", "2", "--pass_k", "2",
                         "--pass_n", "2", "--warmup", "1"]


def nets(seed=0):
    """A tiny policy, its reference (a copy) and a critic from the same weights with a zero head."""
    torch.manual_seed(seed)
    policy = Transformer(tiny_config())
    critic = ScalarModel(tiny_config())
    critic.body.load_state_dict(policy.state_dict())
    return policy, copy.deepcopy(policy).eval(), critic


def config(**kw):
    return train_ppo.PPOConfig(n_digits=2, max_new_tokens=6, **kw)


def nets_of(policy, ref, critic, policy_ddp=None, critic_ddp=None):
    policy_ddp = policy.forward_shared_prefix if policy_ddp is None else policy_ddp
    critic_ddp = critic.forward_shared_prefix if critic_ddp is None else critic_ddp
    return train_ppo.Nets(policy, ref, critic, None, policy_ddp, critic_ddp)


def experience(policy, ref, critic, cfg=None, n=8, seed=0):
    problems = [TASK.sample(random.Random(seed + i)) for i in range(n)]
    exp, correct = train_ppo.make_experience(nets_of(policy, ref, critic), TASK, TOK, problems,
                                             cfg or config(), 0.1,
                                             torch.Generator().manual_seed(seed))
    return exp, None, correct


def test_policy_equal_to_reference_gives_exactly_zero_kl():
    """At the start the per-token KL penalty is exactly 0 (no stale state), so the rewards are the
    scores."""
    policy, ref, critic = nets()
    exp, _, _ = experience(policy, ref, critic)
    assert torch.equal(exp.old_logp, exp.ref_logp)
    r = exp.rollout
    rewards = train_ppo.losses.token_rewards(exp.rewards, exp.old_logp, exp.ref_logp,
                                             r.completion_mask, 0.1)
    assert torch.equal(rewards.sum(1), exp.rewards)  # only the score, on the last token


@pytest.mark.parametrize("treatment", ["penalty", "mask"])
def test_truncated_completions_get_the_chosen_treatment(treatment):
    policy, ref, critic = nets(seed=1)
    cfg = config(truncation=treatment, truncation_penalty=-2.0)
    exp, _, _ = experience(policy, ref, critic, cfg, n=16)
    cut = ~exp.rollout.ended
    assert cut.any() and (~cut).any(), "the test needs ended and truncated completions"
    if treatment == "penalty":
        assert (exp.rewards[cut] == -2.0).all() and (exp.rewards[~cut] >= 0).all()
        assert torch.equal(exp.mask, exp.rollout.completion_mask)
    else:
        assert ((exp.mask[cut] == 0).all()
                and torch.equal(exp.mask[~cut], exp.rollout.completion_mask[~cut]))
        assert (exp.advantages[cut] == 0).all()  # whitened over real tokens only, and zeroed


def logps(policy, exp):
    with torch.no_grad():
        return rollout.completion_logprobs(policy.forward_shared_prefix, exp.rollout,
                                           torch.arange(exp.mask.size(0)))[0]


def step(exp, cfg, policy, critic, policy_model=None, critic_model=None):
    """One PPO update; the statistics' means over the micro-batches (and the steps)."""
    opts = [torch.optim.SGD(policy.parameters(), lr=0.5),
            torch.optim.SGD(critic.parameters(), lr=0.5)]
    nets = nets_of(policy, None, critic, policy_model, critic_model)
    stats = train_ppo.update(nets, opts, exp, cfg, torch.Generator().manual_seed(0))
    return {k: sum(s[k] for s in stats if k in s) / sum(k in s for s in stats)
            for k in {k for s in stats for k in s}}


def test_one_update_raises_positive_advantage_tokens():
    policy, ref, critic = nets()
    exp, _, _ = experience(policy, ref, critic, n=2)
    adv = torch.stack([torch.ones_like(exp.mask[0]), -torch.ones_like(exp.mask[0])]) * exp.mask
    exp = replace(exp, advantages=adv)
    before = (logps(policy, exp) * exp.mask).sum(1)
    stats = step(exp, config(ppo_epochs=1, num_minibatches=1), policy, critic)
    after = (logps(policy, exp) * exp.mask).sum(1)
    assert after[0] > before[0] and after[1] < before[1]
    # the first update is on-policy
    assert stats["clip_frac"] == 0.0 and abs(stats["ratio"] - 1.0) < 1e-6


def test_critic_moves_toward_the_returns():
    policy, ref, critic = nets()
    exp, _, _ = experience(policy, ref, critic, n=8)
    exp = replace(exp, returns=torch.ones_like(exp.returns) * exp.mask)  # critic starts at V = 0
    step(exp, config(ppo_epochs=1, num_minibatches=1, value_clip=10.0), policy, critic)
    with torch.no_grad():
        v = rollout.completion_values(critic.forward_shared_prefix, exp.rollout, torch.arange(8))
    assert ((v * exp.mask).sum() / exp.mask.sum()) > 0.05


def fixed_experience():
    policy, ref, critic = nets(seed=2)
    exp, _, _ = experience(policy, ref, critic, n=8, seed=3)
    g = torch.Generator().manual_seed(1)
    return replace(exp, advantages=torch.randn(exp.mask.shape, generator=g) * exp.mask,
                   returns=torch.randn(exp.mask.shape, generator=g) * exp.mask)


def test_grad_accumulation_equals_one_batch():
    exp = fixed_experience()
    cfg = config(ppo_epochs=1, num_minibatches=1)
    a = nets(seed=5)
    step(exp, cfg, a[0], a[2])
    b = nets(seed=5)
    step(exp, replace(cfg, grad_accum=2), b[0], b[2])
    for x, y in ((a[0], b[0]), (a[2], b[2])):
        for (n, pa), pb in zip(x.state_dict().items(), y.state_dict().values()):
            torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=n)


def rows_of(exp, rows):
    r = exp.rollout
    local = rollout.Rollout(*(t[rows] for t in (r.prompt_ids, r.prompt_mask, r.completion_ids,
                                                 r.completion_mask, r.ended, r.logprobs)))
    fields = ("rewards", "advantages", "mask", "old_logp", "ref_logp", "values", "returns")
    return replace(exp, rollout=local, **{k: getattr(exp, k)[rows] for k in fields})


def _ddp_ppo(rank, world, path, exp):
    from torch.nn.parallel import DistributedDataParallel as DDP
    policy, _, critic = nets(seed=5)
    ddp = lambda m: DDP(common.SharedPrefix(m), find_unused_parameters=True)  # noqa: E731
    cfg = config(ppo_epochs=1, num_minibatches=1, grad_accum=2)
    step(rows_of(exp, slice(rank * 4, rank * 4 + 4)), cfg, policy, critic, ddp(policy), ddp(critic))
    if rank == 0:
        torch.save([policy.state_dict(), critic.state_dict()], path)


def test_ddp_two_ranks_equal_single_process(tmp_path):
    exp = fixed_experience()
    run_on_two_ranks(_ddp_ppo, str(tmp_path / "ddp.pt"), exp)
    policy, _, critic = nets(seed=5)
    step(exp, config(ppo_epochs=1, num_minibatches=1), policy, critic)
    got = torch.load(tmp_path / "ddp.pt")
    for saved, net in zip(got, (policy, critic)):
        for n, p in net.state_dict().items():
            torch.testing.assert_close(saved[n], p, atol=1e-6, rtol=0, msg=n)


def ppo(sft_ckpt, folder, *extra):
    return train_ppo.main(PPO_TINY + ["--init", sft_ckpt, "--out_dir", str(folder)] + list(extra))


def test_end_to_end_with_adaptive_kl_and_exact_resume(sft_ckpt, tmp_path):
    flags = ["--steps", "4", "--ckpt_every", "100", "--eval_every", "2", "--adaptive_kl",
             "--kl_target", "0.01", "--kl_horizon", "20"]
    full, first, last = ppo(sft_ckpt, tmp_path / "a", *flags)
    assert set(first) == {"greedy_acc", "pass@2", "maj@2", "mean@2"} == set(last)
    ppo(sft_ckpt, tmp_path / "b", *flags, "--stop_at", "2")
    resumed, _, _ = ppo(sft_ckpt, tmp_path / "b", *flags, "--resume")
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    ca, cb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("a", "b"))
    # the controller moved, and resumed exactly
    assert ca["kl_ctl"] == cb["kl_ctl"] and ca["kl_ctl"]["value"] != 0.05
    for k in ca["critic"]:
        assert torch.equal(ca["critic"][k], cb["critic"][k]), k
    import json
    rec = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl") if '"train"' in x]
    for key in ("score", "kl", "kl_coef", "policy_loss", "value_loss", "clip_frac",
                "value_clip_frac", "entropy", "explained_variance", "length", "samples_per_s",
                "peak_rss_mb", "params_critic"):
        assert key in rec[0] or key in rec[1], key


def test_reward_model_run(sft_ckpt, tmp_path, monkeypatch):
    """The reward model is the reward with --reward model, and only then: with the rule reward it
    may still give the critic its start (--critic_init rm)."""
    train_rm.main(RM_TINY + ["--init", sft_ckpt, "--out_dir", str(tmp_path / "rm"),
                             "--epochs", "1"])
    flags = ["--steps", "2", "--reward_model", str(tmp_path / "rm"), "--critic_init", "rm"]
    _, _, last = ppo(sft_ckpt, tmp_path / "ppo", "--reward", "model", *flags)
    assert "greedy_acc" in last
    ckpt = torch.load(tmp_path / "ppo" / "ckpt.pt", weights_only=False)
    rm = torch.load(tmp_path / "rm" / "ckpt.pt", weights_only=False)["model"]
    assert not torch.equal(ckpt["critic"]["value_head.weight"],
                           torch.zeros_like(rm["value_head.weight"]))
    monkeypatch.setattr(rollout, "score_completions", lambda *a: pytest.fail("the RM scored"))
    ppo(sft_ckpt, tmp_path / "rule", "--reward", "rule", *flags)


@pytest.mark.parametrize("argv,flag", [
    (["--gamma", "1.5"], "--gamma"), (["--lam", "-0.1"], "--lam"),
    (["--epsilon", "0"], "--epsilon"), (["--reward", "model"], "--reward_model"),
    (["--critic_init", "rm"], "--reward_model"), (["--truncation", "drop"], "--truncation"),
    (["--reward_model", "out/rm"], "--reward_model"),
    (["--batch_size", "7"], "--batch_size"), (["--kl_coef", "-1"], "--kl_coef"),
])
def test_bad_settings_are_one_line_errors(sft_ckpt, tmp_path, argv, flag, capsys):
    assert flag in one_line_failure(
        train_ppo.main, PPO_TINY + ["--init", sft_ckpt, "--out_dir", str(tmp_path)] + argv, capsys)
    assert not os.path.exists(tmp_path / "config.json")


def test_a_reward_model_of_another_task_is_an_error(sft_ckpt, tmp_path, capsys):
    train_rm.main(RM_TINY + ["--init", sft_ckpt, "--out_dir", str(tmp_path / "rm"),
                             "--epochs", "1"])
    err = one_line_failure(train_ppo.main, PPO_TINY + ["--n_digits", "3", "--init", sft_ckpt,
                                                       "--reward", "model",
                                                       "--reward_model", str(tmp_path / "rm"),
                                                       "--out_dir", str(tmp_path / "p")], capsys)
    assert ("was trained on task add with 2 digits, not add with 3" in err
            and not os.path.exists(tmp_path / "p"))
