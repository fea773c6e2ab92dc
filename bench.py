"""Benchmarks that print figures (not tests). Ratios are measured in one run, on this machine.

    python bench.py rollout    # KV cache vs full recompute, MLA vs MHA cache bytes,
                               # absorbed vs naive
    python bench.py train      # training tokens/s, MLA+MoE vs MHA+dense at equal active parameters
    python bench.py grpo       # seconds per GRPO step by phase: the contract config, the default
                               # model, the contract's op floor, and the step's matmul FLOPs at
                               # this machine's peak
    python bench.py spec --ckpt out/sft_multistep   # MTP speculative decoding: acceptance, tokens/s
    python bench.py style      # the code's shape: main() sizes, GRPO's reading path, long lines
"""
import argparse
import contextlib
import time

import torch

import common
import model
import moe
import rollout

torch.set_flush_denormal(True)


def timed(fn, repeats=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def decode_full_recompute(m, prompts, new_tokens, pad_id):
    """Greedy decoding without a cache: a full forward over the whole sequence at every step."""
    ids, mask = rollout.left_pad(prompts, pad_id, "cpu")
    for _ in range(new_tokens):
        pos = (mask.long().cumsum(1) - 1).clamp_min(0)
        logits, _ = m(ids, positions=pos, pad_mask=mask)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def bench_rollout(args):
    torch.manual_seed(0)
    n, new = args.batch, args.new_tokens
    cfg = model.ModelConfig(max_seq_len=16 + new)  # the default model, long enough for the run
    m = model.Transformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [[15] + torch.randint(0, 15, (int(L),), generator=g).tolist()
               for L in torch.randint(5, 9, (n,), generator=g)]
    kw = dict(eos_id=-1, pad_id=17, max_new_tokens=new, temperature=0.0)  # eos -1: never stop early
    t_cache = timed(lambda: rollout.generate(m, prompts, **kw), args.repeats)
    t_full = timed(lambda: decode_full_recompute(m, prompts, new, 17), args.repeats)
    print(f"decode {n} sequences x {new} new tokens "
          f"(default model, {torch.get_num_threads()} threads):")
    print(f"  KV cache (absorbed MLA): {t_cache:.3f} s = {n * new / t_cache:,.0f} tok/s")
    print(f"  full recompute each step: {t_full:.3f} s = {n * new / t_full:,.0f} tok/s")
    print(f"  cache speed-up: {t_full / t_cache:.1f}x")

    mla = cfg.kv_cache_elements_per_token()
    mha = model.ModelConfig(attention="mha").kv_cache_elements_per_token()
    print(f"KV cache per token per layer: MLA {mla} elements ({4 * mla} bytes fp32), "
          f"MHA {mha} elements ({4 * mha} bytes): "
          f"MLA/MHA = {mla / mha:.3f} ({mha / mla:.1f}x smaller)")

    # absorbed vs naive: one decode step with S cached tokens
    S, B = args.cached, args.decode_batch
    cfg_long = model.ModelConfig(max_seq_len=S + 1)
    m = model.Transformer(cfg_long).eval()
    x = torch.randint(0, 15, (B, S))
    times = {}
    for impl in ("naive", "absorbed"):
        cache = m.new_cache(B, S + 1, impl=impl)
        with torch.no_grad():
            m(x, cache=cache, start_pos=0)
            step = lambda: m(x[:, :1], cache=cache, start_pos=S)  # noqa: E731
            times[impl] = timed(lambda: [step() for _ in range(10)], args.repeats) / 10
    print(f"one decode step, batch {B}, {S} cached tokens: naive {1e3 * times['naive']:.2f} ms, "
          f"absorbed {1e3 * times['absorbed']:.2f} ms: "
          f"absorbed is {times['naive'] / times['absorbed']:.2f}x faster")


def bench_train(args):
    """Training tokens/s of the default MLA+MoE model against an MHA+dense model with the same
    active parameters per token (its dense FFN width solved for), on the SFT batch. The two models
    take their steps alternately, so that the machine's drift during the run hits both alike. Then
    the FFN alone: one MoE layer against the dense FFN, forward + backward over one batch's
    tokens."""
    import random

    import tasks
    import train_sft
    cpu = torch.device("cpu")
    base = model.ModelConfig()
    target = model.param_counts(model.Transformer(base))["active_per_token"]

    def mha_dense(inter_dim):
        return model.ModelConfig(attention="mha", n_dense_layers=base.n_layers, inter_dim=inter_dim)

    inter = min(range(16, 4096, 8), key=lambda w: abs(
        model.param_counts(model.Transformer(mha_dense(w)))["active_per_token"] - target))
    tok, task = tasks.Tokenizer(), tasks.Addition(3)
    rng = random.Random(0)
    batches = [train_sft.make_batch(task, tok, rng, args.train_batch, cpu)
               for _ in range(args.train_steps + 3)]
    n_tok = sum(b[0].numel() for b in batches[3:])
    names = ("MLA + MoE (default)", f"MHA + dense (inter_dim {inter})")
    runs = []
    for cfg in (base, mha_dense(inter)):
        torch.manual_seed(0)
        m = model.Transformer(cfg)
        runs.append((m, torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.99),
                                          weight_decay=0.0, fused=True)))
    seconds = [0.0, 0.0]
    for i, b in enumerate(batches):
        for j, (m, opt) in enumerate(runs):
            t = time.perf_counter()
            train_sft.train_step(m, m, opt, [b], 1.0)
            seconds[j] += (time.perf_counter() - t) if i >= 3 else 0.0  # 3 warm-up steps
    print(f"SFT training step, batch {args.train_batch}, {torch.get_num_threads()} threads "
          "(MTP on in both):")
    for name, (m, _), dt in zip(names, runs, seconds):
        c = model.param_counts(m)
        print(f"  {name}: active/token {c['active_per_token']:,}, total {c['total']:,}: "
              f"{n_tok / dt:,.0f} tokens/s ({1e3 * dt / args.train_steps:.1f} ms/step)")
    print(f"  MLA+MoE / MHA+dense throughput: {seconds[1] / seconds[0]:.2f}")
    # the FFN alone: one MoE layer against the dense FFN of equal active width, forward + backward
    torch.manual_seed(0)
    x = torch.randn(n_tok // args.train_steps, base.dim, requires_grad=True)  # one batch's tokens
    layer, dense = moe.MoE(base), moe.MLP(base.dim, inter)

    def moe_step():
        y, balance = layer(x[None])
        (y.sum() + balance).backward()

    ffn = {"MoE layer": moe_step, "dense FFN": lambda: dense(x).sum().backward()}
    ms = {k: 1e3 * timed(f, 20) for k, f in ffn.items()}
    print(f"  one FFN, forward + backward over {len(x):,} tokens: "
          f"MoE layer {ms['MoE layer']:.1f} ms, "
          f"dense FFN (inter_dim {inter}) {ms['dense FFN']:.1f} ms: "
          f"dense / MoE {ms['dense FFN'] / ms['MoE layer']:.2f}")


# a dense MHA model, ~1.05M params
CONTRACT = dict(attention="mha", n_layers=4, n_dense_layers=4, dim=128, n_heads=4, inter_dim=512,
                mtp_depth=0, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=32)
# The contract with its residual stream and FFN 8 wide (heads unchanged, so attention runs the same
# kernels on the same shapes): its step runs every operation of the contract's, with almost no
# matrix-product FLOPs. Its time is what the step costs besides those FLOPs: Python, op dispatch,
# attention, elementwise work.
FLOOR = dict(CONTRACT, dim=8, inter_dim=8)


def matmul_peak(repeats=200):
    """FLOP/s of this machine's best (1024, 128) @ (128, 512) matrix product, the shape of the
    model's FFN."""
    a, b = torch.randn(1024, 128), torch.randn(128, 512)
    return 2 * 1024 * 128 * 512 / timed(lambda: a @ b, repeats)


def bench_grpo(args):
    """GRPO steps timed phase by phase, with the very functions train_grpo.main calls: sampling
    (rollout.generate, inside make_experience), the reference and pi_old forwards (the rest of
    make_experience), the update (update_policy: forward,
    backward, AdamW), on the contract config (dense MHA, 3-digit addition, 16 prompts x 8, at most 6
    new tokens, T = 1, beta 0.04, lr 5e-5, one update per rollout, float32), on the default
    MLA + MoE model and on the contract at width 8 (FLOOR), each from a short SFT warm start. Prints
    the median seconds per step (evaluation excluded), the completions' median length, the peak RSS,
    and the step's matrix-product FLOPs (counted by torch's FlopCounterMode) against this machine's
    matmul peak: the step's time is roughly at least the FLOPs at that peak plus the op floor."""
    import copy
    import random
    import resource
    import statistics

    from torch.utils.flop_counter import FlopCounterMode

    import tasks
    import train_grpo
    import train_sft
    cpu, tok, task = torch.device("cpu"), tasks.Tokenizer(), tasks.Addition(3)
    generate, sampling = rollout.generate, []

    def timed_generate(*a, **kw):  # the sampling phase of make_experience
        t = time.perf_counter()
        out = generate(*a, **kw)
        sampling.append(time.perf_counter() - t)
        return out

    rollout.generate = timed_generate
    peak = matmul_peak()
    print(f"matmul peak of this machine: {peak / 1e9:.0f} GFLOP/s "
          f"((1024, 128) @ (128, 512), {torch.get_num_threads()} threads)")
    contract_length, contract_step = 6, float("inf")  # the contract's faster mode, for TRL
    configs = {"contract": ("contract: dense MHA", CONTRACT), "default": ("default: MLA + MoE", {}),
               "floor": ("op floor: the contract at width 8", FLOOR)}
    for name, kw in (configs[c] for c in args.models.split(",")):
        torch.manual_seed(0)
        cfg = model.ModelConfig(**kw)
        policy = model.Transformer(cfg)
        opt = torch.optim.AdamW(policy.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0,
                                fused=True)
        rng = random.Random(0)
        for _ in range(args.warm_steps):  # a short SFT warm start: sensible completions to time
            train_sft.train_step(policy, policy, opt,
                                 [train_sft.make_batch(task, tok, rng, 64, cpu)], 1.0)
        # the width-8 model is too narrow to learn when to stop: it samples as many tokens as the
        # contract's did
        gcfg = train_grpo.GRPOConfig(batch_size=16, num_generations=8,
                                     max_new_tokens=contract_length if kw is FLOOR else 6,
                                     temperature=1.0, beta=0.04, lr=5e-5)
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
        opt = torch.optim.AdamW(policy.parameters(), lr=gcfg.lr, betas=(0.9, 0.99),
                                weight_decay=0.0, fused=True)
        gen = torch.Generator().manual_seed(0)
        phases = ("sampling", "old + ref forwards", "update", "step")
        modes = {"eager": (policy.forward_shared_prefix, ref.forward_shared_prefix, False)}
        if args.compile:  # what train_grpo.py --compile compiles (Run.wrap, Run.frozen, decode)
            modes["compiled"] = (*(model.torch_compile(common.SharedPrefix(m))
                                   for m in (policy, ref)), True)
        times = {mode: {k: [] for k in phases} for mode in modes}
        lengths, warm_up = {mode: [] for mode in modes}, dict.fromkeys(modes, 0.0)
        for i in range(args.grpo_steps + 4):
            for mode, (fwd, ref_fwd, compiled) in modes.items():  # alternately: drift hits both
                if i == 3 and mode != "eager":
                    continue
                counter = FlopCounterMode(display=False) if i == 3 else contextlib.nullcontext()
                with counter:  # one untimed eager step counts its FLOPs
                    t0 = time.perf_counter()
                    problems = [task.sample(rng) for _ in range(gcfg.batch_size)]
                    sampling.clear()
                    exp = train_grpo.make_experience(policy, fwd, ref_fwd, task, tok, problems,
                                                     gcfg, gen, compile=compiled)
                    t1 = t0 + sampling[0]
                    t2 = time.perf_counter()
                    with moe.RouteRecorder(policy):
                        train_grpo.update_policy(fwd, opt, exp, gcfg)
                    policy.update_router_biases()
                    t3 = time.perf_counter()
                if i == 3:
                    flops = counter.get_total_flops()
                elif i < 3:  # warm-up steps are not timed; compiling happens in the first
                    warm_up[mode] += t3 - t0
                else:
                    for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                        times[mode][k].append(dt)
                    lengths[mode].append(exp.rollout.completion_ids.size(1))
        c = model.param_counts(policy)
        print(f"{name} ({c['total']:,} params), median of {args.grpo_steps} GRPO steps, "
              f"{torch.get_num_threads()} threads:")
        for mode in modes:
            med = {k: statistics.median(v) for k, v in times[mode].items()}
            print(f"  {mode}: " + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in med.items()) +
                  f"; completions {statistics.median(lengths[mode]):.0f} tokens; the first 3 "
                  f"steps {warm_up[mode]:.1f} s ({warm_up[mode] - 3 * med['step']:.1f} s more)")
            if kw is CONTRACT:
                contract_length = int(statistics.median(lengths["eager"]))
                contract_step = min(contract_step, med["step"])
        if args.compile:
            ratio = (statistics.median(times["eager"]["step"])
                     / statistics.median(times["compiled"]["step"]))
            print(f"  compiled against eager: {ratio:.2f}x faster a step")
        print(f"  matrix products: {flops / 1e9:.2f} GFLOP a step = "
              f"{1e3 * flops / peak:.1f} ms at the matmul peak; peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    for compile in (False, True) if args.trl else ():
        trl_step = bench_trl(args.grpo_steps, compile)
        print(f"TRL GRPOTrainer on the contract config{', torch_compile=True' if compile else ''}:"
              f" {1e3 * trl_step:.1f} ms a step, {trl_step / contract_step:.2f}x ours")


def bench_trl(n_steps, compile=False):
    """TRL's GRPOTrainer with its defaults (gradient checkpointing, its DAPO loss, fused AdamW) on
    the contract config: a Llama of the contract's shape (dense MHA, 4 layers, width 128, FFN 512,
    4 heads of 32) and our tokenizer, 16 prompts x 8 completions of at most 6 tokens, T = 1, beta
    0.04, lr 5e-5, float32 on the CPU. Returns the median seconds per step after 4 untimed steps.
    Needs `pip install trl` (not a requirement of this project)."""
    import json
    import random
    import statistics
    import tempfile

    import datasets
    import tokenizers
    import transformers
    import trl

    import export_hf
    import tasks
    tok, task = tasks.Tokenizer(), tasks.Addition(3)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(export_hf.tokenizer_json(tok))),
        bos_token=tasks.BOS, eos_token=tasks.EOS, pad_token=tasks.PAD, padding_side="left")
    c = model.ModelConfig(**CONTRACT)
    torch.manual_seed(0)
    net = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=c.dim, intermediate_size=c.inter_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
        head_dim=c.qk_nope_head_dim + c.qk_rope_head_dim, max_position_embeddings=c.max_seq_len,
        tie_word_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id))
    rng = random.Random(0)
    problems = [task.sample(rng) for _ in range(16 * (n_steps + 4))]
    data = datasets.Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in problems])

    def accuracy(completions, answer, **_):
        return [float(text.strip() == str(a)) for text, a in zip(completions, answer)]

    stamps = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    out = tempfile.mkdtemp()
    net.save_pretrained(out)  # TRL loads its reference model from the policy's folder
    config = trl.GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, per_device_train_batch_size=128,
        num_generations=8, max_completion_length=6, temperature=1.0, beta=0.04, learning_rate=5e-5,
        max_steps=n_steps + 4, logging_steps=10 ** 6, report_to="none", save_strategy="no",
        seed=0, torch_compile=compile)
    trainer = trl.GRPOTrainer(model=out, reward_funcs=accuracy, args=config, train_dataset=data,
                              processing_class=hf_tok, callbacks=[Clock()])
    stamps.append(time.perf_counter())
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=8):  # dynamo's default, as TRL's users run it
        trainer.train()
    return statistics.median(b - a for a, b in zip(stamps[4:], stamps[5:]))


def bench_spec(args):
    """Speculative decoding with the MTP draft against ordinary decoding, on the model of an SFT run
    (--ckpt): the draft's acceptance rate on held-out prompts (greedy and T = 1), and tokens/s and
    tokens per main-model forward at batch 1 and at GRPO's batch (256 rows), each the best of
    --repeats runs, both decoders timed alternately (--compile: both with their forwards compiled;
    the first run compiles them, the best is a later one)."""
    import tasks
    ckpt = common.load_checkpoint(args.ckpt)
    m = common.model_of(ckpt, args.ckpt).eval()
    tok, task = tasks.get(ckpt["config"]["task"], ckpt["config"]["n_digits"])
    problems = task.eval_set(256)
    prompts = [tasks.encode_problem(tok, p, False)[0] for p in problems]
    new = task.max_new_tokens()
    kw = dict(eos_id=tok.eos_id, pad_id=tok.pad_id, max_new_tokens=new)
    print(f"{args.ckpt}: task {task.name} ({task.n_digits} digits, completions up to {new - 2} "
          f"tokens + end), MTP depth {m.cfg.mtp_depth}, {torch.get_num_threads()} threads")
    for temperature in (0.0, 1.0):
        r = rollout.generate(m, prompts, speculative=True, temperature=temperature,
                             generator=torch.Generator().manual_seed(0), **kw)
        print(f"  T={temperature:g}: draft accepted {r.stats['acceptance']:.1%} of "
              f"{r.stats['proposed']} proposals, "
              f"{r.stats['tokens_per_forward']:.2f} tokens per main-model forward")
    for rows, n_batches in ((1, 32), (256, 1)):  # batch 1: 32 prompts decoded one at a time
        batches = [prompts[i * rows:(i + 1) * rows] for i in range(n_batches)]
        best, tokens, per_forward = {False: float("inf"), True: float("inf")}, {}, []
        for _ in range(args.repeats):
            for spec in (False, True):
                t, n = time.perf_counter(), 0.0
                for i, batch in enumerate(batches):
                    r = rollout.generate(m, batch, speculative=spec, temperature=1.0,
                                         generator=torch.Generator().manual_seed(i),
                                         compile=args.compile, **kw)
                    n += float(r.completion_mask.sum())
                    per_forward += [r.stats["tokens_per_forward"]] if spec else []
                best[spec], tokens[spec] = min(best[spec], time.perf_counter() - t), n
        speed = {spec: tokens[spec] / best[spec] for spec in best}
        print(f"  batch {rows} (T=1, {n_batches * rows} prompts): "
              f"ordinary {speed[False]:,.0f} tokens/s, speculative {speed[True]:,.0f} tokens/s "
              f"({sum(per_forward) / len(per_forward):.2f} tokens per main-model forward): "
              f"{speed[True] / speed[False]:.2f}x")


def _spans(path):
    """{function name: (first line, last line)} of a file's top-level functions (1-based)."""
    import ast
    tree = ast.parse(open(path).read())
    return {n.name: (n.lineno, n.end_lineno) for n in tree.body if isinstance(n, ast.FunctionDef)}


def _marked(lines, start, end, marker):
    """The lines of [start, end) in the blocks under a `# ---- <marker>` comment: from the comment
    to the next `# ----` comment, a blank line at the comment's indentation, or a dedent."""
    out, inside, indent = set(), False, 0
    for i in range(start, end):
        text = lines[i]
        stripped, depth = text.strip(), len(text) - len(text.lstrip())
        if stripped.startswith("# ----"):
            inside, indent = stripped.startswith(f"# ---- {marker}"), depth
        elif inside and stripped and depth < indent:
            inside = False
        elif inside and not stripped and i + 1 < end and (
                len(lines[i + 1]) - len(lines[i + 1].lstrip()) <= indent):
            inside = False  # a blank line, and the next line is at the block's depth or less
        if inside and stripped:
            out.add(i)
    return out


def _size(lines, ranges, docstrings=True):
    """(non-blank lines, characters of them) over line ranges [(first, last)], 1-based; without
    the functions' docstrings if docstrings is False."""
    keep = [i for a, b in ranges for i in range(a - 1, b) if lines[i].strip()]
    if not docstrings:
        import ast
        tree = ast.parse("\n".join(lines))
        doc = {i for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and ast.get_docstring(n)
               for i in range(n.body[0].lineno - 1, n.body[0].end_lineno)}
        keep = [i for i in keep if i not in doc]
    return len(keep), sum(len(lines[i]) for i in keep)


def bench_style(args):
    """The numbers the project's style keeps, measured on the files as they are: each train
    script's length, its main()'s length and the share of main() outside its `# ---- plumbing`
    blocks (the algorithm and its setup), its `try` blocks, the distinct common.* names it uses;
    the step of GRPO and of PPO as a reader follows it, from sampling to the optimiser step (the
    loop's `# ---- the algorithm` block, the script's functions from the one that makes the
    experience to the update, and the body of the loss it optimises, its docstring's equations
    read once: contiguous spans are one place; the sampler, the reward, the advantage and KL
    formulas are named calls, each with its own docstring); lines over 100 characters in every
    .py; README.md's lines and words."""
    import glob
    import re
    print("| script | lines | main() lines | algorithm + setup share | try | common.* names |")
    print("|---|---|---|---|---|---|")
    for path in sorted(glob.glob("train_*.py")):
        lines = open(path).read().splitlines()
        a, b = _spans(path)["main"]
        body = [i for i in range(a - 1, b) if lines[i].strip()]
        plumbing = _marked(lines, a - 1, b, "plumbing")
        names = sorted(set(re.findall(r"\bcommon\.([A-Za-z_]+)", "\n".join(lines))))
        tries = sum(line.strip() == "try:" for line in lines)
        print(f"| {path} | {len(lines)} | {len(body)} | {1 - len(plumbing) / len(body):.0%} | "
              f"{tries} | {len(names)}: {', '.join(names)} |")
    for script, helpers, loss in (("train_grpo.py", ("make_experience", "update_policy"),
                                   ("grpo_aggregation", "grpo_loss")),
                                  ("train_ppo.py", ("make_experience", "update"),
                                   ("ppo_policy_loss", "value_loss"))):
        lines, spans = open(script).read().splitlines(), _spans(script)
        loop = sorted(_marked(lines, spans["main"][0] - 1, spans["main"][1], "the algorithm"))
        first, last = spans[helpers[0]][0], spans[helpers[-1]][1]
        n, chars = _size(lines, [(loop[0] + 1, loop[-1] + 1), (first, last)])
        loss_lines, loss_spans = open("losses.py").read().splitlines(), _spans("losses.py")
        ln, lc = _size(loss_lines, [loss_spans[f] for f in loss], False)
        order = list(loss_spans)  # the functions of losses.py in file order
        places = 2 + sum(1 for i, f in enumerate(loss) if i == 0 or
                         order.index(f) != order.index(loss[i - 1]) + 1)
        print(f"{script}: the step as a reader follows it: {n + ln} non-blank lines, "
              f"{chars + lc:,} characters, {places} places (the loop {len(loop)} lines, "
              f"{' .. '.join(helpers)} {n - len(loop)}, losses.{' + '.join(loss)} {ln})")
    wide = [(p, i + 1, len(t)) for p in sorted(glob.glob("*.py") + glob.glob("tests/*.py"))
            for i, t in enumerate(open(p).read().splitlines()) if len(t) > 100]
    print(f"lines over 100 characters in every .py: {len(wide)}"
          + "".join(f"\n  {p}:{i} ({n})" for p, i, n in wide[:20]))
    readme = open("README.md").read()
    print(f"README.md: {len(readme.splitlines())} lines, {len(readme.split()):,} words")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["rollout", "train", "grpo", "spec", "style"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--cached", type=int, default=1024)
    p.add_argument("--decode_batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train_batch", type=int, default=64)
    p.add_argument("--train_steps", type=int, default=30)
    p.add_argument("--warm_steps", type=int, default=300)
    p.add_argument("--grpo_steps", type=int, default=60)
    p.add_argument("--models", default="contract,default,floor",
                   help="grpo: which models to time (contract, default, floor)")
    p.add_argument("--compile", action="store_true",
                   help="grpo: the decode step, the update and the reference forward compiled "
                        "(timed beside eager); spec: both decoders' forwards compiled")
    p.add_argument("--trl", action="store_true",
                   help="grpo: also time TRL's GRPOTrainer on the contract (pip install trl)")
    p.add_argument("--ckpt", default="out/sft")
    args = p.parse_args()
    {"rollout": bench_rollout, "train": bench_train, "grpo": bench_grpo, "spec": bench_spec,
     "style": bench_style}[args.what](args)


if __name__ == "__main__":
    main()
