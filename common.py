"""Plumbing every train script shares: config flags and their checks, torchrun setup, data streams,
checkpoints, the run folder (lock, config, metrics), graceful stop, schedule.

The training loops themselves stay written out in each train_*.py; this file holds only what would
otherwise be copied into each of them.
"""
import argparse
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import random
import resource
import signal
import sys
import time
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

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
            # argparse %-formats help texts: a literal % in a comment must be doubled
            help_text = f"{comments.get(f.name, '')} (default: {f.default})".replace("%", "%%")
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


def check_config(cfg, positive=(), non_negative=(), fractions=(), choices=None):
    """Raise one ValueError naming every bad field of a config dataclass (each a --flag): every float
    must be finite, `positive` fields > 0, `non_negative` >= 0, `fractions` in [0, 1], and
    `choices` maps a field to its allowed values. Call it from __post_init__."""
    errors = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            errors.append(f"--{f.name} must be a finite number, got {v}")
        elif f.name in positive and v <= 0:
            errors.append(f"--{f.name} must be > 0, got {v}")
        elif f.name in non_negative and v < 0:
            errors.append(f"--{f.name} must be >= 0, got {v}")
        elif f.name in fractions and not 0 <= v <= 1:
            errors.append(f"--{f.name} must be in [0, 1], got {v}")
        elif f.name in (choices or {}) and v not in choices[f.name]:
            errors.append(f"--{f.name} must be one of {', '.join(map(str, choices[f.name]))}; got {v!r}")
    if errors:
        raise ValueError("; ".join(errors))


def check_out_dir(path):
    """Raise ValueError if `path` cannot hold a run: it, or a folder above it, is a file, or its
    checkpoint path is taken by something that is not a file. Creates nothing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out_dir {path} is a file, not a folder")
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"--out_dir {path} lies under {parent}, which is a file")
    if not os.access(parent or ".", os.W_OK):
        raise ValueError(f"--out_dir {path}: {parent or '.'} is not writable")
    ckpt = os.path.join(path, "ckpt.pt")
    if os.path.exists(ckpt) and not os.path.isfile(ckpt):
        raise ValueError(f"--out_dir {path}: {ckpt} exists and is not a file")


def check_lengths(task, max_seq_len, max_new_tokens=None):
    """Raise ValueError unless the task's longest sequence fits the model: `<bos> prompt completion
    <eos>` for SFT, or `<bos> prompt` + max_new_tokens when sampling, and max_new_tokens leaves
    room for the longest reference answer and its end token."""
    prompt, completion = task.max_lengths()
    needed = 1 + prompt + (completion + 1 if max_new_tokens is None else max_new_tokens)
    if needed > max_seq_len:
        raise ValueError(f"--max_seq_len {max_seq_len} is too short for task {task.name} with {task.n_digits} "
                         f"digits: its longest sequence has {needed} tokens")
    if max_new_tokens is not None and max_new_tokens < completion + 1:
        raise ValueError(f"--max_new_tokens {max_new_tokens} is shorter than the longest answer of task {task.name} "
                         f"({completion} tokens and an end token): it could never be written")


# Fields that may change between a run and its resumption: they steer the run, not the result.
RUN_ONLY_FIELDS = {"resume", "stop_at", "steps", "eval_every", "ckpt_every", "samples", "quiet", "compile", "out_dir"}
INIT_FIELDS = ("init", "warmstart_steps", "warmstart_target_acc")  # how an RL run got its init: irrelevant once resumed


def resume_mismatches(ckpt, cfg, extra_ignore=()):
    """Fields of cfg (a train script's config) that differ from the resumed checkpoint's. A field the
    checkpoint lacks (saved before the field existed) counts as its default."""
    saved = {**config_dict(type(cfg)()), **ckpt["config"]}
    return mismatched_fields(saved, config_dict(cfg), RUN_ONLY_FIELDS | set(extra_ignore))


def load_for_resume(path, kind, tok, cfg, mcfg, model_flags, extra_ignore=()):
    """The checkpoint that --resume continues, checked: readable, of this script's kind and tokenizer,
    saved with the same config (but the fields that may change between a run and its resumption) and
    the same values of the model flags given on the command line. Raises CheckpointError or
    ValueError naming every field that differs. Returns (ckpt, its ModelConfig)."""
    from model import ModelConfig
    ckpt = load_checkpoint(path)
    check_tokenizer(ckpt, tok, path)
    check_kind(ckpt, kind, f"checkpoint {path}")
    bad = resume_mismatches(ckpt, cfg, extra_ignore)
    bad += [f"{k} ({ckpt['model_config'].get(k)}, not {getattr(mcfg, k)})" for k in sorted(model_flags)
            if ckpt["model_config"].get(k) != getattr(mcfg, k)]
    if bad:
        raise ValueError(f"checkpoint {path} does not match this run's config in: {', '.join(bad)}")
    return ckpt, ModelConfig(**ckpt["model_config"])


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


def rank():
    return dist.get_rank() if is_dist() else 0


def world_size():
    return dist.get_world_size() if is_dist() else 1


def all_reduce_sum(values, device):
    """Sum a dict of floats over ranks (identity without torchrun)."""
    if not is_dist():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_reduce_max(value, device):
    """The largest of a float over ranks (identity without torchrun)."""
    if not is_dist():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


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


def no_sync_unless_last(model, last):
    """DDP's no_sync() for every micro-batch of an optimiser step but the last (whose backward then
    all-reduces the accumulated gradients); a plain context without DDP."""
    return model.no_sync() if isinstance(model, DDP) and not last else nullcontext()


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
# Data streams


def stream_seed(seed, stage, rank, part=""):
    """A 63-bit seed for one stream of random draws, distinct for every (seed, stage, rank, part):
    SFT, GRPO, DPO and PPO (`stage`) never replay each other's problems from the same --seed, and
    no two ranks share a stream."""
    digest = hashlib.sha256(f"{seed}/{stage}/{rank}/{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def data_rng(seed, stage, rank):
    """The problem stream of one stage on one rank."""
    return random.Random(stream_seed(seed, stage, rank))


def epoch_batches(n, batch_size, epochs, seed, stage):
    """Indices of every optimiser step's items over `epochs` shuffled passes through n items (a last
    partial batch of each pass is dropped), the same on every rank: each rank takes its share."""
    order = []
    for e in range(epochs):
        idx = list(range(n))
        random.Random(stream_seed(seed, stage, 0, f"epoch {e}")).shuffle(idx)
        order += [idx[b * batch_size:(b + 1) * batch_size] for b in range(n // batch_size)]
    return order


# ----------------------------------------------------------------------------------------------
# Schedule


def adamw(params, lr, betas=(0.9, 0.99), weight_decay=0.0):
    """AdamW with the fused kernel (one pass over all parameters; on a 1.3M-parameter model on this
    CPU a step takes 1.4 ms instead of 8.4 ms with the per-parameter loop)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def optimizer_step(params, opt, grad_clip):
    """Clip the gradient norm to grad_clip (0 = no clipping), step, zero the gradients. Returns the
    norm before clipping, or None, without stepping, when it is not finite (the caller stops)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if not torch.isfinite(grad_norm):
        return None
    opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm.item()


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


def rng_state(data_rng, generator=None):
    """This rank's random state: torch, numpy, python, its problem stream and its sampling generator."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "data": data_rng.getstate(), "generator": None if generator is None else generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state, data_rng, generator=None):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    data_rng.setstate(state["data"])
    if generator is not None:
        generator.set_state(state["generator"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(states, rank, world, seed, stage, step, data_rng, generator=None):
    """Resume this rank's random state from a checkpoint's per-rank `states`. On the world size the
    run was saved with, exactly (bitwise resume). On another one the saved streams cannot be split or
    merged: every rank starts fresh streams seeded by (seed, stage, rank, step), distinct across ranks
    and from the run's earlier ones. Returns a note saying so in that case, else None."""
    if len(states) == world:
        set_rng_state(states[rank], data_rng, generator)
        return None
    part = f"resumed at step {step} on {world} ranks"
    data_rng.seed(stream_seed(seed, stage, rank, part))
    torch.manual_seed(stream_seed(seed, stage, rank, part + "/torch"))
    if generator is not None:
        generator.manual_seed(stream_seed(seed, stage, rank, part + "/sampling"))
    return (f"the run was saved on {len(states)} rank(s) and resumes on {world}: every rank draws a fresh "
            f"problem stream from step {step} on, so the run is not bitwise the one it would have been")


def non_finite(obj, name=""):
    """The name (a path of keys) of the first floating tensor in obj, a tensor or nested dicts and
    lists of them such as a checkpoint, that holds a NaN or an infinity; None if there is none."""
    if torch.is_tensor(obj):
        return name if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = non_finite(value, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def save_checkpoint(path, payload):
    """Atomic: write a temporary file in the same folder, flush it to disk, then os.replace. A kill at
    any moment leaves either the old checkpoint or the new one, never a torn file. torch.save writes a
    zip archive in which every record carries a CRC32: load_checkpoint verifies them."""
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
    """Load a checkpoint written by save_checkpoint (a run folder means its ckpt.pt), with one-line
    errors for missing or bad files. Every record's CRC32 is checked first: torch.load does not, and
    a few flipped bytes would otherwise load as silently wrong weights or optimiser state."""
    if os.path.isdir(path):
        inner = os.path.join(path, "ckpt.pt")
        if not os.path.isfile(inner):
            raise CheckpointError(f"{path} is a folder with no checkpoint file ckpt.pt in it")
        path = inner
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # not a zip at all: truncated, empty, random bytes
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                              f"delete it or point to another") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: record {bad} fails its CRC32 check; "
                              f"delete it or point to another")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # unpickling junk: one clear message
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                              f"delete it or point to another") from None
    required = {"model", "model_config", "config", "step", "tokenizer"}
    if not isinstance(ckpt, dict) or not required <= set(ckpt):
        raise CheckpointError(f"checkpoint {path} is not one of ours (needs keys {sorted(required)})")
    return ckpt


def load_init(path, tok, task, n_digits, given_model_flags, mcfg, device):
    """The model of an SFT checkpoint that DPO / GRPO / PPO start from (--init), with its config.
    A checkpoint that is not an SFT run's, of another task or digit count, or whose model config
    differs from a model flag given on the command line, is an error."""
    from model import ModelConfig, Transformer
    ckpt = load_checkpoint(path)
    check_tokenizer(ckpt, tok, path)
    check_kind(ckpt, "sft", f"--init {path}")
    trained = {k: ckpt["config"].get(k) for k in ("task", "n_digits")}
    if trained != {"task": task, "n_digits": n_digits}:
        raise CheckpointError(f"--init {path} was trained on task {trained['task']} with {trained['n_digits']} "
                              f"digits, not {task} with {n_digits}: pass --init with an SFT run of this task")
    check_model_flags(ckpt, given_model_flags, mcfg, f"--init {path}")
    model = Transformer(ModelConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model, ModelConfig(**ckpt["model_config"])


def check_model_flags(ckpt, given_model_flags, mcfg, what):
    """A model flag given on the command line must agree with the checkpoint's model config (the
    checkpoint decides the model; a silently ignored flag would be a lie)."""
    bad = sorted(k for k in given_model_flags if ckpt["model_config"].get(k) != getattr(mcfg, k))
    if bad:
        raise CheckpointError(f"{what} has another model config in: " +
                              ", ".join(f"{k} ({ckpt['model_config'].get(k)}, not {getattr(mcfg, k)})" for k in bad))


def check_kind(ckpt, kind, what):
    """A checkpoint must come from the script that expects it (an SFT run for --init, a GRPO run for
    train_grpo.py --resume, ...)."""
    if ckpt.get("kind") != kind:
        raise CheckpointError(f"{what} is a {ckpt.get('kind', 'unknown')} checkpoint, not a {kind} run's")


def check_tokenizer(ckpt, tok, path):
    if ckpt["tokenizer"] != tok.definition():
        raise CheckpointError(f"checkpoint {path} was trained with another tokenizer: {ckpt['tokenizer']}")


# ----------------------------------------------------------------------------------------------
# The run folder: lock, config, metrics


class RunFolderBusy(RuntimeError):
    pass


def lock_run_folder(out_dir):
    """Take an exclusive lock on out_dir/.lock (a POSIX lock: held by this process until it closes
    the file or exits, even by kill -9). Raises RunFolderBusy naming the process that holds it."""
    import fcntl
    f = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunFolderBusy(f"{out_dir} is in use by another run (pid {holder}): wait for it to end "
                            f"or pass another --out_dir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


class NonFiniteState(RuntimeError):
    pass


class RunFolder:
    """Rank 0's run folder: locked for the run (a second run into it fails at once), stale temporary
    checkpoint files of killed writes removed, config.json written and metrics.jsonl opened. Open it
    only once every flag and input has been checked, so that a run that fails on bad input touches
    nothing. On other ranks it writes nothing (save still checks the state is finite)."""

    def __init__(self, out_dir, enabled, resume_step=None, **configs):
        self.out_dir, self.enabled, self.lock, self.f = out_dir, enabled, None, None
        self.ckpt_path = os.path.join(out_dir, "ckpt.pt")
        self.saved_step = resume_step  # the step of the last checkpoint this run wrote or resumed from
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.lock = lock_run_folder(out_dir)
        for tmp in glob.glob(self.ckpt_path + ".tmp.*"):
            os.remove(tmp)  # a killed write's leftovers; nothing else writes here while we hold the lock
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({k: config_dict(v) for k, v in configs.items()}, f, indent=2)
        self.f = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), resume_step)

    def log(self, record, kind="train"):
        if self.f is not None:
            self.f.log(record, kind)

    def save(self, step, payload):
        """Write ckpt.pt atomically, unless a weight or an optimiser state is NaN or infinite: then
        raise NonFiniteState and keep the last good checkpoint."""
        bad = non_finite({k: v for k, v in payload.items() if k != "rng"})
        if bad is not None:
            raise NonFiniteState(f"non-finite values in {bad} after step {step}, not saved; {self.last_good()}")
        if self.enabled:
            save_checkpoint(self.ckpt_path, payload)
        self.saved_step = step

    def last_good(self):
        if self.saved_step is None:
            return "no checkpoint of this run was written"
        return f"the last good checkpoint ({self.ckpt_path}, step {self.saved_step}) was kept"

    def close(self):
        if self.f is not None:
            self.f.close()
        if self.lock is not None:
            self.lock.close()
        self.f = self.lock = None


class MetricsLog:
    """One JSON line per (step, kind) in metrics.jsonl: kind "train" after each optimiser step, "eval"
    for a held-out evaluation. Resuming from a checkpoint of step k keeps the lines of steps <= k
    (every one of them was logged before that checkpoint was written) and drops what a killed run
    wrote after it, a torn last line included, so the file reads the same whatever the history of
    kills and resumes."""

    def __init__(self, path, resume_step=None):
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= resume_step:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):
                        pass  # a line torn by a kill
        self.f = open(path, "w")
        self.f.writelines(kept)
        self.f.flush()

    def log(self, record, kind):
        rounded = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self.f.write(json.dumps({"step": record["step"], "kind": kind, **rounded}) + "\n")
        self.f.flush()

    def close(self):
        self.f.close()


class GracefulStop:
    """On SIGINT (Ctrl-C) or SIGTERM, let the current step finish, then the loop writes a checkpoint
    and exits. A second signal stops at once. Use as a context manager around the loop; ask
    `requested()` once per step (under torchrun every rank asks, so all stop at the same step)."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = None, {}

    def _handle(self, signum, frame):
        self.signum = signum
        for s, h in self.previous.items():  # the next signal gets the default behaviour: stop now
            signal.signal(s, h)

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)

    def requested(self, device):
        got = float(self.signum is not None)
        return (all_reduce_sum({"stop": got}, device)["stop"] if is_dist() else got) > 0

    def exit(self, out_dir, step, hint=None, close=()):
        """Close `close` (progress bar, run folder), print where the checkpoint is and how to go on, then
        exit with 128 + the signal number."""
        for thing in close:
            thing.close()
        hint = hint or "to continue, run the same command with --resume"
        name = signal.Signals(self.signum).name if self.signum else "signal"
        if rank() == 0:
            print(f"stopped by {name} after step {step}: checkpoint saved in {out_dir}; {hint}", file=sys.stderr)
        cleanup_dist()
        sys.exit(128 + (self.signum or signal.SIGINT))


def finish_run(run, first, last, what, show, owns_dist):
    """The end of a train script's main(): print the held-out metrics before -> after (if `show`),
    close the run folder, and take down the process group the script set up."""
    if show and first and last:
        print(f"before -> after {what}: " + ", ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in last))
    run.close()
    if owns_dist:
        cleanup_dist()


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


def networks_held(nets):
    """{name: parameter count} of every network a script holds, and the line that prints it."""
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    line = ", ".join(f"{k} {v:,}" for k, v in counts.items()) + f" (total {sum(counts.values()):,})"
    return {f"params_{k.replace(' ', '_')}": v for k, v in counts.items()}, "networks held: " + line


def peak_memory(device):
    """Peak memory so far, in MiB: the process's resident set (Linux reports ru_maxrss in KiB), and on CUDA the
    allocator's peak. These are what set PPO's cost beside GRPO's."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def write_jsonl(path, rows):
    """One JSON object per line, written atomically (a temporary file renamed over `path`)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def file_digest(path):
    """SHA-256 of a file's bytes: ties a data file to the checkpoints trained on it."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
