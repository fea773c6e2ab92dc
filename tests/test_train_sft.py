import dataclasses
import json
import os
import random
import zlib

import pytest
import torch

import common
import rollout
import tasks
import train_sft
from conftest import one_line_cli_error, tiny_config
from dist_helpers import run_on_two_ranks
from model import Transformer

TINY_MODEL = ["--dim", "32", "--inter_dim", "64", "--moe_inter_dim", "16", "--n_layers", "2",
              "--n_heads", "2", "--kv_lora_rank", "16", "--qk_nope_head_dim", "8",
              "--qk_rope_head_dim", "4", "--v_head_dim", "8", "--n_routed_experts", "4",
              "--max_seq_len", "32"]
TINY_FLAGS = TINY_MODEL + ["--task", "add", "--n_digits", "2", "--eval_size", "8", "--samples", "0",
                           "--quiet", "--batch_size", "8", "--warmup", "2"]


def fixed_batch(n=8, seed=0):
    tok, task = tasks.Tokenizer(), tasks.Addition(2)
    return train_sft.make_batch(task, tok, random.Random(seed), n, torch.device("cpu"))


def fresh(seed=0, sgd=False, **kw):
    """A tiny model and its optimiser. Equivalence tests use SGD: Adam's first step is
    ~lr * sign(g), which turns float noise in a near-zero gradient into a full-size difference in
    the weights."""
    torch.manual_seed(seed)
    m = Transformer(tiny_config(**kw))
    opt = (torch.optim.SGD(m.parameters(), lr=0.5) if sgd
           else torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0))
    return m, opt


def test_make_batch_masks_prompt_and_aligns_targets():
    tok = tasks.Tokenizer()
    idx, targets, mask, pad = fixed_batch(4)
    assert torch.equal(pad, idx != tok.pad_id)
    for i in range(4):
        row = [t for t in idx[i].tolist() if t != tok.pad_id]
        text = tok.decode(row)
        prompt_len = text.index("=") + 2  # <bos> + up to '='
        real = idx[i, 1:] != tok.pad_id
        assert torch.equal(targets[i, :-1][real], idx[i, 1:][real])
        masked = targets[i][mask[i] == 1].tolist()
        assert masked[-1] == tok.eos_id  # the end token is learnt
        assert int(tok.decode(masked)) == eval_sum(text)  # only the answer (+ <eos>) is learnt
        assert mask[i, :prompt_len - 1].sum() == 0


def eval_sum(text):
    a, b = text.split("=")[0].split("+")
    return int(a) + int(b)


def test_prompt_targets_do_not_change_the_loss():
    m, _ = fresh()
    idx, targets, mask, _ = fixed_batch()
    _, loss = m(idx, targets, mask)
    t2 = targets.clone()
    t2[mask == 0] = (t2[mask == 0] + 3) % 15
    _, loss2 = m(idx, t2, mask)
    assert torch.equal(loss, loss2)
    t3 = targets.clone()
    t3[mask == 1] = (t3[mask == 1] + 3) % 15
    assert not torch.equal(m(idx, t3, mask)[1], loss)


def test_pretraining_learns_every_token_of_a_mix_of_thinking_and_direct_documents(tiny):
    """--data pretrain: the loss covers every token after <bos> (a changed prompt target changes
    it), and about worked_fraction of the documents think, the rest answer directly."""
    tok, task = tasks.get("think")
    idx, targets, mask, pad = train_sft.make_batch(task, tok, random.Random(0), 400,
                                                   torch.device("cpu"), worked=0.2)
    real = targets != tok.pad_id
    assert torch.equal(mask.bool(), real)  # every real target, the prompt's included
    docs = [tok.decode(row) for row in idx.tolist()]
    thinking = [d for d in docs if tasks.THINK in d]
    assert 0.14 < len(thinking) / len(docs) < 0.26
    for d in docs:  # each a well-formed, right solution of its prompt
        prompt, completion = d.split("=", 1)
        p = tasks.Problem(prompt + "=", "", sum(map(int, prompt.split("+"))))
        assert task.reward(completion, p) == 1.0
    m = Transformer(tiny(vocab_size=20, max_seq_len=64))
    _, loss = m(idx[:8], targets[:8], mask[:8])
    changed = targets[:8].clone()
    changed[:, 0] = (changed[:, 0] + 1) % 10  # the first prompt token
    assert not torch.equal(m(idx[:8], changed, mask[:8])[1], loss)


def test_pretraining_is_for_the_thinking_task(tmp_path, capsys):
    err = one_line_cli_error(train_sft.main, TINY_FLAGS + ["--data", "pretrain", "--out_dir",
                                                           str(tmp_path)], capsys)
    assert "--task think" in err


def test_overfit_a_fixed_batch():
    m, opt = fresh(mtp_depth=0)
    batch = fixed_batch(8)
    for _ in range(150):
        metrics = train_sft.train_step(m, m, opt, [batch], 1.0)
    assert metrics["ce"] < 0.05, metrics


def test_grad_accumulation_equals_one_big_batch():
    """k=2 micro-batches of B/2 (of different token counts) == one step on B."""
    idx, targets, mask, pad = fixed_batch(8, seed=3)
    mask[:4, -2:] = 0  # make the two halves' token counts differ, so naive averaging would be wrong
    a, opt_a = fresh(seed=1, sgd=True)
    train_sft.train_step(a, a, opt_a, [(idx, targets, mask, pad)], 1.0)
    b, opt_b = fresh(seed=1, sgd=True)
    halves = [(idx[:4], targets[:4], mask[:4], pad[:4]), (idx[4:], targets[4:], mask[4:], pad[4:])]
    train_sft.train_step(b, b, opt_b, halves, 1.0)
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=n)


def _ddp_step(rank, world, path, batch):
    from torch.nn.parallel import DistributedDataParallel as DDP
    m, opt = fresh(seed=1, sgd=True)
    ddp = DDP(m, find_unused_parameters=True)
    half = slice(rank * 4, rank * 4 + 4)
    train_sft.train_step(ddp, m, opt, [tuple(t[half] for t in batch)], 1.0)
    if rank == 0:
        torch.save(m.state_dict(), path)


def test_ddp_two_ranks_equal_single_process(tmp_path):
    batch = fixed_batch(8, seed=4)
    batch[2][:4, -2:] = 0
    path = str(tmp_path / "ddp.pt")
    run_on_two_ranks(_ddp_step, path, batch)
    single, opt = fresh(seed=1, sgd=True)
    train_sft.train_step(single, single, opt, [batch], 1.0)
    ddp_state = torch.load(path)
    for n, p in single.state_dict().items():
        torch.testing.assert_close(ddp_state[n], p, atol=1e-6, rtol=0, msg=n)


def run(tmp_path, *extra):
    return train_sft.main(TINY_FLAGS + ["--out_dir", str(tmp_path)] + list(extra))


def test_exact_resume_is_bitwise(tmp_path):
    flags = ("--steps", "6", "--ckpt_every", "2", "--eval_every", "100")
    full, _ = run(tmp_path / "a", *flags)
    run(tmp_path / "b", *flags, "--stop_at", "3")
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    resumed, _ = run(tmp_path / "b", *flags, "--resume")
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert os.path.exists(tmp_path / "b" / "config.json")


def test_resume_with_other_config_names_the_fields(tmp_path, capsys):
    run(tmp_path, "--steps", "2", "--eval_every", "100")
    with pytest.raises(SystemExit):
        run(tmp_path, "--steps", "4", "--eval_every", "100", "--resume", "--lr", "0.5",
            "--dim", "64")
    err = capsys.readouterr().err
    assert "does not match" in err and "lr" in err and "dim" in err


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    good = {"model": {"w": torch.ones(3)}, "model_config": {}, "config": {}, "step": 1,
            "tokenizer": {}}
    common.save_checkpoint(path, good)

    def killed(src, dst):  # the process dies after writing the temp file, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(common.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {**good, "step": 2, "model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    ckpt = common.load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign"])
def test_bad_checkpoint_is_a_clear_error(tmp_path, damage):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"model": {"w": torch.ones(100)}, "model_config": {},
                                  "config": {}, "step": 1, "tokenizer": {}})
    data = open(path, "rb").read()
    if damage == "truncate":
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(path, "wb").write(b"not a checkpoint" * 10)
    elif damage == "empty":
        open(path, "wb").write(b"")
    else:
        torch.save({"something": 1}, path)
    with pytest.raises(common.CheckpointError, match="corrupt or truncated|not one of ours"):
        common.load_checkpoint(path)


def test_missing_checkpoint_on_resume(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path / "none", "--resume")
    assert "no checkpoint at" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_forward = Transformer.forward

    def poisoned(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        if kw.get("num_tokens") is not None or len(a) > 1:
            calls["n"] += 1
            if calls["n"] > 3:
                return out[0], out[1] * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    with pytest.raises(SystemExit):
        run(tmp_path, "--steps", "6", "--ckpt_every", "2", "--eval_every", "100")
    assert "non-finite loss" in capsys.readouterr().err
    ckpt = common.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("argv,name", [(["--foo", "1"], "--foo"), (["--lr", "fast"], "--lr"),
                                       (["--steps", "1.5"], "--steps"),
                                       (["--resume", "maybe"], "--resume")])
def test_cli_rejects_bad_flags(argv, name, capsys):
    assert name in one_line_cli_error(train_sft.main, argv, capsys)


def test_cli_forms_and_help(capsys):
    cfg, mcfg, run_cfg = common.parse_config([train_sft.SFTConfig, tiny_config().__class__],
                                             ["--lr=0.5", "--steps", "7", "--resume", "--dim=64"])
    assert cfg.lr == 0.5 and cfg.steps == 7 and run_cfg.resume is True and mcfg.dim == 64
    assert set(run_cfg.given) == {"lr", "steps", "resume", "dim"}
    with pytest.raises(SystemExit):
        train_sft.main(["--help"])
    out = capsys.readouterr().out
    assert ("--lr" in out and "peak learning rate (default: 0.002)" in out
            and "--kv_lora_rank" in out)


@pytest.mark.parametrize("script",
                         ["train_sft", "train_grpo", "train_dpo", "train_rm", "train_ppo"])
def test_every_script_prints_its_help(script, capsys):
    """--help formats every flag's comment (a '%' in one once broke train_dpo.py --help), and every
    flag has one, inherited fields (common.InitConfig's --task, --init, ...) too."""
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0 and "--seed" in capsys.readouterr().out
    configs = [c for c in vars(module).values() if dataclasses.is_dataclass(c)
               and isinstance(c, type) and c.__name__.endswith("Config")]
    for cls in configs + [common.RunConfig]:
        comments = common._field_comments(cls)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.metadata.get("flag", True) and not comments.get(f.name)]
        assert not missing, f"{cls.__name__}: no --help text for {missing}"


def test_batch_not_dividing_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--batch_size", "6", "--grad_accum", "4")
    assert "does not divide" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# RFT (--data rft): the same loop, another data source (DeepSeekMath 5.2.1)


def text_reward(self, completion, problem):
    """Right for about half of all texts: a tiny model is never right, and RFT needs kept
    samples."""
    return float(zlib.crc32(completion.encode()) % 2)


def test_rft_data_keeps_exactly_the_correct_ended_samples(monkeypatch):
    """RFT's data source, rejection sampling (rollout.correct_samples), on RFT's prompt stream."""
    monkeypatch.setattr(tasks.Addition, "reward", text_reward)
    tok, task = tasks.Tokenizer(), tasks.Addition(2)
    stream = random.Random(common.stream_seed(0, "rft", 0))
    problems = {p.prompt: p for p in (task.sample(stream) for _ in range(6))}
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    seqs, solved = rollout.correct_samples(Transformer(tiny_config()), tok, task,
                                           list(problems.values()), 4, gen)
    assert 0 < len(seqs) < 24 and 0 < solved <= 6
    prompts = {tok.decode(ids[1:k]) for ids, k in seqs}
    assert prompts <= set(problems) and len(prompts) == solved
    for ids, k in seqs:  # `<bos> prompt completion <eos>`, the completion one the reward accepts
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.eos_id not in ids[k:-1]
        assert task.reward(tok.decode(ids[k:], strict=True), problems[tok.decode(ids[1:k])]) == 1.0


def test_rft_run_starts_from_its_init_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tasks.Addition, "reward", text_reward)
    run(tmp_path / "sft", "--steps", "3", "--eval_every", "100")
    flags = ["--data", "rft", "--init", str(tmp_path / "sft"), "--rft_prompts", "32",
             "--rft_samples", "8", "--steps", "4", "--ckpt_every", "2", "--eval_every", "100",
             "--lr", "1e-30"]
    # a step of 1e-30 rounds away: the weights are the init's
    unchanged, _ = run(tmp_path / "lr0", *flags, "--stop_at", "1")
    init = torch.load(tmp_path / "sft" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(unchanged.state_dict()[k], v) for k, v in init.items()
               if not k.endswith("gate.bias"))
    flags[-1] = "1e-3"
    full, _ = run(tmp_path / "a", *flags)
    assert os.path.exists(tmp_path / "a" / "rft_data.jsonl")
    run(tmp_path / "b", *flags, "--stop_at", "2")
    resumed, _ = run(tmp_path / "b", *flags, "--resume")
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(SystemExit):  # fine-tuning an init into its own folder would overwrite it
        run(tmp_path / "sft", *flags)
    assert "give it another folder" in capsys.readouterr().err
    with open(tmp_path / "b" / "rft_data.jsonl", "a") as f:  # data the checkpoint did not train on
        f.write('{"ids": [15, 16], "start": 1}\n')
    os.remove(tmp_path / "b" / "config.json")  # the refusal comes before anything is written
    with pytest.raises(SystemExit):
        run(tmp_path / "b", *flags, "--resume")
    assert "is not the file this run's checkpoint was trained on" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b" / "config.json")
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)  # the name inputs had
    ckpt["inputs"] = {"rft_data": ckpt["inputs"].pop("rft_data.jsonl")}  # before their file's
    torch.save(ckpt, tmp_path / "b" / "ckpt.pt")
    with pytest.raises(SystemExit):
        run(tmp_path / "b", *flags, "--resume")
    assert "is not the file this run's checkpoint was trained on" in capsys.readouterr().err


def test_a_field_added_after_a_checkpoint_was_saved_counts_as_its_default():
    cfg, run_cfg = train_sft.SFTConfig(n_digits=2), common.RunConfig()
    saved = {"config": common.config_dict(cfg), "run_config": common.config_dict(run_cfg)}
    del saved["config"]["data"], saved["config"]["rft_samples"]  # saved before RFT existed
    assert common.config_mismatches(saved, cfg, run_cfg) == []
    rft = train_sft.SFTConfig(n_digits=2, data="rft")
    assert common.config_mismatches(saved, rft, run_cfg) == ["data"]  # init may change
    saved["config"]["gone"] = 1  # a field that no longer exists is not compared
    assert common.config_mismatches(saved, cfg, common.RunConfig(seed=1)) == ["seed"]


def test_rejection_sampling_from_a_teacher_fine_tunes_the_init(tmp_path, monkeypatch):
    """--teacher: its samples are the data (R1's rejection sampling from the RL model), --init is
    the model fine-tuned; the checkpoint records both."""
    monkeypatch.setattr(tasks.Addition, "reward", text_reward)
    run(tmp_path / "init", "--steps", "2", "--eval_every", "100")
    run(tmp_path / "teacher", "--steps", "3", "--eval_every", "100", "--seed", "7")
    sampled, real = [], rollout.correct_samples
    monkeypatch.setattr(rollout, "correct_samples",
                        lambda m, *a, **k: sampled.append(m.state_dict()) or real(m, *a, **k))
    model, _ = run(tmp_path / "rs", "--data", "rft", "--init", str(tmp_path / "init"), "--teacher",
                   str(tmp_path / "teacher"), "--rft_prompts", "16", "--steps", "1",
                   "--eval_every", "100", "--lr", "1e-30")
    teacher = common.load_checkpoint(str(tmp_path / "teacher"))
    init = common.load_checkpoint(str(tmp_path / "init"))
    assert all(torch.equal(sampled[0][k], v) for k, v in teacher["model"].items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in init["model"].items()
               if not k.endswith("gate.bias"))  # the init, fine-tuned (a step of 1e-30)
    ckpt = common.load_checkpoint(str(tmp_path / "rs"))
    assert ckpt["teacher"]["run"] == str(tmp_path / "teacher") and ckpt["teacher"]["step"] == 3
    assert [s["run"] for s in ckpt["chain"]] == [str(tmp_path / "init")]


def test_a_fixed_training_set_is_drawn_once_outside_the_held_out_split(tmp_path):
    """--train_size (a cold start): every batch comes from the same few problems, none held out
    (nor a reordered twin of one), in shuffled epochs; a resume goes on exactly."""
    tok, task = tasks.get("think")
    cfg = train_sft.SFTConfig(task="think", train_size=24, batch_size=8, steps=7)
    data, order = train_sft.fixed_set(task, tok, cfg, seed=0)
    assert len(data) == 24 and len(order) >= 7 and all(len(o) == 8 for o in order)
    assert sorted(order[0] + order[1] + order[2]) == list(range(24))  # an epoch: each once
    held = {task.canonical(p.prompt) for p in task.eval_set(256)}
    for ids, start in data:
        prompt = tok.decode(ids[1:start])
        assert not task.is_held_out(prompt) and task.canonical(prompt) not in held
        assert tok.decode(ids[start:]).startswith(tasks.THINK)  # worked examples
    assert train_sft.fixed_set(task, tok, cfg, seed=0) == (data, order)
    flags = ["--train_size", "16", "--steps", "4", "--ckpt_every", "2", "--eval_every", "100"]
    full, _ = run(tmp_path / "a", *flags)
    run(tmp_path / "b", *flags, "--stop_at", "2")
    resumed, _ = run(tmp_path / "b", *flags, "--resume")
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("argv,msg", [
    (["--train_size", "4"], "smaller than one batch"),
    (["--train_size", "16", "--data", "rft"], "--train_size is for --data task"),
    (["--teacher", "x"], "--teacher is for --data rft or soft targets")])
def test_bad_data_settings_are_one_line_errors(argv, msg, tmp_path, capsys):
    assert msg in one_line_cli_error(train_sft.main, TINY_FLAGS + argv + [
        "--out_dir", str(tmp_path / "x")], capsys)
    assert not os.path.exists(tmp_path / "x")
