"""PPO for language models (InstructGPT arXiv 2203.02155; Ziegler et al. arXiv 1909.08593): a policy,
a frozen reference, a reward (the task's exact-answer rule, or the reward model of train_rm.py) and a
critic, on an arithmetic task.

    python train_ppo.py                                     # rule reward; out/ppo/
    python train_ppo.py --reward model --reward_model out/rm   # the learned reward (RLHF's pipeline)
    python train_ppo.py --adaptive_kl --kl_target 0.5       # Ziegler et al.'s adaptive KL coefficient
    torchrun --standalone --nproc_per_node=2 train_ppo.py   # DDP: prompts sharded over ranks

One step: sample one completion for each of `batch_size` prompts with the current policy (pi_old);
score it; per-token rewards = -kl_coef * (log pi_old - log pi_ref) on every token plus the score on
the last one (losses.token_rewards); the critic's values V_old of every completion position, computed
once; GAE advantages and returns (losses.gae), whitened over the batch; then `ppo_epochs` passes of
shuffled minibatches, each step updating the policy (clipped surrogate minus an entropy bonus) and
the critic (clipped value loss) with their own optimisers. A completion cut at max_new_tokens
without an end token gets --truncation penalty (its score is truncation_penalty) or mask (left out
of both losses). The policy and the reference start from the SFT init (--init; a short warm start
makes one when it is missing), the critic from the same SFT weights with a zero value head (or from
the reward model, --critic_init rm).
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
import rollout
import tasks
import train_rm
import train_sft
from model import ModelConfig, ScalarModel, Transformer


@dataclass
class PPOConfig:
    task: str = "add"  # add, sub, mul or multistep
    n_digits: int = 0  # digits per operand; 0 = the task's default (add, sub 3; mul, multistep 2)
    init: str = ""  # SFT run folder (or .pt file) of the policy, reference and critic; "" = out/sft for add, out/sft_<task> otherwise; a missing folder gets a warm start
    warmstart_steps: int = 1500  # steps of the SFT warm start made when --init does not exist
    warmstart_target_acc: float = 0.8  # the warm start stops once held-out accuracy reaches this
    reward: str = "rule"  # rule (the task's exact-answer reward) or model (--reward_model's score)
    reward_model: str = ""  # a train_rm.py run folder (or ckpt.pt), for --reward model or --critic_init rm
    critic_init: str = "sft"  # sft (the init's weights, zero value head) or rm (the reward model's weights)
    truncation: str = "penalty"  # a completion without an end token: penalty (score = truncation_penalty) or mask (no loss)
    truncation_penalty: float = -1.0  # the score of a truncated completion under --truncation penalty
    steps: int = 100  # PPO steps (one rollout batch each)
    batch_size: int = 512  # prompts per step (one completion each), over all ranks: GRPO's 64 x 8 completions
    ppo_epochs: int = 2  # passes over each rollout batch
    num_minibatches: int = 4  # optimiser steps per pass
    grad_accum: int = 1  # micro-batches per optimiser step (per rank)
    lr: float = 1e-4  # the policy's peak learning rate
    critic_lr: float = 5e-4  # the critic's peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step
    warmup: int = 10  # linear warmup steps
    grad_clip: float = 1.0  # max gradient norm of each network (0 = off)
    kl_coef: float = 0.05  # coefficient of the k1 KL penalty in the reward (the initial one if adaptive)
    adaptive_kl: bool = False  # Ziegler et al.'s adaptive controller instead of a fixed coefficient
    kl_target: float = 0.5  # the adaptive controller's target KL per sequence (nats)
    kl_horizon: int = 10000  # the adaptive controller's horizon (samples)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    epsilon: float = 0.2  # clip range of the policy ratio
    value_clip: float = 0.2  # clip range of the value around V_old
    entropy_coef: float = 0.0  # c2: weight of the entropy bonus
    whiten_advantages: bool = True  # normalise advantages to mean 0, std 1 over the batch (all ranks)
    temperature: float = 1.0  # sampling temperature of the rollouts
    max_new_tokens: int = 0  # completion length limit (0 = the task's longest answer + 2)
    eval_every: int = 10  # steps between held-out greedy evaluations
    eval_size: int = 256  # held-out problems per evaluation
    pass_k: int = 4  # k of pass@k and maj@k, measured at the start and the end
    pass_n: int = 8  # samples per prompt for pass@k (n >= k)
    ckpt_every: int = 50  # steps between checkpoints (and at the end)
    seed: int = 0  # seed of the problem and sampling streams
    out_dir: str = "out/ppo"  # run folder: ckpt.pt, metrics.jsonl, config.json
    resume: bool = False  # continue from out_dir/ckpt.pt
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0 = run to the end
    quiet: bool = False  # no progress bar or printed samples

    def __post_init__(self):
        common.check_config(
            self, positive=("warmstart_steps", "steps", "batch_size", "ppo_epochs", "num_minibatches", "grad_accum",
                            "lr", "critic_lr", "kl_target", "kl_horizon", "epsilon", "temperature", "eval_every",
                            "eval_size", "pass_k", "ckpt_every"),
            non_negative=("warmup", "grad_clip", "kl_coef", "value_clip", "entropy_coef", "max_new_tokens", "stop_at"),
            fractions=("warmstart_target_acc", "min_lr_ratio", "gamma", "lam"),
            choices={"task": tuple(tasks.TASKS), "reward": ("rule", "model"), "critic_init": ("sft", "rm"),
                     "truncation": ("penalty", "mask")})
        if (self.reward == "model" or self.critic_init == "rm") and not self.reward_model:
            raise ValueError("--reward model and --critic_init rm need --reward_model (a train_rm.py run folder)")
        if self.pass_n < self.pass_k:
            raise ValueError(f"pass@k needs --pass_n >= --pass_k, got {self.pass_n} < {self.pass_k}")
        task = tasks.get_task(self.task, self.n_digits)
        self.n_digits = task.n_digits
        self.max_new_tokens = self.max_new_tokens or task.max_lengths()[1] + 2


# ----------------------------------------------------------------------------------------------
# Rollouts, scores, advantages


@torch.no_grad()
def make_experience(policy, ref, critic, rm, task, tok, problems, cfg, kl_coef, generator, device):
    """One completion per problem from pi_old, its score, log-probs under pi_old and pi_ref, the
    critic's V_old, per-token rewards, GAE advantages (whitened) and returns: an Experience, the
    completion texts and whether each is correct."""
    prompts = [tasks.encode_problem(tok, p, with_completion=False)[0] for p in problems]
    with common.autocast(device):  # sample in the precision the trainer scores in
        r = rollout.generate(policy, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, generator=generator)
    texts = rollout.decode_completions(tok, r)
    correct = torch.tensor([task.reward(c, p) for c, p in zip(texts, problems)], device=device)  # (N,)
    if rm is None:
        scores = correct.clone()
    else:
        lengths = r.completion_mask.sum(1).long().tolist()
        scores = rm.score(prompts, [row[:n] for row, n in zip(r.completion_ids.tolist(), lengths)], tok.pad_id).float()
    mask = r.completion_mask.clone()
    truncated = ~r.ended
    if cfg.truncation == "penalty":
        scores = torch.where(truncated, torch.full_like(scores, cfg.truncation_penalty), scores)
    else:
        mask[truncated] = 0.0  # no loss from a completion that never ended (PITFALLS 11)
    rows = torch.arange(len(prompts))
    policy.eval()  # the same numbers as train mode; no router loads counted
    with common.autocast(device):
        old = rollout.completion_logprobs(policy, r, rows, device, cfg.temperature)[0]
        ref_logp = rollout.completion_logprobs(ref, r, rows, device, cfg.temperature)[0]
        values = rollout.completion_values(critic, r, rows, device).float() * r.completion_mask
    policy.train()
    rewards = losses.token_rewards(scores, old, ref_logp, r.completion_mask, kl_coef)  # (N, L)
    advantages, returns = losses.gae(rewards, values, r.completion_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:  # over every rank's real tokens
        s = common.all_reduce_sum({"n": mask.sum().item(), "a": (advantages * mask).sum().item(),
                                   "a2": (advantages ** 2 * mask).sum().item()}, device)
        mean = s["a"] / max(s["n"], 1.0)
        std = max(s["a2"] / max(s["n"], 1.0) - mean ** 2, 0.0) ** 0.5
        advantages = (advantages - mean) / (std + 1e-8) * mask
    exp = rollout.Experience(r, scores, advantages, mask, old, ref_logp, values=values, returns=returns)
    return exp, texts, correct


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over the real tokens: 1 for a perfect critic, 0 for a constant one."""
    m = mask.bool()
    return (1 - (returns[m] - values[m]).var() / returns[m].var().clamp_min(1e-8)).item()


# ----------------------------------------------------------------------------------------------
# The update: policy and critic, each with its optimiser


def update(policy_model, policy, critic_model, critic, opts, exp, cfg, generator, device):
    """`ppo_epochs` passes of shuffled minibatches over the rollout batch; every micro-batch divides
    by its minibatch's token count over all ranks (PPO's token mean), so accumulation and DDP equal
    one big batch. Returns the mean stats over the updates, or None on a non-finite gradient."""
    world, N = common.world_size(), exp.mask.size(0)
    stats = dict.fromkeys(("policy_loss", "value_loss", "entropy", "clip_frac", "value_clip_frac", "approx_kl",
                           "ratio", "grad_norm", "critic_grad_norm"), 0.0)
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(N, generator=generator, device=generator.device)  # the generator's device (CUDA too)
        for minibatch in order.chunk(cfg.num_minibatches):
            n_tok = common.all_reduce_sum({"n": exp.mask[minibatch].sum().item()}, device)["n"]
            micro = minibatch.chunk(cfg.grad_accum)
            for j, rows in enumerate(micro):
                last, m, r = j == len(micro) - 1, exp.mask[rows], exp.rollout
                with common.no_sync_unless_last(policy_model, last), common.autocast(device):
                    logp, logits = rollout.completion_logprobs(policy_model, r, rows, device, cfg.temperature)
                    loss, pm = losses.ppo_policy_loss(logp, exp.old_logp[rows], exp.advantages[rows], m, cfg.epsilon,
                                                      normalizer=max(n_tok, 1.0))
                    logp_all = torch.log_softmax(logits.float(), -1)
                    entropy = losses.masked_mean(-(logp_all.exp() * logp_all).sum(-1), m, max(n_tok, 1.0))
                    ((loss - cfg.entropy_coef * entropy) * world).backward()  # DDP averages over ranks
                with common.no_sync_unless_last(critic_model, last), common.autocast(device):
                    values = rollout.completion_values(critic_model, r, rows, device).float()
                    vloss, vm = losses.value_loss(values, exp.values[rows], exp.returns[rows], m, cfg.value_clip,
                                                  normalizer=max(n_tok, 1.0))
                    (vloss * world).backward()
                stats["policy_loss"] += loss.item()
                stats["value_loss"] += vloss.item()
                stats["entropy"] += entropy.item()
                for key, v in {**pm, **vm}.items():
                    stats[key] += v / len(micro)
            grad_norm = common.optimizer_step(policy.parameters(), opts[0], cfg.grad_clip)
            critic_norm = common.optimizer_step(critic.parameters(), opts[1], cfg.grad_clip)
            if grad_norm is None or critic_norm is None:
                return None
            stats["grad_norm"] += grad_norm
            stats["critic_grad_norm"] += critic_norm
            n_updates += 1
    return {k: v / max(n_updates, 1) for k, v in stats.items()}


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    (cfg, mcfg), given = common.parse_config([PPOConfig, ModelConfig], argv, __doc__)
    owns_dist = not common.is_dist()
    rank, world, device = common.setup_dist()
    common.setup_torch(cfg.seed, device)
    tok, task = tasks.Tokenizer(), tasks.get_task(cfg.task, cfg.n_digits)
    model_flags = given & set(ModelConfig.__dataclass_fields__)
    ckpt_path, ckpt, start, rm = os.path.join(cfg.out_dir, "ckpt.pt"), None, 0, None
    try:  # every check before anything is written
        if cfg.batch_size % world or (cfg.batch_size // world) % (cfg.num_minibatches * cfg.grad_accum):
            raise ValueError(f"--batch_size {cfg.batch_size} does not split into {world} ranks x --num_minibatches "
                             f"{cfg.num_minibatches} x --grad_accum {cfg.grad_accum}")
        common.check_lengths(task, mcfg.max_seq_len, cfg.max_new_tokens)
        common.check_out_dir(cfg.out_dir)
        if cfg.reward_model:
            rm = train_rm.load_reward_model(cfg.reward_model, tok, task, device)
        if cfg.resume:
            ckpt, mcfg = common.load_for_resume(ckpt_path, "ppo", tok, cfg, mcfg, model_flags, common.INIT_FIELDS)
            policy, start = Transformer(mcfg).to(device), ckpt["step"]
        else:
            policy, mcfg = train_sft.load_or_make_init(cfg, tok, model_flags, mcfg, device)
        if rm is not None and rm.cfg != mcfg:
            raise ValueError(f"--reward_model {cfg.reward_model} has another model config than the policy")
    except (ValueError, common.CheckpointError) as e:
        common.die(str(e))
    eval_problems = task.eval_set(cfg.eval_size)
    data_rng = common.data_rng(cfg.seed, "ppo", rank)  # PPO's own prompts, never the warm start's
    gen = torch.Generator(device=device).manual_seed(common.stream_seed(cfg.seed, "ppo", rank, "sampling"))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_ref: the frozen init
    critic = ScalarModel(mcfg).to(device)
    if cfg.critic_init == "rm":
        critic.load_state_dict(rm.state_dict())
    else:
        critic.body.load_state_dict(policy.state_dict())
    opts = [common.adamw(net.parameters(), lr) for net, lr in ((policy, cfg.lr), (critic, cfg.critic_lr))]
    kl_ctl = (losses.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else losses.FixedKLController(cfg.kl_coef))
    note = None
    if ckpt is not None:
        for net, key in ((policy, "model"), (ref, "ref"), (critic, "critic")):
            net.load_state_dict(ckpt[key])
        for opt, state in zip(opts, ckpt["optimizers"]):
            opt.load_state_dict(state)
        kl_ctl.load_state_dict(ckpt["kl_ctl"])
        note = common.restore_rng(ckpt["rng"], rank, world, cfg.seed, "ppo", start, data_rng, gen)
    wrap = (lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
            if world > 1 else m)
    policy_model, critic_model = wrap(policy), wrap(critic)
    main_proc = rank == 0
    try:
        run = common.RunFolder(cfg.out_dir, main_proc, start if cfg.resume else None, ppo=cfg, model=mcfg)
    except common.RunFolderBusy as e:
        common.die(str(e))
    held = {"policy": policy, "reference": ref, "critic": critic, **({"reward model": rm} if rm is not None else {})}
    params, held_line = common.networks_held(held)
    if main_proc and not cfg.quiet:
        print(held_line)
        if note:
            print(f"note: {note}")

    def fail(message):
        run.close()
        common.die(message)

    def evaluate(step, k=0):
        if not main_proc:
            return {}
        try:
            m = rollout.evaluate(policy, tok, task, eval_problems, k=k, n_samples=cfg.pass_n, temperature=cfg.temperature,
                                 generator=torch.Generator(device=device).manual_seed(step))
        except rollout.NonFiniteLogits as e:
            fail(f"{e} (at step {step}); {run.last_good()}")
        run.log({"step": step, **{f"eval_{key}": v for key, v in m.items()}}, kind="eval")
        if not cfg.quiet:
            tqdm.write(f"step {step}: " + ", ".join(f"{key} {v:.3f}" for key, v in m.items()))
        return m

    def checkpoint(step):
        states = common.gather_objects(common.rng_state(data_rng, gen))
        try:
            run.save(step, {"model": policy.state_dict(), "ref": ref.state_dict(), "critic": critic.state_dict(),
                            "optimizers": [o.state_dict() for o in opts],
                            "kl_ctl": kl_ctl.state_dict(), "step": step, "rng": states, "world_size": world,
                            "config": common.config_dict(cfg), "model_config": common.config_dict(mcfg),
                            "tokenizer": tok.definition(), "kind": "ppo"})
        except common.NonFiniteState as e:
            fail(str(e))

    first = evaluate(0, k=cfg.pass_k) if start == 0 else {}
    stop = cfg.steps if cfg.stop_at <= 0 else min(cfg.steps, cfg.stop_at)
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=not main_proc or cfg.quiet, dynamic_ncols=True)
    timer, last, acc = common.Timer(), {}, first.get("greedy_acc", float("nan"))
    with common.GracefulStop() as stopper:
        for step in bar:
            for opt, lr in zip(opts, (cfg.lr, cfg.critic_lr)):
                for group in opt.param_groups:
                    group["lr"] = common.lr_at(step, lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
            problems = [task.sample(data_rng) for _ in range(cfg.batch_size // world)]
            try:
                exp, texts, correct = make_experience(policy, ref, critic, rm, task, tok, problems, cfg, kl_ctl.value,
                                                      gen, device)
            except rollout.NonFiniteLogits as e:
                fail(f"{e} (at step {step + 1}; lower --lr?); {run.last_good()}")
            stats = update(policy_model, policy, critic_model, critic, opts, exp, cfg, gen, device)
            if stats is None:
                fail(f"non-finite gradient at step {step + 1} (lower --lr?); {run.last_good()}")
            policy.update_router_biases()
            critic.body.update_router_biases()
            r, N, s = exp.rollout, len(problems), step + 1
            seq_kl = (losses.kl_k1(exp.old_logp, exp.ref_logp) * r.completion_mask).sum(1)  # (N,) KL per sequence
            top = exp.rewards >= exp.rewards.quantile(0.75)  # the learned reward's winners: are they right?
            local = {"score": exp.rewards.sum().item(), "correct": correct.sum().item(), "kl": seq_kl.sum().item(),
                     "length": r.completion_mask.sum().item(), "truncated": (~r.ended).float().sum().item(),
                     "top_correct": correct[top].mean().item(), "explained_variance": explained_variance(
                         exp.values, exp.returns, exp.mask), **stats}
            tot = common.all_reduce_sum({**local, "n": float(N)}, device)
            n, dt = tot.pop("n"), timer.lap()
            kl_ctl.update(tot["kl"] / n, int(n))
            record = {"step": s, "kl_coef": kl_ctl.value, "samples_per_s": n / dt, **common.peak_memory(device),
                      **{k: tot[k] / n for k in ("score", "correct", "kl", "length", "truncated")},
                      **{k: tot[k] for k in ("policy_loss", "value_loss", "entropy")},  # each rank's is its share
                      **{k: tot[k] / world for k in ("top_correct", "explained_variance", "clip_frac", "value_clip_frac",
                                                     "approx_kl", "ratio", "grad_norm", "critic_grad_norm")}}
            if s == 1:
                record.update(params)
            run.log(record)
            bar.set_postfix(score=f"{record['score']:.3f}", acc=f"{acc:.3f}", kl=f"{record['kl']:.3f}", refresh=False)
            if s % cfg.eval_every == 0 or s == cfg.steps:
                last = evaluate(s, k=cfg.pass_k if s == cfg.steps else 0)
                acc = last.get("greedy_acc", acc)
                timer.lap()
            interrupted = stopper.requested(device)
            if s % cfg.ckpt_every == 0 or s == stop or interrupted:
                checkpoint(s)
            if interrupted:
                stopper.exit(cfg.out_dir, s, close=(bar, run))
    bar.close()
    common.finish_run(run, first, last, "PPO", main_proc and not cfg.quiet and stop == cfg.steps, owns_dist)
    return policy, first, last


if __name__ == "__main__":
    main(sys.argv[1:])
