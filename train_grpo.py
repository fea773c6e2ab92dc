"""GRPO (DeepSeekMath, arXiv 2402.03300) on an arithmetic task with exact-answer rewards.

    python train_grpo.py                                    # CPU or one GPU; out/grpo/
    torchrun --standalone --nproc_per_node=2 train_grpo.py  # DDP: a group stays on one rank
    python train_grpo.py --supervision process --task multistep      # process supervision
    python train_grpo.py --loss_type dr_grpo --scale_rewards none    # Dr. GRPO
    python train_grpo.py --loss_type dapo --epsilon_high 0.28 --filter_zero_std   # DAPO's pieces
    python train_grpo.py --gradient_coef rft --beta 0       # online RFT: GC = 1[correct]
    python train_grpo.py --task think --reward accuracy,format:0.1 --eval_samples 16  # R1-Zero
    python train_grpo.py --gradient_coef distill --teacher out/r1 --beta 0  # on-policy distillation

DeepSeekMath's Algorithm 1, as main()'s loop numbers it (python train_grpo.py --help: the flags):
    1     pi <- pi_init       common.load_or_make_init: a policy run, or a warm start (a base)
    3     pi_ref <- pi        a frozen copy; again every --ref_reset_every steps (iterative GRPO)
    5     a batch of prompts  from this rank's own stream (never the warm start's problems)
    6-9   make_experience     G completions each from pi_old (the policy as it is), rewards
                              (--reward: rules, a reward model), group-relative advantages (or
                              log pi_teacher - log pi_old per token), log-probs: pi_old, pi_ref
    10-11 update_policy       num_iterations passes of num_minibatches AdamW steps on eq. 3
                              (losses.grpo_loss); then the router biases, once per step (V3 2.1.2)
Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint and says how to resume.
"""
import copy
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
import losses
import moe
import rollout
import tasks
import train_rm
from model import ModelConfig


@dataclass
class GRPOConfig(common.InitConfig):
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
    loss_type: str = "grpo"  # grpo (per-sequence mean), dapo (token mean), dr_grpo (constant)
    scale_rewards: str = "group"  # advantages divided by the std of: group, batch or none
    reward: str = "accuracy"  # weighed rewards: accuracy, format (rules), model (--reward_model)
    reward_model: str = ""  # a train_rm.py run: --reward's model component, e.g. model,format:0.1
    gradient_coef: str = "grpo"  # grpo (group-relative advantage), rft (1[correct]) or distill
    teacher: str = ""  # distill: GC = log pi_teacher - log pi per token (a policy run, any size)
    unbiased_std: bool = False  # sample std (TRL) instead of the population std
    supervision: str = "outcome"  # outcome or process (per-step rewards: multistep, think)
    filter_zero_std: bool = False  # drop groups whose rewards are all equal (DAPO)
    ref_reset_every: int = 0  # iterative GRPO: pi_ref <- pi every M steps (0 = never)
    temperature: float = 1.0  # sampling temperature of the rollouts
    mla_impl: str = "absorbed"  # MLA decode path of the rollouts: absorbed or naive
    eval_size: int = 256  # held-out problems per evaluation
    pass_k: int = 4  # k of pass@k and maj@k, measured at the start and the end
    pass_n: int = 8  # samples per prompt for pass@k (n >= k)
    eval_samples: int = 0  # samples per prompt at every evaluation: mean@n (R1: 16); 0 = greedy
    samples: int = 3  # sampled completions printed at each evaluation
    collapse_patience: int = 50  # stop after this many steps of reward 0 and gradient 0 (0 = never)

    def __post_init__(self):
        super().__post_init__()  # task, n_digits, init and the warm start; max_new_tokens
        common.check_config(
            self, positive=("steps", "batch_size", "num_generations",
                            "num_iterations", "num_minibatches", "grad_accum", "lr", "epsilon",
                            "temperature", "eval_size", "pass_k"),
            non_negative=("warmup", "weight_decay", "grad_clip", "beta", "epsilon_high",
                          "ref_reset_every", "samples", "collapse_patience", "eval_samples"),
            fractions=("min_lr_ratio",), ordered=(("pass_k", "pass_n"),),
            choices={"loss_type": ("grpo", "dapo", "dr_grpo"), "mla_impl": ("absorbed", "naive"),
                     "scale_rewards": ("group", "batch", "none"), "supervision": ("outcome",
                     "process"), "gradient_coef": ("grpo", "rft", "distill")})
        if (self.gradient_coef == "distill") != bool(self.teacher):
            raise ValueError("--gradient_coef distill needs --teacher, and --teacher is for it")
        if self.num_generations < 2 and self.gradient_coef == "grpo":
            raise ValueError(f"--num_generations must be >= 2: with G={self.num_generations} every "
                             "advantage is r - mean(r) = 0 and GRPO learns nothing")
        if self.gradient_coef != "grpo" and (self.supervision == "process" or self.filter_zero_std):
            raise ValueError(f"--gradient_coef {self.gradient_coef} is not a group's reward: use "
                             "--supervision outcome, without --filter_zero_std")
        if self.supervision == "process" and self.task not in ("multistep", "think"):
            raise ValueError("--supervision process needs a task with steps: multistep or think")
        self.weights = tasks.parse_reward(self.reward)  # {component: weight}
        if ("model" in self.weights) != bool(self.reward_model) or "model" in self.weights and (
                self.gradient_coef != "grpo" or self.supervision == "process"):
            raise ValueError("--reward model needs --reward_model (a train_rm.py run) and GRPO's "
                             "outcome advantages; --reward_model needs model in --reward")
        self.epsilon_high = self.epsilon_high or self.epsilon


# ----------------------------------------------------------------------------------------------
# The algorithm


@torch.no_grad()
def make_experience(policy, policy_ddp, ref, task, tok, problems, cfg, gen, rm=None, teacher=None,
                    compile=False):
    """Alg. 1 lines 6-9: G completions per problem from pi_old (compile: decode compiled), rewards
    (the rules', rm's score), advantages (or the teacher's per-token coefficient), log-probs under
    pi_old and pi_ref (ref: Run.frozen's) on the update's micro-batches (the first ratio is 1)."""
    G, prompts = cfg.num_generations, [tasks.encode_problem(tok, p, False)[0] for p in problems]
    with common.autocast():
        r = rollout.generate(
            policy, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id, num_generations=G,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, generator=gen,
            mla_impl=cfg.mla_impl, compile=compile)
    texts = rollout.decode_completions(tok, r)
    scores = [task.rule_rewards(c, problems[i // G]) for i, c in enumerate(texts)]
    parts = {k: torch.tensor([s[k] for s in scores]) for k in tasks.REWARDS}  # each (N,)
    if rm is not None:  # the learned reward: rm's score at each completion's last token
        parts["model"] = rollout.score_rollout(rm, prompts, r, tok.pad_id).float().cpu()
    rewards = sum(w * parts[k] for k, w in cfg.weights.items())  # R1 2.2.2: a weighted sum
    if cfg.supervision == "process":  # a reward per step (4.1.3)
        adv = process_advantages(task, texts, problems, r, cfg)  # (N, L)
    elif cfg.gradient_coef == "rft":  # online RFT (5.2.1)
        adv = parts["accuracy"]  # (N,) 1 if correct, else 0
    else:  # outcome (4.1.2), all ranks' rewards
        everyone, mine = common.gather_rows(rewards)
        adv = losses.grpo_advantages(everyone, G, cfg.scale_rewards, 1e-4, cfg.unbiased_std)[mine]
    mask = r.completion_mask.clone()  # (N, L)
    if cfg.filter_zero_std:  # DAPO: drop groups of equal rewards
        mask[(adv.view(len(problems), -1) == 0).all(1).repeat_interleave(G)] = 0.0
    exp = rollout.Experience(r, rewards, adv.to(mask.device), mask,
                             batches=micro_batches(mask, cfg), texts=texts, parts=parts)
    policy.eval()  # no router loads counted
    with common.autocast(), moe.RouteRecorder(policy) as exp.routes:  # pi_old's experts
        if teacher is not None or cfg.num_iterations * cfg.num_minibatches > 1:  # else in update
            exp.old_logp = rollout.batched_logprobs(policy_ddp, exp, cfg.temperature)
        if cfg.beta > 0:
            exp.ref_logp = rollout.batched_logprobs(ref, exp, cfg.temperature)
        if teacher is not None:  # on-policy distillation (GKD): log pi_teacher - log pi_old (N, L)
            t_logp = rollout.batched_logprobs(teacher.forward_shared_prefix, exp, cfg.temperature)
            exp.advantages = (t_logp - exp.old_logp) * mask  # on the student's own samples
            exp.parts["teacher"] = exp.advantages.sum(1).cpu()  # log pi_T(o) - log pi(o): -KL
    policy.train()
    return exp


def micro_batches(mask, cfg):
    """Each optimiser step's rows (strided: groups mix), in grad_accum micro-batches."""
    rows = torch.arange(mask.size(0), device=mask.device)
    return [rows[i::cfg.num_minibatches].chunk(cfg.grad_accum) for i in range(cfg.num_minibatches)]


def update_policy(policy_ddp, opt, exp, cfg):
    """Alg. 1 lines 10-11: mu passes, an AdamW step a minibatch on eq. 3. Every micro-batch divides
    by its minibatch's denominator over all ranks: accumulation and DDP equal one batch."""
    stats = []
    for _ in range(cfg.num_iterations):  # mu
        for minibatch in exp.batches:
            mask = exp.mask[torch.cat(minibatch)]
            denom = losses.grpo_aggregation(mask, cfg.loss_type, cfg.max_new_tokens)[1]
            denom = common.all_reduce_sum(denom)
            if denom == 0:  # all rows filtered out
                continue
            for j, rows in enumerate(minibatch):
                with common.micro_batch(policy_ddp, last=j == len(minibatch) - 1) as world:
                    logp, logits = rollout.completion_logprobs(
                        policy_ddp, exp.rollout, rows, cfg.temperature)
                    old = logp.detach() if exp.old_logp is None else exp.old_logp[rows]
                    ref = logp.detach() if exp.ref_logp is None else exp.ref_logp[rows]
                    loss, m = losses.grpo_loss(
                        logp, old, ref, exp.advantages[rows], exp.mask[rows], cfg.epsilon,
                        cfg.epsilon_high, cfg.beta, cfg.loss_type, denom, logits)
                    (loss * world).backward()  # DDP averages over ranks
                gap = (old - exp.rollout.logprobs[rows]).abs() * exp.mask[rows]
                stats.append({**m, "loss": loss.item() * len(minibatch), "gap": gap.max().item()})
            stats.append({"grad_norm": common.optimizer_step(opt, cfg.grad_clip)})
    return stats


def process_advantages(task, texts, problems, r, cfg):
    """Process supervision's advantages (N, L): each step's reward, normalised over its group."""
    G, L, last = cfg.num_generations, r.completion_ids.size(1), r.completion_mask.sum(1) - 1
    steps, ends = zip(*(task.step_rewards(c, problems[i // G], int(last[i]))
                        for i, c in enumerate(texts)))  # last: the end token, or the last written
    return losses.process_advantages(steps, ends, G, L, unbiased_std=cfg.unbiased_std)


# ----------------------------------------------------------------------------------------------
# Plumbing: what is logged and printed (tests/test_runs.py guards it)


def grpo_metrics(exp, stats, routes, task, cfg):
    """The step's figures over every rank: rewards (and each component), zero-variance groups,
    lengths (of the correct and the wrong), truncation, the thinking rate and the accuracy with and
    without, the update's mean statistics, routing flips, the largest log-prob gap."""
    r, n, G = exp.rollout, len(exp.rewards), cfg.num_generations
    by_group = (exp.advantages if cfg.supervision == "process" else exp.rewards).reshape(n // G, -1)
    mean = lambda k: sum(s[k] for s in stats if k in s) / max(1, sum(k in s for s in stats))  # noqa
    rows = {"reward_mean": exp.rewards.sum().item(), "reward_sq": (exp.rewards ** 2).sum().item(),
            "zero_std_frac": G * (by_group.amax(1) == by_group.amin(1)).sum().item(),
            "completion_len": r.completion_mask.sum().item(),
            "truncated_frac": (~r.ended).sum().item(),
            **{k: n * mean(k) for k in ("kl", "clip_low", "clip_high", "ratio", "entropy",
                                         "grad_norm")},  # a rank's mean weighted by its rows
            "routing_flips": n * routes.flipped_fraction(exp.routes),
            **{f"reward_{k}": exp.parts[k].sum().item() for k in exp.parts}}  # weighed or not
    total = common.all_reduce_sum({**rows, "n": n, "loss": mean("loss")}, exp.mask.device)
    out = {k: total[k] / total["n"] for k in rows}
    out["reward_std"] = max(0.0, out.pop("reward_sq") - out["reward_mean"] ** 2) ** 0.5
    everyone = [sum(x, []) for x in zip(*common.gather_objects(  # lengths, thinking: all ranks'
        (exp.texts, exp.parts["accuracy"].tolist(), r.completion_mask.sum(1).tolist())))]
    out.update(rollout.completion_figures(task, *everyone))
    gap = torch.tensor([max([s["gap"] for s in stats if "gap" in s], default=0.0)])
    return {**out, "n": total["n"], "loss": total["loss"],  # each rank's loss is its share
            "updates": sum("grad_norm" in s for s in stats),
            "logprob_gap": common.gather_rows(gap.to(exp.mask.device))[0].max().item()}


def print_samples(problems, exp, cfg):
    """A few sampled completions of the step, each with its reward."""
    for p, i in zip(problems[:cfg.samples], range(0, len(exp.texts), cfg.num_generations)):
        tqdm.write(f"  sample: {p.prompt}{exp.texts[i]}  reward {exp.rewards[i]:.3g}")


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    cfg, mcfg, run_cfg = common.parse_config([GRPOConfig, ModelConfig], argv, __doc__,
                                             out_dir="out/grpo", eval_every=25, ckpt_every=50)
    with common.Run("grpo", cfg, mcfg, run_cfg) as run:  # torchrun, seeds, one-line errors
        tok, task = tasks.get(cfg.task, cfg.n_digits)
        # ---- plumbing: the checks before anything is written, the held-out evaluation
        rows = cfg.batch_size // run.world * cfg.num_generations  # completions per rank and step
        run.require(cfg.batch_size % run.world == 0, f"--batch_size {cfg.batch_size} prompts do "
                    f"not divide over {run.world} ranks (a group must stay on one rank)")
        run.require(rows % (cfg.num_minibatches * cfg.grad_accum) == 0, f"{rows} completions per "
                    f"rank do not split into --num_minibatches {cfg.num_minibatches} x "
                    f"--grad_accum {cfg.grad_accum}")
        held_out, collapsed = task.eval_set(cfg.eval_size), common.CollapseCheck(
            cfg.collapse_patience, "GRPO")

        def evaluate(step, k=0):  # on rank 0: greedy accuracy, mean@n, pass@k and maj@k
            gen_eval = torch.Generator(device=run.device).manual_seed(step)
            return run.eval(step, rollout.evaluate(
                policy, tok, task, held_out, k=k, n_samples=cfg.pass_n, mean_of=cfg.eval_samples,
                generator=gen_eval, temperature=cfg.temperature, mla_impl=cfg.mla_impl)
                if run.main else {})

        rm = (train_rm.load_reward_model(cfg.reward_model, task, run.device, cfg.max_new_tokens)
              if cfg.reward_model else None)  # the learned reward (--reward model), frozen
        # Alg. 1 line 1: the SFT init (made if missing), or --resume's checkpoint
        policy = run.resumed() if run_cfg.resume else common.load_or_make_init(cfg, run)
        teacher = common.load_teacher(cfg, run, task) if cfg.teacher else None  # frozen, tied
        if cfg.reward_model:  # tied to the checkpoints: a resume with another one is refused
            run.input(cfg.reward_model, "--reward_model")
        common.check_lengths(task, policy.cfg.max_seq_len, cfg.max_new_tokens)
        ref = copy.deepcopy(policy).eval().requires_grad_(False)  # line 3: pi_ref, frozen
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                weight_decay=cfg.weight_decay, fused=True)  # fused: one pass
        data, gen = run.streams()  # this rank's problems and sampling generator, GRPO's own
        run.begin(model=policy, ref=ref, optimizer=opt, streams=(data, gen))  # + --resume
        policy_ddp, ref_forward = run.wrap(policy, shared_prefix=True), run.frozen(ref)  # compile
        if run.start == 0:
            evaluate(0, k=cfg.pass_k)  # the init's figures
        for step in run.steps(cfg.steps):
            # ---- the algorithm
            lr = common.lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            opt.param_groups[0]["lr"] = lr
            if cfg.ref_reset_every and step and step % cfg.ref_reset_every == 0:
                ref.load_state_dict(policy.state_dict())  # line 3: iterative GRPO
            problems = [task.sample(data) for _ in range(cfg.batch_size // run.world)]  # line 5
            exp = make_experience(policy, policy_ddp, ref_forward, task, tok, problems, cfg, gen,
                                  rm, teacher, run_cfg.compile)  # 6-9
            with moe.RouteRecorder(policy) as routes:  # for the routing flips
                stats = update_policy(policy_ddp, opt, exp, cfg)  # lines 10-11
            balance = policy.update_router_biases()  # V3 2.1.2, once a rollout

            # ---- plumbing: logging, evaluation, checkpoints (tests/test_runs.py guards it)
            metrics = grpo_metrics(exp, stats, routes, task, cfg)
            speed = metrics.pop("n") / run.elapsed()  # completions sampled per second, all ranks
            run.log({"step": step + 1, "lr": lr, **metrics, **balance, "samples_per_s": speed},
                    show=("reward_mean", "zero_std_frac"))
            collapsed(step + 1, metrics)
            if run.due(step + 1, run_cfg.eval_every):
                evaluate(step + 1, k=cfg.pass_k if step + 1 == cfg.steps else 0)
                if run.main and not run_cfg.quiet:
                    print_samples(problems, exp, cfg)
            run.end_step(step + 1)  # a checkpoint when due; Ctrl-C stops here, resumable
    return policy, run.first_eval or {}, run.last_eval or {}


if __name__ == "__main__":
    main(sys.argv[1:])
