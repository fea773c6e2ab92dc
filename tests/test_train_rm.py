import os
import random

import pytest
import torch

import common
import rollout
import tasks
import train_rm
from conftest import one_line_failure, tiny_config
from dist_helpers import run_on_two_ranks
from model import ScalarModel
from test_train_dpo import synthetic_pairs
from test_train_sft import TINY_MODEL

CPU = torch.device("cpu")
TOK, TASK = tasks.Tokenizer(), tasks.Addition(2)
RM_TINY = TINY_MODEL + ["--n_digits", "2", "--eval_size", "8", "--quiet", "--batch_size", "4",
                        "--num_prompts", "16", "--num_generations", "2", "--auc_samples", "2",
                        "--warmup", "1"]


def tiny_rm(seed=0):
    torch.manual_seed(seed)
    rm = ScalarModel(tiny_config())
    torch.nn.init.normal_(rm.value_head.weight, std=0.5)  # a non-zero head, so that scores differ
    return rm


def score(rm, prompts, completions):
    return rollout.score_completions(rm, prompts, completions, TOK.pad_id)


def test_zero_head_scores_exactly_zero():
    rm = ScalarModel(tiny_config())
    assert torch.equal(score(rm, [[15, 1, 10, 2, 13]], [[3, 16]]), torch.zeros(1))


def test_scores_read_the_last_real_token_whatever_the_padding():
    """The same scores for a right-padded batch (score), a left-padded batch with positions, and
    each sequence alone: the head reads the last real token, never padding."""
    rm = tiny_rm().eval()
    rng = random.Random(0)
    seqs = [[15] + [rng.randrange(15) for _ in range(n)] for n in (3, 9, 5, 1)]
    batch = score(rm, seqs, [[] for _ in seqs])
    alone = torch.stack([rm(torch.tensor([s]))[0, -1] for s in seqs])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    ids, mask = rollout.left_pad(seqs, TOK.pad_id, CPU)
    positions = (mask.long().cumsum(1) - 1).clamp_min(0)
    left = rollout.last_real(rm(ids, positions=positions, pad_mask=mask), mask)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)
    assert len(set(alone.tolist())) == 4


def test_scores_run_each_prompt_once_and_equal_each_sequence_alone():
    """score runs a prompt once for all its completions (forward_shared_prefix): the scalar at each
    completion's last token equals a plain forward of `prompt + completion` alone, with ragged
    prompts and completions, a repeated prompt and an empty completion; pair_scores (training's
    plain forward over both sides) agrees."""
    rm = tiny_rm().eval()
    prompts = [[15, 1, 10, 2, 13], [15, 4, 4, 10, 3, 13], [15, 1, 10, 2, 13], [15, 7, 13]]
    completions = [[3, 16], [8, 7, 16], [4, 1, 0, 16], []]

    def alone(p, c):
        return rm(torch.tensor([p + c]))[0, -1]

    want = torch.stack([alone(p, c) for p, c in zip(prompts, completions)])
    torch.testing.assert_close(score(rm, prompts, completions), want, atol=1e-5, rtol=1e-5)
    pairs = synthetic_pairs(3)
    rejected = pairs[2]["rejected_ids"]
    pairs[2]["rejected_ids"] = rejected[:3] + rejected  # the longest side
    with torch.no_grad():
        got = train_rm.pair_scores(rm, pairs, TOK.pad_id, CPU)
        for side, values in zip(("chosen_ids", "rejected_ids"), got):
            torch.testing.assert_close(
                values, torch.stack([alone(p["prompt_ids"], p[side]) for p in pairs]),
                atol=1e-5, rtol=1e-5)
    assert len(set(want.tolist())) == 4


def test_auc_by_hand():
    s = torch.tensor([0.9, 0.8, 0.3, 0.3, 0.1])
    y = torch.tensor([True, False, True, False, False])
    # positives 0.9 and 0.3 against negatives 0.8, 0.3, 0.1: 0.9 beats 3, 0.3 beats 1 and ties 1
    assert abs(train_rm.auc(s, y) - (3 + 1 + 0.5) / 6) < 1e-7
    # nan without negatives
    assert train_rm.auc(s, ~torch.zeros(5, dtype=torch.bool)) != train_rm.auc(s, y)


def rm_step(pairs, micro, model=None, n_global=8):
    rm = tiny_rm(3)
    opt = torch.optim.SGD(rm.parameters(), lr=0.5)
    cfg = train_rm.RMConfig(n_digits=2)
    train_rm.train_step(model(rm) if model else rm, rm, opt, micro, n_global, cfg, TOK.pad_id, CPU)
    return rm


def test_one_step_raises_chosen_scores_relative_to_rejected():
    pairs = synthetic_pairs(8)
    before = train_rm.pair_scores(tiny_rm(3), pairs, TOK.pad_id, CPU)
    after = train_rm.pair_scores(rm_step(pairs, [pairs]), pairs, TOK.pad_id, CPU)
    assert ((after[0] - after[1]) - (before[0] - before[1])).mean() > 0


def test_grad_accumulation_equals_one_batch():
    pairs = synthetic_pairs(8, seed=2)
    a, b = rm_step(pairs, [pairs]), rm_step(pairs, [pairs[:5], pairs[5:]])
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=n)


def _ddp_rm(rank, world, path, pairs):
    from torch.nn.parallel import DistributedDataParallel as DDP
    mine = pairs[rank::world]
    rm = rm_step(pairs, [mine[:1], mine[1:]], model=lambda m: DDP(m, find_unused_parameters=True))
    if rank == 0:
        torch.save(rm.state_dict(), path)


def test_ddp_two_ranks_equal_single_process(tmp_path):
    pairs = synthetic_pairs(8, seed=2)
    run_on_two_ranks(_ddp_rm, str(tmp_path / "ddp.pt"), pairs)
    single = rm_step(pairs, [pairs])
    got = torch.load(tmp_path / "ddp.pt")
    for n, p in single.state_dict().items():
        torch.testing.assert_close(got[n], p, atol=1e-6, rtol=0, msg=n)


def test_end_to_end_resume_and_load(sft_ckpt, tmp_path, capsys):
    flags = RM_TINY + ["--init", sft_ckpt, "--epochs", "2", "--eval_every", "3",
                       "--ckpt_every", "100"]
    full, first, last = train_rm.main(flags + ["--out_dir", str(tmp_path / "a")])
    assert (first["pair_acc"] == 0.0
            and {"pair_acc", "pair_margin", "auc", "frac_correct"} == set(last))
    for p in rollout.load_pairs(str(tmp_path / "a" / "pairs.jsonl"))[0]:
        assert TASK.is_held_out(p["prompt"]) == (p["split"] == "heldout")
    train_rm.main(flags + ["--out_dir", str(tmp_path / "b"), "--stop_at", "3"])
    resumed, _, _ = train_rm.main(flags + ["--out_dir", str(tmp_path / "b"), "--resume"])
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    rm = train_rm.load_reward_model(str(tmp_path / "a"), TASK, CPU)
    p = rollout.load_pairs(str(tmp_path / "a" / "pairs.jsonl"))[0][0]
    torch.testing.assert_close(score(rm, [p["prompt_ids"]], [p["chosen_ids"]]),
                               score(full.eval().cpu(),  # CUDA runs too
                                     [p["prompt_ids"]], [p["chosen_ids"]]))
    with pytest.raises(common.CheckpointError, match="not add with 3"):
        train_rm.load_reward_model(str(tmp_path / "a"), tasks.Addition(3), CPU)
    with pytest.raises(common.CheckpointError, match="is a sft checkpoint"):
        train_rm.load_reward_model(sft_ckpt, TASK, CPU)


@pytest.mark.parametrize("argv,flag", [(["--margin", "-1"], "--margin"),
                                       (["--auc_samples", "0"], "--auc_samples"),
                                       (["--pairs_source", "human"], "--pairs_source"),
                                       (["--lr", "nan"], "--lr")])
def test_bad_settings_are_one_line_errors(sft_ckpt, tmp_path, argv, flag, capsys):
    assert flag in one_line_failure(
        train_rm.main, RM_TINY + ["--init", sft_ckpt, "--out_dir", str(tmp_path)] + argv, capsys)
    assert not os.path.exists(tmp_path / "config.json")


def test_held_out_pairs_do_not_depend_on_the_number_of_training_prompts(tmp_path):
    """Held-out pairs and AUC samples come from their own streams: runs with more or fewer training
    prompts are measured on the same held-out set (they were drawn after the training pairs, from
    the same generator, so every --num_prompts changed them)."""
    from model import Transformer
    torch.manual_seed(0)
    sft = Transformer(tiny_config()).eval()
    held = {}
    for n in (4, 12):
        cfg = train_rm.RMConfig(n_digits=2, num_prompts=n, num_generations=4, auc_samples=2)
        run_cfg = common.RunConfig(out_dir=str(tmp_path / str(n)))
        os.makedirs(run_cfg.out_dir)
        train_rm.make_run_data(cfg, run_cfg, sft, TOK, TASK, TASK.eval_set(8))
        pairs = rollout.load_pairs(os.path.join(run_cfg.out_dir, "pairs.jsonl"))[0]
        assert sum(p["split"] == "train" for p in pairs) > 0
        held[n] = ([p for p in pairs if p["split"] == "heldout"],
                   open(os.path.join(run_cfg.out_dir, "heldout_samples.jsonl")).read())
    assert held[4][0] and held[4] == held[12]
