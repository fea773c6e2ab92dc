import copy
import json
import math
import os
import random
from dataclasses import replace

import pytest
import torch

import common
import losses
import rollout
import tasks
import train_dpo
from conftest import one_line_failure, tiny_config
from dist_helpers import run_on_two_ranks
from model import Transformer
from test_train_sft import TINY_MODEL

CPU = torch.device("cpu")
TOK, TASK = tasks.Tokenizer(), tasks.Addition(2)
DPO_TINY = TINY_MODEL + ["--n_digits", "2", "--eval_size", "8", "--quiet", "--batch_size", "4",
                         "--num_prompts", "16", "--num_generations", "2", "--pass_k", "2",
                         "--pass_n", "2", "--warmup", "1"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return Transformer(tiny_config())


def synthetic_pairs(n=6, seed=0):
    rng = random.Random(seed)
    problems = [TASK.sample(rng) for _ in range(n)]
    return rollout.make_pairs(None, TOK, TASK, problems, "synthetic", rng=rng)


def with_ref(ref, pairs):
    """The pairs as train_dpo.Pairs, with the reference's log-probs."""
    pairs = copy.deepcopy(pairs)
    train_dpo.add_ref_logprobs(ref, pairs, TOK.pad_id, CPU)
    return train_dpo.Pairs.of(pairs, CPU)


def logprobs(policy, pairs):
    return train_dpo.pair_logprobs(policy.forward_shared_prefix, pairs, TOK.pad_id)


def config(**kw):
    return train_dpo.DPOConfig(n_digits=2, **kw)


def test_policy_equal_to_reference_gives_exactly_ln2():
    """On a real model's log-probs: with the policy equal to the reference, every pair's loss is
    exactly ln 2 and both implicit rewards exactly 0 (no dropout, no stale state)."""
    policy = tiny()
    pairs = with_ref(copy.deepcopy(policy).eval(), synthetic_pairs())
    chosen, rejected = logprobs(policy, pairs)
    loss, rc, rr = train_dpo.preference_loss(config(), chosen, rejected, pairs)
    assert torch.equal(loss, torch.full_like(loss, math.log(2)))
    assert torch.equal(rc, torch.zeros_like(rc)) and torch.equal(rr, torch.zeros_like(rr))
    assert chosen.abs().min() > 1  # real log-probs, not zeros


def margin(policy, pairs):
    with torch.no_grad():
        c, r = logprobs(policy, pairs)
    return c - r


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_one_step_raises_chosen_relative_to_rejected(loss):
    policy = tiny()
    pairs = with_ref(copy.deepcopy(policy).eval(), synthetic_pairs(8))
    before = margin(policy, pairs)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    train_dpo.train_step(policy.forward_shared_prefix, policy, opt, [pairs], config(loss=loss),
                         len(pairs), TOK.pad_id)
    assert (margin(policy, pairs) - before).mean() > 0


def test_simpo_never_reads_a_reference():
    pairs = train_dpo.Pairs.of(synthetic_pairs(), CPU)  # no reference log-probs in them at all
    assert pairs.ref_chosen is None and pairs.ref_rejected is None
    chosen, rejected = logprobs(tiny(), pairs)
    loss, _, _ = train_dpo.preference_loss(config(loss="simpo"), chosen, rejected, pairs)
    assert torch.isfinite(loss).all()
    with pytest.raises(TypeError):  # DPO needs them
        train_dpo.preference_loss(config(loss="dpo"), chosen, rejected, pairs)


def test_length_normalised_dpo_averages_both_log_ratios():
    policy, ref = tiny(0), tiny(1)
    pairs = with_ref(ref, synthetic_pairs())
    chosen, rejected = logprobs(policy, pairs)
    cfg = config(length_normalize=True)
    got, _, _ = train_dpo.preference_loss(cfg, chosen, rejected, pairs)
    lc = torch.tensor([float(len(p["chosen_ids"])) for p in pairs.items])
    lr = torch.tensor([float(len(p["rejected_ids"])) for p in pairs.items])
    rc, rr = (torch.tensor([p[k] for p in pairs.items])
              for k in ("ref_chosen_logp", "ref_rejected_logp"))
    want, _, _ = losses.dpo_loss(chosen / lc, rejected / lr, rc / lc, rr / lr, cfg.beta)
    torch.testing.assert_close(got, want)


def test_pair_logprobs_equal_a_per_sequence_loop():
    """Each pair's prompt runs once for both sides (forward_shared_prefix); the sums equal a plain
    forward of each `prompt + completion` alone, with ragged completions and a prompt repeated."""
    policy = tiny()
    pairs = synthetic_pairs(3)
    rejected = pairs[1]["rejected_ids"]
    pairs[1]["rejected_ids"] = rejected[:2] + rejected  # the longest side
    # the same prompt again, a shorter side
    pairs.append(dict(pairs[0], chosen_ids=pairs[0]["chosen_ids"][1:]))
    got = logprobs(policy, train_dpo.Pairs.of(pairs, CPU))
    for side, values in zip(("chosen_ids", "rejected_ids"), got):
        for i, p in enumerate(pairs):
            ids = torch.tensor([p["prompt_ids"] + p[side]])
            logp = torch.log_softmax(policy(ids)[0][0], -1)
            P = len(p["prompt_ids"])
            want = sum(logp[P - 1 + t, tok].item() for t, tok in enumerate(p[side]))
            assert abs(values[i].item() - want) < 1e-5, (side, i)


# ----------------------------------------------------------------------------------------------
# The pair builder


def test_policy_pairs_chosen_right_rejected_wrong(monkeypatch):
    """A fake sampler whose groups are all right, all wrong, or mixed: a pair only where a sample is
    wrong, chosen a right sample (the reference when none is), rejected a wrong one."""
    problems = TASK.eval_set(3)
    kinds = {0: ["right"] * 4, 1: ["wrong"] * 4, 2: ["wrong", "right", "wrong", "right"]}

    def fake(model, prompts, *, num_generations, pad_id, eos_id, **_):
        rows = []
        for i, _ in enumerate(prompts):
            for kind in kinds[i]:
                text = (problems[i].completion if kind == "right"
                        else TASK.near_miss(problems[i], random.Random(i)))
                rows.append(TOK.encode(text) + [eos_id])
        L = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (L - len(r)) for r in rows])
        return rollout.Rollout(None, None, ids, (ids != pad_id).float(), None, None)

    monkeypatch.setattr(rollout, "generate", fake)
    pairs = rollout.make_pairs(None, TOK, TASK, problems, "policy", num_generations=4)
    assert [p["prompt"] for p in pairs] == [problems[1].prompt, problems[2].prompt]
    for p in pairs:
        prob = next(q for q in problems if q.prompt == p["prompt"])
        assert TASK.reward(TOK.decode(p["chosen_ids"], strict=True), prob) == 1.0
        assert TASK.reward(TOK.decode(p["rejected_ids"], strict=True), prob) == 0.0
        assert p["chosen_ids"][-1] == TOK.eos_id
    assert pairs[0]["chosen"] == problems[1].completion  # no right sample: the reference


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_synthetic_pairs_chosen_right_rejected_a_well_formed_near_miss(name):
    tok, task = tasks.get(name)
    rng = random.Random(1)
    problems = [task.sample(rng) for _ in range(200)]
    pairs = rollout.make_pairs(None, tok, task, problems, "synthetic", rng=rng)
    for prob, p in zip(problems, pairs):
        assert task.reward(p["chosen"], prob) == 1.0
        answer = task.parse_answer(p["rejected"])
        assert answer is not None and answer != prob.answer  # wrong, but an answer


def dpo(sft_ckpt, folder, *extra):
    return train_dpo.main(DPO_TINY + ["--init", sft_ckpt, "--out_dir", str(folder)] + list(extra))


def test_end_to_end_rounds_held_out_split_and_resume(sft_ckpt, tmp_path):
    """Two rounds of iterative DPO with a reference reset: pairs files for both rounds, training
    pairs never from held-out prompts (held-out pairs always), and --stop_at then --resume (across
    the round boundary) ends with the same weights as the uninterrupted run."""
    flags = ["--rounds", "2", "--ref_reset", "--epochs", "2", "--eval_every", "3",
             "--ckpt_every", "100"]
    full, first, last = dpo(sft_ckpt, tmp_path / "a", *flags)
    assert ({"greedy_acc", "pass@2", "maj@2", "pref_acc", "pref_margin"} <= set(last)
            and first["pref_acc"] == 0.0)
    for k in (0, 1):
        pairs, settings = rollout.load_pairs(str(tmp_path / "a" / f"pairs_round{k}.jsonl"))
        assert settings["round"] == k and "reference" in settings
        for p in pairs:
            assert TASK.is_held_out(p["prompt"]) == (p["split"] == "heldout")
    held = [[p["prompt"]
             for p in rollout.load_pairs(str(tmp_path / "a" / f"pairs_round{k}.jsonl"))[0]
             if p["split"] == "heldout"] for k in (0, 1)]
    assert held[0] == held[1] and held[0]  # the same held-out pairs in every round
    n_steps = sum(1 for line in open(tmp_path / "a" / "metrics.jsonl") if '"train"' in line)
    dpo(sft_ckpt, tmp_path / "b", *flags, "--stop_at", str(n_steps // 2 + 1))
    resumed, _, _ = dpo(sft_ckpt, tmp_path / "b", *flags, "--resume")
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    keys = [(r["step"], r["kind"]) for r in map(json.loads, open(tmp_path / "b" / "metrics.jsonl"))]
    assert keys == [(r["step"], r["kind"])
                    for r in map(json.loads, open(tmp_path / "a" / "metrics.jsonl"))]


def test_pairs_file_is_reused_with_its_reference_logprobs(sft_ckpt, tmp_path, monkeypatch):
    dpo(sft_ckpt, tmp_path / "a", "--epochs", "1")
    made = str(tmp_path / "a" / "pairs_round0.jsonl")
    calls = []
    monkeypatch.setattr(train_dpo, "add_ref_logprobs", lambda *a, **kw: calls.append(1))
    monkeypatch.setattr(rollout, "make_pairs",
                        lambda *a, **kw: pytest.fail("pairs were made again"))
    dpo(sft_ckpt, tmp_path / "b", "--epochs", "1", "--pairs_file", made)
    assert calls == []  # the same reference: its stored log-probs are reused
    assert (rollout.load_pairs(str(tmp_path / "b" / "pairs_round0.jsonl"))[0]
            == rollout.load_pairs(made)[0])


def test_simpo_run_computes_no_reference_logprobs(sft_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(train_dpo, "add_ref_logprobs",
                        lambda *a, **kw: pytest.fail("SimPO read a reference"))
    dpo(sft_ckpt, tmp_path, "--loss", "simpo", "--epochs", "1")


@pytest.mark.parametrize("argv,flag", [
    (["--loss", "kto"], "--loss"), (["--label_smoothing", "0.7"], "--label_smoothing"),
    (["--loss", "ipo", "--label_smoothing", "0.1"], "--label_smoothing"),
    (["--beta", "-1"], "--beta"), (["--rounds", "0"], "--rounds"),
    (["--pairs_source", "human"], "--pairs_source"),
    (["--batch_size", "3", "--grad_accum", "2"], "--batch_size"),
])
def test_bad_settings_are_one_line_errors(sft_ckpt, tmp_path, argv, flag, capsys):
    assert flag in one_line_failure(
        train_dpo.main, DPO_TINY + ["--init", sft_ckpt, "--out_dir", str(tmp_path)] + argv, capsys)
    assert not os.path.exists(tmp_path / "config.json")


def test_pairs_file_of_another_task_is_an_error(tmp_path, sft_ckpt, capsys):
    path = str(tmp_path / "pairs.jsonl")
    rollout.save_pairs(path, [], {"task": "mul", "n_digits": 2})
    err = one_line_failure(train_dpo.main, DPO_TINY + ["--init", sft_ckpt, "--pairs_file", path,
                                                       "--out_dir", str(tmp_path / "run")], capsys)
    assert "holds pairs of task mul" in err and not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------------------------
# Accumulation and DDP equal one big batch


def fixed_pairs():
    ref = tiny(1)
    pairs = synthetic_pairs(8, seed=2)
    rejected = pairs[0]["rejected_ids"]
    pairs[0]["rejected_ids"] = rejected[:2] + rejected  # ragged lengths
    return with_ref(ref, pairs)


def dpo_step(pairs, cfg, micro, model=None, n_global=8):
    policy = tiny(3)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)  # not Adam: see test_train_sft.fresh
    forward = model(policy) if model else policy.forward_shared_prefix
    train_dpo.train_step(forward, policy, opt, micro, cfg, n_global, TOK.pad_id)
    return policy


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_grad_accumulation_equals_one_batch(loss):
    pairs, cfg = fixed_pairs(), config(loss=loss)
    a = dpo_step(pairs, cfg, [pairs])
    b = dpo_step(pairs, replace(cfg, grad_accum=2), [pairs[[0, 1, 2]], pairs[[3, 4, 5, 6, 7]]])
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=n)


def _ddp_dpo(rank, world, path, pairs):
    from torch.nn.parallel import DistributedDataParallel as DDP
    mine = list(range(8))[rank::world]
    policy = dpo_step(pairs, config(), [pairs[mine[:2]], pairs[mine[2:]]],
                      model=lambda m: DDP(common.SharedPrefix(m), find_unused_parameters=True))
    if rank == 0:
        torch.save(policy.state_dict(), path)


def test_ddp_two_ranks_equal_single_process(tmp_path):
    pairs = fixed_pairs()
    run_on_two_ranks(_ddp_dpo, str(tmp_path / "ddp.pt"), pairs)
    single = dpo_step(pairs, config(), [pairs])
    got = torch.load(tmp_path / "ddp.pt")
    for n, p in single.state_dict().items():
        torch.testing.assert_close(got[n], p, atol=1e-6, rtol=0, msg=n)
