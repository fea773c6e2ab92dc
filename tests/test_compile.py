"""torch.compile gives the eager numbers: an SFT step of every model family (MLA or MHA, MoE or
dense, with or without MTP), a GRPO update through the shared-prefix forward (what Run.wrap
compiles), and a whole --compile run, with Inductor, of the family whose compiled loss once came
back without a gradient (a dense model without MTP: its loss was the detached cross-entropy)."""
import random
from dataclasses import replace

import pytest
import torch

import common
import tasks
import train_sft
from conftest import tiny_config
from model import Transformer
from test_train_grpo import config, rollout_batch, update
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


def test_compiled_grpo_update_equals_the_eager_update():
    eager, compiled = twins()
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
