"""DPO (arXiv 2305.18290) and its variants on preference pairs made from an arithmetic task.

    python train_dpo.py                                     # offline DPO from the SFT init; out/dpo/
    python train_dpo.py --rounds 3 --ref_reset              # iterative (online) DPO: fresh pairs each round
    python train_dpo.py --loss ipo                          # IPO (length-averaged log-probs)
    python train_dpo.py --loss simpo                        # SimPO (no reference model)
    python train_dpo.py --label_smoothing 0.1               # cDPO / robust DPO
    python train_dpo.py --pairs_source synthetic            # rejected = a near miss of the reference
    python train_dpo.py --pairs_file out/dpo/pairs_round0.jsonl   # reuse pairs (and their reference log-probs)
    torchrun --standalone --nproc_per_node=2 train_dpo.py   # DDP: every step's pairs sharded over ranks

The reference is the frozen SFT init (--init; a short warm start makes one when it is missing). Each
round: sample G completions for `num_prompts` new prompts from the current policy and make pairs
(chosen: a correct sample, rejected: an incorrect one; rollout.make_pairs), compute the reference's
sequence log-probs once and store them with the pairs (pairs_round<k>.jsonl in the run folder), then
train `epochs` passes over the pairs. --rounds 1 is plain offline DPO; more rounds re-sample from the
current policy (Xiong et al. arXiv 2312.11456), optionally resetting the reference to it (--ref_reset,
Pang et al. arXiv 2404.19733). Held-out pairs (from held-out prompts, made once by the init) measure
preference accuracy; held-out greedy accuracy, pass@k and maj@k are measured before and after.
"""
import copy
import hashlib
import os
import random
import sys
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import losses
import rollout
import tasks
import train_sft
from model import ModelConfig, Transformer, shared_prefix_args


@dataclass
class DPOConfig:
    task: str = "add"  # add, sub, mul or multistep
    n_digits: int = 0  # digits per operand; 0 = the task's default (add, sub 3; mul, multistep 2)
    init: str = ""  # SFT run folder (or .pt file): the initial policy and the reference; "" = out/sft for add, out/sft_<task> otherwise; a missing folder gets a warm start
    warmstart_steps: int = 1500  # steps of the SFT warm start made when --init does not exist
    warmstart_target_acc: float = 0.8  # the warm start stops once held-out accuracy reaches this
    loss: str = "dpo"  # dpo (with --label_smoothing: cDPO), ipo or simpo
    beta: float = 0.0  # 0 = the loss's default: 1.0 for dpo and ipo (TRL's 0.1 let DPO drop greedy accuracy from 50% to 10% here), 2.0 for simpo (its paper's)
    label_smoothing: float = 0.0  # cDPO / robust DPO: the assumed fraction of flipped preferences
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    length_normalize: bool = False  # average the completion log-probs instead of summing them (ipo always does)
    pairs_source: str = "policy"  # policy (samples of the current policy) or synthetic (near misses of the reference)
    pairs_file: str = ""  # train on these pairs (a pairs_round<k>.jsonl) in round 0 instead of making new ones
    recompute_ref: bool = False  # recompute the reference log-probs even where the pairs file holds them
    num_prompts: int = 2048  # new training prompts per round (policy pairs: only those with a wrong sample give a pair)
    num_generations: int = 8  # samples per prompt for policy pairs
    temperature: float = 1.0  # sampling temperature of policy pairs
    max_new_tokens: int = 0  # completion length limit (0 = the task's longest answer + 2)
    rounds: int = 1  # iterative DPO: make pairs from the current policy at the start of each round
    ref_reset: bool = False  # iterative DPO: the reference becomes the current policy at each new round
    epochs: int = 2  # passes over each round's pairs
    batch_size: int = 64  # pairs per optimiser step, over all ranks and micro-batches
    grad_accum: int = 1  # micro-batches per optimiser step (per rank)
    lr: float = 0.0  # peak learning rate (warmup and cosine within each round); 0 = 2e-5 for dpo and ipo, 5e-6 for simpo (no reference holds it back)
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the end of each round
    warmup: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    eval_every: int = 25  # steps between held-out evaluations
    eval_size: int = 256  # held-out problems (greedy accuracy) and held-out pair prompts
    pass_k: int = 4  # k of pass@k and maj@k, measured at the start and the end
    pass_n: int = 8  # samples per prompt for pass@k (n >= k)
    ckpt_every: int = 50  # steps between checkpoints (and at the end of every round)
    seed: int = 0  # seed of the prompt and sampling streams
    out_dir: str = "out/dpo"  # run folder: ckpt.pt, metrics.jsonl, config.json, pairs_round<k>.jsonl
    resume: bool = False  # continue from out_dir/ckpt.pt
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0 = run to the end
    quiet: bool = False  # no progress bar or printed samples

    def __post_init__(self):
        common.check_config(
            self, positive=("warmstart_steps", "num_prompts", "num_generations", "temperature", "rounds", "epochs",
                            "batch_size", "grad_accum", "eval_every", "eval_size", "pass_k", "ckpt_every"),
            non_negative=("beta", "lr", "simpo_gamma", "max_new_tokens", "warmup", "weight_decay", "grad_clip", "stop_at"),
            fractions=("warmstart_target_acc", "label_smoothing", "min_lr_ratio"),
            choices={"task": tuple(tasks.TASKS), "loss": ("dpo", "ipo", "simpo"),
                     "pairs_source": ("policy", "synthetic")})
        if self.label_smoothing > 0.5:
            raise ValueError(f"--label_smoothing must be <= 0.5 (above it the preferences flip), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "dpo":
            raise ValueError(f"--label_smoothing applies to --loss dpo only, not {self.loss}")
        if self.pass_n < self.pass_k:
            raise ValueError(f"pass@k needs --pass_n >= --pass_k, got {self.pass_n} < {self.pass_k}")
        task = tasks.get_task(self.task, self.n_digits)
        self.n_digits = task.n_digits
        self.max_new_tokens = self.max_new_tokens or task.max_lengths()[1] + 2
        self.beta = self.beta or (2.0 if self.loss == "simpo" else 1.0)
        self.lr = self.lr or (5e-6 if self.loss == "simpo" else 2e-5)


# ----------------------------------------------------------------------------------------------
# Pairs and their reference log-probs


def fingerprint(model):
    """A short hash of a model's weights: which reference a file's stored log-probs came from."""
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def pair_logprobs(model, pairs, pad_id, device):
    """Summed completion log-probs of the chosen and the rejected side of `pairs`, from one forward
    in which each pair's prompt runs once for both its sides (forward_shared_prefix): (chosen (n,),
    rejected (n,)). Pairs never share a prompt's forward, even with equal prompts: a micro-batch then
    counts the same router loads as the whole batch does."""
    both = list(range(len(pairs))) * 2  # (2n,) row i and row n + i continue pair i's prompt
    prefixes, prefix_mask, conts = shared_prefix_args([p["prompt_ids"] for p in pairs], both,
                                                      [p[side] for side in ("chosen_ids", "rejected_ids") for p in pairs],
                                                      pad_id, device)
    logits, _ = model(prefixes, pad_mask=prefix_mask, continuations=conts)  # (2n, L, V): logits[:, t] predict token t
    logps = losses.sequence_logprobs(losses.token_logprobs(logits, conts[1]), conts[2])  # (2n,)
    return logps[:len(pairs)], logps[len(pairs):]


@torch.no_grad()
def add_ref_logprobs(ref, pairs, pad_id, device, batch=256):
    for i in range(0, len(pairs), batch):
        chosen, rejected = pair_logprobs(ref, pairs[i:i + batch], pad_id, device)
        for p, c, r in zip(pairs[i:i + batch], chosen.tolist(), rejected.tolist()):
            p["ref_chosen_logp"], p["ref_rejected_logp"] = c, r


def round_pairs(k, cfg, policy, ref, tok, task, eval_problems, device):
    """Rank 0 writes round k's pairs to the run folder (pairs_round<k>.jsonl): training pairs made by
    the current policy from new prompts (round 0: those of --pairs_file, if given), and the held-out
    pairs, made once by the init from held-out prompts and carried into every round; all of them
    scored by the reference, unless the file already holds this very reference's log-probs."""
    if k == 0 and cfg.pairs_file:
        pairs, settings = rollout.load_pairs(cfg.pairs_file, task)
    else:
        pairs, settings = [], {"task": cfg.task, "n_digits": cfg.n_digits, "source": cfg.pairs_source, "round": k,
                               "num_generations": cfg.num_generations, "temperature": cfg.temperature,
                               "seed": cfg.seed, "made_by": "the SFT init" if k == 0 else f"the policy after round {k - 1}"}
    rng = random.Random(common.stream_seed(cfg.seed, "dpo", 0, f"round {k}"))
    gen = torch.Generator(device=device).manual_seed(common.stream_seed(cfg.seed, "dpo", 0, f"round {k}/sampling"))

    def make(problems, split):
        return [{**p, "split": split} for p in rollout.make_pairs(policy, tok, task, problems, cfg.pairs_source,
                                                                   cfg.num_generations, cfg.temperature,
                                                                   cfg.max_new_tokens, gen, rng)]
    if not pairs:
        pairs = make([task.sample(rng) for _ in range(cfg.num_prompts)], "train")
    if k > 0:
        pairs += [p for p in rollout.load_pairs(pairs_path(cfg, 0))[0] if p["split"] == "heldout"]
    elif not any(p["split"] == "heldout" for p in pairs):
        pairs += make(eval_problems, "heldout")  # only ever evaluated on
    if cfg.loss != "simpo" and (cfg.recompute_ref or settings.get("reference") != fingerprint(ref)):
        add_ref_logprobs(ref, pairs, tok.pad_id, device)
        settings["reference"] = fingerprint(ref)
    rollout.save_pairs(pairs_path(cfg, k), pairs, settings)


def pairs_path(cfg, k):
    return os.path.join(cfg.out_dir, f"pairs_round{k}.jsonl")


def preference_loss(cfg, chosen, rejected, pairs, device):
    """The chosen loss on sequence log-probs (n,): (losses (n,), chosen rewards (n,), rejected rewards (n,))."""
    lengths = [torch.tensor([float(len(p[s])) for p in pairs], device=device) for s in ("chosen_ids", "rejected_ids")]
    if cfg.loss == "simpo":
        return losses.simpo_loss(chosen, rejected, lengths[0], lengths[1], cfg.beta, cfg.simpo_gamma)
    ref = [torch.tensor([p[f"ref_{s}_logp"] for p in pairs], device=device) for s in ("chosen", "rejected")]
    if cfg.loss == "ipo" or cfg.length_normalize:  # 1/|y| inside the log-ratios (PITFALLS 12)
        chosen, rejected, ref = chosen / lengths[0], rejected / lengths[1], [ref[0] / lengths[0], ref[1] / lengths[1]]
    if cfg.loss == "ipo":
        return losses.ipo_loss(chosen, rejected, ref[0], ref[1], cfg.beta)
    return losses.dpo_loss(chosen, rejected, ref[0], ref[1], cfg.beta, cfg.label_smoothing)


# ----------------------------------------------------------------------------------------------
# One optimiser step


def train_step(model, policy, opt, micro, cfg, n_global, pad_id, device):
    """One optimiser step over this rank's micro-batches of pairs; each micro-batch's summed loss is
    divided by the step's pair count over all ranks, so accumulation and DDP equal one big batch.
    Returns the step's metrics summed over ranks (divide by n_global), or None on a non-finite gradient."""
    world = common.world_size()
    sums = dict.fromkeys(("loss", "accuracy", "margin", "chosen_logp", "rejected_logp"), 0.0)
    for j, pairs in enumerate(micro):
        with common.no_sync_unless_last(model, j == len(micro) - 1), common.autocast(device):
            chosen, rejected = pair_logprobs(model, pairs, pad_id, device)
            loss, r_chosen, r_rejected = preference_loss(cfg, chosen, rejected, pairs, device)
            (loss.sum() / n_global * world).backward()  # DDP averages over ranks
        sums["loss"] += loss.sum().item()
        sums["accuracy"] += (r_chosen > r_rejected).float().sum().item()
        sums["margin"] += (r_chosen - r_rejected).sum().item()
        sums["chosen_logp"] += chosen.sum().item()  # its fall is expected (PITFALLS 12)
        sums["rejected_logp"] += rejected.sum().item()
    grad_norm = common.optimizer_step(policy.parameters(), opt, cfg.grad_clip)
    if grad_norm is None:
        return None
    policy.update_router_biases()
    return {**common.all_reduce_sum(sums, device), "grad_norm": grad_norm}


@torch.no_grad()
def heldout_preference(policy, cfg, pairs, pad_id, device):
    """Preference accuracy (chosen implicit reward > rejected) and mean margin on held-out pairs."""
    policy.eval()
    acc = margin = 0.0
    for i in range(0, len(pairs), 256):
        chosen, rejected = pair_logprobs(policy, pairs[i:i + 256], pad_id, device)
        _, rc, rr = preference_loss(cfg, chosen, rejected, pairs[i:i + 256], device)
        acc, margin = acc + (rc > rr).float().sum().item(), margin + (rc - rr).sum().item()
    policy.train()
    return {"pref_acc": acc / max(len(pairs), 1), "pref_margin": margin / max(len(pairs), 1)}


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    (cfg, mcfg), given = common.parse_config([DPOConfig, ModelConfig], argv, __doc__)
    owns_dist = not common.is_dist()
    rank, world, device = common.setup_dist()
    common.setup_torch(cfg.seed, device)
    tok, task = tasks.Tokenizer(), tasks.get_task(cfg.task, cfg.n_digits)
    model_flags = given & set(ModelConfig.__dataclass_fields__)
    ckpt_path, ckpt = os.path.join(cfg.out_dir, "ckpt.pt"), None
    try:  # every check before anything is written
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ValueError(f"--batch_size {cfg.batch_size} does not divide into {world} ranks x {cfg.grad_accum} micro-batches")
        common.check_lengths(task, mcfg.max_seq_len, cfg.max_new_tokens)
        common.check_out_dir(cfg.out_dir)
        if cfg.pairs_file:
            rollout.load_pairs(cfg.pairs_file, task)
        if cfg.resume:
            ckpt, mcfg = common.load_for_resume(ckpt_path, "dpo", tok, cfg, mcfg, model_flags, common.INIT_FIELDS)
            policy = Transformer(mcfg).to(device)
        else:
            policy, mcfg = train_sft.load_or_make_init(cfg, tok, model_flags, mcfg, device)
    except (ValueError, common.CheckpointError) as e:
        common.die(str(e))
    eval_problems = task.eval_set(cfg.eval_size)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_ref: the frozen SFT init
    opt = common.adamw(policy.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    k0, in_round, step = 0, 0, 0  # round, optimiser steps taken in it, in all
    if ckpt is not None:
        policy.load_state_dict(ckpt["model"])
        ref.load_state_dict(ckpt["ref"])
        opt.load_state_dict(ckpt["optimizer"])
        k0, in_round, step = ckpt["round"], ckpt["step_in_round"], ckpt["step"]
    model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=True) if world > 1 else policy
    main_proc = rank == 0
    try:
        run = common.RunFolder(cfg.out_dir, main_proc, step if cfg.resume else None, dpo=cfg, model=mcfg)
    except common.RunFolderBusy as e:
        common.die(str(e))

    def fail(message):
        run.close()
        common.die(message)

    def evaluate(s, k=0):
        if not main_proc:
            return {}
        try:
            m = rollout.evaluate(policy, tok, task, eval_problems, k=k, n_samples=cfg.pass_n,
                                 generator=torch.Generator(device=device).manual_seed(s))
        except rollout.NonFiniteLogits as e:
            fail(f"{e} (at step {s}); {run.last_good()}")
        m.update(heldout_preference(policy, cfg, heldout, tok.pad_id, device))
        run.log({"step": s, **{f"eval_{key}": v for key, v in m.items()}}, kind="eval")
        if not cfg.quiet:
            tqdm.write(f"step {s}: " + ", ".join(f"{key} {v:.3f}" for key, v in m.items()))
        return m

    def checkpoint(s, k, n_in_round):
        try:
            run.save(s, {"model": policy.state_dict(), "ref": ref.state_dict(), "optimizer": opt.state_dict(),
                         "step": s, "round": k, "step_in_round": n_in_round, "world_size": world,
                         "config": common.config_dict(cfg), "model_config": common.config_dict(mcfg),
                         "tokenizer": tok.definition(), "kind": "dpo"})
        except common.NonFiniteState as e:
            fail(str(e))

    first, last = {}, {}
    with common.GracefulStop() as stopper:
        for k in range(k0, cfg.rounds):
            # ---- pairs of this round: made by the current policy, scored once by the reference
            if in_round == 0:
                if k > 0 and cfg.ref_reset:
                    ref.load_state_dict(policy.state_dict())  # iterative DPO: the reference follows the policy
                if main_proc:
                    try:
                        round_pairs(k, cfg, policy, ref, tok, task, eval_problems, device)
                    except (ValueError, rollout.NonFiniteLogits) as e:
                        fail(str(e))
                if world > 1:
                    torch.distributed.barrier()
            pairs = rollout.load_pairs(pairs_path(cfg, k))[0]
            train = [p for p in pairs if p["split"] == "train"]
            heldout = [p for p in pairs if p["split"] == "heldout"]
            per_epoch = len(train) // cfg.batch_size
            if per_epoch == 0:
                fail(f"round {k} has {len(train)} training pairs, fewer than --batch_size {cfg.batch_size} "
                     "(a policy right on every sample gives no pair): lower --batch_size or raise --num_prompts")
            order = common.epoch_batches(len(train), cfg.batch_size, cfg.epochs, cfg.seed, f"dpo round {k}")
            if step == 0:
                first = evaluate(0, k=cfg.pass_k)
                if main_proc and not cfg.quiet:
                    print(f"round {k}: {len(train)} training pairs, {len(heldout)} held-out pairs ({pairs_path(cfg, k)})")
            stop = len(order) if cfg.stop_at <= 0 else min(len(order), in_round + cfg.stop_at - step)
            bar = tqdm(range(in_round, stop), initial=in_round, total=len(order), desc=f"round {k}",
                       disable=not main_proc or cfg.quiet, dynamic_ncols=True)
            timer = common.Timer()
            for i in bar:
                lr = common.lr_at(i, cfg.lr, cfg.warmup, len(order), cfg.min_lr_ratio)
                for group in opt.param_groups:
                    group["lr"] = lr
                mine = [train[j] for j in order[i][rank::world]]  # this rank's share of the step's pairs
                per = len(mine) // cfg.grad_accum
                m = train_step(model, policy, opt, [mine[a * per:(a + 1) * per] for a in range(cfg.grad_accum)],
                               cfg, len(order[i]), tok.pad_id, device)
                step, in_round = step + 1, i + 1
                if m is None or m["loss"] != m["loss"]:
                    fail(f"non-finite loss or gradient at step {step} (lower --lr?); {run.last_good()}")
                n = len(order[i])
                run.log({"step": step, "round": k, "epoch": i // per_epoch, "lr": lr, "grad_norm": m["grad_norm"],
                         "pairs_per_s": n / timer.lap(), **{key: m[key] / n for key in m if key != "grad_norm"}})
                bar.set_postfix(loss=f"{m['loss'] / n:.3f}", acc=f"{m['accuracy'] / n:.2f}", refresh=False)
                done = k == cfg.rounds - 1 and in_round == len(order)
                if step % cfg.eval_every == 0 or done:
                    last = evaluate(step, k=cfg.pass_k if done else 0)
                    timer.lap()
                interrupted = stopper.requested(device)
                if step % cfg.ckpt_every == 0 or in_round == len(order) or i + 1 == stop or interrupted:
                    checkpoint(step, k, in_round)
                if interrupted:
                    stopper.exit(cfg.out_dir, step, close=(run,))
            bar.close()
            if in_round < len(order):  # --stop_at
                break
            in_round = 0
    common.finish_run(run, first, last, "DPO", main_proc and not cfg.quiet and f"pass@{cfg.pass_k}" in last, owns_dist)
    return policy, first, last


if __name__ == "__main__":
    main(sys.argv[1:])
