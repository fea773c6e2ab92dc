"""DPO (arXiv 2305.18290) and its variants on preference pairs made from an arithmetic task.

    python train_dpo.py                                    # offline DPO from the SFT init; out/dpo/
    python train_dpo.py --rounds 3 --ref_reset             # iterative (online) DPO
    python train_dpo.py --loss ipo                         # IPO (length-averaged log-probs)
    python train_dpo.py --loss simpo                       # SimPO (no reference model)
    python train_dpo.py --label_smoothing 0.1              # cDPO / robust DPO
    python train_dpo.py --pairs_source synthetic           # rejected = a near miss of the answer
    python train_dpo.py --pairs_file out/dpo/pairs_round0.jsonl  # its pairs and ref log-probs
    torchrun --standalone --nproc_per_node=2 train_dpo.py  # DDP: every step's pairs sharded

The reference is the frozen SFT init (--init). Each round: G samples of `num_prompts` new prompts
from the current policy make pairs (chosen: a correct sample, rejected: a wrong one), scored once
by the reference (pairs_round<k>.jsonl), then `epochs` passes over them. More rounds sample again
from the current policy (Xiong et al. arXiv 2312.11456), optionally resetting the reference to it
(--ref_reset, Pang et al. arXiv 2404.19733). Held-out pairs measure preference accuracy.
"""
import copy
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

PAIRS = "pairs_round{}.jsonl"  # round k's pairs, in the run folder


@dataclass
class DPOConfig(common.InitConfig):
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
        super().__post_init__()  # task, n_digits, init and the warm start; max_new_tokens
        common.check_config(
            self, positive=("num_prompts", "num_generations", "temperature",
                            "rounds", "epochs", "batch_size", "grad_accum", "eval_size", "pass_k"),
            non_negative=("beta", "lr", "simpo_gamma", "warmup", "weight_decay", "grad_clip"),
            fractions=("label_smoothing", "min_lr_ratio"),
            ordered=(("pass_k", "pass_n"),), choices={"loss": (
                "dpo", "ipo", "simpo"), "pairs_source": ("policy", "synthetic")})
        if self.label_smoothing > 0.5:
            raise ValueError(f"--label_smoothing must be <= 0.5 (above it the preferences flip), "
                             f"got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "dpo":
            raise ValueError(f"--label_smoothing applies to --loss dpo only, not {self.loss}")
        self.beta = self.beta or (2.0 if self.loss == "simpo" else 1.0)
        self.lr = self.lr or (5e-6 if self.loss == "simpo" else 2e-5)


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
        column = lambda key: torch.tensor([float(key(p)) for p in items], device=device)  # noqa
        scored = bool(items) and all("ref_chosen_logp" in p for p in items)
        return cls(items, column(lambda p: len(p["chosen_ids"])),
                   column(lambda p: len(p["rejected_ids"])),
                   column(lambda p: p["ref_chosen_logp"]) if scored else None,
                   column(lambda p: p["ref_rejected_logp"]) if scored else None)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, rows):  # the pairs at a list of indices
        idx = torch.tensor(rows, dtype=torch.long)
        return Pairs([self.items[i] for i in rows], *(None if t is None else t[idx] for t in (
            self.len_chosen, self.len_rejected, self.ref_chosen, self.ref_rejected)))


def pair_logprobs(forward, pairs, pad_id):
    """Summed completion log-probs of the chosen and the rejected side of `pairs`, from one forward
    in which each pair's prompt runs once for both its sides: (chosen (n,), rejected (n,)).
    forward: a forward_shared_prefix, or Run.wrap's. Pairs never share a prompt's forward (even
    equal prompts): micro-batches then count the router loads of their whole batch."""
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
    c_len, r_len = pairs.len_chosen, pairs.len_rejected
    if cfg.loss == "simpo":
        return losses.simpo_loss(chosen, rejected, c_len, r_len, cfg.beta, cfg.simpo_gamma)
    ref_c, ref_r = pairs.ref_chosen, pairs.ref_rejected
    if cfg.loss == "ipo" or cfg.length_normalize:  # 1/|y| inside both log-ratios
        chosen, rejected = chosen / c_len, rejected / r_len
        ref_c, ref_r = ref_c / c_len, ref_r / r_len
    if cfg.loss == "ipo":
        return losses.ipo_loss(chosen, rejected, ref_c, ref_r, cfg.beta)
    return losses.dpo_loss(chosen, rejected, ref_c, ref_r, cfg.beta, cfg.label_smoothing)


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
        values = (loss, (r_chosen > r_rejected).float(), r_chosen - r_rejected, chosen, rejected)
        for key, v in zip(sums, values):  # in sums' order; DPO lowers chosen_logp too
            sums[key] += v.sum().item()
    grad_norm = common.optimizer_step(opt, cfg.grad_clip)
    policy.update_router_biases()
    return {**common.all_reduce_sum(sums, micro[0].len_chosen.device), "grad_norm": grad_norm}


@torch.no_grad()
def add_ref_logprobs(ref, pairs, pad_id, device, batch=256):
    """Store the reference's summed log-probs of both sides in each pair dict."""
    for i in range(0, len(pairs), batch):
        part = pairs[i:i + batch]
        chosen, rejected = pair_logprobs(ref.forward_shared_prefix, Pairs.of(part, device), pad_id)
        for p, c, r in zip(part, chosen.tolist(), rejected.tolist()):
            p["ref_chosen_logp"], p["ref_rejected_logp"] = c, r


def round_pairs(k, cfg, run_cfg, policy, ref, tok, task, held_out, device):
    """Rank 0 writes round k's pairs (pairs_round<k>.jsonl): training pairs by the current policy
    from new prompts (round 0: --pairs_file's, if given), and the held-out pairs, made once by the
    init; all scored by the reference, unless the file holds this very reference's log-probs."""
    seed, path = run_cfg.seed, os.path.join(run_cfg.out_dir, PAIRS.format(k))
    if k == 0 and cfg.pairs_file:
        pairs, settings = rollout.load_pairs(cfg.pairs_file, task, cfg.max_new_tokens)
    else:
        made_by = "the SFT init" if k == 0 else f"the policy after round {k - 1}"
        pairs, settings = [], {"task": cfg.task, "n_digits": cfg.n_digits, "round": k,
                               "source": cfg.pairs_source, "num_generations": cfg.num_generations,
                               "temperature": cfg.temperature, "seed": seed, "made_by": made_by}
    rng = random.Random(common.stream_seed(seed, "dpo", 0, f"round {k}"))
    gen = torch.Generator(device=device)
    gen.manual_seed(common.stream_seed(seed, "dpo", 0, f"round {k}/sampling"))

    def make(problems, split):
        return [{**p, "split": split} for p in rollout.make_pairs(
            policy, tok, task, problems, cfg.pairs_source, cfg.num_generations, cfg.temperature,
            cfg.max_new_tokens, gen, rng)]
    if not (k == 0 and cfg.pairs_file):
        pairs = make([task.sample(rng) for _ in range(cfg.num_prompts)], "train")
    if k > 0:
        first = rollout.load_pairs(os.path.join(run_cfg.out_dir, PAIRS.format(0)))[0]
        pairs += [p for p in first if p["split"] == "heldout"]
    elif not any(p["split"] == "heldout" for p in pairs):
        pairs += make(held_out, "heldout")  # only ever evaluated on
    scored_by = common.fingerprint(ref)  # which reference the stored log-probs come from
    stale = cfg.recompute_ref or settings.get("reference") != scored_by or any(
        "ref_chosen_logp" not in p for p in pairs)  # e.g. held-out pairs made just now
    if cfg.loss != "simpo" and stale:
        add_ref_logprobs(ref, pairs, tok.pad_id, device)
        settings["reference"] = scored_by
    rollout.save_pairs(path, pairs, settings)


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
        tok, task = tasks.get(cfg.task, cfg.n_digits)
        # ---- plumbing: the checks before anything is written, the held-out evaluation
        run.require(cfg.batch_size % (run.world * cfg.grad_accum) == 0, f"--batch_size "
                    f"{cfg.batch_size} does not divide into {run.world} ranks x {cfg.grad_accum} "
                    "micro-batches")
        if cfg.pairs_file and not run_cfg.resume:  # a bad file: one line, before anything
            rollout.load_pairs(cfg.pairs_file, task, cfg.max_new_tokens)
        held_out = task.eval_set(cfg.eval_size)

        def evaluate(step, k=0):  # on rank 0: greedy accuracy, pass@k, maj@k, preference accuracy
            gen = torch.Generator(device=run.device).manual_seed(step)
            m = {**rollout.evaluate(policy, tok, task, held_out, k=k, n_samples=cfg.pass_n,
                                    generator=gen),
                 **heldout_preference(policy, cfg, heldout, tok.pad_id)} if run.main else {}
            return run.eval(step, m)

        policy = run.resumed() if run_cfg.resume else common.load_or_make_init(cfg, run)
        common.check_lengths(task, policy.cfg.max_seq_len, cfg.max_new_tokens)
        ref = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_ref: the frozen init
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                weight_decay=cfg.weight_decay, fused=True)  # fused: one pass
        position = {"round": 0, "step_in_round": 0}  # where a resumed run goes on
        run.begin(model=policy, ref=ref, optimizer=opt, position=position)  # + --resume
        policy_ddp = run.wrap(policy, shared_prefix=True)  # what the update calls: DDP, compile
        for k in range(position["round"], cfg.rounds):
            if position["step_in_round"] == 0:  # the round's pairs: the policy's, scored by ref
                if k > 0 and cfg.ref_reset:
                    ref.load_state_dict(policy.state_dict())  # iterative DPO: ref <- the policy
                run.on_main(round_pairs, k, cfg, run_cfg, policy, ref, tok, task, held_out,
                            run.device)
            path = run.input(os.path.join(run_cfg.out_dir, PAIRS.format(k)))  # tied to the run
            pairs = rollout.load_pairs(path)[0]
            train = Pairs.of([p for p in pairs if p["split"] == "train"], run.device)
            heldout = Pairs.of([p for p in pairs if p["split"] == "heldout"], run.device)
            run.require(len(train) >= cfg.batch_size, f"round {k} has {len(train)} training pairs, "
                        f"fewer than --batch_size {cfg.batch_size} (a policy right on every sample "
                        "gives no pair): lower --batch_size, or raise --num_prompts (or give a "
                        "--pairs_file with more pairs)")
            order = common.epoch_batches(len(train), cfg.batch_size, cfg.epochs, run_cfg.seed,
                                         f"dpo round {k}")
            if run.step == 0:
                evaluate(0, k=cfg.pass_k)  # the init's figures
            for i in run.steps(len(order), first=position["step_in_round"], desc=f"round {k}"):
                # ---- the algorithm
                lr = common.lr_at(i, cfg.lr, cfg.warmup, len(order), cfg.min_lr_ratio)
                opt.param_groups[0]["lr"] = lr
                mine = order[i][run.rank::run.world]  # this rank's share of the step's pairs
                per = len(mine) // cfg.grad_accum
                micro = [train[mine[a * per:(a + 1) * per]] for a in range(cfg.grad_accum)]
                m = train_step(policy_ddp, policy, opt, micro, cfg, len(order[i]), tok.pad_id)
                position.update(round=k, step_in_round=i + 1)

                # ---- plumbing: logging, evaluation, checkpoints (tests/test_runs.py guards it)
                n, done = len(order[i]), k == cfg.rounds - 1 and i + 1 == len(order)
                epoch, grad_norm = i // (len(train) // cfg.batch_size), m.pop("grad_norm")
                run.log({"step": run.step, "round": k, "epoch": epoch, "lr": lr,
                         "pairs_per_s": n / run.elapsed(), "grad_norm": grad_norm,
                         **{key: v / n for key, v in m.items()}}, show=("loss", "accuracy"))
                if run.due(run.step, run_cfg.eval_every):  # and at the end of each round
                    evaluate(run.step, k=cfg.pass_k if done else 0)
                run.end_step(run.step, finished=done)  # a checkpoint when due; Ctrl-C stops here
            if run.stopped:  # --stop_at
                break
            position.update(round=k + 1, step_in_round=0)
    return policy, run.first_eval or {}, run.last_eval or {}


if __name__ == "__main__":
    main(sys.argv[1:])
