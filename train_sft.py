"""Supervised fine-tuning on an arithmetic task: the warm start and the reference for DPO/GRPO/PPO.

    python train_sft.py                                   # CPU or one GPU; out/sft/
    torchrun --standalone --nproc_per_node=2 train_sft.py # DDP (gloo on CPU, nccl on CUDA)
    python train_sft.py --resume                          # continue exactly from out/sft/ckpt.pt
    python train_sft.py --data rft --out_dir out/rft --steps 300 --lr 3e-4 --warmup 10  # RFT from out/sft
    python train_sft.py --help                            # every flag with its default

Loss (SFT, DeepSeekMath 5.2.1): L = -mean over completion tokens of log pi(y_t | x, y_<t); the prompt
is masked. The data source is the only difference between SFT and RFT (the same section): --data task
trains from scratch on the task's reference solutions, a fresh problem stream; --data rft
(rejection-sampling fine-tuning) starts from an SFT model (--init), samples rft_samples completions
for each of rft_prompts new prompts from it once, keeps the correct ones (GC = 1[correct], offline)
and fine-tunes on them (rft_data.jsonl in the run folder). Plus mtp_lambda * the MTP loss and the
MoE sequence-wise balance loss; the router biases are updated after every optimiser step
(aux-loss-free balancing). Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint and says how
to resume.
"""
import math
import os
import sys
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
    n_digits: int = 0  # digits per operand; 0 = the task's default (add, sub 3; mul, multistep 2)
    data: str = "task"  # task (reference solutions, from scratch) or rft (the correct samples of --init, fine-tuning it)
    init: str = ""  # --data rft: the SFT run that samples the data and is fine-tuned; "" = out/sft for add, out/sft_<task> otherwise; a missing folder gets a warm start
    warmstart_steps: int = 1500  # --data rft: steps of the SFT warm start made when --init does not exist
    warmstart_target_acc: float = 0.8  # --data rft: the warm start stops once held-out accuracy reaches this
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
    eval_every: int = 250  # steps between held-out evaluations
    eval_size: int = 256  # held-out problems per evaluation
    samples: int = 3  # sampled completions printed at each evaluation
    ckpt_every: int = 250  # steps between checkpoints (and at the end)
    seed: int = 0  # seed of the weights and of the problem streams (one per stage and rank)
    out_dir: str = "out/sft"  # run folder: ckpt.pt, metrics.jsonl, config.json
    resume: bool = False  # continue from out_dir/ckpt.pt
    stop_at: int = 0  # stop (with a checkpoint) after this step, to resume later; 0 = run to the end
    target_acc: float = 0.0  # stop early (with a checkpoint) once held-out greedy accuracy reaches this; 0 = never
    compile: bool = False  # torch.compile the model
    quiet: bool = False  # no progress bar or printed samples

    def __post_init__(self):
        common.check_config(self, positive=("batch_size", "grad_accum", "steps", "lr", "eval_every", "eval_size",
                                            "ckpt_every", "warmstart_steps", "rft_prompts", "rft_samples"),
                            non_negative=("warmup", "weight_decay", "grad_clip", "samples", "stop_at"),
                            fractions=("min_lr_ratio", "target_acc", "warmstart_target_acc"),
                            choices={"task": tuple(tasks.TASKS), "data": ("task", "rft")})
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        self.n_digits = tasks.get_task(self.task, self.n_digits).n_digits  # 0 -> the task's default


# ----------------------------------------------------------------------------------------------
# Data


def encode_batch(seqs, pad_id, device):
    """Token sequences `<bos> prompt completion <eos>` with the index where each completion starts ->
    right-padded (idx (n, T), targets (n, T), loss_mask (n, T), pad_mask (n, T) bool): targets[:, t]
    is the token after idx[:, t]; the loss mask keeps the completion and its end token only; the pad
    mask marks the real input tokens."""
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
    return encode_batch([tasks.encode_problem(tok, task.sample(rng)) for _ in range(n)], tok.pad_id, device)


@torch.no_grad()
def make_rft_data(model, tok, task, cfg, device):
    """RFT's data source (DeepSeekMath 5.2.1): cfg.rft_samples completions (T = 1) of each of
    cfg.rft_prompts new prompts from `model`, once; the correct ones (an end token, the right answer)
    as `<bos> prompt completion <eos>` token lists with their completion start, as encode_batch
    takes them. Returns (sequences, the number of prompts with at least one correct sample)."""
    rng = common.data_rng(cfg.seed, "rft", 0)  # the same prompts whatever the number of ranks
    gen = torch.Generator(device=device).manual_seed(common.stream_seed(cfg.seed, "rft", 0, "sampling"))
    problems = [task.sample(rng) for _ in range(cfg.rft_prompts)]
    G, seqs, solved, per = cfg.rft_samples, [], 0, max(1, 256 // cfg.rft_samples)
    for i in range(0, len(problems), per):
        batch = problems[i:i + per]
        prompts = [tasks.encode_problem(tok, p, with_completion=False)[0] for p in batch]
        with common.autocast(device):
            r = rollout.generate(model, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id, num_generations=G,
                                 max_new_tokens=task.max_lengths()[1] + 2, temperature=1.0, generator=gen)
        texts, lengths = rollout.decode_completions(tok, r), r.completion_mask.sum(1).long().tolist()
        for j, p in enumerate(batch):
            right = [k for k in range(j * G, (j + 1) * G) if r.ended[k] and task.reward(texts[k], p) == 1.0]
            seqs += [(prompts[j] + r.completion_ids[k, :lengths[k]].tolist(), len(prompts[j])) for k in right]
            solved += bool(right)
    return seqs, solved


# ----------------------------------------------------------------------------------------------
# One optimiser step


def train_step(model, raw_model, opt, micro_batches, device, grad_clip):
    """Accumulate gradients over micro-batches (no DDP sync but on the last), normalising every
    micro-batch by the whole step's token and sequence counts (over all ranks), so the gradient
    equals that of one big batch. Returns the step's metrics, all-reduced; without "tokens" if the
    loss or the gradient is not finite (the optimiser then does not step)."""
    world = common.world_size()
    counts = common.all_reduce_sum({"tokens": sum(m.sum().item() for _, _, m, _ in micro_batches),
                                    "seqs": sum(x.size(0) for x, _, _, _ in micro_batches),
                                    "inputs": sum(p.sum().item() for _, _, _, p in micro_batches)}, device)
    parts = {"loss": 0.0, "ce": 0.0, "mtp": 0.0, "balance": 0.0}
    for i, (x, y, m, pad) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with common.no_sync_unless_last(model, last):
            with common.autocast(device):
                _, loss = model(x, y, m, pad_mask=pad, num_tokens=counts["tokens"], num_seqs=counts["seqs"])
            (loss * world).backward()  # DDP averages gradients over ranks; the counts are already global
        parts["loss"] += loss.item()
        for k in ("ce", "mtp", "balance"):
            parts[k] += raw_model.loss_parts[k].item()
    metrics = common.all_reduce_sum(parts, device)
    grad_norm = common.optimizer_step(model.parameters(), opt, grad_clip) if math.isfinite(metrics["loss"]) else None
    metrics["grad_norm"] = float("nan") if grad_norm is None else grad_norm
    if grad_norm is None:
        return metrics  # the caller stops the run; the optimiser never saw the NaN
    metrics.update(raw_model.update_router_biases())
    metrics["tokens"] = counts["inputs"]  # the real tokens the model ran on
    return metrics


# ----------------------------------------------------------------------------------------------
# The SFT init that GRPO, DPO and PPO start from


def init_path(cfg):
    """cfg.init as a checkpoint file ("" = out/sft for add, out/sft_<task> otherwise)."""
    folder = cfg.init or ("out/sft" if cfg.task == "add" else f"out/sft_{cfg.task}")
    return folder if folder.endswith(".pt") else os.path.join(folder, "ckpt.pt")


def load_or_make_init(cfg, tok, model_flags, mcfg, device):
    """The SFT model an RL run starts from (cfg: a config with task, n_digits, init, warmstart_steps,
    warmstart_target_acc, seed, quiet), and its ModelConfig. A run folder without a checkpoint gets
    a short SFT warm start that stops once held-out accuracy reaches warmstart_target_acc, so that RL,
    not SFT, does most of the work; a warm start stopped by a signal is continued. Raises
    CheckpointError for a checkpoint that is not an SFT run of this task and model flags."""
    path = init_path(cfg)
    folder = os.path.dirname(path) or "."
    argv = ["--task", cfg.task, "--n_digits", str(cfg.n_digits), "--steps", str(cfg.warmstart_steps),
            "--target_acc", str(cfg.warmstart_target_acc), "--eval_every", "25", "--samples", "0",
            "--out_dir", folder, "--seed", str(cfg.seed)] + [f"--{k}={getattr(mcfg, k)}" for k in sorted(model_flags)]
    argv += ["--quiet"] if cfg.quiet else []
    hint = f"run the same command again: the SFT warm start in {folder} continues where it stopped"
    if not os.path.exists(path):
        if path.endswith(".pt") and not path.endswith("ckpt.pt"):
            raise common.CheckpointError(f"no checkpoint at {path} (a warm start is made only for a run folder)")
        if common.rank() == 0:
            print(f"no SFT checkpoint at {path}: making one with a short SFT warm start (at most "
                  f"{cfg.warmstart_steps} steps, stopping at {cfg.warmstart_target_acc:.0%} held-out accuracy)")
        main(argv, resume_hint=hint)
    else:
        ckpt = common.load_checkpoint(path)
        warm, warm_model = common.parse_config([SFTConfig, ModelConfig], argv)[0]
        ours = not (common.resume_mismatches(ckpt, warm) or
                    common.mismatched_fields(ckpt["model_config"], common.config_dict(warm_model)))
        if ckpt.get("kind") == "sft" and not ckpt.get("done", True) and ours:
            if common.rank() == 0:
                print(f"continuing the SFT warm start in {folder} from step {ckpt['step']}")
            main(argv + ["--resume"], resume_hint=hint)
    return common.load_init(path, tok, cfg.task, cfg.n_digits, model_flags, mcfg, device)


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None, resume_hint=None):
    """Run SFT. resume_hint: what to tell a user whose run was stopped by a signal (a caller that
    runs SFT as its warm start says how to go on with itself)."""
    (cfg, mcfg), given = common.parse_config([SFTConfig, ModelConfig], argv, __doc__)
    model_flags = given & set(ModelConfig.__dataclass_fields__)
    rft = cfg.data == "rft"
    owns_dist = not common.is_dist()  # a caller (a warm start) may have set it up already
    rank, world, device = common.setup_dist()
    common.setup_torch(cfg.seed, device)
    tok = tasks.Tokenizer()
    task = tasks.get_task(cfg.task, cfg.n_digits)
    per_rank, rem = divmod(cfg.batch_size, world * cfg.grad_accum)
    ckpt_path, start, ckpt = os.path.join(cfg.out_dir, "ckpt.pt"), 0, None
    try:  # every check before anything is written
        if rem or per_rank == 0:
            raise ValueError(f"--batch_size {cfg.batch_size} does not divide into {world} ranks x "
                             f"{cfg.grad_accum} micro-batches")
        if mcfg.vocab_size != tok.vocab_size:
            raise ValueError(f"--vocab_size {mcfg.vocab_size} does not match the tokenizer's {tok.vocab_size}")
        common.check_out_dir(cfg.out_dir)
        if rft and os.path.abspath(os.path.dirname(init_path(cfg))) == os.path.abspath(cfg.out_dir):
            raise ValueError(f"--data rft fine-tunes --init {os.path.dirname(init_path(cfg))} into --out_dir "
                             f"{cfg.out_dir}: give it another folder, e.g. --out_dir out/rft")
        init = None
        if cfg.resume:  # from scratch every model flag counts (the model comes from them); RFT's comes from --init
            ckpt, mcfg = common.load_for_resume(ckpt_path, "sft", tok, cfg, mcfg, model_flags if rft else
                                                ModelConfig.__dataclass_fields__, common.INIT_FIELDS if rft else ())
            start = ckpt["step"]
        elif rft:
            init, mcfg = load_or_make_init(cfg, tok, model_flags, mcfg, device)
        common.check_lengths(task, mcfg.max_seq_len, task.max_lengths()[1] + 2 if rft else None)  # RFT samples too
    except (ValueError, common.CheckpointError) as e:
        common.die(str(e))
    eval_problems = task.eval_set(cfg.eval_size)
    data_rng = common.data_rng(cfg.seed, "sft", rank)  # its own problem stream per stage and rank

    model = Transformer(mcfg).to(device)
    if init is not None:
        model.load_state_dict(init.state_dict())
        del init
    opt = common.adamw(model.parameters(), cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    note = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        note = common.restore_rng(ckpt["rng"], rank, world, cfg.seed, "sft", start, data_rng)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:  # experts unused by a micro-batch get no gradient, hence find_unused_parameters
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    main_proc = rank == 0
    try:
        run = common.RunFolder(cfg.out_dir, main_proc, start if cfg.resume else None, sft=cfg, model=mcfg)
    except common.RunFolderBusy as e:
        common.die(str(e))
    if main_proc and not cfg.quiet:
        c = param_counts(raw_model)
        print(f"SFT on {task.name} ({device}, world {world}): {c['total']:,} params, "
              f"{c['active_per_token']:,} active per token; steps {start}->{cfg.steps}")
        if note:
            print(f"note: {note}")

    def fail(message):
        run.close()
        common.die(message)

    def checkpoint(step, done):
        rngs = common.gather_objects(common.rng_state(data_rng))  # every rank's streams
        try:
            run.save(step, {"model": raw_model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "rng": rngs, "world_size": world, "config": common.config_dict(cfg),
                            "model_config": common.config_dict(mcfg), "tokenizer": tok.definition(),
                            "kind": "sft", "done": done, **({"rft_data": digest} if rft else {})})
        except common.NonFiniteState as e:
            fail(str(e))

    def evaluate(step):
        """Held-out greedy accuracy on rank 0 (nan elsewhere), logged and printed with a few samples."""
        if not main_proc:
            return float("nan")
        try:
            m = rollout.evaluate(raw_model, tok, task, eval_problems)
        except rollout.NonFiniteLogits as e:
            fail(f"{e} (at step {step}); {run.last_good()}")
        run.log({"step": step, **{f"eval_{k}": v for k, v in m.items()}}, kind="eval")
        if not cfg.quiet and cfg.samples:
            g = torch.Generator(device=device).manual_seed(step)
            probs = eval_problems[:cfg.samples]
            r = rollout.generate(raw_model, [tasks.encode_problem(tok, p, False)[0] for p in probs], eos_id=tok.eos_id,
                                 pad_id=tok.pad_id, max_new_tokens=task.max_lengths()[1] + 2, generator=g)
            for p, c in zip(probs, rollout.decode_completions(tok, r)):
                tqdm.write(f"  step {step} sample: {p.prompt}{c}  ({'correct' if task.reward(c, p) else 'wrong'})")
        return m["greedy_acc"]

    def reached_target(acc):  # rank 0 evaluates; every rank must agree to stop
        return cfg.target_acc > 0 and common.all_reduce_sum({"hit": float(acc >= cfg.target_acc)}, device)["hit"] > 0

    if rft:  # made once by rank 0 at the start and read by every rank; a resumed run checks it is the same file
        data_path = os.path.join(cfg.out_dir, "rft_data.jsonl")
        if start == 0 and main_proc:
            try:
                seqs, solved = make_rft_data(raw_model, tok, task, cfg, device)
            except rollout.NonFiniteLogits as e:
                fail(f"{e} while sampling RFT data from --init")
            common.write_jsonl(data_path, [{"ids": ids, "start": k} for ids, k in seqs])
            if not cfg.quiet:
                print(f"RFT data: {len(seqs)} correct of {cfg.rft_prompts * cfg.rft_samples} samples; "
                      f"{solved} of {cfg.rft_prompts} prompts solved at least once ({data_path})")
        if world > 1:
            torch.distributed.barrier()
        digest = common.file_digest(data_path) if os.path.exists(data_path) else None
        if ckpt is not None and digest != ckpt.get("rft_data"):
            fail(f"{data_path} is missing or is not the data this run trained on (a later run in {cfg.out_dir} "
                 "rewrote it?): start the run again without --resume")
        data = [(d["ids"], d["start"]) for d in common.read_jsonl(data_path)]
        if len(data) < cfg.batch_size:
            fail(f"RFT kept {len(data)} correct samples, fewer than --batch_size {cfg.batch_size}: "
                 "raise --rft_prompts or --rft_samples")
        per_epoch = len(data) // cfg.batch_size  # full batches per pass (epoch_batches drops the rest)
        order = common.epoch_batches(len(data), cfg.batch_size, -(-cfg.steps // per_epoch), cfg.seed, "rft")

    def next_batches(step):
        """This rank's micro-batches of the step: fresh problems, or its share of the RFT data's batch."""
        if not rft:
            return [make_batch(task, tok, data_rng, per_rank, device) for _ in range(cfg.grad_accum)]
        mine = order[step][rank * per_rank * cfg.grad_accum:(rank + 1) * per_rank * cfg.grad_accum]
        return [encode_batch([data[i] for i in mine[j * per_rank:(j + 1) * per_rank]], tok.pad_id, device)
                for j in range(cfg.grad_accum)]

    stop = cfg.steps if cfg.stop_at <= 0 else min(cfg.steps, cfg.stop_at)
    acc, hit = float("nan"), False
    if start == 0:
        acc = evaluate(0)
        hit = reached_target(acc)
        if hit:  # already good enough: the init itself is the result
            checkpoint(0, done=True)
            stop = 0
    elif start >= cfg.steps and main_proc and not cfg.quiet:
        print(f"{ckpt_path} is already at step {start} of {cfg.steps}: nothing to do")
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=not main_proc or cfg.quiet, dynamic_ncols=True)
    timer = common.Timer()
    with common.GracefulStop() as stopper:
        for step in bar:
            lr = common.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            metrics = train_step(model, raw_model, opt, next_batches(step), device, cfg.grad_clip)
            s = step + 1  # optimiser steps taken
            if "tokens" not in metrics:
                fail(f"non-finite loss {metrics['loss']} or grad norm {metrics['grad_norm']} at step {s} "
                     f"(lower --lr?); {run.last_good()}")
            dt = timer.lap()
            run.log({"step": s, "lr": lr, "tokens_per_s": metrics.pop("tokens") / dt, "step_s": dt, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{acc:.2f}", refresh=False)
            if s % cfg.eval_every == 0 or s == cfg.steps:
                acc = evaluate(s)
                hit = reached_target(acc)
                timer.lap()  # evaluation time is not training time
            interrupted = stopper.requested(device)
            if s % cfg.ckpt_every == 0 or s == stop or hit or interrupted:
                checkpoint(s, done=s == cfg.steps or hit)
            if hit:
                if main_proc and not cfg.quiet:
                    tqdm.write(f"held-out accuracy {acc:.3f} reached target_acc {cfg.target_acc} at step {s}: stopping")
                break
            if interrupted:
                stopper.exit(cfg.out_dir, s, resume_hint, close=(bar, run))
    bar.close()
    if main_proc and not cfg.quiet and start < cfg.steps and (hit or stop == cfg.steps):
        print(f"held-out greedy accuracy after {run.saved_step} steps: {acc:.3f}")
    run.close()
    if world > 1:
        torch.distributed.barrier()
    if owns_dist:
        common.cleanup_dist()
    return raw_model, {"greedy_acc": acc}


if __name__ == "__main__":
    main(sys.argv[1:])
