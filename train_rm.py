"""A Bradley-Terry reward model on preference pairs made from an arithmetic task: the first half
of the RLHF pipeline that train_ppo.py completes (--reward model --reward_model out/rm).

    python train_rm.py                                      # from the SFT init; out/rm/
    python train_rm.py --pairs_file out/dpo/pairs_round0.jsonl   # the pairs DPO trained on
    torchrun --standalone --nproc_per_node=2 train_rm.py    # DDP: every step's pairs sharded

The reward model is the SFT Transformer with a scalar head (model.ScalarModel) read at the last
real token of prompt + completion, trained with -log sigmoid(r(x, y_w) - r(x, y_l) - margin)
(losses.bradley_terry_loss, InstructGPT section 3.5) on the same kind of pairs as DPO
(rollout.make_pairs: chosen a correct sample of the SFT model, rejected an incorrect one).
Reported: preference accuracy on held-out pairs and the AUC of the score for correct against
incorrect completions sampled on held-out prompts. Load it with load_reward_model; score
(prompt, completion) token lists with rollout.score_completions.
"""
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
from model import ModelConfig, ScalarModel


@dataclass
class RMConfig(common.InitConfig):
    pairs_source: str = "policy"  # policy (the SFT init's samples) or synthetic (near misses)
    pairs_file: str = ""  # train on these pairs (a pairs file of DPO or of another RM run)
    num_prompts: int = 65536  # training prompts (policy pairs: a pair needs a wrong sample)
    num_generations: int = 8  # samples per prompt for policy pairs
    temperature: float = 1.0  # sampling temperature of policy pairs and of the AUC samples
    margin: float = 0.0  # Bradley-Terry margin
    epochs: int = 6  # passes over the pairs
    batch_size: int = 64  # pairs per optimiser step, over all ranks and micro-batches
    grad_accum: int = 1  # micro-batches per optimiser step (per rank)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step
    warmup: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    eval_size: int = 256  # held-out prompts (held-out pairs and AUC samples)
    auc_samples: int = 4  # completions sampled per held-out prompt for the AUC

    def __post_init__(self):
        super().__post_init__()  # task, n_digits, init and the warm start; max_new_tokens
        common.check_config(
            self, positive=("num_prompts", "num_generations", "temperature",
                            "epochs", "batch_size", "grad_accum", "lr", "eval_size", "auc_samples"),
            non_negative=("margin", "warmup", "weight_decay", "grad_clip"),
            fractions=("min_lr_ratio",),
            choices={"pairs_source": ("policy", "synthetic")})


def load_reward_model(path, task, device, max_new_tokens=None):
    """A reward model trained by this script (a run folder or its ckpt.pt) for this task, long
    enough for its prompts and max_new_tokens; frozen, in eval mode. Score with
    rollout.score_completions."""
    ckpt = common.load_trained(path, f"reward model {path}", "rm", task)
    rm = common.model_of(ckpt, f"reward model {path}", ScalarModel, device)
    common.check_lengths(task, rm.cfg.max_seq_len, max_new_tokens or task.max_new_tokens())
    return rm.eval().requires_grad_(False)


def reward_model(sft):
    """A new reward model from an SFT model: its body the SFT weights, its scalar head zero."""
    rm = ScalarModel(sft.cfg).to(sft.head.weight.device)
    rm.body.load_state_dict(sft.state_dict())
    return rm


# ----------------------------------------------------------------------------------------------
# The algorithm: pairs, scores, one optimiser step


def make_run_data(cfg, run_cfg, sft, tok, task, held_out):
    """Rank 0 writes the run's pairs (training pairs from new prompts, held-out pairs from held-out
    prompts; or those of --pairs_file) and the AUC samples (completions of the SFT init on held-out
    prompts, with their rewards) into the run folder. Each split has its own streams: the held-out
    pairs do not depend on --num_prompts."""
    def generator(part):
        gen = torch.Generator(device=sft.head.weight.device)
        return gen.manual_seed(common.stream_seed(run_cfg.seed, "rm", 0, part))

    def make(problems, split):
        rng = random.Random(common.stream_seed(run_cfg.seed, "rm", 0, f"{split} pairs"))
        return [{**p, "split": split} for p in rollout.make_pairs(
            sft, tok, task, problems, cfg.pairs_source, cfg.num_generations, cfg.temperature,
            cfg.max_new_tokens, generator(f"{split} sampling"), rng)]
    if cfg.pairs_file:
        pairs, settings = rollout.load_pairs(cfg.pairs_file, task, cfg.max_new_tokens)
    else:
        prompts_rng = random.Random(common.stream_seed(run_cfg.seed, "rm", 0, "prompts"))
        pairs = make([task.sample(prompts_rng) for _ in range(cfg.num_prompts)], "train")
        settings = {"task": cfg.task, "n_digits": cfg.n_digits, "source": cfg.pairs_source,
                    "made_by": "the SFT init", "num_generations": cfg.num_generations,
                    "temperature": cfg.temperature, "seed": run_cfg.seed}
    if not any(p["split"] == "heldout" for p in pairs):
        pairs += make(held_out, "heldout")
    rollout.save_pairs(os.path.join(run_cfg.out_dir, "pairs.jsonl"), pairs, settings)
    prompts = [tasks.encode_problem(tok, p, with_completion=False)[0] for p in held_out]
    r = rollout.generate(sft, prompts, eos_id=tok.eos_id, pad_id=tok.pad_id,
                         num_generations=cfg.auc_samples, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, generator=generator("auc sampling"))
    texts, lengths = rollout.decode_completions(tok, r), r.completion_mask.sum(1).long().tolist()
    G = cfg.auc_samples
    common.write_jsonl(os.path.join(run_cfg.out_dir, "heldout_samples.jsonl"), [
        {"prompt_ids": prompts[i // G], "completion": text,
         "completion_ids": r.completion_ids[i, :lengths[i]].tolist(),
         "correct": task.reward(text, held_out[i // G]) == 1.0} for i, text in enumerate(texts)])


def pair_scores(rm, pairs, pad_id, device):
    """Rewards of the chosen and the rejected side of `pairs`, from one plain forward over the 2n
    sequences `prompt + completion`: (chosen (n,), rejected (n,)). rm: a ScalarModel, or what
    Run.wrap made of it. Training runs this plain forward, each prompt twice; scoring runs each
    prompt once (rollout.score_completions): the two agree to 1e-5."""
    seqs = [p["prompt_ids"] + p[side] for side in ("chosen_ids", "rejected_ids") for p in pairs]
    idx, pad_mask = rollout.right_pad(seqs, pad_id, device)
    r = rollout.last_real(rm(idx, pad_mask=pad_mask), pad_mask)  # (2n,)
    return r[:len(pairs)], r[len(pairs):]


def train_step(rm_ddp, rm, opt, micro, n_global, cfg, pad_id, device):
    """One optimiser step over this rank's micro-batches of pairs: each micro-batch's summed
    Bradley-Terry loss is divided by the step's pair count over all ranks, so that accumulation and
    DDP equal one big batch. Returns the step's sums over ranks, and the gradient norm."""
    sums = dict.fromkeys(("loss", "accuracy", "margin", "r_chosen", "r_rejected"), 0.0)
    for a, pairs in enumerate(micro):
        with common.micro_batch(rm_ddp, last=a == len(micro) - 1) as world:
            r_chosen, r_rejected = pair_scores(rm_ddp, pairs, pad_id, device)
            loss = losses.bradley_terry_loss(r_chosen, r_rejected, cfg.margin) * len(pairs)  # sum
            (loss / n_global * world).backward()  # DDP averages over ranks
        sums["loss"] += loss.item()
        sums["accuracy"] += (r_chosen > r_rejected).float().sum().item()
        for key, v in (("margin", r_chosen - r_rejected), ("r_chosen", r_chosen),
                       ("r_rejected", r_rejected)):
            sums[key] += v.sum().item()
    grad_norm = common.optimizer_step(opt, cfg.grad_clip)
    rm.body.update_router_biases()
    return {**common.all_reduce_sum(sums, device), "grad_norm": grad_norm}


# ----------------------------------------------------------------------------------------------
# Plumbing: the held-out measures (tests/test_runs.py guards the rest)


def auc(scores, labels):
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties
    counting one half (the Mann-Whitney statistic). scores: (n,) float, labels: (n,) bool."""
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).float().mean()  # (P, Q) each positive, each negative
    return (greater + 0.5 * (pos[:, None] == neg[None, :]).float().mean()).item()


@torch.no_grad()
def evaluate_rm(rm, heldout, samples, pad_id, device):
    """Held-out pair accuracy and mean margin, and the AUC of correct vs incorrect samples."""
    rm.eval()
    acc = margin = 0.0
    for i in range(0, len(heldout), 256):
        chosen, rejected = pair_scores(rm, heldout[i:i + 256], pad_id, device)
        acc += (chosen > rejected).float().sum().item()
        margin += (chosen - rejected).sum().item()
    scores = torch.cat([rollout.score_completions(rm, [s["prompt_ids"] for s in samples[i:i + 256]],
                                                  [s["completion_ids"] for s in samples[i:i + 256]],
                                                  pad_id) for i in range(0, len(samples), 256)])
    rm.train()
    correct = torch.tensor([s["correct"] for s in samples], device=scores.device)
    return {"pair_acc": acc / max(1, len(heldout)), "pair_margin": margin / max(1, len(heldout)),
            "auc": auc(scores, correct), "frac_correct": correct.float().mean().item()}


# ----------------------------------------------------------------------------------------------
# Main


def main(argv=None):
    cfg, mcfg, run_cfg = common.parse_config([RMConfig, ModelConfig], argv, __doc__,
                                             out_dir="out/rm", eval_every=25, ckpt_every=50)
    with common.Run("rm", cfg, mcfg, run_cfg) as run:  # torchrun, seeds, one-line errors
        run.require(cfg.batch_size % (run.world * cfg.grad_accum) == 0, f"--batch_size "
                    f"{cfg.batch_size} does not divide into {run.world} ranks x {cfg.grad_accum} "
                    "micro-batches")
        tok, task = tasks.get(cfg.task, cfg.n_digits)
        if cfg.pairs_file and not run_cfg.resume:  # a bad file: one line, before anything
            rollout.load_pairs(cfg.pairs_file, task, cfg.max_new_tokens)
        if run_cfg.resume:
            rm = run.resumed(ScalarModel)
        else:  # the SFT init's weights, a zero head
            rm = reward_model(common.load_or_make_init(cfg, run))
        common.check_lengths(task, rm.cfg.max_seq_len, cfg.max_new_tokens)
        opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                weight_decay=cfg.weight_decay, fused=True)  # fused: one pass
        run.begin(model=rm, optimizer=opt)  # restored by --resume; opens the run folder
        rm_ddp = run.wrap(rm)  # DDP and torch.compile, as configured
        if not run_cfg.resume:  # the pairs and AUC samples, by the init (rm.body now), on rank 0
            run.on_main(make_run_data, cfg, run_cfg, rm.body, tok, task,
                        task.eval_set(cfg.eval_size))
        pairs = rollout.load_pairs(run.input(os.path.join(run_cfg.out_dir, "pairs.jsonl")))[0]
        train = [p for p in pairs if p["split"] == "train"]
        heldout = [p for p in pairs if p["split"] == "heldout"]
        samples = common.read_jsonl(run.input(os.path.join(run_cfg.out_dir,
                                                           "heldout_samples.jsonl")))
        order = common.epoch_batches(len(train), cfg.batch_size, cfg.epochs, run_cfg.seed, "rm")
        run.require(order, f"{len(train)} training pairs are fewer than --batch_size "
                    f"{cfg.batch_size}: lower it, or raise --num_prompts (with --pairs_file: "
                    "give a file with more pairs)")
        if run.main and not run_cfg.quiet:
            print(f"{len(train)} training pairs ({len(order)} steps), {len(heldout)} held-out "
                  f"pairs, {len(samples)} AUC samples")

        def evaluate(step):  # on rank 0: held-out pair accuracy and AUC
            m = evaluate_rm(rm, heldout, samples, tok.pad_id, run.device) if run.main else {}
            return run.eval(step, m)

        if run.start == 0:
            evaluate(0)
        for step in run.steps(len(order)):
            # ---- the algorithm
            lr = common.lr_at(step, cfg.lr, cfg.warmup, len(order), cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            mine = [train[j] for j in order[step][run.rank::run.world]]  # this rank's share
            per, n = len(mine) // cfg.grad_accum, len(order[step])
            micro = [mine[a * per:(a + 1) * per] for a in range(cfg.grad_accum)]
            sums = train_step(rm_ddp, rm, opt, micro, n, cfg, tok.pad_id, run.device)

            # ---- plumbing: logging, evaluation, checkpoints (tests/test_runs.py guards it)
            run.log({"step": step + 1, "lr": lr, "pairs_per_s": n / run.elapsed(),
                     **{k: v if k == "grad_norm" else v / n for k, v in sums.items()}},
                    show=("loss", "accuracy"))
            if run.due(step + 1, run_cfg.eval_every):
                evaluate(step + 1)
            run.end_step(step + 1)  # a checkpoint when due; Ctrl-C stops here, resumable
    return rm, run.first_eval or {}, run.last_eval or {}


if __name__ == "__main__":
    main(sys.argv[1:])
