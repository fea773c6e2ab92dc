"""Export a trained run as a Hugging Face DeepseekV3 checkpoint, and import one back.

    python export_hf.py out/grpo out/grpo_hf     # config.json, model.safetensors, tokenizer.json
    python export_hf.py --help

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    model = AutoModelForCausalLM.from_pretrained("out/grpo_hf")        # DeepseekV3ForCausalLM
    tok = PreTrainedTokenizerFast.from_pretrained("out/grpo_hf")

    import export_hf; model, tok = export_hf.import_hf("out/grpo_hf")  # -> Transformer, Tokenizer

Needs `pip install -r requirements-hf.txt` (safetensors; transformers only to load the result);
nothing else in the project imports them. The names are those of DeepSeek-V3's released weights
(per-expert `gate_proj`/`up_proj`/`down_proj`, the router's `e_score_correction_bias`); the MTP
module sits at layer index num_hidden_layers, as DeepSeek-V3's does at 61: Hugging Face's model
does not run it (it warns of the unused weights), import_hf reads it back. DeepseekV3 is MLA with a
sigmoid router only: an MHA model or a softmax router is a one-line error.
"""
import argparse
import json
import os
import sys

import torch

import common
import tasks
from model import ModelConfig, Transformer

# ours -> Hugging Face's, inside a block
BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
         "attn.wq": "self_attn.q_proj", "attn.wq_a": "self_attn.q_a_proj",
         "attn.q_norm": "self_attn.q_a_layernorm", "attn.wq_b": "self_attn.q_b_proj",
         "attn.wkv_a": "self_attn.kv_a_proj_with_mqa", "attn.kv_norm": "self_attn.kv_a_layernorm",
         "attn.wkv_b": "self_attn.kv_b_proj", "attn.wo": "self_attn.o_proj",
         "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
         "ffn": "mlp", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
MTP = {"enorm": "enorm", "hnorm": "hnorm", "proj": "eh_proj", "norm": "shared_head.norm"}


def hf_config(cfg, tok):
    """The DeepseekV3Config (as a dict) of a ModelConfig; ConfigError for what it cannot hold."""
    if cfg.attention != "mla":
        raise common.ConfigError("the DeepseekV3 architecture is MLA only: an --attention mha "
                                 "model cannot be exported")
    if cfg.score_func != "sigmoid" and cfg.n_dense_layers < cfg.n_layers:
        raise common.ConfigError("the DeepseekV3 router is sigmoid: a --score_func softmax model "
                                 "cannot be exported")
    return {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
            "intermediate_size": cfg.inter_dim, "moe_intermediate_size": cfg.moe_inter_dim,
            "num_hidden_layers": cfg.n_layers, "first_k_dense_replace": cfg.n_dense_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
            "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "qk_head_dim": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
            "head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
            "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
            "num_experts_per_tok": cfg.n_activated_experts, "n_group": cfg.n_expert_groups,
            "topk_group": cfg.n_limited_groups, "routed_scaling_factor": cfg.route_scale,
            "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
            "rope_interleave": True,
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
            "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
            "max_position_embeddings": cfg.max_seq_len, "num_nextn_predict_layers": cfg.mtp_depth,
            "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
            "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id,
            "torch_dtype": "float32", "dtype": "float32"}


def block_name(name):
    """A block's parameter name, ours -> Hugging Face's (e.g. ffn.experts.3.w1.weight ->
    mlp.experts.3.gate_proj.weight)."""
    for ours, theirs in BLOCK.items():
        if name == ours or name.startswith(ours + "."):
            name = theirs + name[len(ours):]
            break
    parts = name.split(".")
    return ".".join(BLOCK[p] if p in ("w1", "w2", "w3") else p for p in parts)


def hf_state_dict(model):
    """Our weights under Hugging Face's names: {name: tensor}. The MTP module k at layer
    num_hidden_layers + k, with copies of the shared embedding and head (as DeepSeek-V3 ships)."""
    out, L = {}, model.cfg.n_layers
    for name, t in model.state_dict().items():
        head, _, rest = name.partition(".")
        if head == "layers":
            i, _, rest = rest.partition(".")
            out[f"model.layers.{i}.{block_name(rest)}"] = t
        elif head == "mtp":
            k, _, rest = rest.partition(".")
            prefix = f"model.layers.{L + int(k)}."
            if rest.startswith("block."):
                out[prefix + block_name(rest[len("block."):])] = t
            else:
                part, _, leaf = rest.partition(".")
                out[prefix + MTP[part] + "." + leaf] = t
        else:
            out[{"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "head.weight": "lm_head.weight"}[name]] = t
    for k in range(model.cfg.mtp_depth):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = model.embed.weight
        out[f"model.layers.{L + k}.shared_head.head.weight"] = model.head.weight
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def tokenizer_json(tok):
    """tokenizers' JSON for our tokenizer: one token per character of the task alphabet, the
    special tokens (and <think>, </think>) as added tokens, the same ids."""
    definition = tok.definition()
    vocab = {ch: i for i, ch in enumerate(definition["alphabet"])}
    specials = {s: tok.enc.encode_single_token(s) for s in definition["specials"]}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False,
                              "special": s in tasks.SPECIALS}  # <think> is text, decoded
                             for s, i in specials.items()],
            "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."},
                              "behavior": "Isolated", "invert": False},
            "post_processor": {  # every sequence starts with <bos>, as in training
                "type": "TemplateProcessing", "single": [
                    {"SpecialToken": {"id": tasks.BOS, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 0}}],
                "special_tokens": {tasks.BOS: {"id": tasks.BOS, "ids": [tok.bos_id],
                                               "tokens": [tasks.BOS]}}},
            "decoder": {"type": "Fuse"},
            "model": {"type": "WordLevel", "vocab": {**vocab, **specials},
                      "unk_token": "<unk>"}}  # not in the vocabulary: an unknown character fails


def export_model(model, tok, out):
    """Write model and tokenizer as a Hugging Face folder (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json)."""
    from safetensors.torch import save
    config = hf_config(model.cfg, tok)
    os.makedirs(out, exist_ok=True)
    common.atomic_write(os.path.join(out, "config.json"), json.dumps(config, indent=2))
    common.atomic_write(os.path.join(out, "model.safetensors"),
                        save(hf_state_dict(model), metadata={"format": "pt"}))
    common.atomic_write(os.path.join(out, "tokenizer.json"), json.dumps(tokenizer_json(tok)))
    common.atomic_write(os.path.join(out, "tokenizer_config.json"), json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tasks.BOS,
        "eos_token": tasks.EOS, "pad_token": tasks.PAD, "padding_side": "left",
        "model_max_length": model.cfg.max_seq_len}, indent=2))


def export(run, out):
    """A policy run (a folder or its ckpt.pt) -> a Hugging Face folder at out."""
    path = common.checkpoint_file(run)
    ckpt = common.load_checkpoint(path)
    tok = tasks.Tokenizer(think=tasks.THINK in ckpt.get("tokenizer", {}).get("specials", ()))
    common.check_checkpoint(ckpt, path, common.POLICY_KINDS, tok)
    export_model(common.model_of(ckpt, path), tok, out)


SUPPORTED = {"model_type": "deepseek_v3", "hidden_act": "silu", "attention_bias": False,
             "norm_topk_prob": True, "rope_interleave": True, "tie_word_embeddings": False}


def import_hf(path):
    """A Hugging Face DeepseekV3 folder -> (model.Transformer in float32 and eval mode, our
    Tokenizer). ConfigError, one line naming it, for a feature this model does not have, or a
    vocabulary without our tokens. What the architecture does not hold (mtp_lambda, the balancing
    settings) comes back as ModelConfig's defaults."""
    from safetensors.torch import load_file
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    for key, value in SUPPORTED.items():
        if c.get(key, value) != value:
            raise common.ConfigError(f"{path}: {key} = {c.get(key)!r} is not supported (only "
                                     f"{value!r})")
    if c.get("scoring_func", "sigmoid") != "sigmoid" or c.get("topk_method", "noaux_tc") not in (
            "noaux_tc", "greedy"):
        raise common.ConfigError(f"{path}: a {c.get('scoring_func')} router with topk_method "
                                 f"{c.get('topk_method')!r} is not supported (only sigmoid)")
    rope = c.get("rope_parameters") or {}
    for scaling in (rope, c.get("rope_scaling") or {}):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            raise common.ConfigError(f"{path}: rope scaling {kind!r} is not supported")
    if c.get("quantization_config"):
        raise common.ConfigError(f"{path}: quantized weights are not supported (float only)")
    tok = check_vocabulary(path, c)
    theirs = load_file(os.path.join(path, "model.safetensors"))
    mtp = c.get("num_nextn_predict_layers", 0)  # none if its weights are not there, as when
    if f"model.layers.{c['num_hidden_layers']}.eh_proj.weight" not in theirs:  # transformers
        mtp = 0  # saved the folder itself: its model has no MTP
    needed = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim", "max_position_embeddings")
    missing = [k for k in needed if k not in c]
    if missing:
        raise common.ConfigError(f"{path}: config.json lacks {', '.join(missing)}")
    d = {"moe_intermediate_size": 1, "first_k_dense_replace": c["num_hidden_layers"],
         "n_routed_experts": 1, "n_shared_experts": 0, "num_experts_per_tok": 1, "n_group": 1,
         "topk_group": 1, "routed_scaling_factor": 1.0, "rms_norm_eps": 1e-6}
    c = {**d, **{k: v for k, v in c.items() if v is not None}}  # absent: a dense model's values
    try:
        cfg = ModelConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], inter_dim=c["intermediate_size"],
        moe_inter_dim=c["moe_intermediate_size"], n_layers=c["num_hidden_layers"],
        n_dense_layers=c["first_k_dense_replace"], n_heads=c["num_attention_heads"],
        q_lora_rank=c.get("q_lora_rank") or 0, kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"],
        v_head_dim=c["v_head_dim"], n_routed_experts=c["n_routed_experts"],
        n_shared_experts=c["n_shared_experts"], n_activated_experts=c["num_experts_per_tok"],
        n_expert_groups=c["n_group"], n_limited_groups=c["topk_group"],
        route_scale=c["routed_scaling_factor"],
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
        max_seq_len=c["max_position_embeddings"], mtp_depth=mtp,
        norm_eps=c["rms_norm_eps"])
    except (TypeError, ValueError) as e:
        raise common.ConfigError(f"{path}: config.json is not a model this project has ({e})")
    model = Transformer(cfg)
    names = hf_state_dict(model)  # ours under their names, in our order (the MTP copies last)
    ours = dict(zip(names, model.state_dict()))  # their name -> ours
    missing = sorted(set(names) - set(theirs))
    if missing:
        raise common.ConfigError(f"{path}: model.safetensors lacks {len(missing)} weights "
                                 f"(e.g. {missing[0]})")
    model.load_state_dict({mine: theirs[name] for name, mine in ours.items()})
    return model.eval(), tok


def check_vocabulary(path, c):
    """Our tokenizer whose size the config has, if the folder's tokenizer.json (when there is one)
    maps every token of it to the same id; ConfigError otherwise."""
    tok = next((t for t in (tasks.Tokenizer(), tasks.Tokenizer(think=True))
                if t.vocab_size == c["vocab_size"]), None)
    if tok is None:
        raise common.ConfigError(f"{path}: a vocabulary of {c['vocab_size']} tokens is not one of "
                                 "this project's tokenizers (18 or 20 tokens)")
    file = os.path.join(path, "tokenizer.json")
    if os.path.exists(file):
        with open(file) as f:
            vocab = json.load(f)["model"]["vocab"]
        want = tokenizer_json(tok)["model"]["vocab"]
        bad = sorted(k for k in want if vocab.get(k) != want[k])
        if bad:
            raise common.ConfigError(f"{path}: its tokenizer lacks our tokens or gives them other "
                                     f"ids: {', '.join(bad[:4])}")
    return tok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a policy run (its folder or a .pt checkpoint)")
    p.add_argument("out", help="the folder to write (new, or empty)")
    p.add_argument("--overwrite", action="store_true", help="write into a folder that holds files")
    args = p.parse_args(argv)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        sys.exit(f"error: {args.out} holds files: pass --overwrite to replace them")
    try:
        if not args.out:
            raise common.ConfigError("OUT is empty: name the folder to write")
        common.check_out_dir(args.out, "OUT")
        export(args.run, args.out)
    except (common.RunError, OSError) as e:
        sys.exit(f"error: {e}")
    except ImportError:
        sys.exit("error: exporting needs safetensors: pip install -r requirements-hf.txt")
    print(f"wrote {args.out}: config.json, model.safetensors, tokenizer.json")


if __name__ == "__main__":
    main(sys.argv[1:])
