"""Draw run folders' metrics.jsonl: held-out accuracy, reward, KL and loss against the step.

    python plot.py out/grpo                        # one run -> out/grpo/metrics.png
    python plot.py out/grpo out/ppo --out cmp.png  # several runs, one line each

Needs matplotlib, an optional extra (pip install -r requirements-plot.txt); nothing else in the
project imports it. A panel is drawn when any of the runs logged its metric.
"""
import argparse
import io
import json
import os
import sys

import common

# (metric keys, the first one a run has is drawn; panel title; y-axis label)
PANELS = [
    (("eval_greedy_acc",), "held-out greedy accuracy", "accuracy (%)"),
    (("reward_mean", "correct"), "batch reward (T = 1)", "mean reward (PPO: fraction correct)"),
    (("score",), "PPO score (rule, or the reward model's)", "mean score"),
    (("kl",), "KL to the reference", "nats (PPO: per sequence, GRPO: per token)"),
    (("loss",), "training loss", "loss"),
]


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def save_png(fig, path):
    """fig as a PNG at path, written atomically (a kill leaves the old plot or the new one)."""
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    common.atomic_write(path, png.getvalue())


def series(path):
    """{metric: (steps, values)} of one metrics.jsonl, each metric in step order."""
    out = {}
    with open(path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a blank line, the torn last line of a run being written or
                continue  # killed, or bytes that are not text
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                continue  # JSON, but not a metrics record
            for k, v in rec.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    out.setdefault(k, ([], []))
                    out[k][0].append(rec["step"])
                    out[k][1].append(100 * v if k == "eval_greedy_acc" else v)
    return {k: tuple(zip(*sorted(zip(*v), key=lambda point: point[0]))) for k, v in out.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (or metrics.jsonl files)")
    p.add_argument("--out", default="",
                   help="PNG to write (default: metrics.png in the first run folder)")
    args = p.parse_args(argv)
    files = [r if r.endswith(".jsonl") else os.path.join(r, "metrics.jsonl") for r in args.runs]
    for f in files:
        if not os.path.isfile(f):
            fail(f"no metrics file at {f}")
    out = args.out or os.path.join(os.path.dirname(files[0]), "metrics.png")
    if not os.path.isdir(os.path.dirname(out) or "."):
        fail(f"--out {out}: no folder {os.path.dirname(out)}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("plot.py needs matplotlib: pip install -r requirements-plot.txt")
    runs = {r.removesuffix("/metrics.jsonl").rstrip("/") or r: series(f)
            for r, f in zip(args.runs, files)}
    panels = [(keys, title, ylabel) for keys, title, ylabel in PANELS
              if any(k in s for s in runs.values() for k in keys)]
    if not panels:
        fail(f"none of {', '.join(files)} holds accuracy, reward, KL or loss")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (keys, title, ylabel) in zip(axes[0], panels):
        for i, (name, s) in enumerate(runs.items()):
            k = next((k for k in keys if k in s), None)
            if k:  # one colour per run in every panel; evaluations are sparse: mark them
                ax.plot(*s[k], color=f"C{i}", marker="o" if k.startswith("eval") else None,
                        markersize=3, label=name)
        ax.set(title=title, xlabel="step (SFT/DPO: optimiser step; RL: rollout batch)",
               ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        save_png(fig, out)
    except common.WriteError as e:
        fail(str(e))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
