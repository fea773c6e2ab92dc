"""export_hf.py against Hugging Face's own DeepseekV3 (skipped without transformers: pip install -r
requirements-hf.txt): the same logits, the same greedy tokens, import(export(m)) bitwise."""
import json
import os
import time

import pytest
import torch

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

import common  # noqa: E402
import export_hf  # noqa: E402
import rollout  # noqa: E402
import tasks  # noqa: E402
from conftest import tiny_config  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

GRID = [dict(), dict(q_lora_rank=8), dict(n_expert_groups=2, n_limited_groups=1),
        dict(route_scale=2.5, rope_theta=10000.0), dict(n_dense_layers=0, rope_theta=500.0),
        dict(n_dense_layers=2), dict(n_shared_experts=2, mtp_depth=0),
        dict(n_shared_experts=0, n_heads=4, mtp_depth=2, q_lora_rank=16)]


def exported(tmp_path, **kw):
    torch.manual_seed(0)
    m = Transformer(tiny_config(**kw)).eval()
    with torch.no_grad():  # trained norms (a swap of two of one size would show) and router bias
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for moe in m.moe_layers():
            moe.gate.bias.normal_(0, 0.1)
    out = str(tmp_path / "hf")
    export_hf.export_model(m, tasks.Tokenizer(), out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return m, hf, out


@pytest.mark.parametrize("kw", GRID, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items())
                         or "default")
def test_transformers_gives_our_logits_and_import_gives_our_weights(kw, tmp_path):
    m, hf, out = exported(tmp_path, **kw)
    tok = tasks.Tokenizer()
    x = torch.tensor([tok.encode("12+34=46,7*8=56")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x)[0], atol=1e-4, rtol=0)
        # a left-padded batch: each row's first real token at position 0, padding masked
        rows = [tok.encode("1+2="), tok.encode("12+34=46")]
        n = max(map(len, rows))
        ids = torch.tensor([[tok.pad_id] * (n - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
        ours = m(ids, positions=pos, pad_mask=mask.bool())[0]
        torch.testing.assert_close(theirs[mask.bool()], ours[mask.bool()], atol=1e-4, rtol=0)
    back, _ = export_hf.import_hf(out)
    assert back.cfg == m.cfg
    for (name, a), b in zip(m.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_greedy_generation_of_a_trained_run_is_token_for_token_ours(sft_ckpt, tmp_path):
    out = str(tmp_path / "hf")
    t = time.perf_counter()
    export_hf.main([sft_ckpt, out])
    assert time.perf_counter() - t < 5
    ckpt = common.load_checkpoint(sft_ckpt)
    m, tok, task = common.model_of(ckpt, sft_ckpt).eval(), tasks.Tokenizer(), tasks.Addition(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    for p in task.eval_set(4):
        prompt = tasks.encode_problem(tok, p, with_completion=False)[0]
        assert hf_tok(p.prompt)["input_ids"] == prompt  # <bos> first, as in training
        r = rollout.generate(m, [prompt], eos_id=tok.eos_id, pad_id=tok.pad_id,
                             max_new_tokens=6, temperature=0)
        ours = r.completion_ids[0][:int(r.completion_mask[0].sum())].tolist()
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(prompt):]
        assert theirs.tolist()[:len(ours)] == ours


def test_what_deepseek_v3_cannot_hold_is_one_line(sft_ckpt, tmp_path, capsys):
    with pytest.raises(common.ConfigError, match="MLA only"):
        export_hf.hf_config(ModelConfig(attention="mha"), tasks.Tokenizer())
    with pytest.raises(common.ConfigError, match="router is sigmoid"):
        export_hf.hf_config(ModelConfig(score_func="softmax"), tasks.Tokenizer())
    _, _, out = exported(tmp_path)
    config = json.load(open(os.path.join(out, "config.json")))
    for key, value, msg in [("scoring_func", "softmax", "softmax router"),
                            ("rope_parameters", {"rope_type": "yarn", "factor": 4}, "yarn"),
                            ("hidden_act", "gelu", "hidden_act"),
                            ("vocab_size", 129280, "not one of this project's tokenizers")]:
        json.dump({**config, key: value}, open(os.path.join(out, "config.json"), "w"))
        with pytest.raises(common.ConfigError, match=msg):
            export_hf.import_hf(out)
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    tj = json.load(open(os.path.join(out, "tokenizer.json")))
    tj["model"]["vocab"]["<|eos|>"] = 3
    json.dump(tj, open(os.path.join(out, "tokenizer.json"), "w"))
    with pytest.raises(common.ConfigError, match="other ids"):
        export_hf.import_hf(out)
    with pytest.raises(SystemExit, match="holds files"):  # no export overwrites by accident
        export_hf.main([sft_ckpt, out])


def test_a_folder_transformers_saved_itself_imports_with_its_logits(tmp_path):
    """Not only our own exports: a DeepseekV3 that transformers made and saved (random weights and
    router bias, two expert groups, route scale 2.5, no q_lora_rank; no MTP weights, so the import
    has none) gives the same logits in our Transformer."""
    c = transformers.DeepseekV3Config(
        vocab_size=20, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(c).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
        for module in hf.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.1)
    hf.save_pretrained(str(tmp_path / "theirs"))
    m, tok = export_hf.import_hf(str(tmp_path / "theirs"))
    assert m.cfg.mtp_depth == 0 and tok.think
    x = torch.tensor([tok.encode("<think>12+34=46</think>46")])
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], hf(x).logits, atol=1e-4, rtol=0)


def test_the_thinking_tokenizer_round_trips_through_transformers(tmp_path):
    """<think> and </think> are one token each and decode as text; an unknown character is an
    error, not a silent pad."""
    tok = tasks.Tokenizer(think=True)
    torch.manual_seed(0)
    export_hf.export_model(Transformer(tiny_config(vocab_size=20)), tok, str(tmp_path / "hf"))
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf"))
    text = "<think>12+34=46</think>46"
    ids = hf_tok(text)["input_ids"]
    assert ids == [tok.bos_id] + tok.encode(text)
    assert hf_tok.decode(ids, skip_special_tokens=True) == text
    with pytest.raises(Exception, match="UNK"):
        hf_tok("1 a")
