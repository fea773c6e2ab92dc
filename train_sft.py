"""Supervised fine-tuning on an arithmetic task: the warm start and the reference of the RL scripts.

    python train_sft.py                                   # CPU or one GPU; out/sft/
    torchrun --standalone --nproc_per_node=2 train_sft.py # DDP (gloo on CPU, nccl on CUDA)
    python train_sft.py --resume                          # continue exactly from out/sft/ckpt.pt
    python train_sft.py --data rft --out_dir out/rft --steps 300 --lr 3e-4 --warmup 10  # RFT
    python train_sft.py --help                            # every flag with its default

The loss (SFT, DeepSeekMath 5.2.1): L = -mean over completion tokens of log pi(y_t | x, y_<t), the
prompt masked; plus mtp_lambda * the MTP loss and the MoE sequence-wise balance loss, with the
router biases updated after every optimiser step (auxiliary-loss-free balancing). The data source
is the only difference between SFT and RFT: --data task trains from scratch on the task's
reference solutions, a fresh problem stream; --data rft (rejection-sampling fine-tuning) samples
rft_samples completions of each of rft_prompts new prompts from an SFT model (--init) once, keeps
the correct ones (GC = 1[correct], offline) and fine-tunes that model on them (rft_data.jsonl in
the run folder). Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint and says how to resume.
"""
import os
import random
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
import rollout
import tasks
from model import ModelConfig, Transformer


@dataclass
class SFTConfig:
    task: str = "add"  # add, sub, mul or multistep
    n_digits: int = 0  # digits per operand; 0 = the task's default (add, sub 3; mul, multistep 2)
    data: str = "task"  # task (reference solutions, from scratch) or rft (--init's correct samples)
    init: str = ""  # --data rft: the SFT run sampled and fine-tuned; "" = out/sft or out/sft_<task>
    warmstart_steps: int = 1500  # --data rft: steps of the SFT warm start made if --init is missing
    warmstart_target_acc: float = 0.8  # --data rft: the warm start stops at this held-out accuracy
    rft_prompts: int = 2048  # --data rft: new prompts sampled once from --init
    rft_samples: int = 8  # --data rft: completions per prompt (T = 1); the correct ones are the data
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
    samples: int = 3  # sampled completions printed at each evaluation
    target_acc: float = 0.0  # stop early (with a checkpoint) at this held-out accuracy; 0 = never

    def __post_init__(self):
        common.check_config(self, positive=("batch_size", "grad_accum", "steps", "lr", "eval_size",
                                            "warmstart_steps", "rft_prompts", "rft_samples"),
                            non_negative=("warmup", "weight_decay", "grad_clip", "samples"),
                            fractions=("min_lr_ratio", "target_acc", "warmstart_target_acc"),
                            choices={"task": tuple(tasks.TASKS), "data": ("task", "rft")})
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        self.n_digits = tasks.get_task(self.task, self.n_digits).n_digits  # 0 -> the default
        self.init = self.init or (default_init(self.task) if self.data == "rft" else "")


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


def make_batch(task, tok, rng, n, device):
    """n training problems from the stream rng, encoded by encode_batch."""
    seqs = [tasks.encode_problem(tok, task.sample(rng)) for _ in range(n)]
    return encode_batch(seqs, tok.pad_id, device)


@torch.no_grad()
def make_rft_data(model, tok, task, cfg, seed):
    """RFT's data source (DeepSeekMath 5.2.1): cfg.rft_samples completions (T = 1) of each of
    cfg.rft_prompts new prompts from `model`, once; the correct ones (an end token, the right
    answer) as `<bos> prompt completion <eos>` token lists with their completion start, as
    encode_batch takes them. Returns (sequences, the number of prompts solved at least once)."""
    rng = random.Random(common.stream_seed(seed, "rft", 0))  # the same prompts on any world
    gen = torch.Generator(device=model.head.weight.device)
    gen.manual_seed(common.stream_seed(seed, "rft", 0, "sampling"))
    problems = [task.sample(rng) for _ in range(cfg.rft_prompts)]
    G, seqs, solved, per = cfg.rft_samples, [], 0, max(1, 256 // cfg.rft_samples)
    for i in range(0, len(problems), per):
        batch = problems[i:i + per]
        prompts = [tasks.encode_problem(tok, p, with_completion=False)[0] for p in batch]
        with common.autocast():
            r = rollout.generate(model, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                 num_generations=G, max_new_tokens=task.max_lengths()[1] + 2,
                                 temperature=1.0, generator=gen)
        texts, lengths = rollout.decode_completions(tok, r), r.completion_mask.sum(1).long().tolist()
        for j, p in enumerate(batch):
            right = [k for k in range(j * G, (j + 1) * G)
                     if r.ended[k] and task.reward(texts[k], p) == 1.0]
            seqs += [(prompts[j] + r.completion_ids[k, :lengths[k]].tolist(), len(prompts[j]))
                     for k in right]
            solved += bool(right)
    return seqs, solved


def train_step(model_ddp, model, opt, micro_batches, grad_clip):
    """One optimiser step over this rank's micro-batches, each normalised by the whole step's token
    and sequence counts (over all ranks), so that the gradient equals one big batch's. Returns the
    step's metrics over all ranks; raises common.NonFinite on a non-finite loss or gradient."""
    counts = common.all_reduce_sum({"tokens": sum(m.sum().item() for _, _, m, _ in micro_batches),
                                    "seqs": sum(x.size(0) for x, _, _, _ in micro_batches),
                                    "inputs": sum(p.sum().item() for _, _, _, p in micro_batches)},
                                   micro_batches[0][0].device)
    parts = {"loss": 0.0, "ce": 0.0, "mtp": 0.0, "balance": 0.0}
    for i, (x, y, m, pad) in enumerate(micro_batches):
        with common.micro_batch(model_ddp, last=i == len(micro_batches) - 1) as world:
            _, loss = model_ddp(x, y, m, pad_mask=pad, num_tokens=counts["tokens"],
                                num_seqs=counts["seqs"])
            (loss * world).backward()  # DDP averages over ranks; the counts are already global
        parts["loss"] += loss.item()
        for k in ("ce", "mtp", "balance"):
            parts[k] += model.loss_parts[k].item()
    metrics = common.all_reduce_sum(parts, micro_batches[0][0].device)
    metrics["grad_norm"] = common.optimizer_step(opt, grad_clip)
    return {**metrics, **model.update_router_biases(), "tokens": counts["inputs"]}


# ----------------------------------------------------------------------------------------------
# The SFT init that the RL scripts, the reward model and RFT start from


def default_init(task):
    return "out/sft" if task == "add" else f"out/sft_{task}"


def load_or_make_init(cfg, run):
    """The SFT model a run starts from (cfg: a config with task, n_digits, init, warmstart_steps and
    warmstart_target_acc), on the run's device. A run folder that does not exist gets a short SFT
    warm start that stops once held-out accuracy reaches warmstart_target_acc, so that RL, not
    SFT, does most of the work; an interrupted warm start with the same settings continues.
    Raises a one-line error for a checkpoint that is not an SFT run of this task and of the model
    flags given, and for a folder that holds something else."""
    path = cfg.init if cfg.init.endswith(".pt") else os.path.join(cfg.init, "ckpt.pt")
    folder = os.path.dirname(path) or "."
    argv = ["--task", cfg.task, "--n_digits", str(cfg.n_digits), "--steps",
            str(cfg.warmstart_steps), "--target_acc", str(cfg.warmstart_target_acc), "--eval_every",
            "25", "--samples", "0", "--out_dir", folder, "--seed", str(run.rc.seed)]
    argv += [f"--{k}={getattr(run.mcfg, k)}" for k in sorted(run.model_flags)]
    argv += ["--quiet"] if run.rc.quiet else []
    warm, warm_model, warm_run = common.parse_config([SFTConfig, ModelConfig], argv)
    hint = f"run the same command again: the SFT warm start in {folder} continues where it stopped"
    if not os.path.exists(path):
        if path.endswith(".pt") and not path.endswith("ckpt.pt"):
            raise common.CheckpointError(f"no checkpoint at {path} (a warm start is made only for "
                                         "a run folder)")
        held = os.listdir(folder) if os.path.isdir(folder) else []
        if held and not _same_settings(common.recorded_checkpoint(folder), warm, warm_model, warm_run):
            raise common.ConfigError(f"--init {folder} holds no checkpoint and is not a warm start "
                                     "of this run's: a warm start is made only in a new folder; "
                                     "pass an SFT run folder as --init")
        if run.main:
            print(f"no SFT checkpoint at {path}: making one with a short SFT warm start (at most "
                  f"{cfg.warmstart_steps} steps, stopping at {cfg.warmstart_target_acc:.0%} "
                  "held-out accuracy)")
        main(argv + (["--overwrite"] if held else []), resume_hint=hint)
    ckpt = common.load_checkpoint(path)
    if ckpt.get("kind") == "sft" and not ckpt.get("done", True):
        if not _same_settings(ckpt, warm, warm_model, warm_run):
            raise common.ConfigError(f"--init {folder} is an unfinished SFT run (step "
                                     f"{ckpt['step']}) with other settings than this run's warm "
                                     "start: finish it with train_sft.py --resume, or pass another")
        if run.main:
            print(f"continuing the SFT warm start in {folder} from step {ckpt['step']}")
        main(argv + ["--resume"], resume_hint=hint)
        ckpt = common.load_checkpoint(path)
    common.check_checkpoint(ckpt, f"--init {path}", "sft", tasks.Tokenizer())
    trained = (ckpt["config"].get("task"), ckpt["config"].get("n_digits"))
    if trained != (cfg.task, cfg.n_digits):
        raise common.CheckpointError(f"--init {path} was trained on task {trained[0]} with "
                                     f"{trained[1]} digits, not {cfg.task} with {cfg.n_digits}: "
                                     "pass --init with an SFT run of this task")
    bad = common.model_mismatches(ckpt, run.model_flags, run.mcfg)
    if bad:
        raise common.CheckpointError(f"--init {path} has another model config in: {', '.join(bad)}")
    model = Transformer(ModelConfig(**ckpt["model_config"])).to(run.device)
    model.load_state_dict(ckpt["model"])
    return model


def _same_settings(ckpt, cfg, mcfg, run_cfg):
    """Whether a checkpoint (a warm start's) was made with these SFT settings."""
    return ckpt is not None and not (common.config_mismatches(ckpt, cfg, run_cfg) or
                                     common.mismatched_fields(ckpt["model_config"],
                                                              common.config_dict(mcfg)))


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None, resume_hint=None):
    """Run SFT. resume_hint: what to tell a user whose run was stopped by a signal (a caller that
    runs SFT as its warm start says how to go on with itself)."""
    cfg, mcfg, run_cfg = common.parse_config([SFTConfig, ModelConfig], argv, __doc__,
                                             out_dir="out/sft", eval_every=250, ckpt_every=250)
    rft = cfg.data == "rft"
    with common.Run("sft", cfg, mcfg, run_cfg, model_from_flags=not rft,
                    resume_hint=resume_hint) as run:  # torchrun, seeds, one-line errors
        per_rank, rem = divmod(cfg.batch_size, run.world * cfg.grad_accum)
        run.require(rem == 0 and per_rank > 0, f"--batch_size {cfg.batch_size} does not divide "
                    f"into {run.world} ranks x {cfg.grad_accum} micro-batches")
        tok, task = tasks.Tokenizer(), tasks.get_task(cfg.task, cfg.n_digits)
        run.require(mcfg.vocab_size == tok.vocab_size, f"--vocab_size {mcfg.vocab_size} does "
                    f"not match the tokenizer's {tok.vocab_size}")
        model = run.model(lambda: load_or_make_init(cfg, run) if rft else
                          Transformer(mcfg).to(run.device))  # from the flags, seeded by --seed
        rollout.check_lengths(task, model.cfg.max_seq_len,
                             task.max_lengths()[1] + 2 if rft else None)  # RFT samples too
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay, fused=True)  # fused: one pass
        data, gen = run.streams()  # this rank's problem stream, SFT's own
        run.begin(model=model, optimizer=opt, streams=(data, gen))  # + --resume; opens out_dir
        model_ddp = run.wrap(model)  # DDP and torch.compile, as configured
        if rft:  # RFT's data, made once by rank 0 and tied to the run's checkpoints
            data_path = os.path.join(run_cfg.out_dir, "rft_data.jsonl")
            if run.start == 0 and run.main:
                rows = make_rft_data(model, tok, task, cfg, run_cfg.seed)
                common.write_jsonl(data_path, [{"ids": ids, "start": k} for ids, k in rows[0]])
                if not run_cfg.quiet:
                    print(f"RFT data: {len(rows[0])} correct of {cfg.rft_prompts * cfg.rft_samples}"
                          f" samples; {rows[1]} of {cfg.rft_prompts} prompts solved at least once")
            if run.world > 1:
                torch.distributed.barrier()
            run.input("rft_data", data_path)
            rft_data = [(d["ids"], d["start"]) for d in common.read_jsonl(data_path)]
            run.require(len(rft_data) >= cfg.batch_size, f"RFT kept {len(rft_data)} correct "
                        f"samples, fewer than --batch_size {cfg.batch_size}: raise --rft_prompts "
                        "or --rft_samples")
            order = common.epoch_batches(len(rft_data), cfg.batch_size, -(-cfg.steps // (
                len(rft_data) // cfg.batch_size)), run_cfg.seed, "rft")

        def batches(step):  # this rank's micro-batches: new problems, or its share of RFT's
            if not rft:
                return [make_batch(task, tok, data, per_rank, run.device)
                        for _ in range(cfg.grad_accum)]
            n = per_rank * cfg.grad_accum
            mine = order[step][run.rank * n:(run.rank + 1) * n]
            return [encode_batch([rft_data[i] for i in mine[j * per_rank:(j + 1) * per_rank]],
                                 tok.pad_id, run.device) for j in range(cfg.grad_accum)]

        held_out = task.eval_set(cfg.eval_size)

        def evaluate(step):  # on rank 0; every rank learns whether the target is reached
            m = run.eval(step, rollout.evaluate(model, tok, task, held_out) if run.main else {})
            if run.main and not run_cfg.quiet and cfg.samples:
                print_samples(model, tok, task, held_out[:cfg.samples], step)
            hit = float(cfg.target_acc > 0 and m.get("greedy_acc", 0) >= cfg.target_acc)
            return common.all_reduce_sum({"hit": hit}, run.device)["hit"] > 0

        hit = evaluate(0) if run.start == 0 else False
        if hit:  # the init is already good enough: it is the result
            run.end_step(0, finished=True)
        for step in [] if hit else run.steps(cfg.steps):
            # ---- the algorithm
            lr = common.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            metrics = train_step(model_ddp, model, opt, batches(step), cfg.grad_clip)

            # ---- plumbing: logging, evaluation, checkpoints (tests/test_runs.py guards it)
            dt = run.elapsed()
            run.log({"step": step + 1, "lr": lr, "tokens_per_s": metrics.pop("tokens") / dt,
                     "step_s": dt, **metrics}, show=("loss",))
            hit = run.due(step + 1, run_cfg.eval_every) and evaluate(step + 1)
            run.end_step(step + 1, finished=hit or None)  # when due; Ctrl-C stops here
            if hit:
                if run.main and not run_cfg.quiet:
                    tqdm.write(f"held-out accuracy reached target_acc {cfg.target_acc} at step "
                               f"{step + 1}: stopping")
                break
    return model, run.last_eval or {}


def print_samples(model, tok, task, problems, step):
    """A few held-out problems with the model's sampled completions, right or wrong."""
    r = rollout.generate(model, [tasks.encode_problem(tok, p, False)[0] for p in problems],
                         eos_id=tok.eos_id, pad_id=tok.pad_id,
                         max_new_tokens=task.max_lengths()[1] + 2,
                         generator=torch.Generator(device=model.head.weight.device).manual_seed(step))
    for p, c in zip(problems, rollout.decode_completions(tok, r)):
        tqdm.write(f"  step {step} sample: {p.prompt}{c}  "
                   f"({'correct' if task.reward(c, p) else 'wrong'})")


if __name__ == "__main__":
    main(sys.argv[1:])
