"""The papers' claims on the toy task, one command each (the README's results table).

    python results.py passk       # RL raises maj@k more than pass@k (DeepSeekMath Figure 7)
    python results.py rft         # RFT against online RFT against GRPO (DeepSeekMath Figure 5)
    python results.py ref_reset   # iterative GRPO against a fixed reference (DeepSeekMath Figure 6)
    python results.py variants    # grpo, dapo, dr_grpo: accuracy and completion length (Dr. GRPO)
    python results.py process     # process against outcome supervision, multi-step task
                                  # (DeepSeekMath Figure 5/6)
    python results.py grpo_vs_ppo # GRPO against PPO: accuracy against samples and time, memory,
                                  # parameters
    python results.py online_offline  # offline DPO against iterative DPO against GRPO
    python results.py balance     # aux-loss-free balancing against a balance loss against none
                                  # (SFT, MaxVio)
    python results.py mtp         # MTP on against off: SFT sample efficiency
    python results.py mla_mha     # MLA against MHA at equal parameters: SFT accuracy, KV-cache
                                  # bytes per token
    python results.py r1_zero     # GRPO from a pretrained base: accuracy, length, thinking rate
                                  # against the step (DeepSeek-R1 Figures 2 and 3)
    python results.py format_reward   # accuracy alone against accuracy + format (R1 2.2.2)
    python results.py cold_start  # R1-Zero against cold start + GRPO (R1 2.3.1)
    python results.py r1_pipeline # base -> cold start -> GRPO -> rejection sampling -> GRPO
    python results.py length_bias # grpo, dr_grpo, dapo on the thinking task: correct and wrong
                                  # completions' lengths (Dr. GRPO)
    python results.py process_think, rft_think   # process and rft again, on the thinking task
    python results.py distill_vs_rl  # a small student: GRPO against three kinds of distillation
    python results.py grpo_model_reward  # GRPO on the rule reward against a learned reward
    python results.py rft --seeds 0 1 2 --steps 100   # fewer steps for a quick look

Every run is a train script's own command, into out/results/<experiment>/<method>/seed<k>. The RL
and DPO runs start from the shared SFT warm start (out/sft, made first if missing, as `python
train_grpo.py` makes it) and their seed changes the problems and samples, not the init; the SFT
runs (balance, mtp, mla_mha) train from scratch and their seed changes the weights too. Each
experiment prints its table (mean and spread over seeds) and its wall time, and writes
results/<experiment>.json and .png (the PNG needs matplotlib: pip install -r requirements-plot.txt).

A rerun keeps what is done: a finished run is read again, an interrupted one (Ctrl-C, a kill)
resumes from its checkpoint; --fresh starts every run again. `--steps N` runs go to folders of
their own (seed<k>_steps<N>).
"""
import argparse
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import types

import torch

import common
import plot
import rollout
import tasks
import train_grpo
import train_rm
import train_sft
from model import ModelConfig, Transformer, param_counts

HERE = os.path.dirname(os.path.abspath(__file__))
# GRPO's steps, learning-rate schedule and evaluations
RFT_FLAGS = ["--data", "rft", "--steps", "300", "--lr", "3e-4", "--warmup", "10",
             "--min_lr_ratio", "0.1", "--weight_decay", "0", "--eval_every", "25"]
# from scratch: ~99% at step 1000
SFT_FLAGS = ["--steps", "1000", "--eval_every", "50", "--samples", "0"]
# a weaker multi-step init than out/sft_multistep's 90%, so that supervision has room to matter
PROCESS_INIT = {"task": "multistep", "init": "out/sft_multistep_40", "warmstart_target_acc": 0.4}
# a hand-typed run makes the same init
PROCESS_FLAGS = [f"--{k}={v}" for k, v in PROCESS_INIT.items()] + ["--steps", "150"]
# R1-Zero: GRPO from the thinking task's pretrained base (out/base_think), R1's rule rewards,
# mean@16 at every evaluation (DeepSeek-R1 Figure 2's metric)
THINK = {"task": "think"}
R1_FLAGS = ["--task", "think", "--reward", "accuracy,format:0.1", "--eval_samples", "16",
            "--eval_size", "128", "--eval_every", "10", "--steps", "80"]
# R1's cold start: SFT of the base on 512 worked examples, made once before the runs
COLD = "out/cold_think"
COLD_START = ["--task", "think", "--init", "out/base_think", "--train_size", "512",
              "--steps", "100", "--lr", "3e-4", "--warmup", "10", "--eval_every", "25",
              "--samples", "0", "--out_dir", COLD]
RUN = "out/results/r1_pipeline/{}/{run}"  # a stage of the pipeline, the seed's own
# distillation: the teacher is the seed's R1-Zero run (4 layers); the student a base of 2 layers
# and width 64 (28% of the teacher's parameters), pretrained once as out/base_think is
SMALL_BASE = ["--task", "think", "--data", "pretrain", "--n_layers", "2", "--n_dense_layers", "1",
              "--dim", "64", "--inter_dim", "192", "--steps", "1500", "--eval_every", "250",
              "--samples", "0", "--out_dir", "out/base_think_small"]
STUDENT = ["--init", "out/base_think_small"]
TEACHER = ["--teacher", "out/results/r1_zero/R1-Zero/{run}"]  # {run}: seed<k>[_steps<N>]
# the teacher writes the data: 4 samples of each of 4096 new prompts, the correct ones kept
TEACHER_DATA = ["--task", "think", "--data", "rft", "--rft_prompts", "4096", "--rft_samples", "4",
                "--steps", "900", "--lr", "1e-3", "--warmup", "10", "--min_lr_ratio", "0.1",
                "--weight_decay", "0", "--eval_every", "50", "--eval_size", "128",
                "--eval_samples", "16", "--samples", "0"] + STUDENT + TEACHER

# experiment -> (the claim, [(method, train script, its flags[, "experiment/method" whose runs
# these are: the same command, run once])])
EXPERIMENTS = {
    "rft": ("online RFT beats RFT, and GRPO beats both (DeepSeekMath Figure 5)", [
        ("RFT", "train_sft.py", RFT_FLAGS),
        ("online RFT", "train_grpo.py", ["--gradient_coef", "rft", "--beta", "0"]),
        ("GRPO", "train_grpo.py", [])]),
    "ref_reset": ("iterative GRPO (pi_ref <- pi every 50 steps) beats a fixed reference "
                  "(DeepSeekMath Figure 6)", [
        ("fixed reference", "train_grpo.py", []),
        ("reference reset every 50 steps", "train_grpo.py", ["--ref_reset_every", "50"])]),
    "variants": ("on the multi-step task (completions of different lengths), GRPO's per-sequence "
                 "mean lets wrong completions grow; DAPO's token mean and Dr. GRPO's constant "
                 "divisor do not (arXiv 2503.20783)", [
        ("grpo", "train_grpo.py", ["--task", "multistep"]),
        ("dapo", "train_grpo.py", ["--task", "multistep", "--loss_type", "dapo",
                                   "--epsilon_high", "0.28", "--filter_zero_std"]),
        ("dr_grpo", "train_grpo.py", ["--task", "multistep", "--loss_type", "dr_grpo",
                                      "--scale_rewards", "none"])]),
    "process": ("process supervision (a reward per step) beats outcome supervision (one per "
                "answer) on a multi-step task (DeepSeekMath Figure 5/6)", [
        ("outcome", "train_grpo.py", PROCESS_FLAGS),
        ("process", "train_grpo.py", PROCESS_FLAGS + ["--supervision", "process"])]),
    "grpo_vs_ppo": ("GRPO matches PPO's quality without a critic, holding fewer networks "
                    "(seeds 001, 002; DeepSeekMath 4.1)", [
        ("GRPO", "train_grpo.py", []),
        ("PPO", "train_ppo.py", [])]),
    "online_offline": ("online beats offline preference learning: GRPO > iterative DPO > DPO "
                       "(DeepSeekMath 5.2.1)", [
        ("offline DPO", "train_dpo.py", []),
        ("iterative DPO, 3 rounds", "train_dpo.py", ["--rounds", "3", "--ref_reset"]),
        ("GRPO", "train_grpo.py", [])]),
    "balance": ("auxiliary-loss-free balancing keeps expert loads as balanced as a balance loss "
                "does, without its gradient, and costs no accuracy (DeepSeek-V3 2.1.2; "
                "arXiv 2408.15664)", [
        ("aux-loss-free (bias gamma 0.001)", "train_sft.py",
         SFT_FLAGS + ["--balance_loss_alpha", "0"]),
        ("balance loss (alpha 0.001)", "train_sft.py",
         SFT_FLAGS + ["--bias_update_speed", "0", "--balance_loss_alpha", "0.001"]),
        ("no balancing", "train_sft.py",
         SFT_FLAGS + ["--bias_update_speed", "0", "--balance_loss_alpha", "0"])]),
    "mtp": ("multi-token prediction densifies the training signal: MTP on learns from fewer "
            "samples than off (DeepSeek-V3 2.2)", [
        ("MTP depth 1 (lambda 0.3)", "train_sft.py", SFT_FLAGS),
        ("no MTP", "train_sft.py", SFT_FLAGS + ["--mtp_depth", "0"])]),
    "mla_mha": ("MLA matches MHA's quality at equal parameters with a far smaller KV cache "
                "(DeepSeek-V2 2.1)", [
        ("MLA", "train_sft.py", SFT_FLAGS),
        # head dims chosen so that MHA's main model has MLA's parameters (974k against 966k)
        ("MHA", "train_sft.py", SFT_FLAGS + ["--attention", "mha", "--qk_nope_head_dim", "8"])]),
    "r1_zero": ("GRPO with rule rewards straight from a base model (R1-Zero) raises accuracy, and "
                "the thinking grows: more completions think, and they grow longer (DeepSeek-R1 "
                "Figures 2 and 3)", [("R1-Zero", "train_grpo.py", R1_FLAGS)]),
    "format_reward": ("the format reward keeps completions well formed; accuracy comes from the "
                      "accuracy reward (DeepSeek-R1 2.2.2)", [
        ("accuracy", "train_grpo.py", R1_FLAGS + ["--reward", "accuracy"]),
        ("accuracy + format (0.1)", "train_grpo.py", R1_FLAGS, "r1_zero/R1-Zero")]),
    "cold_start": ("a cold start (SFT on a few ideal worked examples) makes RL faster and its "
                   "outputs well formed (DeepSeek-R1 2.3.1)", [
        ("R1-Zero", "train_grpo.py", R1_FLAGS, "r1_zero/R1-Zero"),
        ("cold start + GRPO", "train_grpo.py", R1_FLAGS + ["--init", COLD])]),
    "r1_pipeline": ("each stage of R1 helps: cold start -> GRPO -> rejection sampling SFT -> "
                    "GRPO (DeepSeek-R1 2.3)", [
        ("GRPO 1", "train_grpo.py", R1_FLAGS + ["--init", COLD], "cold_start/cold_start_GRPO"),
        ("rejection sampling SFT", "train_sft.py", [
            "--task", "think", "--data", "rft", "--init", "out/base_think", "--teacher",
            "out/results/cold_start/cold_start_GRPO/{run}", "--steps", "200", "--lr", "1e-3",
            "--warmup", "10", "--eval_every", "50", "--samples", "0"]),
        ("GRPO 2", "train_grpo.py", R1_FLAGS + [
            "--init", RUN.format("rejection_sampling_SFT", run="{run}")])]),
    "length_bias": ("GRPO's 1/|o| lets wrong completions grow long; Dr. GRPO's constant divisor "
                    "and DAPO's token mean do not (arXiv 2503.20783)", [
        ("grpo", "train_grpo.py", R1_FLAGS, "r1_zero/R1-Zero"),
        ("dr_grpo", "train_grpo.py", R1_FLAGS + ["--loss_type", "dr_grpo", "--scale_rewards",
                                                 "none"]),
        ("dapo", "train_grpo.py", R1_FLAGS + ["--loss_type", "dapo", "--epsilon_high", "0.28"])]),
    "process_think": ("process supervision beats outcome supervision, on the thinking task "
                      "(DeepSeekMath 4.1.3)", [
        ("outcome", "train_grpo.py", R1_FLAGS, "r1_zero/R1-Zero"),
        ("process", "train_grpo.py", R1_FLAGS + ["--supervision", "process"])]),
    "rft_think": ("online RFT beats RFT, and GRPO beats both, on the thinking task (DeepSeekMath "
                  "Figure 5)", [
        ("RFT", "train_sft.py", ["--task", "think", "--data", "rft", "--steps", "100", "--lr",
                                 "3e-4", "--warmup", "10", "--eval_every", "10"]),
        ("online RFT", "train_grpo.py", R1_FLAGS + ["--gradient_coef", "rft", "--beta", "0"]),
        ("GRPO", "train_grpo.py", R1_FLAGS, "r1_zero/R1-Zero")]),
    "distill_vs_rl": ("distilling a stronger model into a small one beats RL on the small one "
                      "(DeepSeek-R1 4.1): teacher-written data against GRPO from the small base", [
        ("teacher (R1-Zero, 4 layers)", "train_grpo.py", R1_FLAGS, "r1_zero/R1-Zero"),
        ("(a) GRPO", "train_grpo.py", R1_FLAGS + STUDENT),
        ("(b) teacher-written data", "train_sft.py", TEACHER_DATA),
        ("(c) soft targets on them (alpha 0.5)", "train_sft.py", TEACHER_DATA + [
            "--alpha", "0.5"]),
        ("(d) on-policy (GKD)", "train_grpo.py", R1_FLAGS + STUDENT + TEACHER + [
            "--gradient_coef", "distill", "--beta", "0", "--loss_type", "dapo"])]),
    "grpo_model_reward": ("GRPO on a learned reward is hacked as PPO is, unless the KL holds it "
                          "(InstructGPT; DeepSeekMath's model reward)", [
        ("rule reward", "train_grpo.py", ["--steps", "100"]),
        ("learned reward", "train_grpo.py", ["--steps", "100", "--reward", "model",
                                             "--reward_model", "out/rm"]),
        ("learned reward, 10x KL (beta 0.4)", "train_grpo.py", [
            "--steps", "100", "--reward", "model", "--reward_model", "out/rm", "--beta", "0.4"])]),
}
# the SFT warm start an experiment's runs share, made before them (the settings of the RL configs
# that name it; out/sft otherwise); None: the runs train from scratch
INIT = {"variants": {"task": "multistep"}, "process": PROCESS_INIT, "balance": None, "mtp": None,
        "mla_mha": None, **dict.fromkeys(["r1_zero", "format_reward", "cold_start", "r1_pipeline",
                                          "length_bias", "process_think", "rft_think",
                                          "distill_vs_rl"], THINK)}
# runs made once before an experiment's, (script, its flags): the cold start, the small base, the
# reward model (train_rm.py's defaults)
BEFORE = {"cold_start": [(train_sft, COLD_START)], "r1_pipeline": [(train_sft, COLD_START)],
          "distill_vs_rl": [(train_sft, SMALL_BASE)],
          "grpo_model_reward": [(train_rm, ["--out_dir", "out/rm"])]}


def mean_of(get, fmt):
    """A table column: the mean over seeds of get(run summary), formatted."""
    return lambda rs: fmt.format(statistics.mean(get(r) for r in rs))


def first_at(key, acc, fmt="{:.0f}"):
    """A table column: per seed, the first x of the run's (x, accuracy) curve `key` where held-out
    accuracy reaches acc ("never" if it does not)."""
    return lambda rs: ", ".join(next((fmt.format(x) for x, a in r[key] if a >= acc), "never")
                                for r in rs)


def change(key, fmt="{:.1%}"):
    """A table column: per seed, a curve's first value -> its last."""
    return lambda rs: ", ".join(f"{fmt.format(r[key][0][1])} -> {fmt.format(r[key][-1][1])}"
                                if r[key] else "n/a" for r in rs)


R1_COLUMNS = [("mean@16 (T = 1): start -> end, per seed", change("mean16")),
              ("thinking rate (T = 1): start -> end", change("think")),
              ("mean length, tokens (T = 1): start -> end", change("eval_len", "{:.1f}"))]
FORMAT = ("well-formed share of the last step's samples",
          mean_of(lambda r: r["reward_format"][-1][1] if r["reward_format"] else float("nan"),
                  "{:.1%}"))
REACH_90 = ("first step at >= 90%, per seed", first_at("curve", 0.9))


def budget(r):
    """What a distillation run cost beyond its own sampling: the teacher's completions (sampled
    for the data, or the student's scored by it) and the student's optimiser steps."""
    c = r["config"]
    if "sft" in c:
        rft = c["sft"]["data"] == "rft" and c["sft"]["teacher"]  # else its own, or none
        sampled = c["sft"]["rft_prompts"] * c["sft"]["rft_samples"] if rft else 0
        return f"{sampled:,} sampled; {c['sft']['steps']} steps"
    g = c["grpo"]
    scored = g["steps"] * g["batch_size"] * g["num_generations"] if g.get("teacher") else 0
    return (f"{scored:,} scored; " if scored else "") + (
        f"{g['steps'] * g['num_iterations'] * g['num_minibatches']} steps")


DISTILL = [("mean@16 (T = 1) at the end", mean_of(lambda r: r["mean16"][-1][1], "{:.1%}")),
           ("mean@16 per seed", lambda rs: ", ".join(f"{r['mean16'][-1][1]:.1%}" for r in rs)),
           ("parameters", mean_of(lambda r: r["params"], "{:,.0f}")),
           ("teacher's completions; student's optimiser steps", lambda rs: budget(rs[0]))]
REWARD_MODEL = [("learned reward of the samples: first -> last step",
                 change("reward_model", "{:.2f}")),
                ("accuracy of the samples: first -> last step", change("reward_accuracy")),
                ("KL to pi_ref, last step", mean_of(lambda r: r["kl"][-1][1], "{:.3f}"))]
# experiment -> extra table columns: (header, the runs of one method -> text)
COLUMNS = {
    "distill_vs_rl": DISTILL, "grpo_model_reward": REWARD_MODEL,
    "variants": [("final completion length", mean_of(lambda r: r["length"][-1][1], "{:.2f}"))],
    "grpo_vs_ppo": [("parameters held", mean_of(lambda r: r["params_held"], "{:,.0f}")),
                    ("peak RSS (MB)", mean_of(lambda r: r["peak_rss_mb"], "{:.0f}")),
                    ("samples", mean_of(lambda r: r["samples"][-1][0], "{:,.0f}")),
                    ("training time (s)", mean_of(lambda r: r["seconds"][-1][0], "{:.0f}")),
                    ("training s to first reach 97%, per seed", first_at("seconds", 0.97))],
    "balance": [REACH_90,
                ("MaxVio, mean of the last 100 steps",
                 mean_of(lambda r: statistics.mean(v for _, v in r["maxvio"][-100:]), "{:.3f}")),
                ("MaxVio, mean over training",
                 mean_of(lambda r: statistics.mean(v for _, v in r["maxvio"]), "{:.3f}"))],
    "mtp": [REACH_90],
    "r1_zero": R1_COLUMNS, "format_reward": R1_COLUMNS + [FORMAT],
    "cold_start": [("first step at mean@16 >= 50%, per seed", first_at("mean16", 0.5))] + R1_COLUMNS
    + [FORMAT], "r1_pipeline": R1_COLUMNS, "process_think": R1_COLUMNS,
    "length_bias": [("length of wrong completions, last step",
                     mean_of(lambda r: r["len_wrong"][-1][1], "{:.1f}")),
                    ("length of correct completions, last step",
                     mean_of(lambda r: r["len_correct"][-1][1], "{:.1f}"))],
    "mla_mha": [REACH_90, ("main model parameters", mean_of(lambda r: r["params_main"], "{:,.0f}")),
                ("KV cache bytes per token (float32)",
                 mean_of(lambda r: r["kv_bytes_per_token"], "{:,.0f}"))],
}

ACCURACY = ("curve", "held-out greedy accuracy", "step", "accuracy (%)", 100)
R1_PANELS = [ACCURACY, ("mean16", "held-out mean@16 (T = 1)", "step", "accuracy (%)", 100),
             ("eval_len", "mean completion length (T = 1)", "step", "tokens, end token included",
              1),
             ("think", "thinking rate (T = 1)", "step", "completions that think (%)", 100)]
LENGTHS = [("len_correct", "length of correct completions", "step", "tokens", 1),
           ("len_wrong", "length of wrong completions", "step", "tokens", 1)]
# experiment -> plot panels: (summary key, title, x label, y label, y scale), each a curve of
# (x, y) per run
PANELS = {
    "variants": [ACCURACY, ("length", "completion length (T = 1)", "step",
                            "tokens, end token included", 1)],
    "grpo_vs_ppo": [("samples", "held-out greedy accuracy", "completions sampled",
                     "accuracy (%)", 100),
                    ("seconds", "held-out greedy accuracy",
                     "training time (s, evaluations excluded; mean x)", "accuracy (%)", 100)],
    "online_offline": [("curve", "held-out greedy accuracy",
                        "optimiser step (DPO: over its rounds)", "accuracy (%)", 100)],
    **dict.fromkeys(["r1_zero", "format_reward", "cold_start", "process_think"], R1_PANELS),
    "length_bias": [R1_PANELS[1]] + LENGTHS, "rft_think": [ACCURACY],
    "distill_vs_rl": [("curve", "held-out greedy accuracy", "optimiser step", "accuracy (%)", 100),
                      ("mean16", "held-out mean@16 (T = 1)", "optimiser step", "accuracy (%)",
                       100)],
    "grpo_model_reward": [ACCURACY, ("reward_model", "the learned reward of the step's samples",
                                     "step", "reward model score", 1),
                          ("reward_accuracy", "accuracy of the step's samples (T = 1)", "step",
                           "accuracy (%)", 100)],
    "balance": [ACCURACY, ("maxvio", "MaxVio of each step's expert loads\n"
                                     "(mean over MoE layers; 20-step means)", "step",
                           "MaxVio = (max load - mean) / mean", 1)],
}


def shared_init(**settings):
    """The SFT warm start of the RL configs with these settings (out/sft by default); made here if
    missing, so that no run's time includes it. load_or_make_init reads what it needs of a run
    (its model flags and config, its run config, its device) from the namespace."""
    cfg = train_grpo.GRPOConfig(**settings)
    run = types.SimpleNamespace(model_flags=set(), mcfg=ModelConfig(), main=True,
                                rc=common.RunConfig(quiet=True), device=torch.device("cpu"))
    common.load_or_make_init(cfg, run)
    return common.checkpoint_file(cfg.init)


def read_run(out_dir):
    """A finished run's held-out accuracy curve and last evaluation, its mean completion length and
    MaxVio (mean over MoE layers) per step, and for GRPO and PPO the accuracy against the samples
    seen and the training seconds (evaluations excluded), the parameters held and the peak RSS."""
    rows = common.read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    evals = [r for r in rows if r["kind"] == "eval"]
    train = [r for r in rows if r["kind"] == "train"]
    out = {"curve": [(r["step"], r["eval_greedy_acc"]) for r in evals],
           "final": {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")},
           "length": [(r["step"], r["completion_len"]) for r in train if "completion_len" in r],
           "maxvio": [(r["step"], r["maxvio_mean"]) for r in train if "maxvio_mean" in r],
           **{key: [(r["step"], r[f"eval_{k}"]) for r in evals if r.get(f"eval_{k}") is not None]
              for key, k in (("mean16", "mean@16"), ("eval_len", "len"),
                             ("think", "think_rate"))},  # the thinking task's, at T = 1
           **{key: [(r["step"], r[key]) for r in train if r.get(key) is not None]
              for key in ("len_correct", "len_wrong", "reward_format", "reward_model",
                          "reward_accuracy", "kl")}, "config": {}}
    config_path = os.path.join(out_dir, "config.json")
    config = out["config"]  # and the checkpoint's model: its parameters
    if os.path.exists(config_path):
        with open(config_path) as f:
            config.update(json.load(f))
    if os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        ckpt = common.load_checkpoint(out_dir)
        out["params"] = param_counts(common.model_of(ckpt, out_dir, weights=False))["total"]
    rl = config.get("grpo") or config.get("ppo")
    if rl and train and all("samples_per_s" in r for r in train):
        n = rl["batch_size"] * rl.get("num_generations", 1)  # completions per step
        seconds = dict(zip((r["step"] for r in train),
                           itertools.accumulate(n / r["samples_per_s"] for r in train)))
        seconds[0] = 0.0
        out["samples"] = [(step * n, acc) for step, acc in out["curve"]]
        out["seconds"] = [(seconds[step], acc) for step, acc in out["curve"]]
        out["params_held"] = sum(v for k, v in train[0].items() if k.startswith("params_"))
        out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in train if "peak_rss_mb" in r)
    if "model" in config and "sft" in config:  # model size and KV cache, measured on a fresh cache
        mcfg = ModelConfig(**config["model"])
        model = Transformer(mcfg)
        cache = model.new_cache(1, mcfg.max_seq_len)
        out["params_main"] = param_counts(model)["main"]
        out["kv_bytes_per_token"] = sum(t.nbytes for c in cache for t in (c.c_kv, c.k_pe, c.k, c.v)
                                        if t is not None) / mcfg.max_seq_len
    return out


def slug(method):
    """A method's folder name: its label up to a parenthesis, e.g. "iterative_DPO_3_rounds"."""
    return re.sub(r"[^A-Za-z0-9-]+", "_", method.split(" (")[0]).strip("_")


def run_methods(name, methods, seeds, steps, fresh=False):
    """Every method at every seed, each its own process (its own peak memory), as a user would
    type it; returns {method: [run summary per seed]} with wall times. A run folder that holds a
    checkpoint is resumed (a finished run then does nothing), unless fresh."""
    out = {}
    for method, script, flags, *same in methods:
        for seed in seeds:
            where, run = name, slug(method)
            if same:  # the very run of another experiment: kept there, read here
                where, run = same[0].split("/")
            folder = os.path.join("out", "results", where, run,
                                  f"seed{seed}" + (f"_steps{steps}" if steps else ""))
            how = keep(folder, fresh)
            # a stage's --init, a teacher: the run of this seed (and --steps) in its experiment
            argv = [f.format(seed=seed, run=os.path.basename(folder)) for f in flags]
            argv += ["--seed", str(seed), "--out_dir", folder, "--quiet", how]
            if steps and script == "train_dpo.py":
                print(f"  note: --steps does not apply to {method}: DPO runs its epochs")
            elif steps:
                argv += ["--steps", str(steps)]
            t, wall = time.perf_counter(), os.path.join(folder, "results_wall_s.json")
            saved = checkpoint_time(folder)
            code = run_child([sys.executable, os.path.join(HERE, script), *argv])
            if code:
                sys.exit(f"results: this run failed: python {script} {' '.join(argv)} (to start "
                         "it again: --fresh)")
            seconds = earlier_seconds(wall) if how == "--resume" else 0.0  # None: not known
            if seconds is not None and checkpoint_time(folder) != saved:  # it trained
                seconds += time.perf_counter() - t
            common.atomic_write(wall, json.dumps(seconds))
            out.setdefault(method, []).append({"seed": seed, "wall_s": seconds,
                                               **read_run(folder)})
            print(f"  {method}, seed {seed}: {out[method][-1]['final']['greedy_acc']:.1%} "
                  f"({seconds_text(seconds)})", flush=True)
    return out


def earlier_seconds(path):
    """The wall seconds results.py spent on a run before (its earlier parts, if it was
    interrupted), None if not recorded (a run made before results.py recorded them)."""
    try:
        with open(path) as f:
            seconds = json.load(f)
    except (OSError, ValueError):
        return None
    return seconds if isinstance(seconds, (int, float)) else None


def checkpoint_time(folder):
    path = os.path.join(folder, "ckpt.pt")
    return os.path.getmtime(path) if os.path.exists(path) else None


def seconds_text(seconds):
    return "time not recorded" if seconds is None else f"{seconds:.0f} s"


def keep(folder, fresh):
    """The flag that keeps what a run folder holds (--resume: a finished run is kept, an
    interrupted one goes on) or starts it again (--overwrite)."""
    return "--resume" if os.path.isfile(os.path.join(folder, "ckpt.pt")) and not fresh \
        else "--overwrite"


def _parent_death_signal():
    """Linux's prctl(PR_SET_PDEATHSIG, SIGTERM) as a function the child calls before it runs,
    looked up here (a forked child should not load libraries); None where there is none."""
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: a child outlives a killed results.py
        return None
    return lambda: prctl(1, signal.SIGTERM)


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_child(argv):
    """Run a train script and return its exit code. It runs in its own process group, so that
    Ctrl-C in the terminal reaches results.py alone, which passes the signal on once and waits
    for the run's checkpoint; then results.py stops, and the same command resumes. The child gets
    SIGTERM (a checkpoint, then exit) if results.py dies, even by kill -9, so that no run is left
    orphaned holding its folder."""
    parent, pdeathsig, state = os.getpid(), _parent_death_signal(), {"child": None, "got": None}

    def in_the_child():
        if pdeathsig is not None:
            pdeathsig()
        if os.getppid() != parent:  # results.py died before prctl
            os.kill(os.getpid(), signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def forward(signum, frame):
        if state["got"] is None:
            state["got"] = signum
            state["child"].send_signal(signum)
    mine = [s for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]  # nohup: kept
    signal.pthread_sigmask(signal.SIG_BLOCK, mine)  # a signal while starting it waits for it
    handlers = {s: signal.signal(s, forward) for s in mine}
    state["child"] = subprocess.Popen(argv, start_new_session=True, preexec_fn=in_the_child)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, mine)
    code = state["child"].wait()
    for s, h in handlers.items():
        signal.signal(s, h)
    if state["got"] is not None:
        sys.exit(f"results: stopped by {signal.Signals(state['got']).name}; finished runs are "
                 "kept: run the same command again to resume the interrupted one and go on")
    return code


def spread(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(name, args):
    claim, methods = EXPERIMENTS[name]
    print(f"{name}: {claim}")
    return {"claim": claim, "seeds": args.seeds,
            "runs": run_methods(name, methods, args.seeds, args.steps, args.fresh)}


def table(name, result):
    """The experiment's markdown table: held-out accuracy (mean +- std over seeds, and per seed),
    its own columns, and the wall time of a run."""
    columns = COLUMNS.get(name, [])
    print(f"\n| method | held-out greedy accuracy (mean +- std over {len(result['seeds'])} seeds) "
          "| per seed | "
          + "".join(f"{header} | " for header, _ in columns) + "wall time per run |\n|---|---|---|"
          + "---|" * (len(columns) + 1))
    for method, rs in result["runs"].items():
        m, s = spread([r["final"]["greedy_acc"] for r in rs])
        each = ", ".join(f"{r['final']['greedy_acc']:.1%}" for r in rs)
        extra = "".join(f"{column(rs)} | " for _, column in columns)
        print(f"| {method} | {m:.1%} +- {s:.1%} | {each} | "
              f"{extra}{seconds_text(wall_mean(rs))} |")


def wall_mean(rs):
    """The mean wall time of a method's runs; None if any is not recorded."""
    known = [r["wall_s"] for r in rs]
    return None if None in known else statistics.mean(known)


def passk(args):
    """pass@k and maj@k for k = 1..16 (16 samples per held-out prompt, T = 1) before and after the
    default GRPO run, one sampling seed per --seeds entry."""
    claim = ("RL raises maj@k more than pass@k: it sharpens the distribution more than it adds "
             "ability (DeepSeekMath Figure 7)")
    print(f"passk: {claim}")
    folder = os.path.join("out", "results", "passk", "grpo" + (f"_steps{args.steps}"
                                                               if args.steps else ""))
    train_grpo.main(["--out_dir", folder, "--quiet", keep(folder, args.fresh)]
                    + (["--steps", str(args.steps)] if args.steps else []))
    tok, task = tasks.get("add")
    problems, ks, out = task.eval_set(256), list(range(1, 17)), {}
    for label, path in (("SFT init", shared_init()),
                        ("after GRPO", os.path.join(folder, "ckpt.pt"))):
        ckpt = common.load_checkpoint(path)
        m = common.model_of(ckpt, path)
        per_seed = [rollout.evaluate(m.eval(), tok, task, problems, k=ks, n_samples=16,
                                     generator=torch.Generator().manual_seed(seed))
                    for seed in args.seeds]
        out[label] = {f"{kind}@{k}": spread([r[f"{kind}@{k}"] for r in per_seed])
                      for kind in ("pass", "maj") for k in ks}
    return {"claim": claim, "seeds": args.seeds, "ks": ks, "results": out}


def passk_table(result):
    print("\n| k | pass@k: SFT -> GRPO | maj@k: SFT -> GRPO |\n|---|---|---|")
    a, b = result["results"]["SFT init"], result["results"]["after GRPO"]
    for k in (1, 2, 4, 8, 16):
        pass_a, pass_b = a[f"pass@{k}"][0], b[f"pass@{k}"][0]
        maj_a, maj_b = a[f"maj@{k}"][0], b[f"maj@{k}"][0]
        print(f"| {k} | {pass_a:.1%} -> {pass_b:.1%} (+{pass_b - pass_a:.1%}) | "
              f"{maj_a:.1%} -> {maj_b:.1%} (+{maj_b - maj_a:.1%}) |")


def smooth(curve, window):
    """(x, y) points -> the means of each `window` consecutive points."""
    return [(statistics.mean(x for x, _ in curve[i:i + window]),
             statistics.mean(y for _, y in curve[i:i + window]))
            for i in range(0, len(curve), window)]


def draw(name, result, panels):
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-plot.txt): no PNG")
        return
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4),
                             squeeze=False)
    if name == "passk":
        ax = axes[0][0]
        for i, (label, r) in enumerate(result["results"].items()):
            for kind, style in (("pass", "-"), ("maj", "--")):
                ys = [100 * r[f"{kind}@{k}"][0] for k in result["ks"]]
                ax.plot(result["ks"], ys, style, color=f"C{i}", marker="o", markersize=3,
                        label=f"{kind}@k, {label}")
        ax.set(title="pass@k and maj@k, 256 held-out problems\n"
                     f"(T = 1, mean of {len(result['seeds'])} sampling seeds)",
               xlabel="k (samples)", ylabel="accuracy (%)", xscale="log", xticks=[1, 2, 4, 8, 16],
               xticklabels=["1", "2", "4", "8", "16"])
    for ax, (key, title, xlabel, ylabel, scale) in zip(axes[0], panels):
        for i, (method, rs) in enumerate(result["runs"].items()):
            curves = [smooth(r[key], 20) if key == "maxvio" else r[key] for r in rs]
            n = min(len(c) for c in curves)  # the same evaluation steps in every seed's run
            xs = [statistics.mean(c[j][0] for c in curves) for j in range(n)]
            ys = [[scale * c[j][1] for c in curves] for j in range(n)]
            ax.plot(xs, [statistics.mean(v) for v in ys], color=f"C{i}", linewidth=2,
                    label=f"{method} (mean)")
            # each seed thin: a mean of runs that did and did not learn is no run at all
            for c in curves:
                ax.plot([x for x, _ in c[:n]], [scale * y for _, y in c[:n]], color=f"C{i}",
                        linewidth=0.8, alpha=0.4)
        ax.set(title=f"{title}, {len(result['seeds'])} seeds (thin: each seed)", xlabel=xlabel,
               ylabel=ylabel)
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))  # 150k, not 150000
        ax.title.set_fontsize(10)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    plot.save_png(fig, os.path.join("results", f"{name}.png"))
    print(f"wrote results/{name}.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["passk", *EXPERIMENTS])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of the runs (default: 0 1 2)")
    p.add_argument("--steps", type=int, default=0,
                   help="steps of every run (default: the experiment's own)")
    p.add_argument("--fresh", action="store_true",
                   help="start every run again, instead of keeping finished runs and resuming "
                        "interrupted ones")
    p.add_argument("--table", action="store_true",
                   help="run nothing: print the table and redraw the PNG from "
                        "results/<experiment>.json")
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    path = os.path.join("results", f"{args.experiment}.json")
    if args.table:
        if not os.path.exists(path):
            sys.exit(f"results: no {path}: run `python results.py {args.experiment}` first")
        try:
            with open(path) as f:
                result = json.load(f)
        except ValueError:
            result = None
        if not isinstance(result, dict) or not {"claim", "wall_s", "seeds"} <= set(result):
            sys.exit(f"results: {path} is not a saved experiment: run `python results.py "
                     f"{args.experiment}` again")
    else:
        common.setup_torch(0, torch.device("cpu"))
        init = INIT.get(args.experiment, {})
        if init is not None:
            shared_init(**init)
        for script, argv in BEFORE.get(args.experiment, []):  # made once, kept: in no run's time
            script.main(argv + ["--quiet", keep(argv[argv.index("--out_dir") + 1], False)])
        t = time.perf_counter()
        result = passk(args) if args.experiment == "passk" else compare(args.experiment, args)
        result["wall_s"] = time.perf_counter() - t
        os.makedirs("results", exist_ok=True)
        common.atomic_write(path, json.dumps(result, indent=1))
    print(result["claim"])
    passk_table(result) if args.experiment == "passk" else table(args.experiment, result)
    print(f"{args.experiment}: {result['wall_s'] / 60:.1f} min in all; results in {path}")
    draw(args.experiment, result,
         [] if args.experiment == "passk" else PANELS.get(args.experiment, [ACCURACY]))


if __name__ == "__main__":
    main(sys.argv[1:])
