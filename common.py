"""Plumbing every train script shares: config flags, torchrun setup, checkpoints, metrics, schedule.

The training loops themselves stay written out in each train_*.py; this file holds only what would
otherwise be copied into each of them.
"""
import argparse
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------
# Config: CLI flags generated from dataclass fields


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, naming the flag, instead of usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_comments(cls):
    """The `# comment` after each field in the class source, shown by --help."""
    import inspect
    comments = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return comments
    for line in src.splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith(("#", "def", '"')):
            name = line.split(":", 1)[0].strip()
            comments[name] = line.split("#", 1)[1].strip()
    return comments


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_config(classes, argv=None, description=None):
    """Build one instance of each dataclass in `classes` from command-line flags `--name value` or
    `--name=value` (booleans also as a bare `--name`). Returns (instances, names given explicitly)."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    owner = {}
    for cls in classes:
        group = parser.add_argument_group(cls.__name__)
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in owner, f"flag --{f.name} is defined by two configs"
            owner[f.name] = cls
            kind = {"int": int, "float": float, "str": str, "bool": bool}.get(getattr(f.type, "__name__", f.type), str)
            help_text = f"{comments.get(f.name, '')} (default: {f.default})"
            if kind is bool:
                group.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=None, help=help_text)
            else:
                group.add_argument(f"--{f.name}", type=kind, default=None, metavar=kind.__name__.upper(), help=help_text)
    args = vars(parser.parse_args(argv))
    given = {k for k, v in args.items() if v is not None}
    out = []
    for cls in classes:
        kw = {f.name: args[f.name] for f in dataclasses.fields(cls) if args[f.name] is not None}
        try:
            out.append(cls(**kw))
        except ValueError as e:
            parser.error(str(e))
    return out, given


def config_dict(cfg):
    return dataclasses.asdict(cfg)


# Fields that may change between a run and its resumption: they steer the run, not the result.
RUN_ONLY_FIELDS = {"resume", "stop_at", "steps", "eval_every", "ckpt_every", "samples", "quiet", "compile", "out_dir"}


def resume_mismatches(ckpt, cfg, extra_ignore=()):
    """Fields of cfg (a train script's config) that differ from the resumed checkpoint's."""
    return mismatched_fields(ckpt["config"], config_dict(cfg), RUN_ONLY_FIELDS | set(extra_ignore))


def mismatched_fields(saved, current, ignore=()):
    """Names of fields whose values differ between two config dicts."""
    keys = (set(saved) | set(current)) - set(ignore)
    return sorted(k for k in keys if saved.get(k, "<missing>") != current.get(k, "<missing>"))


# ----------------------------------------------------------------------------------------------
# Distributed (torchrun)


def setup_dist():
    """Returns (rank, world_size, device). Under torchrun: nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 1, torch.device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def cleanup_dist():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values, device):
    """Sum a dict of floats over ranks (identity without torchrun)."""
    if not is_dist():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_gather_cat(t):
    """Concatenate an equal-shaped tensor from every rank along dim 0 (identity without torchrun)."""
    if not is_dist():
        return t
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.cat(out)


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (a one-element list without torchrun)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def autocast(device):
    """bf16 autocast on CUDA; float32 (no autocast) on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def setup_torch(seed, device):
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny models slow ~3x once weights become subnormal
    else:
        torch.backends.cuda.matmul.allow_tf32 = True


# ----------------------------------------------------------------------------------------------
# Schedule


def lr_at(step, lr, warmup, total, min_lr_ratio):
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(RuntimeError):
    pass


def rng_state(data_rng):
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "data": data_rng.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def rng_for_rank(states, rank):
    """This rank's saved RNG states (rank 0's if the run was saved with fewer ranks)."""
    return states[rank] if rank < len(states) else states[0]


def set_rng_state(state, data_rng):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    data_rng.setstate(state["data"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, payload):
    """Atomic: write a temporary file in the same folder, flush it to disk, then os.replace. A kill at
    any moment leaves either the old checkpoint or the new one, never a torn file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    buf = io.BytesIO()
    torch.save(payload, buf)
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint, with one-line errors for missing or bad files."""
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, random bytes, unpickling junk: all one clear message
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                              f"delete it or point to another") from None
    required = {"model", "model_config", "config", "step", "tokenizer"}
    if not isinstance(ckpt, dict) or not required <= set(ckpt):
        raise CheckpointError(f"checkpoint {path} is not one of ours (needs keys {sorted(required)})")
    return ckpt


def load_init(path, tok, task, n_digits, given_model_flags, mcfg, device):
    """The model of an SFT checkpoint that DPO / GRPO / PPO start from (--init), with its config.
    A checkpoint of another task or digit count, or whose model config differs from a model flag
    given on the command line, is an error."""
    import tasks
    from model import ModelConfig, Transformer
    ckpt = load_checkpoint(path)
    check_tokenizer(ckpt, tok, path)
    trained = {k: ckpt["config"].get(k) for k in ("task", "n_digits")}
    if trained["task"] != task or (tasks.takes_n_digits(task) and trained["n_digits"] != n_digits):
        raise CheckpointError(f"--init {path} was trained on task {trained['task']} with {trained['n_digits']} "
                              f"digits, not {task} with {n_digits}: pass --init with an SFT run of this task")
    saved = ModelConfig(**ckpt["model_config"])
    bad = [k for k in given_model_flags if getattr(saved, k) != getattr(mcfg, k)]
    if bad:
        raise CheckpointError(f"--init {path} has another model config in: {', '.join(sorted(bad))}")
    model = Transformer(saved).to(device)
    model.load_state_dict(ckpt["model"])
    return model, saved


def check_tokenizer(ckpt, tok, path):
    if ckpt["tokenizer"] != tok.definition():
        raise CheckpointError(f"checkpoint {path} was trained with another tokenizer: {ckpt['tokenizer']}")


# ----------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """One JSON line per step in <run folder>/metrics.jsonl (rank 0 only). Resuming from step k keeps
    the lines of steps <= k and drops those a killed run wrote after its last checkpoint."""

    def __init__(self, path, enabled=True, resume_step=None):
        self.f = None
        if not enabled:
            return
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.f = open(path, "w")
        self.f.writelines(kept)

    def log(self, record):
        if self.f is not None:
            self.f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()


def save_run_config(out_dir, **configs):
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({k: config_dict(v) for k, v in configs.items()}, f, indent=2)


def die(message):
    """Stop the run with a one-line message (every rank)."""
    print(f"error: {message}", file=sys.stderr)
    cleanup_dist()
    sys.exit(1)


class Timer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self):
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
