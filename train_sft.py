"""Supervised fine-tuning on an arithmetic task: the warm start and the reference of the RL scripts.

    python train_sft.py                                   # CPU or one GPU; out/sft/
    torchrun --standalone --nproc_per_node=2 train_sft.py # DDP (gloo on CPU, nccl on CUDA)
    python train_sft.py --resume                          # continue exactly from out/sft/ckpt.pt
    python train_sft.py --data rft --out_dir out/rft --steps 300 --lr 3e-4 --warmup 10  # RFT
    python train_sft.py --task think --data pretrain --out_dir out/base  # a base model
    # R1's cold start (512 worked examples), then rejection sampling: an RL run's correct samples
    python train_sft.py --task think --init out/base --train_size 512 --out_dir out/cold
    python train_sft.py --task think --data rft --teacher out/r1 --init out/base --out_dir out/rs
    # distillation (R1 4.1): a small student on the teacher's correct samples, + soft targets
    python train_sft.py --task think --data rft --teacher out/r1 --init out/small_base --alpha 0.5
    python train_sft.py --help                            # every flag with its default

The loss (SFT, DeepSeekMath 5.2.1): L = -mean over completion tokens of log pi(y_t | x, y_<t),
the prompt masked; plus mtp_lambda * the MTP loss and the MoE balance loss, the router biases
updated after every optimiser step. The data source is all that tells SFT from RFT: --data task
trains on the task's reference solutions (from scratch, or fine-tuning --init, a policy run); --data
rft (rejection-sampling fine-tuning) fine-tunes a policy run (--init) on the correct samples of
--teacher (by default of --init itself: GC = 1[correct]); --data pretrain is next-token prediction
over documents `prompt completion`, the loss on every token, a --worked_fraction of them thinking
(task think): a base model that can do both. With --alpha < 1 (soft targets, Hinton et al. 2015)
the CE becomes alpha * CE + (1 - alpha) * tau^2 * KL to --teacher's logits on the same tokens
(losses.distill_loss). The checkpoint records the chain of runs it came from, and its teacher.
"""
import os
import random
import sys
from dataclasses import dataclass, replace

import torch

import common
import losses
import rollout
import tasks
from model import ModelConfig, Transformer


@dataclass
class SFTConfig:
    task: str = "add"  # add, sub, mul, multistep or think
    n_digits: int = 0  # digits per operand; 0 = the task's default (add, sub 3; mul, multistep 2)
    data: str = "task"  # task (reference solutions), rft (correct samples) or pretrain
    worked_fraction: float = 0.5  # --data pretrain: the documents that think (the rest answer)
    init: str = ""  # the policy run fine-tuned ("" = from scratch; for rft the task's warm start)
    train_size: int = 0  # --data task: a fixed set of this many problems, in epochs; 0 = new ones
    teacher: str = ""  # a policy run: --data rft keeps its correct samples ("" = --init);
    # with --alpha < 1 its logits are the soft targets (distillation: any model flags)
    alpha: float = 1.0  # soft targets: alpha * CE + (1 - alpha) * tau^2 * KL (1 = CE alone)
    tau: float = 1.0  # soft targets' temperature
    kl: str = "forward"  # soft targets' KL: forward KL(teacher || student) or reverse
    warmstart_steps: int = 1500  # steps of the warm start made if --init does not exist
    warmstart_target_acc: float = 0.8  # the SFT warm start stops at this held-out accuracy
    rft_prompts: int = 2048  # --data rft: new prompts sampled once from --teacher
    rft_samples: int = 8  # --data rft: completions per prompt (T = 1); the correct ones kept
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
    eval_size: int = 256  # held-out problems per evaluation
    eval_samples: int = 0  # samples per prompt at every evaluation: mean@n (R1: 16); 0 = greedy
    samples: int = 3  # sampled completions printed at each evaluation
    target_acc: float = 0.0  # stop early (with a checkpoint) at this held-out accuracy; 0 = never

    def __post_init__(self):
        common.check_config(self, positive=("batch_size", "grad_accum", "steps", "lr", "eval_size",
                                            "warmstart_steps", "rft_prompts", "rft_samples", "tau"),
                            non_negative=("warmup", "weight_decay", "grad_clip", "samples",
                                          "train_size", "eval_samples"),
                            fractions=("min_lr_ratio", "target_acc", "warmstart_target_acc",
                                       "worked_fraction", "alpha"), below_one=("beta1", "beta2"),
                            choices={"task": tuple(tasks.TASKS), "kl": ("forward", "reverse"),
                                     "data": ("task", "rft", "pretrain")})
        if self.data == "pretrain" and self.task != "think":
            raise ValueError("--data pretrain writes thinking and direct answers: use --task think")
        if self.train_size and self.data != "task":
            raise ValueError("--train_size is for --data task")
        if self.alpha < 1 and not self.teacher:
            raise ValueError("soft targets (--alpha < 1) need --teacher, whose logits they are")
        if self.alpha == 1 and (self.tau != 1 or self.kl != "forward"):
            raise ValueError("--tau and --kl are for soft targets (--alpha < 1)")
        if self.teacher and self.data != "rft" and self.alpha == 1:
            raise ValueError("--teacher is for --data rft or soft targets (--alpha < 1)")
        if 0 < self.train_size < self.batch_size:
            raise ValueError(f"--train_size {self.train_size} is smaller than one batch "
                             f"(--batch_size {self.batch_size})")
        self.n_digits = tasks.get_task(self.task, self.n_digits).n_digits  # 0 -> the default
        self.init = self.init or (common.default_init(self.task) if self.data == "rft" else "")


# ----------------------------------------------------------------------------------------------
# The algorithm: batches, RFT's data source, one optimiser step


def encode_batch(seqs, pad_id, device):
    """Token sequences `<bos> prompt completion <eos>` with the index where each completion starts
    -> right-padded (idx (n, T), targets (n, T), loss_mask (n, T), pad_mask (n, T) bool):
    targets[:, t] is the token after idx[:, t]; the loss mask keeps the completion and its end
    token only; the pad mask marks the real input tokens."""
    n, T = len(seqs), max(len(s) for s, _ in seqs) - 1
    idx = torch.full((n, T), pad_id, dtype=torch.long)
    targets = torch.full((n, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, T)
    for i, (s, start) in enumerate(seqs):
        idx[i, :len(s) - 1] = torch.tensor(s[:-1])
        targets[i, :len(s) - 1] = torch.tensor(s[1:])
        loss_mask[i, start - 1:len(s) - 1] = 1.0  # targets from the first completion token to <eos>
    return idx.to(device), targets.to(device), loss_mask.to(device), (idx != pad_id).to(device)


def make_batch(task, tok, rng, n, device, worked=None):
    """n training problems from the stream rng, encoded by encode_batch. Pretraining (worked: a
    fraction): each document thinks with that probability, else answers directly, and its loss
    covers every token after <bos>, the prompt's too."""
    problems = [task.sample(rng) for _ in range(n)]
    if worked is None:
        return encode_batch([tasks.encode_problem(tok, p) for p in problems], tok.pad_id, device)
    docs = [p if rng.random() < worked else replace(p, completion=task.direct(p)) for p in problems]
    return encode_batch([(tasks.encode_problem(tok, d)[0], 1) for d in docs], tok.pad_id, device)


def rft_data(model, tok, task, cfg, run):
    """RFT's data source (DeepSeekMath 5.2.1): rft_samples completions (T = 1) of each of
    rft_prompts new prompts from the init, the correct ones kept (rollout.correct_samples), made
    once by rank 0 into rft_data.jsonl, whatever the number of ranks, and tied to the run's
    checkpoints. Returns (the sequences, each optimiser step's indices into them)."""
    path, seed = os.path.join(run.rc.out_dir, "rft_data.jsonl"), run.rc.seed

    def make():
        rng = random.Random(common.stream_seed(seed, "rft", 0))
        gen = torch.Generator(device=run.device).manual_seed(common.stream_seed(seed, "rft", 0,
                                                                                "sampling"))
        problems = [task.sample(rng) for _ in range(cfg.rft_prompts)]
        seqs, solved = rollout.correct_samples(model, tok, task, problems, cfg.rft_samples, gen)
        common.write_jsonl(path, [{"ids": ids, "start": k} for ids, k in seqs])
        if not run.rc.quiet:
            print(f"RFT data: {len(seqs)} correct of {cfg.rft_prompts * cfg.rft_samples} samples; "
                  f"{solved} of {cfg.rft_prompts} prompts solved at least once")
    if not run.rc.resume:  # a resume trains on the file its checkpoint names
        run.on_main(make)
    run.input(path)
    data = [(d["ids"], d["start"]) for d in common.read_jsonl(path)]
    run.require(len(data) >= cfg.batch_size, f"RFT kept {len(data)} correct samples, fewer than "
                f"--batch_size {cfg.batch_size}: raise --rft_prompts or --rft_samples")
    return data, in_epochs(len(data), cfg, seed, "rft")


def fixed_set(task, tok, cfg, seed):
    """--train_size problems drawn once (never a held-out one) with their reference solutions
    (R1's cold start: a small set of ideal examples). Returns (the sequences, each step's
    indices)."""
    rng = random.Random(common.stream_seed(seed, "sft", 0, "fixed set"))
    data = [tasks.encode_problem(tok, task.sample(rng)) for _ in range(cfg.train_size)]
    return data, in_epochs(len(data), cfg, seed, "sft")


def in_epochs(n, cfg, seed, stage):
    """Each optimiser step's indices into n items: enough shuffled passes for cfg.steps."""
    epochs = -(-cfg.steps // (n // cfg.batch_size))
    return common.epoch_batches(n, cfg.batch_size, epochs, seed, stage)


def train_step(model_ddp, model, opt, micro_batches, grad_clip, teacher=None, cfg=None):
    """One optimiser step over this rank's micro-batches, each normalised by the whole step's token
    and sequence counts (over all ranks), so that the gradient equals one big batch's; with a
    teacher, soft targets (cfg's alpha, tau, kl). Returns the step's metrics over all ranks;
    raises common.NonFinite on a non-finite loss or gradient."""
    counts = common.all_reduce_sum({"tokens": sum(m.sum().item() for _, _, m, _ in micro_batches),
                                    "seqs": sum(x.size(0) for x, _, _, _ in micro_batches),
                                    "inputs": sum(p.sum().item() for _, _, _, p in micro_batches)},
                                   micro_batches[0][0].device)
    parts = {"loss": 0.0, "ce": 0.0, "mtp": 0.0, "balance": 0.0, **({"kl": 0.0} if teacher else {})}
    for i, (x, y, m, pad) in enumerate(micro_batches):
        with common.micro_batch(model_ddp, last=i == len(micro_batches) - 1) as world:
            logits, loss = model_ddp(x, y, m, pad_mask=pad, num_tokens=counts["tokens"],
                                     num_seqs=counts["seqs"])
            if teacher is not None:  # the soft targets' loss in place of the CE
                loss, parts["kl"] = soft_targets(loss, logits, teacher, x, y, m, pad,
                                                 counts["tokens"], cfg, parts["kl"])
            (loss * world).backward()  # DDP averages over ranks; the counts are already global
        parts["loss"] += loss.item()
        for k in ("ce", "mtp", "balance"):
            parts[k] += model.loss_parts[k].item()
    metrics = common.all_reduce_sum(parts, micro_batches[0][0].device)
    metrics["grad_norm"] = common.optimizer_step(opt, grad_clip)
    return {**metrics, **model.update_router_biases(), "tokens": counts["inputs"]}


def soft_targets(loss, logits, teacher, x, y, mask, pad, n, cfg, kl_sum):
    """Soft-target distillation: the model's loss (CE + MTP + balance) with its CE replaced by
    losses.distill_loss, alpha * CE + (1 - alpha) * tau^2 * KL to the frozen teacher's logits,
    each summed over this micro-batch's tokens / n (the whole step's). Returns (that loss, kl_sum
    + this micro-batch's share of the KL)."""
    with torch.no_grad():
        teacher_logits = teacher(x, pad_mask=pad)[0]
    kd, part = losses.distill_loss(logits, teacher_logits, y, mask, cfg.alpha, cfg.tau, cfg.kl, n)
    ce = losses.masked_mean(-losses.token_logprobs(logits, y), mask, n)  # the model's CE
    return loss - ce + kd, kl_sum + part["kl"]


# ----------------------------------------------------------------------------------------------
# Main


def parse(argv):
    """SFT's configs from its flags; the vocabulary is the task's tokenizer's unless typed."""
    cfg, mcfg, run_cfg = common.parse_config([SFTConfig, ModelConfig], argv, __doc__,
                                             out_dir="out/sft", eval_every=250, ckpt_every=250)
    if "vocab_size" not in run_cfg.given:
        mcfg.vocab_size = tasks.get(cfg.task, cfg.n_digits)[0].vocab_size
    return cfg, mcfg, run_cfg


def main(argv=None, resume_hint=None):
    """Run SFT. resume_hint: what to tell a user whose run was stopped by a signal (a caller that
    runs SFT as its warm start says how to go on with itself)."""
    cfg, mcfg, run_cfg = parse(argv)
    rft, worked = cfg.data == "rft", (cfg.worked_fraction if cfg.data == "pretrain" else None)
    tuned = rft or bool(cfg.init)  # fine-tunes a policy run, else trains the flags' model
    with common.Run("sft", cfg, mcfg, run_cfg, model_from_flags=not tuned,
                    resume_hint=resume_hint) as run:  # torchrun, seeds, one-line errors
        tok, task = tasks.get(cfg.task, cfg.n_digits)
        # ---- plumbing: the checks before anything is written
        per_rank, rem = divmod(cfg.batch_size, run.world * cfg.grad_accum)
        run.require(rem == 0 and per_rank > 0, f"--batch_size {cfg.batch_size} does not divide "
                    f"into {run.world} ranks x {cfg.grad_accum} micro-batches")
        run.require(mcfg.vocab_size == tok.vocab_size, f"--vocab_size {mcfg.vocab_size} does "
                    f"not match the tokenizer's {tok.vocab_size}")
        if run_cfg.resume:
            model = run.resumed()  # the checkpoint's model config; begin() restores its weights
        elif tuned:
            model = common.load_or_make_init(cfg, run)  # the policy run it fine-tunes
        else:
            model = Transformer(mcfg).to(run.device)  # from the flags, seeded by --seed
        common.check_lengths(task, model.cfg.max_seq_len, task.max_new_tokens())  # evaluations
        soft = cfg.alpha < 1  # soft targets: the teacher runs every step, also after a resume
        teacher = (common.load_teacher(cfg, run, task)
                   if soft or (cfg.teacher and not run_cfg.resume) else None)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay, fused=True)  # fused: one pass
        data, gen = run.streams()  # this rank's problem stream, SFT's own
        run.begin(model=model, optimizer=opt, streams=(data, gen))  # + --resume; opens out_dir
        model_ddp = run.wrap(model)  # DDP and torch.compile, as configured
        samples = None  # the data source: new problems every step, or a fixed set in epochs:
        if rft:  # the correct samples of --teacher (or the init), made once
            samples, order = rft_data(teacher or model, tok, task, cfg, run)
        elif cfg.train_size:  # --train_size problems (a cold start)
            samples, order = fixed_set(task, tok, cfg, run_cfg.seed)

        def batches(step):  # this rank's micro-batches: new problems, or its share of the set
            if samples is None:
                return [make_batch(task, tok, data, per_rank, run.device, worked)
                        for _ in range(cfg.grad_accum)]
            n = per_rank * cfg.grad_accum
            mine = order[step][run.rank * n:(run.rank + 1) * n]
            return [encode_batch([samples[i] for i in mine[j * per_rank:(j + 1) * per_rank]],
                                 tok.pad_id, run.device) for j in range(cfg.grad_accum)]

        # ---- plumbing: the held-out evaluation
        held_out = task.eval_set(cfg.eval_size)

        def evaluate(step):  # on rank 0; every rank learns whether the target is reached
            gen = torch.Generator(device=run.device).manual_seed(step)
            m = run.eval(step, rollout.evaluate(model, tok, task, held_out, generator=gen,
                                                mean_of=cfg.eval_samples) if run.main else {})
            if run.main and not run_cfg.quiet and cfg.samples:
                rollout.print_samples(model, tok, task, held_out[:cfg.samples], gen, f"step {step}")
            hit = float(cfg.target_acc > 0 and m.get("greedy_acc", 0) >= cfg.target_acc)
            return common.all_reduce_sum({"hit": hit}, run.device)["hit"] > 0

        hit = evaluate(0) if not run_cfg.resume else False
        if hit:  # the init is already good enough: it is the result
            run.end_step(0, finished=True)
        for step in [] if hit else run.steps(cfg.steps):
            # ---- the algorithm
            lr = common.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            opt.param_groups[0]["lr"] = lr
            metrics = train_step(model_ddp, model, opt, batches(step), cfg.grad_clip,
                                 teacher if soft else None, cfg)

            # ---- plumbing: logging, evaluation, checkpoints (tests/test_runs.py guards it)
            dt = run.elapsed()
            run.log({"step": step + 1, "lr": lr, "tokens_per_s": metrics.pop("tokens") / dt,
                     "step_s": dt, **metrics}, show=("loss",))
            hit = run.due(step + 1, run_cfg.eval_every) and evaluate(step + 1)
            run.end_step(step + 1, finished=hit or None)  # when due; Ctrl-C stops here
            if hit:  # held-out accuracy reached --target_acc: the run ends here
                break
    return model, run.last_eval or {}


if __name__ == "__main__":
    main(sys.argv[1:])
