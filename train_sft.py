"""Supervised fine-tuning on an arithmetic task: the warm start and the reference for DPO/GRPO/PPO.

    python train_sft.py                                   # CPU or one GPU; out/sft/
    torchrun --standalone --nproc_per_node=2 train_sft.py # DDP (gloo on CPU, nccl on CUDA)
    python train_sft.py --resume                          # continue exactly from out/sft/ckpt.pt
    python train_sft.py --help                            # every flag with its default

Loss (SFT, DeepSeekMath 5.2.1): L = -mean over completion tokens of log pi(y_t | x, y_<t); the prompt
is masked. Plus mtp_lambda * the MTP loss and the MoE sequence-wise balance loss; the router biases
are updated after every optimiser step (aux-loss-free balancing).
"""
import os
import random
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import rollout
import tasks
from model import ModelConfig, Transformer, param_counts


@dataclass
class SFTConfig:
    task: str = "add"  # add, sub, mul or multistep
    n_digits: int = 3  # digits per operand (add, sub, multistep)
    batch_size: int = 64  # sequences per optimiser step, over all ranks and micro-batches
    grad_accum: int = 1  # micro-batches per optimiser step (per rank)
    steps: int = 2000  # optimiser steps
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    eval_every: int = 250  # steps between held-out evaluations
    eval_size: int = 256  # held-out problems per evaluation
    samples: int = 3  # sampled completions printed at each evaluation
    ckpt_every: int = 250  # steps between checkpoints (and at the end)
    seed: int = 0  # seed for weights and data (rank r draws its problems from seed + r)
    out_dir: str = "out/sft"  # run folder: ckpt.pt, metrics.jsonl, config.json
    resume: bool = False  # continue from out_dir/ckpt.pt
    stop_at: int = 0  # stop (with a checkpoint) after this step, to resume later; 0 = run to the end
    target_acc: float = 0.0  # stop early (with a checkpoint) once held-out greedy accuracy reaches this; 0 = never
    compile: bool = False  # torch.compile the model
    quiet: bool = False  # no progress bar or printed samples


# ----------------------------------------------------------------------------------------------
# Data


def make_batch(task, tok, rng, n, device):
    """n problems -> (idx (n, T), targets (n, T), loss_mask (n, T)): right-padded `<bos> prompt
    completion <eos>`; targets[:, t] is the token after idx[:, t]; the mask keeps the completion and
    its end token only."""
    seqs = [tasks.encode_problem(tok, task.sample(rng)) for _ in range(n)]
    T = max(len(s) for s, _ in seqs) - 1
    idx = torch.full((n, T), tok.pad_id, dtype=torch.long)
    targets = torch.full((n, T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(n, T)
    for i, (s, start) in enumerate(seqs):
        idx[i, :len(s) - 1] = torch.tensor(s[:-1])
        targets[i, :len(s) - 1] = torch.tensor(s[1:])
        mask[i, start - 1:len(s) - 1] = 1.0  # targets from the first completion token to <eos>
    return idx.to(device), targets.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------------
# One optimiser step


def train_step(model, raw_model, opt, micro_batches, device, grad_clip):
    """Accumulate gradients over micro-batches (no DDP sync but on the last), normalising every
    micro-batch by the whole step's token and sequence counts (over all ranks), so the gradient
    equals that of one big batch. Returns the step's metrics, all-reduced."""
    world = torch.distributed.get_world_size() if common.is_dist() else 1
    counts = common.all_reduce_sum({"tokens": sum(m.sum().item() for _, _, m in micro_batches),
                                    "seqs": sum(x.size(0) for x, _, _ in micro_batches),
                                    "inputs": sum(x.numel() for x, _, _ in micro_batches)}, device)
    parts = {"loss": 0.0, "ce": 0.0, "mtp": 0.0, "balance": 0.0}
    for i, (x, y, m) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with common.autocast(device):
                _, loss = model(x, y, m, num_tokens=counts["tokens"], num_seqs=counts["seqs"])
            (loss * world).backward()  # DDP averages gradients over ranks; the counts are already global
        parts["loss"] += loss.item()
        for k in ("ce", "mtp", "balance"):
            parts[k] += raw_model.loss_parts[k].item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    metrics = common.all_reduce_sum(parts, device)
    metrics["grad_norm"] = grad_norm.item()
    if not all(map(lambda v: v == v and abs(v) != float("inf"), (metrics["loss"], metrics["grad_norm"]))):
        return metrics  # the caller stops the run before the optimiser sees a NaN
    opt.step()
    opt.zero_grad(set_to_none=True)
    metrics.update(raw_model.update_router_biases())
    metrics["tokens"] = counts["inputs"]  # every position the model ran on, padding included
    return metrics


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    (cfg, mcfg), _ = common.parse_config([SFTConfig, ModelConfig], argv, __doc__)
    owns_dist = not common.is_dist()  # a caller (train_grpo's warm start) may have set it up already
    rank, world, device = common.setup_dist()
    common.setup_torch(cfg.seed, device)
    per_rank, rem = divmod(cfg.batch_size, world * cfg.grad_accum)
    if rem or per_rank == 0:
        common.die(f"batch_size {cfg.batch_size} does not divide into {world} ranks x {cfg.grad_accum} micro-batches")
    tok = tasks.Tokenizer()
    if mcfg.vocab_size != tok.vocab_size:
        common.die(f"vocab_size {mcfg.vocab_size} does not match the tokenizer's {tok.vocab_size}")
    task = tasks.get_task(cfg.task, cfg.n_digits)
    eval_problems = task.eval_set(cfg.eval_size)
    data_rng = random.Random(cfg.seed + rank)  # each rank its own problem stream

    model = Transformer(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    start = 0
    if cfg.resume:
        try:
            ckpt = common.load_checkpoint(ckpt_path)
            common.check_tokenizer(ckpt, tok, ckpt_path)
        except common.CheckpointError as e:
            common.die(str(e))
        bad = common.resume_mismatches(ckpt, cfg)
        bad += common.mismatched_fields(ckpt["model_config"], common.config_dict(mcfg))
        if bad:
            common.die(f"checkpoint {ckpt_path} does not match this run's config in: {', '.join(bad)}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        common.set_rng_state(common.rng_for_rank(ckpt["rng"], rank), data_rng)
        start = ckpt["step"]
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:  # experts unused by a micro-batch get no gradient, hence find_unused_parameters
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    main_proc = rank == 0
    if main_proc:
        os.makedirs(cfg.out_dir, exist_ok=True)
        common.save_run_config(cfg.out_dir, sft=cfg, model=mcfg)
        if not cfg.quiet:
            c = param_counts(raw_model)
            print(f"SFT on {task.name} ({device}, world {world}): {c['total']:,} params, "
                  f"{c['active_per_token']:,} active per token; steps {start}->{cfg.steps}")
    log = common.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), main_proc, start if cfg.resume else None)

    def checkpoint(step):
        rngs = common.gather_objects(common.rng_state(data_rng))  # every rank's streams
        if main_proc:
            common.save_checkpoint(ckpt_path, {
                "model": raw_model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "rng": rngs, "config": common.config_dict(cfg), "model_config": common.config_dict(mcfg),
                "tokenizer": tok.definition(), "kind": "sft"})

    def evaluate(step):
        if not main_proc:
            return {}
        m = rollout.evaluate(raw_model, tok, task, eval_problems)
        log.log({"step": step, **{f"eval_{k}": v for k, v in m.items()}})
        if not cfg.quiet and cfg.samples:
            g = torch.Generator(device=device).manual_seed(step)
            probs = eval_problems[:cfg.samples]
            r = rollout.generate(raw_model, [tasks.encode_problem(tok, p, False)[0] for p in probs], eos_id=tok.eos_id,
                                 pad_id=tok.pad_id, max_new_tokens=len(probs[0].completion) + 4, generator=g)
            for p, c in zip(probs, rollout.decode_completions(tok, r)):
                tqdm.write(f"  step {step} sample: {p.prompt}{c}  ({'correct' if task.reward(c, p) else 'wrong'})")
        return m

    stop = cfg.steps if cfg.stop_at <= 0 else min(cfg.steps, cfg.stop_at)
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=not main_proc or cfg.quiet, dynamic_ncols=True)
    timer, acc, stopped_early = common.Timer(), float("nan"), False
    for step in bar:
        if step % cfg.eval_every == 0:
            acc = evaluate(step).get("greedy_acc", acc)
            timer.lap()  # evaluation time is not training time
            if cfg.target_acc > 0 and common.all_reduce_sum({"hit": float(acc >= cfg.target_acc)}, device)["hit"] > 0:
                if main_proc and not cfg.quiet:
                    tqdm.write(f"held-out accuracy {acc:.3f} reached target_acc {cfg.target_acc} at step {step}: stopping")
                if step > start:
                    checkpoint(step)
                stopped_early = True
                break
        lr = common.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        micro = [make_batch(task, tok, data_rng, per_rank, device) for _ in range(cfg.grad_accum)]
        metrics = train_step(model, raw_model, opt, micro, device, cfg.grad_clip)
        if "tokens" not in metrics:
            common.die(f"non-finite loss {metrics['loss']} or grad norm {metrics['grad_norm']} at step {step}; "
                       f"the last good checkpoint ({ckpt_path}) was kept")
        dt = timer.lap()
        record = {"step": step + 1, "lr": lr, "tokens_per_s": metrics.pop("tokens") / dt, "step_s": dt, **metrics}
        log.log(record)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{acc:.2f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == stop:
            checkpoint(step + 1)
    bar.close()
    final = {}
    if stop == cfg.steps and not stopped_early:
        final = evaluate(cfg.steps)
        if main_proc:
            if not cfg.quiet:
                print(f"held-out greedy accuracy after {cfg.steps} steps: {final['greedy_acc']:.3f}")
    log.close()
    if world > 1:
        torch.distributed.barrier()
    if owns_dist:
        common.cleanup_dist()
    return raw_model, final


if __name__ == "__main__":
    main(sys.argv[1:])
