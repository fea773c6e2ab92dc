"""GRPO (DeepSeekMath, arXiv 2402.03300) on an arithmetic task with exact-answer rewards.

    python train_grpo.py                                    # CPU or one GPU; out/grpo/
    torchrun --standalone --nproc_per_node=2 train_grpo.py  # DDP: prompts sharded, groups stay on one rank
    python train_grpo.py --supervision process --task multistep      # process supervision
    python train_grpo.py --loss_type dr_grpo --scale_rewards none    # Dr. GRPO
    python train_grpo.py --loss_type dapo --epsilon_high 0.28 --filter_zero_std   # DAPO's pieces
    python train_grpo.py --gradient_coef rft --beta 0       # online RFT: GC = 1[correct]
    python train_grpo.py --help

One step (DeepSeekMath Algorithm 1): sample B prompts, generate G completions each with the current
policy (pi_old), score them with the task's exact-answer reward, turn rewards into group-relative
advantages, get log-probs under pi_old and the frozen reference pi_ref, then run `num_iterations`
passes of minibatch updates on the clipped objective (losses.grpo_loss). `ref_reset_every` M > 0
sets pi_ref <- pi every M steps (iterative GRPO). Without an SFT checkpoint at --init, a short SFT
warm start (train_sft.py) makes one first. GRPO draws its prompts from its own stream, never the
warm start's. Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint and says how to resume.
"""
import copy
import os
import sys
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import losses
import moe
import rollout
import tasks
import train_sft
from model import ModelConfig, Transformer


@dataclass
class GRPOConfig:
    task: str = "add"  # add, sub, mul or multistep (process supervision needs multistep)
    n_digits: int = 0  # digits per operand; 0 = the task's default (add, sub 3; mul, multistep 2)
    init: str = ""  # SFT run folder (or .pt file) to start from; "" = out/sft for add, out/sft_<task> otherwise; a missing folder gets a warm start
    warmstart_steps: int = 1500  # steps of the SFT warm start made when --init does not exist
    warmstart_target_acc: float = 0.8  # the warm start stops once held-out accuracy reaches this
    steps: int = 300  # GRPO steps (one rollout batch each)
    batch_size: int = 64  # prompts per step, over all ranks
    num_generations: int = 8  # G: completions per prompt (a group)
    num_iterations: int = 1  # mu: passes over each rollout batch
    num_minibatches: int = 1  # optimiser steps per pass (the rollout batch split in this many)
    grad_accum: int = 1  # micro-batches per optimiser step (per rank)
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step
    warmup: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    beta: float = 0.04  # KL coefficient (k3 estimator in the loss)
    epsilon: float = 0.2  # clip range: ratio in [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float = 0.0  # upper clip (DAPO clip-higher, e.g. 0.28); 0 = epsilon
    loss_type: str = "grpo"  # grpo (per-sequence mean), dapo (token mean), dr_grpo (constant divisor)
    scale_rewards: str = "group"  # group, batch or none (Dr. GRPO)
    gradient_coef: str = "grpo"  # grpo (group-relative advantage) or rft (online RFT: 1 for a correct completion, else 0; use with --beta 0)
    unbiased_std: bool = False  # sample std (TRL) instead of the population std
    supervision: str = "outcome"  # outcome or process (per-step rewards, multistep task)
    filter_zero_std: bool = False  # drop groups whose rewards are all equal (DAPO dynamic sampling)
    ref_reset_every: int = 0  # iterative GRPO: pi_ref <- pi every M steps (0 = never)
    temperature: float = 1.0  # sampling temperature of the rollouts
    max_new_tokens: int = 0  # completion length limit (0 = the task's longest answer + 2)
    mla_impl: str = "absorbed"  # MLA decode path of the rollouts: absorbed or naive
    eval_every: int = 25  # steps between held-out greedy evaluations
    eval_size: int = 256  # held-out problems per evaluation
    pass_k: int = 4  # k of pass@k and maj@k, measured at the start and the end
    pass_n: int = 8  # samples per prompt for pass@k (n >= k)
    samples: int = 3  # sampled completions printed at each evaluation
    ckpt_every: int = 50  # steps between checkpoints (and at the end)
    collapse_patience: int = 50  # stop with an error after this many steps in a row of zero reward and zero gradient (0 = never)
    seed: int = 0  # seed of the problem and sampling streams (one per stage and rank)
    out_dir: str = "out/grpo"  # run folder: ckpt.pt, metrics.jsonl, config.json
    resume: bool = False  # continue from out_dir/ckpt.pt
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0 = run to the end
    compile: bool = False  # torch.compile the policy
    quiet: bool = False  # no progress bar or printed samples

    def __post_init__(self):
        common.check_config(
            self, positive=("warmstart_steps", "steps", "batch_size", "num_generations", "num_iterations",
                            "num_minibatches", "grad_accum", "lr", "epsilon", "temperature", "eval_every", "eval_size",
                            "pass_k", "ckpt_every"),
            non_negative=("warmup", "weight_decay", "grad_clip", "beta", "epsilon_high", "ref_reset_every",
                          "max_new_tokens", "samples", "stop_at", "collapse_patience"),
            fractions=("warmstart_target_acc", "min_lr_ratio"),
            choices={"task": tuple(tasks.TASKS), "loss_type": ("grpo", "dapo", "dr_grpo"),
                     "scale_rewards": ("group", "batch", "none"), "supervision": ("outcome", "process"),
                     "gradient_coef": ("grpo", "rft"),
                     "mla_impl": ("absorbed", "naive")})
        if self.num_generations < 2 and self.gradient_coef == "grpo":
            raise ValueError(f"--num_generations must be >= 2: with G={self.num_generations} every advantage "
                             "is r - mean(r) = 0 and GRPO learns nothing")
        if self.gradient_coef == "rft" and (self.supervision == "process" or self.filter_zero_std):
            raise ValueError("--gradient_coef rft keeps every correct completion, each whole: use --supervision "
                             "outcome, without --filter_zero_std (it would drop the groups that are all correct)")
        if self.supervision == "process" and self.task != "multistep":
            raise ValueError("--supervision process needs per-step rewards: use --task multistep")
        if self.pass_n < self.pass_k:
            raise ValueError(f"pass@k needs --pass_n >= --pass_k, got {self.pass_n} < {self.pass_k}")
        task = tasks.get_task(self.task, self.n_digits)
        self.n_digits = task.n_digits  # 0 -> the task's default
        self.max_new_tokens = self.max_new_tokens or task.max_lengths()[1] + 2  # room for the end token and one more


# ----------------------------------------------------------------------------------------------
# Rollouts and advantages


@torch.no_grad()
def make_rollouts(policy, task, tok, problems, cfg, generator, device):
    """Generate G completions per problem with pi_old and score them. Returns the Experience (rollout,
    rewards (N,), advantages ((N,) outcome or (N, L) process), loss mask (N, L) with DAPO-filtered
    groups zeroed), the zero-variance flag of each group (N/G,) and the completion texts."""
    prompts = [tasks.encode_problem(tok, p, with_completion=False)[0] for p in problems]
    with common.autocast(device):  # sample in the precision the trainer scores in (bf16 on CUDA)
        r = rollout.generate(policy, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id, num_generations=cfg.num_generations,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=generator,
                             mla_impl=cfg.mla_impl)
    G, texts = cfg.num_generations, rollout.decode_completions(tok, r)
    N, L = r.completion_ids.shape
    group_of = [problems[i // G] for i in range(N)]
    rewards = torch.tensor([task.reward(c, p) for c, p in zip(texts, group_of)])  # (N,)
    if cfg.supervision == "outcome":
        zero_std = rewards.view(-1, G).amax(1) == rewards.view(-1, G).amin(1)  # (N/G,)
        if cfg.gradient_coef == "rft":  # online RFT (DeepSeekMath 5.2.1): GC = 1[correct], no baseline, no scaling
            adv = (rewards == 1).float()
        else:  # under DDP every rank gathers all rewards, so "batch" scaling sees the whole batch's std
            everything = common.all_gather_cat(rewards.to(device)).cpu()  # nccl needs CUDA tensors
            adv = losses.grpo_advantages(everything, G, cfg.scale_rewards, unbiased_std=cfg.unbiased_std)
            adv = adv[common.rank() * N:(common.rank() + 1) * N]
    else:
        steps, ends = step_rewards(task, texts, group_of, r.ended.tolist(), L)
        adv = losses.process_advantages(steps, ends, G, L, unbiased_std=cfg.unbiased_std)
        zero_std = adv.view(-1, G, L).abs().amax(dim=(1, 2)) == 0  # exactly what process_advantages zeroes
    keep = (~zero_std).repeat_interleave(G) if cfg.filter_zero_std else torch.ones(N, dtype=torch.bool)
    mask = r.completion_mask * keep[:, None].to(device).float()  # filtered groups weigh nothing
    return rollout.Experience(r, rewards, adv.to(device), mask), zero_std, texts


def step_rewards(task, texts, problems, ended, L):
    """Per-step rewards (1 correct / 0 wrong) and the token index where each step ends. Steps a
    completion never wrote count as wrong steps ending at its last token (the end token, or the
    last one written if truncated), so that stopping early is no way to dodge a negative reward."""
    steps, ends = [], []
    for c, p, done in zip(texts, problems, ended):
        ok = [float(x) for x in task.step_correctness(c, p)]
        missing = max(0, len(task.reference_steps([int(t) for t in p.prompt[:-1].split("+")])) - len(ok))
        last = min(len(c) if done else len(c) - 1, L - 1)
        steps.append(ok + [0.0] * missing)
        ends.append(task.step_ends(c) + [last] * missing)
    return steps, ends


def micro_batches(N, cfg):
    """Rows of each optimiser step (minibatch), each split into grad_accum micro-batches. Strided
    minibatches mix groups; the micro-batches are what every forward (old, ref, update) runs on."""
    return [torch.arange(i, N, cfg.num_minibatches).chunk(cfg.grad_accum) for i in range(cfg.num_minibatches)]


def one_update(cfg):
    """One optimiser step per rollout: the update's own forward, detached, is then pi_old."""
    return cfg.num_iterations == 1 and cfg.num_minibatches == 1


@torch.no_grad()
def score_old_and_ref(model, policy, ref, exp, batches, cfg, device):
    """Fill exp.ref_logp (pi_ref; not needed when beta = 0) and, when the rollout gets several
    updates, exp.old_logp (pi_old: the policy before them) and exp.routes (the experts it routed
    each micro-batch to, PITFALLS 12), from the same micro-batches the update will run, so that the
    first ratio is exactly 1. With one update per rollout the update's own forward, detached, is
    pi_old (as TRL does): exp.old_logp stays None and no forward is spent on it."""
    r = exp.rollout
    need_old = not one_update(cfg)
    exp.old_logp = torch.zeros_like(exp.mask) if need_old else None
    exp.ref_logp = torch.zeros_like(exp.mask) if cfg.beta > 0 else None
    exp.routes = {} if need_old else None
    policy.eval()  # same numbers as train mode, but these forwards must not count router loads
    with common.autocast(device):
        for i, micro in enumerate(batches):
            for j, rows in enumerate(micro):
                if need_old:
                    exp.old_logp[rows] = rollout.completion_logprobs(model, r, rows, device, cfg.temperature)[0]
                    exp.routes[i, j] = policy.routed_experts()
                if cfg.beta > 0:
                    exp.ref_logp[rows] = rollout.completion_logprobs(ref, r, rows, device, cfg.temperature)[0]
    policy.train()


def update_policy(model, policy, opt, exp, batches, cfg, device):
    """`num_iterations` passes over the rollout batch, one optimiser step per minibatch, each
    accumulated over its micro-batches (`batches`, from micro_batches). Every micro-batch divides by
    its whole minibatch's normaliser over all ranks, so accumulation and DDP give the big batch's
    gradient (PITFALLS 3). Without exp.old_logp (one update per rollout) pi_old is the update's
    forward, detached, and the largest gap between it and the sampler's log-probs is measured there
    (PITFALLS 8). Returns (mean stats over the updates, number of updates), or (None, n) on a
    non-finite gradient."""
    world, mask = common.world_size(), exp.mask
    stats = dict.fromkeys(("loss", "kl", "clip_low", "clip_high", "ratio", "entropy", "grad_norm", "routing_flips"), 0.0)
    stats["logprob_gap"] = 0.0
    n_updates, n_flips = 0, 0
    for _ in range(cfg.num_iterations):
        for i, micro in enumerate(batches):
            rows = torch.cat(micro)
            # the divisor of the whole minibatch over all ranks: sequences, tokens, or sequences x length limit
            kept = float(mask[rows].any(1).sum())  # a filtered row has an all-zero mask
            denom = {"grpo": kept, "dapo": mask[rows].sum().item(), "dr_grpo": kept * cfg.max_new_tokens}[cfg.loss_type]
            denom = common.all_reduce_sum({"d": denom}, device)["d"]
            if denom == 0:  # every group filtered everywhere: nothing to learn from this minibatch
                continue
            for j, mrows in enumerate(micro):
                with common.no_sync_unless_last(model, j == len(micro) - 1), common.autocast(device):
                    logp, logits = rollout.completion_logprobs(model, exp.rollout, mrows, device, cfg.temperature)
                    old = logp.detach() if exp.old_logp is None else exp.old_logp[mrows]
                    ref_logp = logp.detach() if exp.ref_logp is None else exp.ref_logp[mrows]  # beta = 0: no KL
                    loss, m = losses.grpo_loss(logp, old, ref_logp, exp.advantages[mrows], mask[mrows], cfg.epsilon,
                                               cfg.epsilon_high or None, cfg.beta, cfg.loss_type, logits=logits.detach(),
                                               max_completion_len=cfg.max_new_tokens, normalizer=denom)
                    (loss * world).backward()  # DDP averages over ranks; denom is already global
                if exp.old_logp is None:  # sampler vs trainer, on the update's own forward (PITFALLS 8)
                    sampled = exp.rollout.logprobs[mrows].to(device)
                    stats["logprob_gap"] = max(stats["logprob_gap"], ((old - sampled).abs() * mask[mrows]).max().item())
                stats["loss"] += loss.item()
                for key in ("kl", "clip_low", "clip_high", "ratio", "entropy"):
                    stats[key] += m[key] / len(micro)
                if exp.routes is not None and (i, j) in exp.routes:
                    valid = exp.rollout.completion_mask[mrows, :-1].bool().to(device)  # (n, L-1) the completion tokens run
                    stats["routing_flips"] += moe.flipped_fraction(exp.routes[i, j], policy.routed_experts(), valid)
                    n_flips += 1
            grad_norm = common.optimizer_step(policy.parameters(), opt, cfg.grad_clip)
            if grad_norm is None:
                return None, n_updates
            stats["grad_norm"] += grad_norm
            n_updates += 1
    out = {k: v / max(n_updates, 1) for k, v in stats.items()}  # micro-batch losses already sum to their minibatch's
    out["routing_flips"] = stats["routing_flips"] / max(n_flips, 1)
    out["logprob_gap"] = stats["logprob_gap"]
    return out, n_updates


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    (cfg, mcfg), given = common.parse_config([GRPOConfig, ModelConfig], argv, __doc__)
    owns_dist = not common.is_dist()  # a caller may have set it up already
    rank, world, device = common.setup_dist()
    common.setup_torch(cfg.seed, device)
    tok, task = tasks.Tokenizer(), tasks.get_task(cfg.task, cfg.n_digits)
    model_flags = given & set(ModelConfig.__dataclass_fields__)
    ckpt_path, start, ckpt = os.path.join(cfg.out_dir, "ckpt.pt"), 0, None
    try:  # every check before anything is written (the warm start writes only to its own folder)
        if cfg.batch_size % world:
            raise ValueError(f"--batch_size {cfg.batch_size} prompts do not divide over {world} ranks "
                             "(a group must stay on one rank)")
        rows = cfg.batch_size // world * cfg.num_generations  # completions per rank per step
        if rows % (cfg.num_minibatches * cfg.grad_accum):
            raise ValueError(f"{rows} completions per rank do not split into --num_minibatches "
                             f"{cfg.num_minibatches} x --grad_accum {cfg.grad_accum}")
        common.check_lengths(task, mcfg.max_seq_len, cfg.max_new_tokens)
        common.check_out_dir(cfg.out_dir)
        if cfg.resume:  # the run's own checkpoint holds everything, the model config included
            ckpt, mcfg = common.load_for_resume(ckpt_path, "grpo", tok, cfg, mcfg, model_flags, common.INIT_FIELDS)
            policy, start = Transformer(mcfg).to(device), ckpt["step"]
        else:
            policy, mcfg = train_sft.load_or_make_init(cfg, tok, model_flags, mcfg, device)
        common.check_lengths(task, mcfg.max_seq_len, cfg.max_new_tokens)  # the checkpoint's model decides
    except (ValueError, common.CheckpointError) as e:
        common.die(str(e))
    eval_problems = task.eval_set(cfg.eval_size)
    data_rng = common.data_rng(cfg.seed, "grpo", rank)  # GRPO's own prompts, never the warm start's
    gen = torch.Generator(device=device).manual_seed(common.stream_seed(cfg.seed, "grpo", rank, "sampling"))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_ref: the frozen init
    opt = common.adamw(policy.parameters(), cfg.lr, weight_decay=cfg.weight_decay)
    note = None
    if ckpt is not None:
        policy.load_state_dict(ckpt["model"])
        ref.load_state_dict(ckpt["ref"])
        opt.load_state_dict(ckpt["optimizer"])
        note = common.restore_rng(ckpt["rng"], rank, world, cfg.seed, "grpo", start, data_rng, gen)
    model = torch.compile(policy) if cfg.compile else policy
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    main_proc = rank == 0
    try:
        run = common.RunFolder(cfg.out_dir, main_proc, start if cfg.resume else None, grpo=cfg, model=mcfg)
    except common.RunFolderBusy as e:
        common.die(str(e))
    params, held_line = common.networks_held({"policy": policy, "reference": ref})  # set beside PPO's four
    if main_proc and not cfg.quiet:
        print(held_line + (f"\nnote: {note}" if note else ""))

    def fail(message):
        run.close()
        common.die(message)

    def evaluate(step, k=0):
        if not main_proc:
            return {}
        try:
            m = rollout.evaluate(policy, tok, task, eval_problems, k=k, n_samples=cfg.pass_n, temperature=cfg.temperature,
                                 generator=torch.Generator(device=device).manual_seed(step), mla_impl=cfg.mla_impl)
        except rollout.NonFiniteLogits as e:
            fail(f"{e} (at step {step}); {run.last_good()}")
        run.log({"step": step, **{f"eval_{key}": v for key, v in m.items()}}, kind="eval")
        if not cfg.quiet:
            tqdm.write(f"step {step}: " + ", ".join(f"{key} {v:.3f}" for key, v in m.items()))
        return m

    def checkpoint(step):
        states = common.gather_objects(common.rng_state(data_rng, gen))
        try:
            run.save(step, {"model": policy.state_dict(), "ref": ref.state_dict(), "optimizer": opt.state_dict(),
                            "step": step, "rng": states, "world_size": world, "config": common.config_dict(cfg),
                            "model_config": common.config_dict(mcfg), "tokenizer": tok.definition(), "kind": "grpo"})
        except common.NonFiniteState as e:
            fail(str(e))

    first = evaluate(0, k=cfg.pass_k) if start == 0 else {}
    stop = cfg.steps if cfg.stop_at <= 0 else min(cfg.steps, cfg.stop_at)
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=not main_proc or cfg.quiet, dynamic_ncols=True)
    timer, acc, last, dead = common.Timer(), first.get("greedy_acc", float("nan")), {}, 0
    with common.GracefulStop() as stopper:
        for step in bar:
            if cfg.ref_reset_every > 0 and step > 0 and step % cfg.ref_reset_every == 0:
                ref.load_state_dict(policy.state_dict())  # iterative GRPO: the reference follows the policy
            lr = common.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr

            # ---- rollouts with pi_old, rewards, advantages, then log-probs under pi_old and pi_ref
            problems = [task.sample(data_rng) for _ in range(cfg.batch_size // world)]
            try:
                exp, zero_std, texts = make_rollouts(policy, task, tok, problems, cfg, gen, device)
            except rollout.NonFiniteLogits as e:
                fail(f"{e} (at step {step + 1}; lower --lr?); {run.last_good()}")
            r, N = exp.rollout, exp.mask.size(0)
            batches = micro_batches(N, cfg)
            score_old_and_ref(model, policy, ref, exp, batches, cfg, device)

            # ---- num_iterations passes of minibatch updates, then one router-bias update for the step
            stats, n_updates = update_policy(model, policy, opt, exp, batches, cfg, device)
            if stats is None or stats["loss"] != stats["loss"]:
                fail(f"non-finite loss or gradient at step {step + 1} (lower --lr?); {run.last_good()}")
            if exp.old_logp is not None:  # sampler vs trainer (PITFALLS 8)
                stats["logprob_gap"] = ((exp.old_logp - r.logprobs.to(device)).abs() * exp.mask).max().item()
            stats.update(policy.update_router_biases())  # once per rollout: routing stays put across its updates
            dt = timer.lap()
            rewards = exp.rewards
            local = {"reward_sum": rewards.sum().item(), "reward_sq": (rewards ** 2).sum().item(), "n": float(N),
                     "zero_std": zero_std.float().sum().item(), "groups": float(zero_std.numel()),
                     "length": r.completion_mask.sum().item(), "truncated": (~r.ended).float().sum().item(), **stats}
            tot = common.all_reduce_sum(local, device)
            mean_r = tot["reward_sum"] / tot["n"]
            s = step + 1
            run.log({"step": s, **(params if s == 1 else {}), **common.peak_memory(device), "reward_mean": mean_r, "reward_std": max(0.0, tot["reward_sq"] / tot["n"] - mean_r ** 2) ** 0.5,
                     "zero_std_frac": tot["zero_std"] / tot["groups"], "completion_len": tot["length"] / tot["n"],
                     "truncated_frac": tot["truncated"] / tot["n"], "samples_per_s": tot["n"] / dt,
                     "logprob_gap": common.all_reduce_max(stats.pop("logprob_gap"), device), "updates": n_updates, "lr": lr,
                     "loss": tot["loss"],  # each rank's loss is its share of the global total
                     **{k: tot[k] / world for k in ("kl", "clip_low", "clip_high", "ratio", "entropy", "grad_norm",
                                                    "routing_flips", "maxvio_mean", "maxvio_max")}})
            bar.set_postfix(reward=f"{mean_r:.3f}", acc=f"{acc:.3f}", zero_std=f"{tot['zero_std'] / tot['groups']:.2f}",
                            refresh=False)
            # A policy that gets no reward and no gradient can never change again: say so, do not run on.
            dead = dead + 1 if tot["reward_sum"] == 0 and tot["grad_norm"] == 0 else 0
            if cfg.collapse_patience and dead >= cfg.collapse_patience:
                since = s - dead + 1
                saved = run.last_good() if (run.saved_step or 0) < since else \
                    f"checkpoints from step {since} on ({run.ckpt_path}) hold the collapsed policy"
                fail(f"GRPO collapsed: every completion got reward 0 and the gradient was exactly 0 for the last "
                     f"{dead} steps (since step {since}), so the policy can no longer change (too large an --lr?); {saved}")
            if s % cfg.eval_every == 0 or s == cfg.steps:
                last = evaluate(s, k=cfg.pass_k if s == cfg.steps else 0)
                acc = last.get("greedy_acc", acc)
                if main_proc and not cfg.quiet and cfg.samples:
                    for i in range(0, min(cfg.samples * cfg.num_generations, N), cfg.num_generations):
                        tqdm.write(f"  sample: {problems[i // cfg.num_generations].prompt}{texts[i]}  reward {rewards[i]:.0f}")
                timer.lap()  # evaluation time is not training time
            interrupted = stopper.requested(device)
            if s % cfg.ckpt_every == 0 or s == stop or interrupted:
                checkpoint(s)
            if interrupted:
                stopper.exit(cfg.out_dir, s, close=(bar, run))
    bar.close()
    common.finish_run(run, first, last, "GRPO", main_proc and not cfg.quiet and stop == cfg.steps, owns_dist)
    return policy, first, last


if __name__ == "__main__":
    main(sys.argv[1:])
