import copy
import json
import os
import random
import zlib
from dataclasses import replace

import pytest
import torch

import common
import moe
import rollout
import tasks
import train_grpo
import train_sft
from conftest import one_line_cli_error, tiny_config
from dist_helpers import run_on_two_ranks
from model import Transformer
from test_train_sft import TINY_MODEL, text_reward


def tiny_policy(seed=0):
    torch.manual_seed(seed)
    return Transformer(tiny_config())  # with an MTP module, as the default model (unused by GRPO)


def config(**kw):
    return train_grpo.GRPOConfig(n_digits=2, max_new_tokens=6, **kw)


def rollout_batch(policy, n_prompts=4, G=4, seed=0, cfg=None, ref=None):
    """make_experience on n_prompts x G completions of 2-digit additions (at most 6 new tokens)."""
    tok, task = tasks.Tokenizer(), tasks.Addition(2)
    cfg = cfg or config(num_generations=G)
    problems = [task.sample(random.Random(seed + i)) for i in range(n_prompts)]
    return train_grpo.make_experience(policy, policy.forward_shared_prefix,
                                      (ref or copy.deepcopy(policy)).forward_shared_prefix, task,
                                      tok, problems, cfg,
                                      torch.Generator().manual_seed(seed))


def with_logps(exp, advantages, old, ref, mask=None):
    """The experience with hand-set advantages, pi_old and pi_ref log-probs (and loss mask)."""
    return replace(exp, advantages=advantages, old_logp=old, ref_logp=ref,
                   mask=exp.mask if mask is None else mask)


def logps(policy, r):
    with torch.no_grad():
        rows = torch.arange(r.completion_ids.size(0))
        return rollout.completion_logprobs(policy.forward_shared_prefix, r, rows)[0]


def update(policy, exp, cfg, opt, forward=None):
    """update_policy on the experience's rows split as cfg says; the statistics' means over the
    micro-batches, the number of optimiser steps and the largest sampler/trainer gap."""
    exp = replace(exp, batches=train_grpo.micro_batches(exp.mask, cfg))
    forward = policy.forward_shared_prefix if forward is None else forward
    stats = train_grpo.update_policy(forward, opt, exp, cfg)
    out = {k: sum(s[k] for s in stats if k in s) / sum(k in s for s in stats)
           for k in {k for s in stats for k in s}}
    return {**out, "updates": sum("grad_norm" in s for s in stats),
            "gap": max(s["gap"] for s in stats if "gap" in s)}


def test_grpo_step_moves_logprobs_with_the_advantage():
    """Hand-set advantages +1 / -1 on two completions: one GRPO update raises the first one's
    log-prob and lowers the second's."""
    policy = tiny_policy()
    exp = rollout_batch(policy, n_prompts=1, G=2)
    r, ref = exp.rollout, tiny_policy()
    old = logps(policy, r)
    exp = with_logps(exp, torch.tensor([1.0, -1.0]), old, logps(ref, r))
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    cfg = config(num_generations=2, beta=0.0)
    before = (old * r.completion_mask).sum(1)
    stats = update(policy, exp, cfg, opt)
    after = (logps(policy, r) * r.completion_mask).sum(1)
    assert stats["updates"] == 1
    assert after[0] > before[0] and after[1] < before[1]
    # one update per rollout: the ratio is exactly 1 and clipping never binds
    assert stats["ratio"] == 1.0 and stats["clip_low"] == 0.0 and stats["clip_high"] == 0.0
    assert stats["kl"] == 0.0  # the policy is the reference at the start: no stale state


def test_clipping_binds_after_several_updates():
    policy = tiny_policy()
    exp = rollout_batch(policy, n_prompts=2, G=4)
    old = logps(policy, exp.rollout)
    exp = with_logps(exp, torch.tensor([1.0, -1.0] * 4), old, old.clone())
    opt = torch.optim.Adam(policy.parameters(), lr=3e-2)
    cfg = config(num_generations=4, num_iterations=6)
    stats = update(policy, exp, cfg, opt)
    assert stats["updates"] == 6 and stats["clip_low"] + stats["clip_high"] > 0 and stats["kl"] > 0


def test_rollout_logprobs_match_the_training_forward():
    """The log-probs the sampler stores (KV cache, one token at a time) equal the trainer's
    recomputed ones (one shared-prefix forward): no off-by-one between logits and labels."""
    policy = tiny_policy().eval()
    r = rollout_batch(policy).rollout
    torch.testing.assert_close(r.logprobs, logps(policy, r) * r.completion_mask,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("G", [1, 4])
def test_online_rft_coefficient_is_one_exactly_on_correct_completions(G, monkeypatch):
    """Online RFT's gradient coefficient is 1[correct] (DeepSeekMath 5.2.1): no baseline, no
    scaling, so a group of all-correct completions still pushes them up and G = 1 is allowed."""
    monkeypatch.setattr(tasks.Addition, "reward", text_reward)
    exp = rollout_batch(tiny_policy(), G=G, cfg=config(num_generations=G, gradient_coef="rft"))
    texts = rollout.decode_completions(tasks.Tokenizer(), exp.rollout)
    want = torch.tensor([float(zlib.crc32(t.encode()) % 2) for t in texts])
    assert 0 < want.sum() < len(want)
    assert torch.equal(exp.advantages, want) and torch.equal(exp.rewards, want)
    # the same samples, GRPO's coefficient
    grpo = rollout_batch(tiny_policy(), cfg=config(num_generations=4))
    assert G == 1 or not torch.equal(grpo.advantages, want)


def test_filter_zero_std_masks_flat_groups():
    policy = tiny_policy()
    exp = rollout_batch(policy, cfg=config(num_generations=4, filter_zero_std=True))
    flat = (exp.rewards.view(-1, 4).amax(1) == exp.rewards.view(-1, 4).amin(1)).repeat_interleave(4)
    assert flat.any(), "the test needs a zero-variance group"
    assert torch.equal(exp.mask.any(1), ~flat)
    assert torch.equal(exp.mask[~flat], exp.rollout.completion_mask[~flat])
    assert torch.equal(exp.advantages[flat], torch.zeros(int(flat.sum())))


def _split_step(policy, exp, cfg, forward=None):
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)  # not Adam: see test_train_sft.fresh
    return update(policy, exp, cfg, opt, forward)


def fixed_experience():
    """A rollout with hand-set advantages and completions of different lengths in each half."""
    policy = tiny_policy(seed=1)
    exp = rollout_batch(policy, n_prompts=4, G=2, seed=3)
    exp.rollout.completion_mask[:4, 2:] = 0  # first half shorter: a per-half mean would be wrong
    old = logps(policy, exp.rollout)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3])
    return with_logps(exp, adv, old, old - 0.1, mask=exp.rollout.completion_mask.clone())


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grad_accumulation_equals_one_batch(loss_type):
    exp = fixed_experience()
    cfg = config(num_generations=2, loss_type=loss_type)
    a = tiny_policy(seed=1)
    _split_step(a, exp, cfg)
    b = tiny_policy(seed=1)
    _split_step(b, exp, replace(cfg, grad_accum=2))
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=n)


DDP_CASES = [("grpo", 1), ("dapo", 1), ("dr_grpo", 1), ("grpo", 2), ("dapo", 2), ("dr_grpo", 2)]


def rows_of(exp, rows):
    """The experience restricted to some rows (what one rank holds)."""
    r = exp.rollout
    local = rollout.Rollout(*(t[rows] for t in (r.prompt_ids, r.prompt_mask, r.completion_ids,
                                                 r.completion_mask, r.ended, r.logprobs)))
    return replace(exp, rollout=local, rewards=exp.rewards[rows], advantages=exp.advantages[rows],
                   mask=exp.mask[rows], old_logp=exp.old_logp[rows], ref_logp=exp.ref_logp[rows])


def _ddp_grpo(rank, world, path, exp):
    from torch.nn.parallel import DistributedDataParallel as DDP
    local = rows_of(exp, slice(rank * 4, rank * 4 + 4))  # each rank holds two whole groups
    # MoE layers, no_sync and find_unused_parameters: where DDP bugs hide
    for loss_type, accum in DDP_CASES:
        policy = tiny_policy(seed=1)
        model = DDP(common.SharedPrefix(policy), find_unused_parameters=True)  # as Run.wrap does
        _split_step(policy, local, config(num_generations=2, loss_type=loss_type, grad_accum=accum),
                    model)
        if rank == 0:
            torch.save(policy.state_dict(), f"{path}.{loss_type}.{accum}")


def test_ddp_two_ranks_equal_single_process(tmp_path):
    """For every loss_type, with and without gradient accumulation, a 2-rank gloo step equals one
    process on the whole batch."""
    exp = fixed_experience()
    path = str(tmp_path / "ddp.pt")
    run_on_two_ranks(_ddp_grpo, path, exp)
    for loss_type, accum in DDP_CASES:
        single = tiny_policy(seed=1)
        _split_step(single, exp, config(num_generations=2, loss_type=loss_type))
        got = torch.load(f"{path}.{loss_type}.{accum}")
        for n, p in single.state_dict().items():
            torch.testing.assert_close(got[n], p, atol=1e-6, rtol=0,
                                       msg=f"{loss_type} accum {accum}: {n}")


@pytest.mark.parametrize("flags,msg", [
    (["--num_generations", "1"], "num_generations must be >= 2"),
    (["--epsilon", "0"], "epsilon must be > 0"),
    (["--epsilon", "-0.1"], "epsilon must be > 0"),
    (["--supervision", "process"], "needs a task with steps: multistep or think"),
    (["--loss_type", "ppo"], "loss_type must be"),
    (["--gradient_coef", "sft"], "gradient_coef must be"),
    (["--gradient_coef", "rft", "--task", "multistep", "--supervision", "process"],
     "use --supervision outcome"),
    (["--gradient_coef", "rft", "--filter_zero_std"], "without --filter_zero_std"),
    (["--gradient_coef", "rft", "--num_generations", "0"], "num_generations must be > 0"),
])
def test_bad_settings_are_one_line_errors(flags, msg, capsys):
    assert msg in one_line_cli_error(train_grpo.main, flags, capsys)


GRPO_TINY = ["--eval_size", "8", "--samples", "0", "--quiet", "--batch_size", "4",
             "--num_generations", "4", "--pass_k", "2", "--pass_n", "2", "--warmup", "1"]


def test_end_to_end_outcome_run_and_resume(sft_ckpt, tmp_path, monkeypatch):
    # A barely trained model is never right; a reward that depends on the text (not on being right)
    # gives the groups variance, so the policy really moves and the checks below can fail.
    monkeypatch.setattr(tasks.Addition, "reward", text_reward)
    flags = GRPO_TINY + ["--task", "add", "--n_digits", "2", "--init", sft_ckpt, "--steps", "4",
                         "--ckpt_every", "2", "--num_iterations", "2", "--num_minibatches", "2",
                         "--ref_reset_every", "2"]
    full, first, last = train_grpo.main(flags + ["--out_dir", str(tmp_path / "a")])
    assert set(first) == {"greedy_acc", "pass@2", "maj@2", "mean@2"} and set(last) == set(first)
    recs = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    steps = [x for x in recs if "reward_mean" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    for key in ("reward_mean", "reward_std", "zero_std_frac", "kl", "clip_low", "clip_high",
                "completion_len", "samples_per_s", "logprob_gap"):
        assert key in steps[0]
    assert steps[0]["logprob_gap"] < 1e-4
    train_grpo.main(flags + ["--out_dir", str(tmp_path / "b"), "--stop_at", "2"])
    at_2 = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert at_2["step"] == 2
    resumed, _, _ = train_grpo.main(flags + ["--out_dir", str(tmp_path / "b"), "--resume"])
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    # iterative GRPO: the reference was reset to the policy of step 2, then stayed put
    at_4 = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    init = torch.load(os.path.join(sft_ckpt, "ckpt.pt"), weights_only=False)["model"]
    assert not all(torch.equal(at_2["model"][k], init[k]) for k in init)
    assert all(torch.equal(at_4["ref"][k], at_2["model"][k]) for k in at_2["model"])
    assert not all(torch.equal(at_4["ref"][k], at_4["model"][k]) for k in at_4["model"])


def test_process_supervision_run(tmp_path):
    sft = tmp_path / "sft"
    train_sft.main(TINY_MODEL + ["--task", "multistep", "--n_digits", "1", "--eval_size", "8",
                                 "--samples", "0", "--quiet", "--batch_size", "8", "--steps", "3",
                                 "--eval_every", "100", "--out_dir", str(sft)])
    _, first, last = train_grpo.main(GRPO_TINY + ["--task", "multistep", "--n_digits", "1",
                                                  "--supervision", "process", "--init", str(sft),
                                                  "--steps", "2", "--out_dir", str(tmp_path / "g")])
    assert 0.0 <= last["greedy_acc"] <= 1.0


def test_init_from_another_task_is_an_error(sft_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_grpo.main(GRPO_TINY + ["--init", sft_ckpt, "--task", "sub", "--n_digits", "2",
                                     "--out_dir", str(tmp_path)])
    assert "was trained on task add with 2 digits, not sub" in capsys.readouterr().err


def test_init_with_other_model_flags_is_an_error(sft_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_grpo.main(GRPO_TINY + ["--init", sft_ckpt, "--n_digits", "2", "--dim", "48",
                                     "--out_dir", str(tmp_path)])
    assert "another model config in: dim" in capsys.readouterr().err


def test_old_logprobs_give_ratio_one_and_no_routing_flips_before_updates():
    """pi_old scored on the micro-batches the update runs: the first ratio is exactly 1 and no
    routing decision has flipped; later updates of the same rollout flip some (MoE routing can
    change between the policy that sampled and the one being trained)."""
    policy = tiny_policy()
    cfg = config(num_generations=4, grad_accum=2, num_minibatches=2, num_iterations=1)
    exp = rollout_batch(policy, n_prompts=2, cfg=cfg, ref=tiny_policy())
    assert len(exp.routes.routes) == 4 * 2  # 4 micro-batches, a prompt and a completion pass each
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # no movement: ratio 1, no flips
    with moe.RouteRecorder(policy) as routes:
        stats = update(policy, replace(exp, advantages=torch.ones(8)), cfg, opt)
    assert stats["ratio"] == 1.0 and routes.flipped_fraction(exp.routes) == 0.0
    opt = torch.optim.SGD(policy.parameters(), lr=50.0)  # large steps: the second minibatch moves
    with moe.RouteRecorder(policy) as routes:
        update(policy, replace(exp, advantages=torch.tensor([1.0, -1.0] * 4)), cfg, opt)
    assert routes.flipped_fraction(exp.routes) > 0


def test_process_step_rewards_penalise_missing_steps():
    task = tasks.MultiStep(3, 2)
    p = tasks.Problem("12+34+56=", "12+34=46,46+56=102", 102)
    texts = ["12+34=46,46+56=102", "12+34=46", "12+34=47,47+56=103"]
    got = [task.step_rewards(c, p, last=len(c)) for c in texts]  # ended: the end token's index
    assert [s for s, _ in got] == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    assert [e for _, e in got] == [[7, 17], [7, 8], [7, 17]]  # a missing step ends at the end token
    assert task.step_rewards("12+34=46,4", p, last=9) == ([1.0, 0.0], [7, 9])  # cut at 10 tokens


def test_process_step_rewards_of_the_thinking_task_end_with_the_answer():
    """The steps inside <think> (in tokens: <think> is one) as MultiStep's, then the answer."""
    task, p = tasks.ThinkSum(), tasks.Problem("12+34+56=", "", 102)
    assert task.step_rewards("<think>12+34=46,46+56=102</think>102", p, last=23) == (
        [1.0, 1.0, 1.0], [8, 18, 23])  # the end token is at 23
    assert task.step_rewards("<think>12+34=46,46+56=103</think>103", p, 23) == (
        [1.0, 0.0, 0.0], [8, 18, 23])
    assert task.step_rewards("102", p, 3) == ([0.0, 0.0, 1.0], [3, 3, 3])  # no steps shown
    assert task.step_rewards("<think>12+34=46", p, 8) == ([1.0, 0.0, 0.0], [8, 8, 8])  # cut


def test_r1_zero_from_a_pretrained_base_logs_each_reward_and_the_thinking(tmp_path, monkeypatch):
    """--task think: a missing --init is made a pretrained base (R1-Zero's start, recorded in the
    chain); --reward weighs the rule rewards, each logged, their weighted sum the reward; the
    thinking rate, lengths and the accuracy with and without thinking are logged every step,
    mean@n at every evaluation."""
    monkeypatch.setattr(tasks.ThinkSum, "reward", text_reward)
    monkeypatch.setattr(tasks.ThinkSum, "format_reward",
                        lambda self, c: float(zlib.crc32(c.encode()) % 3 == 0))
    assert TINY_MODEL[-2:] == ["--max_seq_len", "32"]
    train_grpo.main(GRPO_TINY + TINY_MODEL[:-1] + ["64"] + [
        "--task", "think", "--init", str(tmp_path / "base"), "--warmstart_steps", "2",
        "--reward", "accuracy,format:0.5", "--steps", "2", "--eval_every", "1",
        "--eval_samples", "3", "--out_dir", str(tmp_path / "r1")])
    base = common.load_checkpoint(str(tmp_path / "base"))
    assert base["config"]["data"] == "pretrain" and base["step"] == 2
    assert [s["run"] for s in common.load_checkpoint(str(tmp_path / "r1"))["chain"]] == [
        str(tmp_path / "base")]
    recs = [json.loads(x) for x in open(tmp_path / "r1" / "metrics.jsonl")]
    steps = [r for r in recs if r["kind"] == "train"]
    for r in steps:
        assert r["reward_mean"] == pytest.approx(
            r["reward_accuracy"] + 0.5 * r["reward_format"], abs=1e-5)
        assert 0 <= r["think_rate"] <= 1 and r["len"] == pytest.approx(r["completion_len"])
        for key in ("len_correct", "len_wrong", "acc_thinking", "acc_direct"):
            assert key in r
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert all("eval_mean@3" in r and "eval_think_rate" in r and "eval_len" in r for r in evals)


@pytest.mark.parametrize("flag,msg", [("length", "not one of accuracy, format"),
                                      ("accuracy:x", "must be a finite number")])
def test_a_bad_reward_is_a_one_line_error(flag, msg, capsys):
    assert msg in one_line_cli_error(train_grpo.main, ["--reward", flag], capsys)
