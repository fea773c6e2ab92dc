"""torch.compile gives the eager numbers: an SFT step of every model family (MLA or MHA, MoE or
dense, with or without MTP), a GRPO update through the shared-prefix forward (what Run.wrap
compiles), the compiled decode step (the same tokens, compiled once for prompts of any length),
a whole train_grpo.py --compile run, and a whole --compile run, with Inductor, of the family whose
compiled loss once came back without a gradient (a dense model without MTP: its loss was the
detached cross-entropy)."""
import functools
import json
import random
from dataclasses import replace

import pytest
import torch

import common
import rollout
import tasks
import train_grpo
import train_sft
from conftest import tiny_config
from model import Transformer
from test_train_grpo import GRPO_TINY, config, rollout_batch, update
from test_train_sft import TINY_FLAGS

# aot_eager traces what Inductor compiles (dynamo's graph, AOT autograd) in seconds, not minutes
FAMILIES = [{}, {"mtp_depth": 0, "n_dense_layers": 2}, {"attention": "mha", "n_dense_layers": 2},
            {"attention": "mha", "mtp_depth": 0}]


def twins(**kw):
    torch.manual_seed(0)
    a = Transformer(tiny_config(**kw))
    b = Transformer(tiny_config(**kw))
    b.load_state_dict(a.state_dict())
    return a, b


def assert_same_weights(a, b):
    for (n, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("kw", FAMILIES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
                         or "default")
def test_compiled_sft_step_equals_the_eager_step(kw):
    tok, task = tasks.Tokenizer(), tasks.Addition(2)
    batch = train_sft.make_batch(task, tok, random.Random(0), 8, torch.device("cpu"))
    eager, compiled = twins(**kw)
    got = []
    for net, forward in ((eager, eager), (compiled, torch.compile(compiled, backend="aot_eager"))):
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        got.append(train_sft.train_step(forward, net, opt, [batch], 1.0))
    assert abs(got[0]["loss"] - got[1]["loss"]) < 1e-5 and got[1]["grad_norm"] > 0
    assert_same_weights(eager, compiled)


@pytest.mark.parametrize("kw", [{}, {"attention": "mha", "mtp_depth": 0, "n_dense_layers": 2}],
                         ids=["mla,moe,mtp", "mha,dense"])
def test_compiled_grpo_update_equals_the_eager_update(kw):
    eager, compiled = twins(**kw)
    cfg = config(num_generations=4, num_minibatches=2)
    exp = rollout_batch(eager, n_prompts=2, cfg=cfg)
    exp = replace(exp, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3]))
    a = update(eager, exp, cfg, torch.optim.SGD(eager.parameters(), lr=0.5))
    forward = torch.compile(common.SharedPrefix(compiled), backend="aot_eager")
    b = update(compiled, exp, cfg, torch.optim.SGD(compiled.parameters(), lr=0.5), forward)
    assert abs(a["loss"] - b["loss"]) < 1e-5 and a["updates"] == b["updates"] == 2
    assert_same_weights(eager, compiled)


def test_compile_flag_trains_a_dense_model_without_mtp(tmp_path):
    """python train_sft.py --compile, Inductor and all, on the family that crashed at backward: the
    same losses and gradient norms as eager (AdamW's first steps are about lr * sign(g), so the
    weights themselves are compared by the SGD tests above)."""
    flags = TINY_FLAGS + ["--mtp_depth", "0", "--n_dense_layers", "2", "--steps", "2",
                          "--eval_every", "100"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        train_sft.main(flags + ["--out_dir", str(tmp_path / name)] + extra)
        runs[name] = [r for r in common.read_jsonl(tmp_path / name / "metrics.jsonl")
                      if r["kind"] == "train"]
    for e, c in zip(runs["eager"], runs["compiled"]):
        assert abs(e["loss"] - c["loss"]) < 1e-4 and abs(e["grad_norm"] - c["grad_norm"]) < 1e-4
    assert len(runs["compiled"]) == 2 and runs["compiled"][1]["loss"] != runs["compiled"][0]["loss"]


@pytest.mark.parametrize("kw", [{}, {"attention": "mha", "mtp_depth": 0, "n_dense_layers": 2}],
                         ids=["mla,moe", "mha,dense"])
def test_compiled_decode_samples_the_eager_tokens_and_compiles_once(kw):
    """The decode step on fixed shapes (a cache rounded up to 16 slots, the slot a tensor): the same
    tokens and log-probs as eager decoding for the same seed, the completions padded to
    max_new_tokens; prompts of another length reuse the compiled step (dynamo's "eager" backend
    traces what Inductor would compile, in a second)."""
    torch.manual_seed(0)
    m = Transformer(tiny_config(**kw))
    tok = tasks.Tokenizer()
    kw = dict(eos_id=tok.eos_id, pad_id=tok.pad_id, num_generations=3, max_new_tokens=7)
    torch._dynamo.reset()
    frames = []
    for n in (5, 8):  # prompts of 5 and 8 tokens: caches of 12 and 15 slots, both 16 compiled
        prompts = [[tok.bos_id] + torch.randint(0, 10, (n - i,)).tolist() for i in range(3)]
        runs = [rollout.generate(m, prompts, generator=torch.Generator().manual_seed(n),
                                 compile=c, **kw) for c in (False, "eager")]
        frames.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        eager, compiled = runs
        L = eager.completion_ids.size(1)
        assert compiled.completion_ids.shape == (9, 7) and L > 1
        assert torch.equal(compiled.completion_ids[:, :L], eager.completion_ids)
        assert (compiled.completion_ids[:, L:] == tok.pad_id).all()
        assert torch.equal(compiled.completion_mask[:, :L], eager.completion_mask)
        assert compiled.completion_mask[:, L:].sum() == 0
        torch.testing.assert_close(compiled.logprobs[:, :L], eager.logprobs, atol=1e-6, rtol=0)
    assert frames[0] > 0 and frames[1] == frames[0]  # the second length compiled nothing new


def test_compile_flag_runs_grpo_with_the_eager_numbers(tmp_path, monkeypatch):
    """python train_grpo.py --compile on a model with dense and MoE layers (decode step, update and
    reference forwards compiled; here by dynamo's "eager" backend: its graphs and guards, run
    eagerly, as the tests above check aot_eager's numbers): the same samples (rewards, lengths) and
    the same losses as eager. Every variant of every function compiles: none falls back to eager
    past dynamo's limit, as the blocks of a MoE model once did (a variant per FFN, pass and
    network: 10 here, the limit 8)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    rollout._COMPILED.clear()
    torch._dynamo.reset()
    train_sft.main(TINY_FLAGS + ["--n_dense_layers", "1", "--steps", "1", "--eval_every", "100",
                                 "--out_dir", str(tmp_path / "sft")])
    flags = GRPO_TINY + ["--task", "add", "--n_digits", "2", "--init", str(tmp_path / "sft"),
                         "--steps", "2", "--eval_every", "100"]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        train_grpo.main(flags + ["--out_dir", str(tmp_path / name)] + extra)
        runs[name] = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")
                      if "reward_mean" in x]
    assert len(runs["compiled"]) == 2
    for e, c in zip(runs["eager"], runs["compiled"]):
        assert e["reward_mean"] == c["reward_mean"] and e["completion_len"] == c["completion_len"]
        assert abs(e["loss"] - c["loss"]) < 1e-5 and abs(e["kl"] - c["kl"]) < 1e-5
    rollout._COMPILED.clear()  # compiled with the patched backend


def test_compiled_speculative_decoding_samples_the_eager_tokens():
    """MTP speculative decoding with its two forwards compiled (the main model's verify over two
    slots, the MTP block's draft): the same tokens, log-probs and statistics as eager, greedy and
    sampled."""
    torch.manual_seed(0)
    m = Transformer(tiny_config())
    tok = tasks.Tokenizer()
    prompts = [[tok.bos_id] + torch.randint(0, 10, (n,)).tolist() for n in (6, 3, 5)]
    kw = dict(eos_id=tok.eos_id, pad_id=tok.pad_id, num_generations=2, max_new_tokens=6,
              speculative=True)
    for temperature in (0.0, 1.0):
        eager, compiled = (rollout.generate(m, prompts, temperature=temperature, compile=c,
                                            generator=torch.Generator().manual_seed(1), **kw)
                           for c in (False, "eager"))
        assert torch.equal(compiled.completion_ids, eager.completion_ids)
        torch.testing.assert_close(compiled.logprobs, eager.logprobs, atol=1e-6, rtol=0)
        assert compiled.stats == eager.stats and eager.stats["proposed"] > 0
