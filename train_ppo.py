"""PPO for language models (InstructGPT arXiv 2203.02155; Ziegler et al. arXiv 1909.08593): a
policy, a frozen reference, a reward (the task's exact-answer rule, or train_rm.py's reward model)
and a critic, on an arithmetic task.

    python train_ppo.py                                     # rule reward; out/ppo/
    python train_ppo.py --reward model --reward_model out/rm   # the learned reward (RLHF)
    python train_ppo.py --adaptive_kl --kl_target 0.5       # Ziegler et al.'s adaptive KL
    torchrun --standalone --nproc_per_node=2 train_ppo.py   # DDP: prompts sharded over ranks

One step: a completion for each of `batch_size` prompts from the policy (pi_old), scored; per-token
rewards -kl_coef * (log pi_old - log pi_ref) on every token, the score on the last
(losses.token_rewards); the critic's V_old at every completion position; GAE advantages and returns
(losses.gae), whitened over the batch; then `ppo_epochs` passes of shuffled minibatches, each an
update of the policy (clipped surrogate, entropy bonus) and of the critic (clipped value loss). A
completion cut at max_new_tokens gets --truncation penalty (its score) or mask (no loss). The
policy and the reference start from the SFT init (--init), the critic from the same weights with a
zero value head (or from the reward model: --critic_init rm).
"""
import copy
import sys
from dataclasses import dataclass

import torch

import common
import losses
import rollout
import tasks
import train_rm
import train_sft
from model import ModelConfig, ScalarModel


@dataclass
class PPOConfig(common.InitConfig):
    reward: str = "rule"  # rule (the task's exact-answer reward) or model (--reward_model's score)
    reward_model: str = ""  # a train_rm.py run, for --reward model or --critic_init rm
    critic_init: str = "sft"  # sft (the init's weights, a zero value head) or rm (the RM's weights)
    truncation: str = "penalty"  # a completion with no end token: penalty (its score) or mask
    truncation_penalty: float = -1.0  # the score of a truncated completion under penalty
    steps: int = 100  # PPO steps (one rollout batch each)
    batch_size: int = 512  # prompts per step (one completion each), over all ranks: GRPO's 64 x 8
    ppo_epochs: int = 2  # passes over each rollout batch
    num_minibatches: int = 4  # optimiser steps per pass
    grad_accum: int = 1  # micro-batches per optimiser step (per rank)
    lr: float = 1e-4  # the policy's peak learning rate
    critic_lr: float = 5e-4  # the critic's peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step
    warmup: int = 10  # linear warmup steps
    grad_clip: float = 1.0  # max gradient norm of each network (0 = off)
    kl_coef: float = 0.05  # coefficient of the k1 KL penalty in the reward (the initial one)
    adaptive_kl: bool = False  # Ziegler et al.'s adaptive controller instead of a fixed coefficient
    kl_target: float = 0.5  # the adaptive controller's target KL per sequence (nats)
    kl_horizon: int = 10000  # the adaptive controller's horizon (samples)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    epsilon: float = 0.2  # clip range of the policy ratio
    value_clip: float = 0.2  # clip range of the value around V_old
    entropy_coef: float = 0.0  # c2: weight of the entropy bonus
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over the batch
    temperature: float = 1.0  # sampling temperature of the rollouts
    eval_size: int = 256  # held-out problems per evaluation
    pass_k: int = 4  # k of pass@k and maj@k, measured at the start and the end
    pass_n: int = 8  # samples per prompt for pass@k (n >= k)

    def __post_init__(self):
        super().__post_init__()  # task, n_digits, init and the warm start; max_new_tokens
        common.check_config(
            self, positive=("steps", "batch_size", "ppo_epochs",
                            "num_minibatches", "grad_accum", "lr", "critic_lr", "kl_target",
                            "kl_horizon", "epsilon", "temperature", "eval_size", "pass_k"),
            non_negative=("warmup", "grad_clip", "kl_coef", "value_clip", "entropy_coef"),
            fractions=("min_lr_ratio", "gamma", "lam"),
            ordered=(("pass_k", "pass_n"),), choices={"reward": ("rule", "model"),
                     "critic_init": ("sft", "rm"), "truncation": ("penalty", "mask")})
        if (self.reward == "model" or self.critic_init == "rm") != bool(self.reward_model):
            raise ValueError("--reward model and --critic_init rm need --reward_model (a "
                             "train_rm.py run folder), and nothing else reads it")


# ----------------------------------------------------------------------------------------------
# The algorithm


@dataclass
class Nets:
    """What PPO holds: the policy and the critic are trained (their `_ddp` forms, from Run.wrap,
    are what the update calls), the reference and the reward model (None: the rule) are frozen."""
    policy: torch.nn.Module
    ref: torch.nn.Module
    critic: ScalarModel
    rm: ScalarModel = None
    policy_ddp: object = None
    critic_ddp: object = None


@torch.no_grad()
def make_experience(nets, task, tok, problems, cfg, kl_coef, gen):
    """One completion a problem from pi_old, scored; pi_old's and pi_ref's log-probs, V_old; token
    rewards (k1 KL on each, the score on the last), GAE advantages. Also: which are right."""
    prompts = [tasks.encode_problem(tok, p, False)[0] for p in problems]
    with common.autocast():
        r = rollout.generate(
            nets.policy, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id, generator=gen,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    scores, correct, mask = score(nets.rm, task, tok, problems, prompts, r, cfg)  # (N,), (N, L)
    rows = torch.arange(len(prompts))
    nets.policy.eval()  # no router loads counted
    with common.autocast():
        old = rollout.completion_logprobs(nets.policy_ddp, r, rows, cfg.temperature)[0]
        ref = rollout.completion_logprobs(nets.ref.forward_shared_prefix, r, rows,
                                          cfg.temperature)[0]
        values = rollout.completion_values(nets.critic_ddp, r, rows).float() * r.completion_mask
    nets.policy.train()
    rewards = losses.token_rewards(scores, old, ref, r.completion_mask, kl_coef)  # (N, L)
    adv, returns = losses.gae(rewards, values, r.completion_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = whiten(adv, mask)
    return rollout.Experience(r, scores, adv, mask, old, ref, values, returns), correct


def update(nets, opts, exp, cfg, gen):
    """ppo_epochs passes of shuffled minibatches: AdamW steps of the policy (clipped surrogate,
    entropy bonus) and the critic (clipped value loss), on the token mean over all ranks."""
    stats, r = [], exp.rollout
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(len(exp.mask), generator=gen, device=gen.device)
        for minibatch in order.chunk(cfg.num_minibatches):
            n = common.all_reduce_sum({"n": exp.mask[minibatch].sum().item()}, gen.device)["n"]
            n = max(n, 1.0)  # the minibatch's tokens, over every rank
            micro = minibatch.chunk(cfg.grad_accum)
            for j, rows in enumerate(micro):
                m, last = exp.mask[rows], j == len(micro) - 1
                with common.micro_batch(nets.policy_ddp, last) as world:
                    logp, logits = rollout.completion_logprobs(
                        nets.policy_ddp, r, rows, cfg.temperature)
                    loss, pm = losses.ppo_policy_loss(
                        logp, exp.old_logp[rows], exp.advantages[rows], m, cfg.epsilon, n)
                    entropy = losses.masked_mean(losses.entropy(logits), m, n)
                    ((loss - cfg.entropy_coef * entropy) * world).backward()  # DDP averages
                with common.micro_batch(nets.critic_ddp, last) as world:
                    values = rollout.completion_values(nets.critic_ddp, r, rows).float()
                    vloss, vm = losses.value_loss(
                        values, exp.values[rows], exp.returns[rows], m, cfg.value_clip, n)
                    (vloss * world).backward()
                shares = {"policy_loss": loss, "value_loss": vloss, "entropy": entropy}
                stats.append({**pm, **vm, **{k: v.item() * len(micro) for k, v in shares.items()}})
            stats.append({"grad_norm": common.optimizer_step(opts[0], cfg.grad_clip),
                          "critic_grad_norm": common.optimizer_step(opts[1], cfg.grad_clip)})
    return stats


def score(rm, task, tok, problems, prompts, r, cfg):
    """Each completion's score: the task's exact-answer reward, or the reward model's. One cut at
    max_new_tokens (no end token) scores --truncation_penalty, or leaves the loss (--truncation
    mask). Returns (scores (N,), whether each is right (N,), the loss mask (N, L))."""
    texts = rollout.decode_completions(tok, r)
    correct = torch.tensor([task.reward(c, p) for c, p in zip(texts, problems)],
                           device=r.completion_mask.device)
    scores = correct.clone()
    if rm is not None:
        scores = rollout.score_rollout(rm, prompts, r, tok.pad_id).float()
    mask = r.completion_mask.clone()
    if cfg.truncation == "penalty":
        scores = torch.where(~r.ended, torch.full_like(scores, cfg.truncation_penalty), scores)
    else:
        mask[~r.ended] = 0.0  # no loss from a completion that never ended
    return scores, correct, mask


def whiten(x, mask):
    """x normalised to mean 0 and std 1 over every rank's real tokens (mask), 0 elsewhere."""
    s = common.all_reduce_sum({"n": mask.sum().item(), "a": (x * mask).sum().item(),
                               "a2": (x ** 2 * mask).sum().item()}, x.device)
    mean = s["a"] / max(s["n"], 1.0)
    std = max(s["a2"] / max(s["n"], 1.0) - mean ** 2, 0.0) ** 0.5
    return (x - mean) / (std + 1e-8) * mask


# ----------------------------------------------------------------------------------------------
# Plumbing: what is logged (tests/test_runs.py guards the rest)


def ppo_metrics(exp, stats, correct):
    """The step's figures over every rank: score, correctness, KL per sequence, lengths, the
    update's means, the critic's explained variance, whether the highest scores are right."""
    r, n = exp.rollout, len(exp.rewards)
    seq_kl = (losses.kl_k1(exp.old_logp, exp.ref_logp) * r.completion_mask).sum(1)  # (N,)
    top = exp.rewards >= exp.rewards.quantile(0.75)  # a learned reward's winners: are they right?
    m = exp.mask.bool()
    explained = 1 - (exp.returns[m] - exp.values[m]).var() / exp.returns[m].var().clamp_min(1e-8)

    def mean(key):  # over the update's micro-batches (or its steps, for the gradient norms)
        values = [s[key] for s in stats if key in s]
        return sum(values) / max(len(values), 1)

    means = {k: n * mean(k) for k in ("clip_frac", "value_clip_frac", "approx_kl", "ratio",
                                      "grad_norm", "critic_grad_norm")}  # weighted by rows
    total = common.all_reduce_sum({
        "n": n, "score": exp.rewards.sum().item(), "correct": correct.sum().item(),
        "kl": seq_kl.sum().item(), "length": r.completion_mask.sum().item(),
        "truncated": (~r.ended).sum().item(), "top_correct": n * correct[top].mean().item(),
        "explained_variance": n * explained.item(), **means,
        **{k: mean(k) for k in ("policy_loss", "value_loss", "entropy")}}, exp.mask.device)
    N = total.pop("n")
    shares = ("policy_loss", "value_loss", "entropy")  # each rank's is its share: summed
    return {k: v if k in shares else v / N for k, v in total.items()}, N


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    cfg, mcfg, run_cfg = common.parse_config([PPOConfig, ModelConfig], argv, __doc__,
                                             out_dir="out/ppo", eval_every=10, ckpt_every=50)
    with common.Run("ppo", cfg, mcfg, run_cfg) as run:  # torchrun, seeds, one-line errors
        tok, task = tasks.get(cfg.task, cfg.n_digits)
        # ---- plumbing: the checks before anything is written, the held-out evaluation
        per_rank = cfg.batch_size // run.world
        run.require(cfg.batch_size % run.world == 0 and per_rank % (
            cfg.num_minibatches * cfg.grad_accum) == 0, f"--batch_size {cfg.batch_size} does not "
            f"split into {run.world} ranks x --num_minibatches {cfg.num_minibatches} x "
            f"--grad_accum {cfg.grad_accum}")
        held_out = task.eval_set(cfg.eval_size)

        def evaluate(step, k=0):  # on rank 0: greedy accuracy, pass@k and maj@k
            gen_eval = torch.Generator(device=run.device).manual_seed(step)
            return run.eval(step, rollout.evaluate(
                policy, tok, task, held_out, k=k, n_samples=cfg.pass_n, generator=gen_eval,
                temperature=cfg.temperature) if run.main else {})

        rm = None  # a trained reward model, frozen: the reward (--reward model), the critic's init
        if cfg.reward_model:
            rm = train_rm.load_reward_model(cfg.reward_model, task, run.device)
        policy = run.resumed() if run_cfg.resume else common.load_or_make_init(cfg, run)
        if cfg.reward_model:  # tied to the checkpoints: a resume on another one is refused
            run.input(cfg.reward_model, "--reward_model")
        common.check_lengths(task, policy.cfg.max_seq_len, cfg.max_new_tokens)
        run.require(rm is None or rm.cfg == policy.cfg, f"--reward_model {cfg.reward_model} has "
                    "another model config than the policy")
        ref = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_ref: the frozen init
        critic = ScalarModel(policy.cfg).to(run.device)  # V: the init's or the RM's weights
        if cfg.critic_init == "rm":
            critic.load_state_dict(rm.state_dict())
        else:
            critic.body.load_state_dict(policy.state_dict())
        opts = [torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0,
                                  fused=True)  # fused: one pass over all parameters
                for net, lr in ((policy, cfg.lr), (critic, cfg.critic_lr))]
        kl_ctl = (losses.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
                  if cfg.adaptive_kl else losses.FixedKLController(cfg.kl_coef))
        data, gen = run.streams()  # this rank's problems and sampling generator, PPO's own
        scorer = rm if cfg.reward == "model" else None  # None: the rule
        run.begin(model=policy, ref=ref, critic=critic, optimizer=opts[0],
                  critic_optimizer=opts[1], kl_ctl=kl_ctl, streams=(data, gen),
                  held={"reward model": scorer} if scorer is not None else None)  # + --resume
        nets = Nets(policy, ref, critic, scorer, run.wrap(policy, shared_prefix=True),
                    run.wrap(critic, shared_prefix=True))
        if run.start == 0:
            evaluate(0, k=cfg.pass_k)  # the init's figures
        for step in run.steps(cfg.steps):
            # ---- the algorithm
            for opt, lr in zip(opts, (cfg.lr, cfg.critic_lr)):
                opt.param_groups[0]["lr"] = common.lr_at(
                    step, lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            problems = [task.sample(data) for _ in range(per_rank)]
            exp, correct = make_experience(nets, task, tok, problems, cfg, kl_ctl.value, gen)
            stats = update(nets, opts, exp, cfg, gen)
            policy.update_router_biases()
            critic.body.update_router_biases()
            metrics, n = ppo_metrics(exp, stats, correct)
            kl_ctl.update(metrics["kl"], int(n))  # Ziegler et al.: toward the target KL

            # ---- plumbing: logging, evaluation, checkpoints (tests/test_runs.py guards it)
            run.log({"step": step + 1, "kl_coef": kl_ctl.value, "samples_per_s": n / run.elapsed(),
                     **metrics}, show=("score", "kl"))
            if run.due(step + 1, run_cfg.eval_every):
                evaluate(step + 1, k=cfg.pass_k if step + 1 == cfg.steps else 0)
            run.end_step(step + 1)  # a checkpoint when due; Ctrl-C stops here, resumable
    return policy, run.first_eval or {}, run.last_eval or {}


if __name__ == "__main__":
    main(sys.argv[1:])
