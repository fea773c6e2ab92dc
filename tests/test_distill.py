"""Distillation (soft targets in train_sft.py, on-policy in train_grpo.py) and GRPO's learned
reward: each against a computation of its own, resume, two ranks, and what bad input gets."""
import copy
import json
import os
import random
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common
import losses
import tasks
import train_grpo
import train_rm
import train_sft
from conftest import one_line_cli_error, one_line_failure, tiny_config
from dist_helpers import run_on_two_ranks
from model import ScalarModel, Transformer
from test_train_grpo import GRPO_TINY, _split_step, rows_of
from test_train_rm import RM_TINY
from test_runs import snapshot
from test_train_sft import TINY_FLAGS, TINY_MODEL, fixed_batch

SMALL = ["--dim", "16", "--inter_dim", "32"]  # the student: a smaller model than the teacher's


def net(seed, cls=Transformer, **kw):
    torch.manual_seed(seed)
    return cls(tiny_config(**kw))


# ---- soft targets (train_sft.py --alpha < 1)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_soft_targets_replace_the_ce_by_the_formula_value_and_gradient(kl):
    """With no MTP and no balance loss the model's loss is its CE alone, so train_sft's soft-target
    loss must be alpha * CE + (1 - alpha) * tau^2 * KL, written out here in float64 from the
    logits: the same value and the same gradient; the teacher gets none."""
    student = net(0, mtp_depth=0, balance_loss_alpha=0.0, dim=16, inter_dim=32)
    teacher = net(1)  # not frozen here: soft_targets must give it no gradient itself
    x, y, m, pad = fixed_batch(8, seed=2)
    m[:3, -3:] = 0  # a ragged mask
    cfg, n = SimpleNamespace(alpha=0.3, tau=2.0, kl=kl), m.sum()
    logits, loss = student(x, y, m, pad_mask=pad, num_tokens=n, num_seqs=8)
    got, kl_share = train_sft.soft_targets(loss, logits, teacher, x, y, m, pad, n, cfg, 0.0)
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    logits = student(x, pad_mask=pad)[0].double()
    ce = -F.log_softmax(logits, -1).gather(-1, y[..., None]).squeeze(-1)
    log_q = F.log_softmax(logits / 2.0, -1)
    log_p = F.log_softmax(teacher(x, pad_mask=pad)[0].double() / 2.0, -1)
    a, b = (log_p, log_q) if kl == "forward" else (log_q, log_p)
    per_token = (a.exp() * (a - b)).sum(-1)
    want = (0.3 * (ce * m).sum() + 0.7 * 4.0 * (per_token * m).sum()) / m.sum()
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert kl_share == pytest.approx(((per_token * m).sum() / m.sum()).item(), abs=1e-6)
    for g, p in zip(grads, student.parameters()):
        torch.testing.assert_close(g, p.grad.float(), atol=1e-6, rtol=1e-4)


def test_soft_targets_keep_the_mtp_and_balance_losses():
    """With MTP and the balance loss on, they stay in the loss: lambda * MTP + balance + the soft
    targets' loss (the model's own parts, logged), the CE alone replaced."""
    student, teacher = net(0, dim=16, inter_dim=32), net(1)
    x, y, m, pad = fixed_batch(8, seed=2)
    cfg, n = SimpleNamespace(alpha=0.5, tau=1.0, kl="forward"), m.sum()
    logits, loss = student(x, y, m, pad_mask=pad, num_tokens=n, num_seqs=8)
    parts = student.loss_parts
    got, _ = train_sft.soft_targets(loss, logits, teacher, x, y, m, pad, n, cfg, 0.0)
    with torch.no_grad():
        soft, _ = losses.distill_loss(logits, teacher(x, pad_mask=pad)[0], y, m, 0.5, 1.0)
    assert parts["mtp"] > 0 and parts["balance"] > 0
    want = student.cfg.mtp_lambda * parts["mtp"] + parts["balance"] + soft
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def _ddp_soft(rank, world, path, batch):
    from torch.nn.parallel import DistributedDataParallel as DDP
    m, teacher = net(0, dim=16, inter_dim=32), net(1).requires_grad_(False)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    half = slice(rank * 4, rank * 4 + 4)
    cfg = SimpleNamespace(alpha=0.5, tau=2.0, kl="forward")
    metrics = train_sft.train_step(DDP(m, find_unused_parameters=True), m, opt,
                                   [tuple(t[half] for t in batch)], 1.0, teacher, cfg)
    if rank == 0:
        torch.save((m.state_dict(), metrics["kl"]), path)


def test_soft_targets_on_two_ranks_equal_one_process(tmp_path):
    batch = fixed_batch(8, seed=4)
    batch[2][:4, -2:] = 0  # the ranks hold different token counts
    path = str(tmp_path / "ddp.pt")
    run_on_two_ranks(_ddp_soft, path, batch)
    m, teacher = net(0, dim=16, inter_dim=32), net(1).requires_grad_(False)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    metrics = train_sft.train_step(m, m, opt, [batch], 1.0, teacher,
                                   SimpleNamespace(alpha=0.5, tau=2.0, kl="forward"))
    state, kl = torch.load(path)
    assert kl == pytest.approx(metrics["kl"], rel=1e-5)
    for n, p in m.state_dict().items():
        torch.testing.assert_close(state[n], p, atol=1e-6, rtol=0, msg=n)


def digest(run):
    return common.file_digest(os.path.join(run, "ckpt.pt"))


def soft(teacher, out, *extra):
    return TINY_FLAGS + SMALL + ["--teacher", teacher, "--alpha", "0.5", "--tau", "2", "--steps",
                                 "4", "--ckpt_every", "2", "--eval_every", "100", "--out_dir",
                                 str(out), *extra]


def test_a_small_student_on_soft_targets_resumes_bitwise_and_leaves_the_teacher(sft_ckpt, tmp_path,
                                                                              capsys):
    before = digest(sft_ckpt)
    full, _ = train_sft.main(soft(sft_ckpt, tmp_path / "a"))
    train_sft.main(soft(sft_ckpt, tmp_path / "b", "--stop_at", "2"))
    resumed, _ = train_sft.main(soft(sft_ckpt, tmp_path / "b", "--resume"))
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert digest(sft_ckpt) == before and full.cfg.dim == 16
    ckpt = common.load_checkpoint(str(tmp_path / "a"))
    assert set(ckpt) == set(common.load_checkpoint(sft_ckpt)) | {"teacher"}  # no teacher weights
    assert set(ckpt["model"]) == set(full.state_dict())
    assert ckpt["teacher"]["run"] == sft_ckpt and ckpt["teacher"]["sha256"] == before
    steps = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert all(s["kl"] > 0 for s in steps if "loss" in s)
    # a resume with another teacher is refused, whether the flag or the file changed
    teacher = tmp_path / "teacher"
    shutil.copytree(sft_ckpt, teacher)
    train_sft.main(soft(str(teacher), tmp_path / "c", "--stop_at", "2"))
    held = snapshot(tmp_path / "c")
    err = one_line_failure(train_sft.main, soft(str(tmp_path / "a"), tmp_path / "c", "--resume"),
                           capsys)
    assert "does not match this run's config in: teacher" in err
    shutil.copy(tmp_path / "a" / "ckpt.pt", teacher / "ckpt.pt")  # another policy, same path
    err = one_line_failure(train_sft.main, soft(str(teacher), tmp_path / "c", "--resume"), capsys)
    assert "is not the file this run's checkpoint was trained on (--teacher)" in err
    assert snapshot(tmp_path / "c") == held


# ---- on-policy distillation (train_grpo.py --gradient_coef distill)


def sample(policy, cfg, rm=None, teacher=None, n_prompts=4, seed=0):
    tok, task = tasks.Tokenizer(), tasks.Addition(2)
    problems = [task.sample(random.Random(seed + i)) for i in range(n_prompts)]
    return train_grpo.make_experience(policy, policy.forward_shared_prefix,
                                      copy.deepcopy(policy).forward_shared_prefix, task, tok,
                                      problems, cfg, torch.Generator().manual_seed(seed),
                                      rm, teacher)


def sequences(r):
    """Each row's real prompt tokens followed by its completion's real tokens, and where the
    completion starts."""
    out = []
    for i in range(r.completion_ids.size(0)):
        prompt = r.prompt_ids[i][r.prompt_mask[i].bool()]
        n = int(r.completion_mask[i].sum())
        out.append((torch.cat([prompt, r.completion_ids[i, :n]]), len(prompt)))
    return out


def plain_logprobs(model, r, temperature=1.0):
    """log pi(o_t | q, o_<t) of each completion token (at a temperature) from a plain forward of
    its row alone."""
    out = torch.zeros_like(r.completion_mask)
    with torch.no_grad():
        for i, (seq, start) in enumerate(sequences(r)):
            logp = F.log_softmax(model(seq[None])[0][0].double() / temperature, -1)
            t = torch.arange(start, len(seq))
            out[i, :len(t)] = logp[t - 1, seq[t]].float()
    return out


def distill_config(**kw):
    return train_grpo.GRPOConfig(n_digits=2, max_new_tokens=6, gradient_coef="distill",
                                 teacher="t", beta=0.0, **kw)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_on_policy_distillation_coefficient_is_the_teachers_minus_the_students_logprob(
        temperature):
    """GKD's data is the student's own samples; its per-token coefficient log pi_teacher(o_t) -
    log pi_student(o_t), each at the sampling temperature, from a forward of the row alone
    here."""
    student, teacher = net(0, dim=16, inter_dim=32), net(1)
    before = copy.deepcopy(teacher.state_dict())
    exp = sample(student, distill_config(num_generations=2, temperature=temperature),
                 teacher=teacher)
    mask = exp.rollout.completion_mask
    want = (plain_logprobs(teacher, exp.rollout, temperature)
            - plain_logprobs(student, exp.rollout, temperature)) * mask
    assert mask.sum() > 8 and (want != 0).any()
    torch.testing.assert_close(exp.advantages, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.parts["teacher"], want.sum(1), atol=1e-4, rtol=0)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def _ddp_distill(rank, world, path, exp):
    from torch.nn.parallel import DistributedDataParallel as DDP
    local = rows_of(exp, slice(rank * 4, rank * 4 + 4))
    for loss_type in ("grpo", "dapo"):
        policy = net(0, dim=16, inter_dim=32)
        model = DDP(common.SharedPrefix(policy), find_unused_parameters=True)
        _split_step(policy, local, distill_config(num_generations=2, loss_type=loss_type), model)
        if rank == 0:
            torch.save(policy.state_dict(), f"{path}.{loss_type}")


def test_on_policy_distillation_on_two_ranks_equals_one_process(tmp_path):
    """The update on distillation's per-token coefficients (made in one process: each row's own,
    tested above), two gloo ranks holding half the rows each, equals one process on all rows."""
    student, teacher = net(0, dim=16, inter_dim=32), net(1).requires_grad_(False)
    exp = sample(student, distill_config(num_generations=2), teacher=teacher)
    n = exp.rollout.completion_ids.size(0)
    exp = replace(exp, old_logp=exp.rollout.logprobs, ref_logp=exp.rollout.logprobs)
    assert n == 8
    path = str(tmp_path / "ddp.pt")
    run_on_two_ranks(_ddp_distill, path, exp)
    for loss_type in ("grpo", "dapo"):
        single = net(0, dim=16, inter_dim=32)
        _split_step(single, exp, distill_config(num_generations=2, loss_type=loss_type))
        got = torch.load(f"{path}.{loss_type}")
        for k, p in single.state_dict().items():
            torch.testing.assert_close(got[k], p, atol=1e-6, rtol=0, msg=f"{loss_type}: {k}")


GRPO_ADD = GRPO_TINY + ["--task", "add", "--n_digits", "2"]


def test_on_policy_distillation_run_resumes_bitwise_and_leaves_the_teacher(sft_ckpt, tmp_path):
    student = str(tmp_path / "student")
    train_sft.main(TINY_FLAGS + SMALL + ["--out_dir", student, "--steps", "2",
                                         "--eval_every", "100"])
    before = digest(sft_ckpt)
    flags = GRPO_ADD + ["--init", student, "--gradient_coef", "distill", "--teacher", sft_ckpt,
                        "--beta", "0", "--steps", "4", "--ckpt_every", "2"]
    full = train_grpo.main(flags + ["--out_dir", str(tmp_path / "a")])[0]
    train_grpo.main(flags + ["--out_dir", str(tmp_path / "b"), "--stop_at", "2"])
    resumed = train_grpo.main(flags + ["--out_dir", str(tmp_path / "b"), "--resume"])[0]
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    start = common.load_checkpoint(student)["model"]
    assert not all(torch.equal(full.state_dict()[k], v) for k, v in start.items())
    assert digest(sft_ckpt) == before and full.cfg.dim == 16
    ckpt = common.load_checkpoint(str(tmp_path / "a"))
    assert set(ckpt) >= {"model", "ref"} and "teacher_model" not in ckpt
    assert ckpt["teacher"]["sha256"] == before and ckpt["chain"][-1]["run"] == student
    steps = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert all(s["reward_teacher"] != 0 for s in steps if "reward_mean" in s)


# ---- GRPO with a learned reward (train_grpo.py --reward model --reward_model RUN)


def test_grpos_learned_reward_is_the_reward_models_score_of_each_completion():
    """The model component of --reward is the reward model's scalar at each completion's last
    token, here from a plain forward of each row alone; weighed with the rule rewards."""
    policy, rm = net(0), net(2, ScalarModel).eval()
    torch.nn.init.normal_(rm.value_head.weight)  # a trained head: scores that differ
    cfg = train_grpo.GRPOConfig(n_digits=2, max_new_tokens=6, reward="accuracy,model:0.5",
                                reward_model="rm", num_generations=2)
    exp = sample(policy, cfg, rm=rm)
    with torch.no_grad():
        want = torch.stack([rm(seq[None])[0, -1] for seq, _ in sequences(exp.rollout)])
    assert want.std() > 0
    torch.testing.assert_close(exp.parts["model"], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.rewards, exp.parts["accuracy"] + 0.5 * want, atol=1e-5,
                               rtol=0)


@pytest.fixture(scope="module")
def reward_model(sft_ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rm"))
    train_rm.main(RM_TINY + ["--init", sft_ckpt, "--out_dir", out])
    return out


def test_grpo_on_a_learned_reward_logs_it_and_resumes_bitwise(sft_ckpt, reward_model, tmp_path):
    flags = GRPO_ADD + ["--init", sft_ckpt, "--reward", "model", "--reward_model", reward_model,
                        "--steps", "2", "--ckpt_every", "1"]
    full = train_grpo.main(flags + ["--out_dir", str(tmp_path / "a")])[0]
    train_grpo.main(flags + ["--out_dir", str(tmp_path / "b"), "--stop_at", "1"])
    resumed = train_grpo.main(flags + ["--out_dir", str(tmp_path / "b"), "--resume"])[0]
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    steps = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert all(s["reward_mean"] == pytest.approx(s["reward_model"]) for s in steps
               if "reward_mean" in s)


# ---- what bad input gets


@pytest.mark.parametrize("main,flags,msg", [
    (train_sft.main, ["--alpha", "0.5"], "soft targets (--alpha < 1) need --teacher"),
    (train_sft.main, ["--teacher", "out/x"], "--teacher is for --data rft or soft targets"),
    (train_sft.main, ["--alpha", "1.5", "--teacher", "x"], "alpha must be"),
    (train_sft.main, ["--tau", "2", "--data", "rft"], "--tau and --kl are for soft targets"),
    (train_sft.main, ["--kl", "reverse", "--data", "rft"], "--tau and --kl are for soft targets"),
    (train_sft.main, ["--tau", "0", "--teacher", "x", "--alpha", "0"], "tau must be > 0"),
    (train_sft.main, ["--kl", "both", "--teacher", "x", "--alpha", "0"], "kl must be"),
    (train_grpo.main, ["--gradient_coef", "distill"], "needs --teacher"),
    (train_grpo.main, ["--teacher", "out/x"], "--teacher is for it"),
    (train_grpo.main, ["--gradient_coef", "distill", "--teacher", "x", "--supervision",
                       "process", "--task", "think"], "use --supervision outcome"),
    (train_grpo.main, ["--reward", "model"], "--reward model needs --reward_model"),
    (train_grpo.main, ["--reward_model", "out/rm"], "--reward_model needs model in --reward"),
    (train_grpo.main, ["--reward", "model", "--reward_model", "x", "--gradient_coef", "rft"],
     "and GRPO's outcome advantages"),
    (train_grpo.main, ["--reward", "model", "--reward_model", "x", "--task", "multistep",
                       "--supervision", "process"], "and GRPO's outcome advantages"),
    (train_grpo.main, ["--reward", "accuracy,modle"], "not one of accuracy, format, model"),
])
def test_bad_distillation_settings_are_one_line_errors(main, flags, msg, capsys):
    assert msg in one_line_cli_error(main, flags, capsys)


@pytest.fixture(scope="module")
def think_run(tmp_path_factory):
    """A policy of the thinking task: another tokenizer than the addition task's."""
    out = str(tmp_path_factory.mktemp("think"))
    train_sft.main(TINY_MODEL[:-1] + ["64", "--vocab_size", "20", "--task", "think", "--steps",
                                      "1", "--eval_size", "4", "--samples", "0", "--quiet",
                                      "--batch_size", "4", "--out_dir", out])
    return out


@pytest.mark.parametrize("script", ["sft soft", "sft rft", "grpo distill"])
@pytest.mark.parametrize("which", ["another tokenizer", "a reward model"])
def test_a_teacher_of_another_tokenizer_or_a_reward_model_is_refused(
        script, which, sft_ckpt, think_run, reward_model, tmp_path, capsys):
    teacher, out = {"another tokenizer": think_run, "a reward model": reward_model}[which], \
        str(tmp_path / "out")
    main, flags = {
        "sft soft": (train_sft.main, TINY_FLAGS + ["--alpha", "0.5"]),
        "sft rft": (train_sft.main, TINY_FLAGS + ["--data", "rft", "--init", sft_ckpt]),
        "grpo distill": (train_grpo.main, GRPO_ADD + ["--init", sft_ckpt, "--gradient_coef",
                                                      "distill"])}[script]
    err = one_line_failure(main, flags + ["--teacher", teacher, "--out_dir", out], capsys)
    assert "--teacher" in err and ("another tokenizer" if which == "another tokenizer"
                                   else "is a reward model (train_rm.py), not a policy") in err
    assert not os.path.exists(out)
