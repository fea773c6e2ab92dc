"""The papers' claims on the toy task, one command each (the README's results table).

    python results.py passk       # RL raises maj@k more than pass@k (DeepSeekMath Figure 7)
    python results.py rft         # RFT against online RFT against GRPO (DeepSeekMath Figure 5)
    python results.py ref_reset   # iterative GRPO against a fixed reference (DeepSeekMath Figure 6)
    python results.py variants    # grpo, dapo, dr_grpo: accuracy and completion length (PITFALLS 2)
    python results.py rft --seeds 0 1 2 --steps 100   # fewer steps for a quick look

Every run is the train scripts' own main() from the shared SFT warm start (out/sft, made first if
missing, as `python train_grpo.py` makes it), into out/results/<experiment>/<method>/seed<k>; the
seed changes the RL run's problems and samples, not its init. Each experiment prints its table
(mean and spread over seeds) and its wall time, and writes results/<experiment>.json and .png
(the PNG needs matplotlib: pip install -r requirements-plot.txt).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

import common
import rollout
import tasks
import train_grpo
import train_sft
from model import ModelConfig, Transformer

RFT_FLAGS = ["--data", "rft", "--lr", "3e-4", "--warmup", "10", "--min_lr_ratio", "0.1", "--weight_decay", "0",
             "--eval_every", "25"]  # GRPO's learning-rate schedule and evaluation schedule

# experiment -> (the claim, [(method, train script, its flags)])
EXPERIMENTS = {
    "rft": ("online RFT beats RFT, and GRPO beats both (DeepSeekMath Figure 5)", [
        ("RFT", train_sft.main, RFT_FLAGS),
        ("online RFT", train_grpo.main, ["--gradient_coef", "rft", "--beta", "0"]),
        ("GRPO", train_grpo.main, [])]),
    "ref_reset": ("iterative GRPO (pi_ref <- pi every 50 steps) beats a fixed reference (DeepSeekMath Figure 6)", [
        ("fixed reference", train_grpo.main, []),
        ("reference reset every 50 steps", train_grpo.main, ["--ref_reset_every", "50"])]),
    "variants": ("on the multi-step task (completions of different lengths), GRPO's per-sequence mean lets wrong "
                 "completions grow; DAPO's token mean and Dr. GRPO's constant divisor do not (PITFALLS 2)", [
        ("grpo", train_grpo.main, ["--task", "multistep"]),
        ("dapo", train_grpo.main, ["--task", "multistep", "--loss_type", "dapo", "--epsilon_high", "0.28",
                                   "--filter_zero_std"]),
        ("dr_grpo", train_grpo.main, ["--task", "multistep", "--loss_type", "dr_grpo", "--scale_rewards", "none"])]),
}
TASK = {"variants": "multistep"}  # the task of an experiment's runs (add otherwise)


def shared_init(task="add"):
    """out/sft (out/sft_<task>), the SFT warm start every RL script starts from; made here if missing."""
    cfg = train_grpo.GRPOConfig(task=task, quiet=True)
    train_sft.load_or_make_init(cfg, tasks.Tokenizer(), set(), ModelConfig(), torch.device("cpu"))
    return train_sft.init_path(cfg)


def read_run(out_dir):
    """A finished run's held-out accuracy curve, last evaluation, and mean completion length curve."""
    rows = common.read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    evals = [r for r in rows if r["kind"] == "eval"]
    return {"curve": [(r["step"], r["eval_greedy_acc"]) for r in evals],
            "final": {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval_")},
            "length": [(r["step"], r["completion_len"]) for r in rows if "completion_len" in r]}


def run_methods(name, methods, seeds, steps):
    """Every method at every seed; returns {method: [run summary per seed]} with wall times."""
    out = {}
    for method, main, flags in methods:
        for seed in seeds:
            folder = os.path.join("out", "results", name, method.replace(" ", "_"), f"seed{seed}")
            argv = flags + ["--seed", str(seed), "--out_dir", folder, "--quiet"]
            argv += ["--steps", str(steps)] if steps else ["--steps", "300"]  # RFT too: GRPO's 300 steps
            t = time.perf_counter()
            main(argv)
            out.setdefault(method, []).append({"seed": seed, "wall_s": time.perf_counter() - t, **read_run(folder)})
            print(f"  {method}, seed {seed}: {out[method][-1]['final']['greedy_acc']:.1%} "
                  f"({out[method][-1]['wall_s']:.0f} s)")
    return out


def spread(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare(name, args):
    claim, methods = EXPERIMENTS[name]
    print(f"{name}: {claim}")
    runs = run_methods(name, methods, args.seeds, args.steps)
    print(f"\n| method | held-out greedy accuracy (mean +- std over {len(args.seeds)} seeds) | per seed | "
          "final completion length | wall time per run |\n|---|---|---|---|---|")
    for method, rs in runs.items():
        m, s = spread([r["final"]["greedy_acc"] for r in rs])
        length = [r["length"][-1][1] for r in rs if r["length"]]
        each = ", ".join(f"{r['final']['greedy_acc']:.1%}" for r in rs)
        print(f"| {method} | {m:.1%} +- {s:.1%} | {each} | "
              f"{statistics.mean(length) if length else float('nan'):.2f} | "
              f"{statistics.mean(r['wall_s'] for r in rs):.0f} s |")
    panels = [("curve", "held-out greedy accuracy", "accuracy (%)", 100)]
    if name == "variants":
        panels.append(("length", "completion length (T = 1)", "tokens, end token included", 1))
    return {"claim": claim, "seeds": args.seeds, "runs": runs}, panels


def passk(args):
    """pass@k and maj@k for k = 1..16 (16 samples per held-out prompt, T = 1) before and after the
    default GRPO run, one sampling seed per --seeds entry."""
    claim = "RL raises maj@k more than pass@k: it sharpens the distribution more than it adds ability (DeepSeekMath Figure 7)"
    print(f"passk: {claim}")
    folder = os.path.join("out", "results", "passk", "grpo")
    t = time.perf_counter()
    train_grpo.main(["--out_dir", folder, "--quiet"] + (["--steps", str(args.steps)] if args.steps else []))
    tok, task = tasks.Tokenizer(), tasks.get_task("add", 0)
    problems, ks, out = task.eval_set(256), list(range(1, 17)), {}
    for label, path in (("SFT init", shared_init()), ("after GRPO", os.path.join(folder, "ckpt.pt"))):
        ckpt = common.load_checkpoint(path)
        m = Transformer(ModelConfig(**ckpt["model_config"]))
        m.load_state_dict(ckpt["model"])
        per_seed = [rollout.evaluate(m.eval(), tok, task, problems, k=ks, n_samples=16,
                                     generator=torch.Generator().manual_seed(seed)) for seed in args.seeds]
        out[label] = {f"{kind}@{k}": spread([r[f"{kind}@{k}"] for r in per_seed]) for kind in ("pass", "maj") for k in ks}
    print("\n| k | pass@k: SFT -> GRPO | maj@k: SFT -> GRPO |\n|---|---|---|")
    for k in (1, 2, 4, 8, 16):
        a, b = out["SFT init"], out["after GRPO"]
        print(f"| {k} | {a[f'pass@{k}'][0]:.1%} -> {b[f'pass@{k}'][0]:.1%} (+{b[f'pass@{k}'][0] - a[f'pass@{k}'][0]:.1%}) | "
              f"{a[f'maj@{k}'][0]:.1%} -> {b[f'maj@{k}'][0]:.1%} (+{b[f'maj@{k}'][0] - a[f'maj@{k}'][0]:.1%}) |")
    print(f"wall time {time.perf_counter() - t:.0f} s")
    return {"claim": claim, "seeds": args.seeds, "ks": ks, "results": out}


def plot(name, result, panels):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -r requirements-plot.txt): no PNG")
        return
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False)
    if name == "passk":
        ax = axes[0][0]
        for i, (label, r) in enumerate(result["results"].items()):
            for kind, style in (("pass", "-"), ("maj", "--")):
                ys = [100 * r[f"{kind}@{k}"][0] for k in result["ks"]]
                ax.plot(result["ks"], ys, style, color=f"C{i}", marker="o", markersize=3, label=f"{kind}@k, {label}")
        ax.set(title=f"pass@k and maj@k, 256 held-out problems\n(T = 1, mean of {len(result['seeds'])} sampling seeds)",
               xlabel="k (samples)", ylabel="accuracy (%)", xscale="log", xticks=[1, 2, 4, 8, 16], xticklabels=["1", "2", "4", "8", "16"])
    for ax, (key, title, ylabel, scale) in zip(axes[0], panels):
        for i, (method, rs) in enumerate(result["runs"].items()):
            steps = [s for s, _ in rs[0][key]]
            per_step = [[scale * r[key][j][1] for r in rs] for j in range(len(steps))]
            ax.plot(steps, [statistics.mean(v) for v in per_step], color=f"C{i}", label=f"{method} (mean)")
            ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=f"C{i}", alpha=0.2)
        ax.set(title=f"{title}, {len(result['seeds'])} seeds (band: min-max)", xlabel="step", ylabel=ylabel)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join("results", f"{name}.png"), dpi=110)
    print(f"wrote results/{name}.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["passk", *EXPERIMENTS])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the RL runs (default: 0 1 2)")
    p.add_argument("--steps", type=int, default=0, help="steps of every run (default: each script's own, 300)")
    args = p.parse_args(argv)
    if args.steps < 0:
        p.error(f"--steps must be >= 0, got {args.steps}")
    common.setup_torch(0, torch.device("cpu"))
    shared_init(TASK.get(args.experiment, "add"))
    t = time.perf_counter()
    result, panels = (passk(args), []) if args.experiment == "passk" else compare(args.experiment, args)
    result["wall_s"] = time.perf_counter() - t
    os.makedirs("results", exist_ok=True)
    with open(os.path.join("results", f"{args.experiment}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{args.experiment}: {result['wall_s'] / 60:.1f} min in all; wrote results/{args.experiment}.json")
    plot(args.experiment, result, panels)


if __name__ == "__main__":
    main(sys.argv[1:])
