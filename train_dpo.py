"""DPO (arXiv 2305.18290) and its variants on preference pairs made from an arithmetic task.

    python train_dpo.py                                     # offline DPO from the SFT init; out/dpo/
    python train_dpo.py --rounds 3 --ref_reset              # iterative (online) DPO
    python train_dpo.py --loss ipo                          # IPO (length-averaged log-probs)
    python train_dpo.py --loss simpo                        # SimPO (no reference model)
    python train_dpo.py --label_smoothing 0.1               # cDPO / robust DPO
    python train_dpo.py --pairs_source synthetic            # rejected = a near miss of the answer
    python train_dpo.py --pairs_file out/dpo/pairs_round0.jsonl   # reuse pairs and their ref log-probs
    torchrun --standalone --nproc_per_node=2 train_dpo.py   # DDP: every step's pairs sharded

The reference is the frozen SFT init (--init; a short warm start makes one when it is missing).
Each round: sample G completions for `num_prompts` new prompts from the current policy and make
pairs (chosen: a correct sample, rejected: an incorrect one; rollout.make_pairs), compute the
reference's sequence log-probs once and store them with the pairs (pairs_round<k>.jsonl in the run
folder), then train `epochs` passes over the pairs. --rounds 1 is plain offline DPO; more rounds
sample again from the current policy (Xiong et al. arXiv 2312.11456), optionally resetting the
reference to it (--ref_reset, Pang et al. arXiv 2404.19733). Held-out pairs (from held-out prompts,
made once by the init) measure preference accuracy; held-out greedy accuracy, pass@k and maj@k are
measured at the start, at the end of each round and every eval_every steps.
"""
import copy
import hashlib
import os
import random
import sys
from dataclasses import dataclass

import torch

import common
import losses
import rollout
import tasks
import train_sft
from model import ModelConfig


@dataclass
class DPOConfig:
    task: str = "add"  # add, sub, mul or multistep
    n_digits: int = 0  # digits per operand; 0 = the task's default (add, sub 3; mul, multistep 2)
    init: str = ""  # SFT run: the initial policy and the reference; "" = out/sft or out/sft_<task>
    warmstart_steps: int = 1500  # steps of the SFT warm start made when --init does not exist
    warmstart_target_acc: float = 0.8  # the warm start stops at this held-out accuracy
    loss: str = "dpo"  # dpo (with --label_smoothing: cDPO), ipo or simpo
    beta: float = 0.0  # 0 = the loss's default: 1.0 for dpo and ipo, 2.0 for simpo (its paper's)
    label_smoothing: float = 0.0  # cDPO / robust DPO: the assumed fraction of flipped preferences
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    length_normalize: bool = False  # average the completion log-probs, not sum them (ipo always)
    pairs_source: str = "policy"  # policy (the current policy's samples) or synthetic (near misses)
    pairs_file: str = ""  # train on these pairs (a pairs_round<k>.jsonl) in round 0
    recompute_ref: bool = False  # recompute the reference log-probs even where the file has them
    num_prompts: int = 2048  # new training prompts per round (a pair needs a wrong sample)
    num_generations: int = 8  # samples per prompt for policy pairs
    temperature: float = 1.0  # sampling temperature of policy pairs
    max_new_tokens: int = 0  # completion length limit (0 = the task's longest answer + 2)
    rounds: int = 1  # iterative DPO: make pairs from the current policy at each round's start
    ref_reset: bool = False  # iterative DPO: the reference becomes the policy at each new round
    epochs: int = 2  # passes over each round's pairs
    batch_size: int = 64  # pairs per optimiser step, over all ranks and micro-batches
    grad_accum: int = 1  # micro-batches per optimiser step (per rank)
    lr: float = 0.0  # peak learning rate, each round; 0 = 2e-5 for dpo and ipo, 5e-6 for simpo
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the end of each round
    warmup: int = 5  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    eval_size: int = 256  # held-out problems (greedy accuracy) and held-out pair prompts
    pass_k: int = 4  # k of pass@k and maj@k, measured at the start and the end
    pass_n: int = 8  # samples per prompt for pass@k (n >= k)

    def __post_init__(self):
        common.check_config(
            self, positive=("warmstart_steps", "num_prompts", "num_generations", "temperature",
                            "rounds", "epochs", "batch_size", "grad_accum", "eval_size", "pass_k"),
            non_negative=("beta", "lr", "simpo_gamma", "max_new_tokens", "warmup", "weight_decay",
                          "grad_clip"),
            fractions=("warmstart_target_acc", "label_smoothing", "min_lr_ratio"),
            choices={"task": tuple(tasks.TASKS), "loss": ("dpo", "ipo", "simpo"),
                     "pairs_source": ("policy", "synthetic")})
        if self.label_smoothing > 0.5:
            raise ValueError(f"--label_smoothing must be <= 0.5 (above it the preferences flip), "
                             f"got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "dpo":
            raise ValueError(f"--label_smoothing applies to --loss dpo only, not {self.loss}")
        if self.pass_n < self.pass_k:
            raise ValueError(f"pass@k needs --pass_n >= --pass_k, got {self.pass_n} < {self.pass_k}")
        task = tasks.get_task(self.task, self.n_digits)
        self.n_digits = task.n_digits
        self.max_new_tokens = self.max_new_tokens or task.max_lengths()[1] + 2
        self.beta = self.beta or (2.0 if self.loss == "simpo" else 1.0)
        self.lr = self.lr or (5e-6 if self.loss == "simpo" else 2e-5)
        self.init = self.init or train_sft.default_init(self.task)


# ----------------------------------------------------------------------------------------------
# The algorithm: pairs, their log-probs, the loss, one optimiser step


@dataclass
class Pairs:
    """Preference pairs (the dicts rollout.make_pairs makes) and, as tensors on the device, what
    the losses read of them: each side's length and, once scored, the reference's log-probs."""
    items: list  # {"prompt_ids", "chosen_ids", "rejected_ids", ...} per pair
    len_chosen: torch.Tensor  # (n,) |y_w| in tokens, the end token included
    len_rejected: torch.Tensor  # (n,) |y_l|
    ref_chosen: torch.Tensor = None  # (n,) log ref(y_w | x), summed over y_w
    ref_rejected: torch.Tensor = None  # (n,) log ref(y_l | x)

    @classmethod
    def of(cls, items, device):
        def column(get):
            return torch.tensor([float(get(p)) for p in items], device=device)
        pairs = cls(items, column(lambda p: len(p["chosen_ids"])),
                    column(lambda p: len(p["rejected_ids"])))
        if items and "ref_chosen_logp" in items[0]:
            pairs.ref_chosen = column(lambda p: p["ref_chosen_logp"])
            pairs.ref_rejected = column(lambda p: p["ref_rejected_logp"])
        return pairs

    def __len__(self):
        return len(self.items)

    def __getitem__(self, rows):  # the pairs at a list of indices
        pick = lambda t: None if t is None else t[torch.tensor(rows, dtype=torch.long)]  # noqa: E731
        return Pairs([self.items[i] for i in rows], pick(self.len_chosen),
                     pick(self.len_rejected), pick(self.ref_chosen), pick(self.ref_rejected))


def pair_logprobs(forward, pairs, pad_id):
    """Summed completion log-probs of the chosen and the rejected side of `pairs`, from one forward
    in which each pair's prompt runs once for both its sides: (chosen (n,), rejected (n,)).
    forward: a network's forward_shared_prefix, or what Run.wrap made of it. Pairs never share a
    prompt's forward, even with equal prompts: a micro-batch counts the router loads of the whole
    batch then."""
    n, device = len(pairs), pairs.len_chosen.device
    sides = [p[side] for side in ("chosen_ids", "rejected_ids") for p in pairs.items]  # (2n,)
    args = rollout.shared_prefix_args([p["prompt_ids"] for p in pairs.items], list(range(n)) * 2,
                                      sides, pad_id, device)
    logits, _ = forward(*args)  # (2n, L, V): logits[:, t] predict token t
    logps = losses.sequence_logprobs(losses.token_logprobs(logits, args[3]), args[4])  # (2n,)
    return logps[:n], logps[n:]


def preference_loss(cfg, chosen, rejected, pairs):
    """--loss on the summed sequence log-probs (n,): (losses (n,), chosen and rejected rewards).
        dpo   : DPO eq. 7 on the log-ratios to the reference (cDPO with --label_smoothing)
        ipo   : IPO eq. 17 on length-averaged log-ratios (a fixed target needs one length scale)
        simpo : SimPO eq. 6, beta / |y| log pi(y) and a margin, no reference
    --length_normalize averages dpo's log-probs over the completion's tokens too."""
    if cfg.loss == "simpo":
        return losses.simpo_loss(chosen, rejected, pairs.len_chosen, pairs.len_rejected, cfg.beta,
                                 cfg.simpo_gamma)
    ref_chosen, ref_rejected = pairs.ref_chosen, pairs.ref_rejected
    if cfg.loss == "ipo" or cfg.length_normalize:  # 1/|y| inside both log-ratios
        chosen, ref_chosen = chosen / pairs.len_chosen, ref_chosen / pairs.len_chosen
        rejected, ref_rejected = rejected / pairs.len_rejected, ref_rejected / pairs.len_rejected
    if cfg.loss == "ipo":
        return losses.ipo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta)
    return losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta,
                           cfg.label_smoothing)


def train_step(policy_ddp, policy, opt, micro, cfg, n_global, pad_id):
    """One optimiser step over this rank's micro-batches of Pairs; each micro-batch's summed loss is
    divided by the step's pair count over all ranks, so that accumulation and DDP equal one big
    batch. Returns the step's sums over all ranks (divide by n_global) and the gradient norm."""
    sums = dict.fromkeys(("loss", "accuracy", "margin", "chosen_logp", "rejected_logp"), 0.0)
    for j, pairs in enumerate(micro):
        with common.micro_batch(policy_ddp, last=j == len(micro) - 1) as world:
            chosen, rejected = pair_logprobs(policy_ddp, pairs, pad_id)
            loss, r_chosen, r_rejected = preference_loss(cfg, chosen, rejected, pairs)
            (loss.sum() / n_global * world).backward()  # DDP averages over ranks
        sums["loss"] += loss.sum().item()
        sums["accuracy"] += (r_chosen > r_rejected).float().sum().item()
        sums["margin"] += (r_chosen - r_rejected).sum().item()
        sums["chosen_logp"] += chosen.sum().item()  # DPO lowers it too, as expected
        sums["rejected_logp"] += rejected.sum().item()
    grad_norm = common.optimizer_step(opt, cfg.grad_clip)
    policy.update_router_biases()
    return {**common.all_reduce_sum(sums, micro[0].len_chosen.device), "grad_norm": grad_norm}


@torch.no_grad()
def add_ref_logprobs(ref, pairs, pad_id, device, batch=256):
    """Store the reference's summed log-probs of both sides in each pair dict."""
    for i in range(0, len(pairs), batch):
        chosen, rejected = pair_logprobs(ref.forward_shared_prefix,
                                         Pairs.of(pairs[i:i + batch], device), pad_id)
        for p, c, r in zip(pairs[i:i + batch], chosen.tolist(), rejected.tolist()):
            p["ref_chosen_logp"], p["ref_rejected_logp"] = c, r


def fingerprint(model):
    """A short hash of a model's weights: which reference a file's stored log-probs came from."""
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def round_pairs(k, cfg, run_cfg, policy, ref, tok, task, held_out, device):
    """Rank 0 writes round k's pairs to the run folder (pairs_round<k>.jsonl): training pairs made
    by the current policy from new prompts (round 0: those of --pairs_file, if given), and the
    held-out pairs, made once by the init from held-out prompts and carried into every round; all
    scored by the reference, unless the file already holds this very reference's log-probs."""
    seed, path = run_cfg.seed, pairs_path(run_cfg.out_dir, k)
    if k == 0 and cfg.pairs_file:
        pairs, settings = rollout.load_pairs(cfg.pairs_file, task)
    else:
        pairs, settings = [], {"task": cfg.task, "n_digits": cfg.n_digits, "source":
                               cfg.pairs_source, "round": k, "num_generations": cfg.num_generations,
                               "temperature": cfg.temperature, "seed": seed, "made_by":
                               "the SFT init" if k == 0 else f"the policy after round {k - 1}"}
    rng = random.Random(common.stream_seed(seed, "dpo", 0, f"round {k}"))
    gen = torch.Generator(device=device)
    gen.manual_seed(common.stream_seed(seed, "dpo", 0, f"round {k}/sampling"))

    def make(problems, split):
        return [{**p, "split": split} for p in rollout.make_pairs(
            policy, tok, task, problems, cfg.pairs_source, cfg.num_generations, cfg.temperature,
            cfg.max_new_tokens, gen, rng)]
    if not pairs:
        pairs = make([task.sample(rng) for _ in range(cfg.num_prompts)], "train")
    if k > 0:
        first = rollout.load_pairs(pairs_path(run_cfg.out_dir, 0))[0]
        pairs += [p for p in first if p["split"] == "heldout"]
    elif not any(p["split"] == "heldout" for p in pairs):
        pairs += make(held_out, "heldout")  # only ever evaluated on
    if cfg.loss != "simpo" and (cfg.recompute_ref or settings.get("reference") != fingerprint(ref)):
        add_ref_logprobs(ref, pairs, tok.pad_id, device)
        settings["reference"] = fingerprint(ref)
    rollout.save_pairs(path, pairs, settings)


def pairs_path(out_dir, k):
    return os.path.join(out_dir, f"pairs_round{k}.jsonl")


# ----------------------------------------------------------------------------------------------
# Plumbing: held-out preference accuracy (tests/test_runs.py guards the rest)


@torch.no_grad()
def heldout_preference(policy, cfg, pairs, pad_id):
    """Preference accuracy (chosen implicit reward > rejected) and mean margin on held-out pairs."""
    policy.eval()
    acc = margin = 0.0
    for i in range(0, len(pairs), 256):
        part = pairs[list(range(i, min(i + 256, len(pairs))))]
        chosen, rejected = pair_logprobs(policy.forward_shared_prefix, part, pad_id)
        _, rc, rr = preference_loss(cfg, chosen, rejected, part)
        acc, margin = acc + (rc > rr).float().sum().item(), margin + (rc - rr).sum().item()
    policy.train()
    return {"pref_acc": acc / max(len(pairs), 1), "pref_margin": margin / max(len(pairs), 1)}


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    cfg, mcfg, run_cfg = common.parse_config([DPOConfig, ModelConfig], argv, __doc__,
                                             out_dir="out/dpo", eval_every=25, ckpt_every=50)
    with common.Run("dpo", cfg, mcfg, run_cfg) as run:  # torchrun, seeds, one-line errors
        run.require(cfg.batch_size % (run.world * cfg.grad_accum) == 0, f"--batch_size "
                    f"{cfg.batch_size} does not divide into {run.world} ranks x {cfg.grad_accum} "
                    "micro-batches")
        tok, task = tasks.Tokenizer(), tasks.get_task(cfg.task, cfg.n_digits)
        if cfg.pairs_file:
            rollout.load_pairs(cfg.pairs_file, task)  # a bad file: one line, before anything
        policy = run.model(lambda: train_sft.load_or_make_init(cfg, run))
        rollout.check_lengths(task, policy.cfg.max_seq_len, cfg.max_new_tokens)
        ref = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_ref: the frozen init
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                weight_decay=cfg.weight_decay, fused=True)  # fused: one pass
        position = {"round": 0, "step_in_round": 0}  # where a resumed run goes on
        run.begin(model=policy, ref=ref, optimizer=opt, position=position)  # + --resume
        policy_ddp = run.wrap(policy, shared_prefix=True)  # what the update calls: DDP, compile
        held_out = task.eval_set(cfg.eval_size)

        def evaluate(step, k=0):  # on rank 0: greedy accuracy, pass@k, maj@k, preference accuracy
            gen = torch.Generator(device=run.device).manual_seed(step)
            m = rollout.evaluate(policy, tok, task, held_out, k=k, n_samples=cfg.pass_n,
                                 generator=gen) if run.main else {}
            return run.eval(step, {**m, **heldout_preference(policy, cfg, heldout, tok.pad_id)}
                            if run.main else {})

        for k in range(position["round"], cfg.rounds):
            # ---- the algorithm: the round's pairs, made by the current policy, scored by pi_ref
            if position["step_in_round"] == 0:
                if k > 0 and cfg.ref_reset:
                    ref.load_state_dict(policy.state_dict())  # iterative DPO: ref <- the policy
                if run.main:
                    round_pairs(k, cfg, run_cfg, policy, ref, tok, task, held_out, run.device)
                if run.world > 1:
                    torch.distributed.barrier()
            pairs = rollout.load_pairs(pairs_path(run_cfg.out_dir, k))[0]
            train = Pairs.of([p for p in pairs if p["split"] == "train"], run.device)
            heldout = Pairs.of([p for p in pairs if p["split"] == "heldout"], run.device)
            run.require(len(train) >= cfg.batch_size, f"round {k} has {len(train)} training pairs, "
                        f"fewer than --batch_size {cfg.batch_size} (a policy right on every sample "
                        "gives no pair): lower --batch_size or raise --num_prompts")
            order = common.epoch_batches(len(train), cfg.batch_size, cfg.epochs, run_cfg.seed,
                                         f"dpo round {k}")
            if run.step == 0:
                evaluate(0, k=cfg.pass_k)
            for i in run.steps(len(order), first=position["step_in_round"], desc=f"round {k}"):
                lr = common.lr_at(i, cfg.lr, cfg.warmup, len(order), cfg.min_lr_ratio)
                for group in opt.param_groups:
                    group["lr"] = lr
                mine = order[i][run.rank::run.world]  # this rank's share of the step's pairs
                per = len(mine) // cfg.grad_accum
                micro = [train[mine[a * per:(a + 1) * per]] for a in range(cfg.grad_accum)]
                m = train_step(policy_ddp, policy, opt, micro, cfg, len(order[i]), tok.pad_id)
                position.update(round=k, step_in_round=i + 1)

                # ---- plumbing: logging, evaluation, checkpoints (tests/test_runs.py guards it)
                n, step, done = len(order[i]), run.step, k == cfg.rounds - 1 and i + 1 == len(order)
                run.log({"step": step, "round": k, "epoch": i // (len(train) // cfg.batch_size),
                         "lr": lr, "pairs_per_s": n / run.elapsed(), "grad_norm": m.pop("grad_norm"),
                         **{key: v / n for key, v in m.items()}}, show=("loss", "accuracy"))
                if run.due(step, run_cfg.eval_every):  # and at the end of each round
                    evaluate(step, k=cfg.pass_k if done else 0)
                run.end_step(step, finished=done)  # a checkpoint when due; Ctrl-C stops here
            if run.stopped:  # --stop_at
                break
            position.update(round=k + 1, step_in_round=0)
    return policy, run.first_eval or {}, run.last_eval or {}


if __name__ == "__main__":
    main(sys.argv[1:])
