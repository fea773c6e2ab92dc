"""Plumbing the train scripts share, so that each script's main() reads as setup, then its loop.

- Config: CLI flags generated from dataclass fields (`parse_config`), their checks
  (`check_config`), and `RunConfig`: the settings of a run that are not its algorithm's.
- torchrun: `setup_dist`, collectives that are identities in one process (`all_reduce_sum`,
  `gather_rows`), `micro_batch` (no_sync for gradient accumulation under DDP, and autocast).
- Streams: a seed per (seed, stage, rank, part), so that no two stages or ranks replay each other.
- The optimiser step: `optimizer_step` (raises on a non-finite gradient), `lr_at`.
- Checkpoints: atomic and CRC-verified (`save_checkpoint`, `load_checkpoint`).
- `Run`: one run's bookkeeping (resume, the locked run folder, metrics.jsonl, tqdm, checkpoints,
  Ctrl-C, one-line errors). It never calls a model, a loss, an optimiser step or the schedule: every
  line that changes the numbers a run produces stays in the train script.
"""
import argparse
import contextlib
import dataclasses
import glob
import hashlib
import inspect
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
from tqdm import tqdm

import tasks
from model import ModelConfig, Transformer, torch_compile

# ----------------------------------------------------------------------------------------------
# Errors: what a run reports as one line


class RunError(Exception):
    """An expected failure: Run prints its message as one line, with the last good checkpoint."""


class ConfigError(RunError, ValueError):
    """A bad flag, setting or input file, found before anything is written."""


class CheckpointError(RunError):
    """A checkpoint that is missing, damaged, or not the one the run needs."""


class NonFinite(RunError, FloatingPointError):
    """A NaN or an infinity in a loss, a gradient, the logits or the weights."""


class Collapse(RunError):
    """Reward 0 and gradient 0 for many steps: the policy can no longer change."""

    def __init__(self, message, since):
        super().__init__(message)
        self.since = since  # the first step of the collapse


class CollapseCheck:
    """Reward 0 and a gradient of exactly 0 for `patience` steps in a row: the policy can never
    change again, so the run stops with an error rather than running on."""

    def __init__(self, patience, what):
        self.patience, self.dead, self.what = patience, 0, what

    def __call__(self, step, metrics):
        self.dead = self.dead + 1 if metrics["reward_mean"] == metrics["grad_norm"] == 0 else 0
        if self.patience and self.dead >= self.patience:
            raise Collapse(f"{self.what} collapsed: reward 0 and a gradient of exactly 0 for the "
                           f"last {self.dead} steps (since step {step - self.dead + 1}): "
                           "the policy can no longer change (too large an --lr?)",
                           since=step - self.dead + 1)


class RunFolderBusy(RunError):
    """Another process holds the run folder's lock."""


class WriteError(RunError, OSError):
    """A file could not be written (a full disk, a read-only folder): nothing was left half done."""


class PeerFailed(RunError):
    """Under torchrun: another rank failed or was killed. quiet: the failed rank says why."""

    def __init__(self, message, quiet=False):
        super().__init__(message)
        self.quiet = quiet


# ----------------------------------------------------------------------------------------------
# Config: CLI flags generated from dataclass fields


@dataclasses.dataclass
class RunConfig:
    out_dir: str = "out/run"  # run folder: ckpt.pt, metrics.jsonl, config.json
    resume: bool = False  # continue from out_dir/ckpt.pt
    overwrite: bool = False  # start again in an out_dir that holds a run, replacing its files
    seed: int = 0  # seed of the weights (from scratch) and of every problem and sampling stream
    eval_every: int = 25  # steps between held-out evaluations (and at the end)
    ckpt_every: int = 50  # steps between checkpoints (and at the end)
    stop_at: int = 0  # stop (with a checkpoint) after this step, to resume later; 0 = never
    compile: bool = False  # torch.compile the networks that are trained
    quiet: bool = False  # no progress bar or printed samples
    given: tuple = dataclasses.field(default=(), metadata={"flag": False})  # the flags typed

    def __post_init__(self):
        check_config(self, positive=("eval_every", "ckpt_every"), non_negative=("stop_at",))
        if self.resume and self.overwrite:
            raise ConfigError("pass --resume (continue the run) or --overwrite (start it again), "
                              "not both")
        if not self.out_dir:
            raise ConfigError("--out_dir must name a folder, got an empty string")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, naming the flag, instead of usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_comments(cls):
    """The `# comment` after each field in the sources of the dataclass and of the dataclasses it
    inherits fields from (its own comment wins), shown by --help."""
    comments = {}
    for c in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        for line in inspect.getsource(c).splitlines():
            line = line.strip()
            if ":" in line and "#" in line and not line.startswith(("#", "def", '"')):
                comments[line.split(":", 1)[0].strip()] = line.split("#", 1)[1].strip()
    return comments


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_config(classes, argv=None, description=None, **run_defaults):
    """One instance of each dataclass in `classes`, then a RunConfig (its defaults replaced by
    run_defaults), from flags `--name value` or `--name=value` (booleans also as a bare `--name`).
    The RunConfig's `given` lists the flags typed. A bad flag or value is one line, exit code 2."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    classes, owner = list(classes) + [RunConfig], {}
    types = {"int": int, "float": float, "str": str, "bool": bool}
    for cls in classes:
        group, comments = parser.add_argument_group(cls.__name__), _field_comments(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("flag", True):
                continue
            assert f.name not in owner, f"flag --{f.name} is defined by two configs"
            owner[f.name] = cls
            kind = types.get(getattr(f.type, "__name__", f.type), str)
            default = run_defaults.get(f.name, f.default) if cls is RunConfig else f.default
            # argparse %-formats help texts: a literal % in a comment must be doubled
            help_text = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")
            if kind is bool:
                group.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True,
                                   help=help_text)
            else:
                group.add_argument(f"--{f.name}", type=kind, metavar=kind.__name__.upper(),
                                   help=help_text)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    out = []
    for cls in classes:
        kw = {k: v for k, v in args.items() if owner[k] is cls}
        if cls is RunConfig:
            kw = {**run_defaults, **kw, "given": tuple(sorted(args))}
        try:
            out.append(cls(**kw))
        except ValueError as e:
            parser.error(str(e))
    return out


def config_dict(cfg):
    return dataclasses.asdict(cfg)


def check_config(cfg, positive=(), non_negative=(), fractions=(), choices=None, ordered=(),
                 below_one=()):
    """Raise one ConfigError naming every bad field of a config dataclass (each a --flag): every
    float must be finite, `positive` fields > 0, `non_negative` >= 0, `fractions` in [0, 1],
    `below_one` in [0, 1), `choices` maps a field to its allowed values, and each pair (a, b) of
    `ordered` needs a <= b. Call it from __post_init__."""
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
        elif f.name in below_one and not 0 <= v < 1:
            errors.append(f"--{f.name} must be in [0, 1), got {v}")
        elif f.name in (choices or {}) and v not in choices[f.name]:
            allowed = ", ".join(map(str, choices[f.name]))
            errors.append(f"--{f.name} must be one of {allowed}; got {v!r}")
    errors += [f"--{b} must be >= --{a}, got {getattr(cfg, b)} < {getattr(cfg, a)}"
               for a, b in ordered if getattr(cfg, b) < getattr(cfg, a)]
    if errors:
        raise ConfigError("; ".join(errors))


def default_init(task):  # a task's warm start: its SFT run, or for think its pretrained base
    return {"add": "out/sft", "think": "out/base_think"}.get(task, f"out/sft_{task}")


POLICY_KINDS = ("sft", "grpo", "dpo", "ppo")  # runs whose model is a policy: what --init takes


@dataclasses.dataclass
class InitConfig:
    """The settings of a run that starts from a policy run (GRPO, PPO, DPO, the reward model):
    load_or_make_init finds or makes that run."""
    task: str = "add"  # add, sub, mul, multistep or think
    n_digits: int = 0  # digits per operand; 0 = the task's default (add, sub 3; mul, multistep 2)
    init: str = ""  # the policy run it starts from: "" = out/sft (add), out/base_think (think),
    # out/sft_<task>; a new folder gets a warm start: SFT, or for think a pretrained base
    warmstart_steps: int = 1500  # steps of the warm start made when --init does not exist
    warmstart_target_acc: float = 0.8  # the warm start stops at this held-out accuracy
    max_new_tokens: int = 0  # completion length limit (0 = the task's longest answer + 2)

    def __post_init__(self):  # checks; n_digits, max_new_tokens (longest answer + 2), init
        check_config(self, positive=("warmstart_steps",), non_negative=("max_new_tokens",),
                            fractions=("warmstart_target_acc",),
                            choices={"task": tuple(tasks.TASKS)})
        task = tasks.get_task(self.task, self.n_digits)
        self.n_digits = task.n_digits
        self.max_new_tokens = self.max_new_tokens or task.max_new_tokens()
        self.init = self.init or default_init(self.task)


def check_lengths(task, max_seq_len, max_new_tokens=None):
    """Raise ConfigError unless the task's longest sequence fits the model: `<bos> prompt
    completion <eos>` for SFT, or `<bos> prompt` + max_new_tokens when sampling, and
    max_new_tokens leaves room for the longest reference answer and its end token."""
    prompt, completion = task.max_lengths()
    needed = 1 + prompt + (completion + 1 if max_new_tokens is None else max_new_tokens)
    if needed > max_seq_len:
        raise ConfigError(f"--max_seq_len {max_seq_len} is too short for task {task.name} with "
                          f"{task.n_digits} digits: its longest sequence has {needed} tokens")
    if max_new_tokens is not None and max_new_tokens < completion + 1:
        raise ConfigError(f"--max_new_tokens {max_new_tokens} is shorter than the longest "
                          f"answer of task {task.name} ({completion} tokens and an end token): "
                          "it could never be written")


def checkpoint_file(run):
    """A run given as its folder or as a .pt file -> the checkpoint file's path."""
    return run if run.endswith(".pt") else os.path.join(run, "ckpt.pt")


def load_or_make_init(cfg, run):
    """The policy a run starts from (cfg: an InitConfig), on the run's device: any policy
    run of this task and tokenizer (sft, grpo, dpo, ppo), whose stage is added to run.chain. A
    folder that does not exist gets a warm start: a short SFT run that stops at
    warmstart_target_acc held-out accuracy, so that RL, not SFT, does most of the work, or for the
    thinking task a pretrained base (R1-Zero's); an interrupted warm start of these settings goes
    on. A one-line error for a checkpoint that is not a policy run of this task and model flags
    (a reward model), an unfinished run, or a folder that holds something else."""
    path = checkpoint_file(cfg.init)
    folder, base = os.path.dirname(path) or ".", cfg.task == "think"
    argv = ["--task", cfg.task, "--n_digits", str(cfg.n_digits), "--steps",
            str(cfg.warmstart_steps), "--target_acc", str(0 if base else cfg.warmstart_target_acc),
            "--eval_every", "25" if not base else "250", "--samples", "0", "--out_dir", folder,
            "--seed", str(run.rc.seed)] + (["--data", "pretrain"] if base else [])
    argv += [f"--{k}={getattr(run.mcfg, k)}" for k in sorted(run.model_flags)]
    argv += ["--quiet"] if run.rc.quiet else []
    import train_sft  # the warm start is an SFT run: made by train_sft.main
    warm, warm_model, warm_run = train_sft.parse(argv)
    hint = f"run the same command again: the warm start in {folder} continues where it stopped"
    task = tasks.get_task(cfg.task, cfg.n_digits)
    if not os.path.exists(path):
        if path.endswith(".pt") and not path.endswith("ckpt.pt"):
            raise CheckpointError(f"no checkpoint at {path} (a warm start is made only for a "
                                  "run folder)")
        check_out_dir(folder, "--init")
        check_lengths(task, run.mcfg.max_seq_len, getattr(  # the run's sampling must
            cfg, "max_new_tokens", task.max_new_tokens()))  # fit the warm start's model
        held = os.listdir(folder) if os.path.isdir(folder) else []
        recorded = recorded_checkpoint(folder)  # what config.json says made it
        if held and not same_settings(recorded, warm, warm_model, warm_run):
            raise ConfigError(f"--init {folder} holds no checkpoint and is not a warm start of "
                              "this run's: a warm start is made only in a new folder; pass a "
                              "policy run folder as --init")
        if run.main:
            print(f"no checkpoint at {path}: a warm start makes one ("
                  + ("a base model, pretrained)" if base else "a short SFT run)"))
        train_sft.main(argv + (["--overwrite"] if held else []), resume_hint=hint)
    ckpt = load_trained(path, f"--init {path}", POLICY_KINDS, task)
    if not ckpt.get("done", True):
        if ckpt["kind"] != "sft" or not same_settings(ckpt, warm, warm_model, warm_run):
            raise ConfigError(f"--init {folder} is an unfinished {ckpt['kind']} run (step "
                              f"{ckpt['step']}) with other settings than this run's warm start: "
                              "finish it with --resume, or pass another")
        if run.main:
            print(f"continuing the warm start in {folder} from step {ckpt['step']}")
        train_sft.main(argv + ["--resume"], resume_hint=hint)
        ckpt = load_checkpoint(path)  # finished now
    bad = model_mismatches(ckpt, run.model_flags, run.mcfg)
    if bad:
        raise CheckpointError(f"--init {path} has another model config in: {', '.join(bad)}")
    run.chain = ckpt.get("chain", []) + [stage(path, ckpt)]
    return model_of(ckpt, f"--init {path}", device=run.device)


def load_teacher(cfg, run, task):
    """--teacher's policy (any policy run of the task: RL, SFT, another size), frozen; recorded,
    and tied to the run's checkpoints (a resume with another teacher is refused)."""
    path = checkpoint_file(cfg.teacher)
    ckpt = load_trained(path, f"--teacher {path}", POLICY_KINDS, task)
    run.input(path, "--teacher")
    run.teacher = {**stage(path, ckpt), "chain": ckpt.get("chain", [])}
    teacher = model_of(ckpt, f"--teacher {path}", device=run.device).eval().requires_grad_(False)
    check_lengths(task, teacher.cfg.max_seq_len, getattr(cfg, "max_new_tokens", None)
                  or task.max_new_tokens())
    return teacher


def check_out_dir(path, flag="--out_dir"):
    """Raise ConfigError if `path` cannot hold a run: it is a dangling symlink or a file, a folder
    above it is a file or not writable, or its checkpoint path is taken by something that is not a
    file (RunConfig refuses an empty --out_dir). Creates nothing. flag: how to name the path in an
    error."""
    if os.path.islink(path) and not os.path.exists(path):
        raise ConfigError(f"{flag} {path} is a symlink to {os.readlink(path)}, which does not "
                          "exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a file, not a folder")
    parent = path
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"{flag} {path} lies under {parent}, which is a file")
    if not os.access(parent or ".", os.W_OK):
        raise ConfigError(f"{flag} {path}: {parent or '.'} is not writable")
    ckpt = os.path.join(path, "ckpt.pt")
    if os.path.exists(ckpt) and not os.path.isfile(ckpt):
        raise ConfigError(f"{flag} {path}: {ckpt} exists and is not a file")


# Fields that may differ between a run and its resumption: the length of the run, and how an RL
# run got its init (irrelevant once it has a checkpoint of its own)
RESUMABLE_FIELDS = {"steps", "samples", "init", "warmstart_steps", "warmstart_target_acc"}


def mismatched_fields(saved, current, ignore=()):
    """Names of fields whose values differ between two config dicts. A field `saved` lacks (saved
    before the field existed) counts as its default, which the caller merges in; a field `current`
    lacks no longer exists and is not compared."""
    return sorted(k for k in set(current) - set(ignore) if saved.get(k, "<missing>") != current[k])


# ----------------------------------------------------------------------------------------------
# Distributed (torchrun)


def setup_dist():
    """Returns (rank, world_size, device). Under torchrun: nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
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


def all_reduce_sum(values, device=None):
    """Sum over ranks (the identity in one process): a dict of floats -> a dict of floats, or a
    tensor -> a tensor."""
    if not is_dist():
        return dict(values) if isinstance(values, dict) else values
    if torch.is_tensor(values):
        out = values.clone()
        dist.all_reduce(out)
        return out
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def gather_rows(t):
    """(every rank's equal-shaped tensor t concatenated along dim 0, on t's device; the slice of it
    that is this rank's t): t and slice(None) in one process."""
    if not is_dist():
        return t, slice(None)
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else t.device  # nccl gathers CUDA tensors only
    out = [torch.zeros_like(t, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.to(device))
    return torch.cat(out).to(t.device), slice(rank() * len(t), (rank() + 1) * len(t))


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (a one-element list without torchrun)."""
    if not is_dist():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def micro_batch(model, last):
    """The context of one micro-batch's forward and backward in an optimiser step: DDP's no_sync()
    unless it is the step's last micro-batch (whose backward then all-reduces the accumulated
    gradients), and autocast. Yields the world size: DDP averages gradients over ranks, so a rank
    whose loss is its share of the whole batch's loss multiplies it by the world size."""
    with (model.no_sync() if isinstance(model, DDP) and not last else nullcontext()), autocast():
        yield world_size()


def autocast():
    """bf16 autocast of CUDA ops (CPU ops stay float32): the trainer's precision."""
    if torch.cuda.is_available():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def setup_torch(seed, device):
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny models slow ~3x once weights become subnormal
    else:
        torch.backends.cuda.matmul.allow_tf32 = True


class SharedPrefix(torch.nn.Module):
    """net.forward_shared_prefix as a module's forward: DDP and torch.compile wrap forward."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *args):
        return self.net.forward_shared_prefix(*args)


# ----------------------------------------------------------------------------------------------
# Data streams


def stream_seed(seed, stage, rank, part=""):
    """A 63-bit seed for one stream of random draws, distinct for every (seed, stage, rank, part):
    SFT, GRPO, DPO and PPO (`stage`) never replay each other's problems from the same --seed, and
    no two ranks share a stream."""
    digest = hashlib.sha256(f"{seed}/{stage}/{rank}/{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def epoch_batches(n, batch_size, epochs, seed, stage):
    """Indices of every optimiser step's items over `epochs` shuffled passes through n items (a
    last partial batch of each pass is dropped), the same on every rank: each takes its share."""
    order = []
    for e in range(epochs):
        idx = list(range(n))
        random.Random(stream_seed(seed, stage, 0, f"epoch {e}")).shuffle(idx)
        order += [idx[b * batch_size:(b + 1) * batch_size] for b in range(n // batch_size)]
    return order


# ----------------------------------------------------------------------------------------------
# The optimiser step and the schedule


def optimizer_step(opt, grad_clip):
    """Clip the gradient norm of the optimiser's parameters to grad_clip (0 = no clipping), step,
    zero the gradients. Returns the norm before clipping; raises NonFinite, without stepping, when
    it is not finite (a non-finite loss gives one)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if not torch.isfinite(grad_norm):
        raise NonFinite("non-finite loss or gradient")
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


def non_finite(obj, name=""):
    """The name (a path of keys) of the first floating tensor in obj, a tensor or nested dicts and
    lists of them such as a checkpoint, that holds a NaN or an infinity; None if there is none."""
    if torch.is_tensor(obj):
        return name if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
        if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = non_finite(value, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def atomic_write(path, data):
    """Write bytes or text to path through a temporary file in the same folder, flushed to disk
    and renamed over path: a kill at any moment leaves the old file or the new one, never a torn
    one. A failed write (a full disk, a read-only folder) removes its temporary file and raises
    WriteError; the old file stays."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise WriteError(f"could not write {path}: {e.strerror or e}") from None
        raise


def save_checkpoint(path, payload):
    """Atomic (atomic_write). torch.save writes a zip archive in which every record carries a
    CRC32: load_checkpoint verifies them."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, buf.getbuffer())


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint (a run folder means its ckpt.pt), with one-line
    errors for missing or bad files. Every record's CRC32 is checked first: torch.load does not,
    and a few flipped bytes would otherwise load as silently wrong weights or optimiser state."""
    if os.path.isdir(path):
        inner = os.path.join(path, "ckpt.pt")
        if not os.path.isfile(inner):
            raise CheckpointError(f"{path} is a folder with no checkpoint file ckpt.pt in it")
        path = inner
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    bad = f"checkpoint {path} is corrupt or truncated"
    advice = "delete it or point to another"
    try:
        with zipfile.ZipFile(path) as z:
            record = z.testzip()
    except Exception as e:  # not a zip at all: truncated, empty, random bytes
        raise CheckpointError(f"{bad} ({type(e).__name__}); {advice}") from None
    if record is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: record {record} fails its CRC32 "
                              "check; delete it or point to another")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # unpickling junk: one clear message
        raise CheckpointError(f"{bad} ({type(e).__name__}); {advice}") from None
    required = {"model", "model_config", "config", "step", "tokenizer"}
    ours = isinstance(ckpt, dict) and required <= set(ckpt) and isinstance(ckpt["step"], int) \
        and isinstance(ckpt["model_config"], dict) and isinstance(ckpt["config"], dict)
    if not ours:
        raise CheckpointError(f"checkpoint {path} is not one of ours (needs keys "
                              f"{sorted(required)})")
    return ckpt


def check_checkpoint(ckpt, what, kind, tok):
    """A checkpoint must come from the script that expects it (a policy run for --init, a GRPO run
    for train_grpo.py --resume, ...), with this tokenizer. kind: a kind, or a tuple of kinds."""
    if ckpt["tokenizer"] != tok.definition():
        raise CheckpointError(f"{what} was trained with another tokenizer: {ckpt['tokenizer']}")
    kinds = (kind,) if isinstance(kind, str) else kind
    if ckpt.get("kind") == "rm" and "rm" not in kinds:
        raise CheckpointError(f"{what} is a reward model (train_rm.py), not a policy: pass an "
                              f"{', '.join(kinds)} run")
    if ckpt.get("kind") not in kinds:
        raise CheckpointError(f"{what} is a {ckpt.get('kind', 'unknown')} checkpoint, not a "
                              f"{' or '.join(kinds)} run's")


def load_trained(path, what, kind, task):
    """The checkpoint at path (a run folder or its ckpt.pt) of a `kind` run (or one of a tuple of
    kinds) of this task, with this project's tokenizer; CheckpointError otherwise. what: how to
    name it in an error."""
    ckpt = load_checkpoint(path)
    check_checkpoint(ckpt, what, kind, task.tokenizer())
    trained = (ckpt["config"].get("task"), ckpt["config"].get("n_digits"))
    if trained != (task.name, task.n_digits):
        raise CheckpointError(f"{what} was trained on task {trained[0]} with {trained[1]} digits, "
                              f"not {task.name} with {task.n_digits}")
    return ckpt


def saved_model_config(ckpt):
    """The model config a checkpoint records, as a dict: a field it lacks (saved before the field
    existed) counts as its default, as for the train configs."""
    return {**config_dict(ModelConfig()), **ckpt["model_config"]}


def model_of(ckpt, what, cls=Transformer, device="cpu", weights=True):
    """A new `cls` of the checkpoint's model config, with its weights unless weights=False; a
    one-line CheckpointError for a field this code does not know, a bad value, or weights that do
    not fit."""
    unknown = sorted(set(ckpt["model_config"]) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"{what} has model config fields this code does not know "
                              f"({', '.join(unknown)}): it was written by another version")
    try:
        net = cls(ModelConfig(**saved_model_config(ckpt))).to(device)
    except (TypeError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{what} has an invalid model config ({e})") from None
    if weights:
        load_state(net, ckpt["model"], what)
    return net


def load_state(thing, state, what):
    """thing.load_state_dict(state), a one-line CheckpointError if the state does not fit."""
    try:
        thing.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        detail = str(e).strip().splitlines()[-1].strip()[:200]
        raise CheckpointError(f"{what} holds a state that does not fit ({detail})") from None


def model_mismatches(ckpt, model_flags, mcfg):
    """The model flags given on the command line that the checkpoint's model config disagrees
    with, as `name (saved, not given)`: the checkpoint decides the model, and an ignored flag
    would be a lie."""
    saved = saved_model_config(ckpt)
    return [f"{k} ({saved.get(k)}, not {getattr(mcfg, k)})" for k in sorted(model_flags)
            if saved.get(k) != getattr(mcfg, k)]


def config_mismatches(ckpt, cfg, run_cfg):
    """The fields of a script's config (and the seed) that differ from a checkpoint's, but those
    that may change between a run and its resumption."""
    saved = {**config_dict(type(cfg)()), **ckpt["config"]}
    bad = mismatched_fields(saved, config_dict(cfg), RESUMABLE_FIELDS)
    seed = ckpt.get("run_config", ckpt["config"]).get("seed", 0)
    return bad + (["seed"] if seed != run_cfg.seed else [])


def same_settings(ckpt, cfg, mcfg, run_cfg):
    """Whether a checkpoint (or what a config.json records of one) was made with these settings:
    the config but the fields that may change on resume, the seed, the whole model config."""
    return ckpt is not None and not (config_mismatches(ckpt, cfg, run_cfg) or mismatched_fields(
        saved_model_config(ckpt), config_dict(mcfg)))


def write_jsonl(path, rows):
    """One JSON object per line, written atomically."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fingerprint(model):
    """A short hash of a model's weights: which model, say, a file's stored log-probs came from."""
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path):
    """SHA-256 of a file's bytes: ties a data file to the checkpoints trained on it."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stage(path, ckpt):
    """How a run records a run it started from (--init) or learnt from (--teacher): its folder, its
    kind, its step, its checkpoint's digest, and its own teacher if it had one. A checkpoint's
    "chain" lists them back to the first stage: base -> cold start -> GRPO -> ..."""
    return {"run": os.path.dirname(path) or ".", "kind": ckpt["kind"], "step": ckpt["step"],
            "sha256": file_digest(path), **({"teacher": ckpt["teacher"]}
                                            if ckpt.get("teacher") else {})}


def recorded_checkpoint(folder):
    """What a run folder's config.json records of its run, in a checkpoint's keys ("config",
    "model_config", "run_config"), or None where there is no readable config.json."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        kind = next(k for k in saved if k not in ("model", "run"))
        return {"kind": kind, "config": saved[kind], "model_config": saved["model"],
                "run_config": saved["run"]}
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None


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
        raise RunFolderBusy(f"{out_dir} is in use by another run (pid {holder}): wait for it to "
                            "end or pass another --out_dir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def kept_metrics(path, step):
    """The lines of metrics.jsonl that a resume from a checkpoint of `step` keeps: those of steps
    <= step (each was logged before that checkpoint was written), without what a killed run wrote
    after it (a torn last line included), so that the file reads the same whatever the history of
    kills and resumes."""
    kept = []
    with open(path, "rb") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line.decode())
            except (ValueError, KeyError, TypeError):
                pass  # a line torn by a kill, or bytes that are not a record
    return kept


# ----------------------------------------------------------------------------------------------
# The run


def _number(v):  # a metric as printed: None where there was nothing to measure
    return "n/a" if v is None else f"{v:.3f}"


def _parameters(net):
    return sum(p.numel() for p in net.parameters())


class Run:
    """One train script's run, from its first check to its last checkpoint:

        cfg, mcfg, run_cfg = common.parse_config([SFTConfig, ModelConfig], argv, __doc__)
        with common.Run("sft", cfg, mcfg, run_cfg) as run:  # torchrun, seed, one-line errors
            run.require(ok, "message")                       # checks: nothing is written yet
            model = run.resumed() if run_cfg.resume else new_model()  # the checkpoint's, or new
            run.begin(model=model, optimizer=opt, streams=run.streams())  # restore; open the folder
            for step in run.steps(cfg.steps):                # tqdm; ends at --stop_at
                ...                                          # the algorithm
                run.log({"step": step + 1, ...})             # metrics.jsonl and the bar
                run.end_step(step + 1)                       # a checkpoint when due; Ctrl-C

    Everything begin() names is saved in every checkpoint and restored by --resume: modules,
    optimisers and anything else with state_dict(), plain dicts (restored in place), and the
    rank's random streams. Leaving the `with` block on a RunError prints one line that names the
    last good checkpoint and exits with 1; a signal exits with 128 + its number, after the step's
    checkpoint. It never calls a model, a loss, an optimiser step or the learning-rate schedule."""

    def __init__(self, kind, cfg, mcfg, run_cfg, model_from_flags=False, resume_hint=None):
        self.kind, self.cfg, self.mcfg, self.rc = kind, cfg, mcfg, run_cfg
        # the model flags a checkpoint must agree with: all of them when the model is made from
        # the flags, else those typed (an init or a checkpoint decides the rest)
        fields = type(mcfg).__dataclass_fields__
        self.model_flags = set(fields) if model_from_flags else set(run_cfg.given) & set(fields)
        self.hint = resume_hint or "to continue, run the same command with --resume"
        self.ckpt_path = os.path.join(run_cfg.out_dir, "ckpt.pt")
        self.ckpt, self.state, self.start, self.step, self.total = None, {}, 0, 0, None
        self.saved_step = self.first_eval = self.last_eval = None
        self.lock = self.metrics = self.bar = self.signum = None
        self.stopped = self.opened = self.finished = self.at_end = False
        self.inputs, self.previous_handlers, self.params = {}, {}, {}
        self.chain, self.teacher = [], None  # the stages before this run; what it learnt from

    # ---- setup: torchrun, seeds, the checks before anything is written

    def __enter__(self):
        self.owns_dist = not is_dist()  # a warm start runs inside its caller's process group
        self.rank, self.world, self.device = setup_dist()
        self.main = self.rank == 0
        setup_torch(self.rc.seed, self.device)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal closed
            if signal.getsignal(s) is not signal.SIG_IGN:  # ignored stays ignored (nohup, &)
                self.previous_handlers[s] = signal.signal(s, self._on_signal)
        try:
            self._check_out_dir()
        except RunError as e:  # __exit__ does not run for an error raised in __enter__
            self.__exit__(type(e), e, None)
        return self

    def _check_out_dir(self):
        check_out_dir(self.rc.out_dir)
        init = getattr(self.cfg, "init", "")  # the run an RL (or RFT) run starts from
        folder = os.path.dirname(init) or "." if init.endswith(".pt") else init
        if init and os.path.realpath(folder) == os.path.realpath(self.rc.out_dir):
            raise ConfigError(f"--init {init} lies in --out_dir {self.rc.out_dir}: the run would "
                              "overwrite the checkpoint it starts from; give it another folder")
        self._check_not_a_finished_run()

    def require(self, ok, message):
        if not ok:
            raise ConfigError(message)

    def _check_not_a_finished_run(self):
        held = [f for f in ("ckpt.pt", "metrics.jsonl")
                if os.path.exists(os.path.join(self.rc.out_dir, f))]
        if held and not (self.rc.resume or self.rc.overwrite):
            raise ConfigError(f"--out_dir {self.rc.out_dir} holds a run ({', '.join(held)}): pass "
                              "--resume to continue it or --overwrite to start again")

    def resumed(self, cls=Transformer):
        """--resume's network: the run's checkpoint, checked against this run's config (its kind,
        tokenizer, settings, seed and the model flags given), gives a new `cls` of its model
        config; begin() restores the weights."""
        self.ckpt = load_checkpoint(self.ckpt_path)
        check_checkpoint(self.ckpt, f"checkpoint {self.ckpt_path}", self.kind, self.tokenizer())
        bad = config_mismatches(self.ckpt, self.cfg, self.rc)
        bad += model_mismatches(self.ckpt, self.model_flags, self.mcfg)
        if bad:
            raise ConfigError(f"checkpoint {self.ckpt_path} does not match this run's config in: "
                              f"{', '.join(bad)}")
        self.start = self.step = self.saved_step = self.ckpt["step"]
        legacy = {"rft_data": "rft_data.jsonl"}  # named before inputs were named by their file
        self.inputs = {legacy.get(k, k): v for k, v in self.ckpt.get("inputs", {}).items()}
        self.chain, self.teacher = self.ckpt.get("chain", []), self.ckpt.get("teacher")
        self._check_inputs()
        net = model_of(self.ckpt, f"checkpoint {self.ckpt_path}", cls, self.device, weights=False)
        self.mcfg = net.cfg
        return net

    def tokenizer(self):
        return tasks.get(self.cfg.task, self.cfg.n_digits)[0]

    def streams(self):
        """This rank's problem stream (a random.Random) and sampling generator (a torch.Generator on
        the run's device), both of this kind of run only."""
        data = random.Random(stream_seed(self.rc.seed, self.kind, self.rank))
        gen = torch.Generator(device=self.device)
        return data, gen.manual_seed(stream_seed(self.rc.seed, self.kind, self.rank, "sampling"))

    def wrap(self, net, shared_prefix=False):
        """What the update calls: net (or, with shared_prefix, net.forward_shared_prefix) under
        torch.compile with --compile, and DDP under torchrun (experts unused by a micro-batch get no
        gradient, hence find_unused_parameters). DDP and compile wrap a module's forward."""
        module = SharedPrefix(net) if shared_prefix else net
        if self.rc.compile:
            module = torch_compile(module)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(module, device_ids=ids, find_unused_parameters=True)
        return net.forward_shared_prefix if shared_prefix and not self.rc.compile else module

    def frozen(self, net):
        """net.forward_shared_prefix for a network the run does not train (pi_ref): under
        torch.compile with --compile, never DDP (it has no gradient to average)."""
        return torch_compile(SharedPrefix(net)) if self.rc.compile else net.forward_shared_prefix

    def begin(self, held=None, **state):
        """Name the run's state (saved in every checkpoint), restore it on --resume, then open the
        run folder: from here on the run writes. state["model"] is the trained network, whose
        config the checkpoint records; held: networks the run holds but does not save."""
        self.state, self.mcfg = state, state["model"].cfg
        note, what = None, f"checkpoint {self.ckpt_path}"
        for name, thing in state.items() if self.ckpt is not None else ():
            key = "rng" if name == "streams" else name
            if key not in self.ckpt:
                raise CheckpointError(f"{what} holds no {key}: it is not a checkpoint of this run")
            if name == "streams":
                note = self._restore_streams(*thing)
            elif isinstance(thing, dict):
                thing.update(self.ckpt[name])
            else:
                load_state(thing, self.ckpt[name], f"{what} ({name})")
        nets = {k: v for k, v in {**state, **(held or {})}.items()
                if isinstance(v, torch.nn.Module)}
        self.params = {f"params_{k.replace(' ', '_')}": _parameters(v) for k, v in nets.items()}
        self.on_main(self._open_folder)
        self.opened = True
        if self.main and not self.rc.quiet:
            print("networks held: " + ", ".join(f"{k} {_parameters(v):,}" for k, v in nets.items())
                  + (f"\nnote: {note}" if note else ""))

    def on_main(self, fn, *args):
        """fn(*args) on rank 0 alone (what writes the run folder), then every rank goes on once it
        is done, or stops if it failed: rank 0 with its error, the others with PeerFailed."""
        error = None
        if self.main:
            try:
                fn(*args)
            except Exception as e:  # the others learn of any failure: none waits for rank 0
                error = e
        if self.world > 1:
            failed = all_reduce_sum({"failed": float(error is not None)}, self.device)["failed"]
            if failed and error is None:
                raise PeerFailed("rank 0 failed", quiet=True)
        if error is not None:
            raise error

    def _restore_streams(self, data, gen):
        """This rank's random state, exactly, on the world size the run was saved with (bitwise
        resume). On another one the saved streams cannot be split or merged: every rank starts
        fresh streams seeded by (seed, kind, rank, step), distinct from the run's earlier ones."""
        states = self.ckpt["rng"]
        if len(states) == self.world:
            s = states[self.rank]
            try:
                torch.set_rng_state(s["torch"])
                np.random.set_state(s["numpy"])
                random.setstate(s["python"])
                data.setstate(s["data"])
                gen.set_state(s["generator"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint {self.ckpt_path} holds a random state that "
                                      f"does not fit ({type(e).__name__})") from None
            if s.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(s["cuda"])
            return None
        part = f"resumed at step {self.start} on {self.world} ranks"
        data.seed(stream_seed(self.rc.seed, self.kind, self.rank, part))
        torch.manual_seed(stream_seed(self.rc.seed, self.kind, self.rank, part + "/torch"))
        gen.manual_seed(stream_seed(self.rc.seed, self.kind, self.rank, part + "/sampling"))
        return (f"the run was saved on {len(states)} rank(s) and resumes on {self.world}: every "
                f"rank draws a fresh problem stream from step {self.start} on, so the run is not "
                "bitwise the one it would have been")

    def _open_folder(self):
        """Locked for the run (a second run into it fails at once); stale temporary files of killed
        writes removed; config.json written; metrics.jsonl cut to the resumed step."""
        out = self.rc.out_dir
        os.makedirs(out, exist_ok=True)
        self.lock = lock_run_folder(out)
        self._check_not_a_finished_run()  # again, under the lock
        for tmp in glob.glob(os.path.join(glob.escape(out), "*.tmp.*")):
            os.remove(tmp)  # a killed write's leftovers: nothing else writes here while we hold it
        configs = {self.kind: config_dict(self.cfg), "model": config_dict(self.mcfg),
                   "run": config_dict(self.rc)}
        atomic_write(os.path.join(out, "config.json"), json.dumps(configs, indent=2))
        path = os.path.join(out, "metrics.jsonl")
        kept = kept_metrics(path, self.start) if self.rc.resume and os.path.exists(path) else []
        atomic_write(path, "".join(kept))
        self.metrics = open(path, "a")

    def input(self, path, name=None):
        """Tie a file the run reads to its checkpoints: its digest is saved with them, and a resume
        on another file (or none) is refused with one line. Returns the path (a folder means its
        ckpt.pt). name: how the checkpoint names it, by default its path in the run folder
        (resumed() checks those before anything is written); a file outside the run folder is
        named by its flag (e.g. "--reward_model")."""
        path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
        name = name or os.path.relpath(path, self.rc.out_dir)
        digest = file_digest(path) if os.path.isfile(path) else None
        recorded = self.inputs if self.ckpt is not None else {}  # the checkpoint's
        if name in recorded and recorded[name] != digest:
            raise CheckpointError(f"{path} is missing or is not the file this run's checkpoint "
                                  f"was trained on ({name}): restore it, or start the run again "
                                  "with --overwrite")
        self.inputs[name] = digest
        return path

    def _check_inputs(self):
        """On --resume: every file of the run folder the checkpoint names is the one it names."""
        for name in list(self.inputs):
            if not name.startswith("--"):  # a file of the run folder
                self.input(os.path.join(self.rc.out_dir, name), name)

    # ---- the loop: progress, metrics, evaluations, checkpoints, signals

    def steps(self, total, first=None, desc=None):
        """The steps first, ..., total - 1 (first: the resumed step) under a progress bar, ending
        early at --stop_at. run.step counts the steps taken, over every call (DPO's rounds)."""
        first = self.start if first is None else first
        self.total, self.t0 = total, time.perf_counter()
        if self.ckpt is not None and self.ckpt.get("done") and self.ckpt["config"].get(
                "steps") == getattr(self.cfg, "steps", None):
            first = total  # finished early (SFT's --target_acc), and no more steps asked for
        if first >= total and self.main and not self.rc.quiet and desc is None:
            print(f"{self.ckpt_path} holds a finished run (step {self.start}): nothing to do")
        self.bar = tqdm(total=total, initial=first, desc=desc, dynamic_ncols=True,
                        disable=not self.main or self.rc.quiet)
        if self._signalled():  # a signal before the first step
            self._exit_on_signal(self.step)
        for i in range(first, total):
            if self.rc.stop_at and self.step >= self.rc.stop_at:
                self.stopped = True
                break
            self.t0, self.step, self.at_end = time.perf_counter(), self.step + 1, i == total - 1
            yield i
            self.bar.update()
        self.bar.close()

    def elapsed(self):
        """Seconds since the current step began."""
        return time.perf_counter() - self.t0

    def due(self, step, every):
        """Whether `step` ends an interval of `every` steps, or the loop."""
        return step % every == 0 or self.at_end

    def log(self, record, show=()):
        """One JSON line in metrics.jsonl (rank 0), with the peak memory, and at the first step the
        parameters of every network held; `show`: the keys the progress bar shows."""
        record = {**record, **(self.params if record["step"] == 1 else {}),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.device.type == "cuda":
            record["peak_cuda_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        self._write(record, "train")
        shown = {k: f"{record[k]:.3f}" for k in show}
        if (self.last_eval or {}).get("greedy_acc") is not None:
            shown["acc"] = f"{self.last_eval['greedy_acc']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)

    def eval(self, step, metrics):
        """Log and print a held-out evaluation (metrics: {} on ranks that do not evaluate)."""
        if metrics:
            self._write({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}}, "eval")
            if not self.rc.quiet:
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {_number(v)}"
                                                        for k, v in metrics.items()))
        self.last_eval = metrics
        self.first_eval = metrics if self.first_eval is None else self.first_eval
        return metrics

    def _write(self, record, kind):
        if self.metrics is not None:
            rounded = {k: (round(v, 6) if math.isfinite(v) else None) if isinstance(v, float)
                       else v for k, v in record.items()}  # JSON has no NaN: null
            line = json.dumps({"step": record["step"], "kind": kind, **rounded}) + "\n"
            try:
                self.metrics.write(line)
                self.metrics.flush()
            except OSError as e:
                raise WriteError(f"could not write {self.metrics.name}: {e.strerror}") from None

    def end_step(self, step, finished=None):
        """After each step: a checkpoint every ckpt_every steps, once the run is finished (by
        default: at the loop's last step; a script ending early passes True), at --stop_at and on
        a signal; then a signal stops the run, resumable."""
        finished = self.at_end if finished is None else finished
        interrupted = self._signalled()
        stop = self.rc.stop_at and step >= self.rc.stop_at
        if step % self.rc.ckpt_every == 0 or self.at_end or finished or stop or interrupted:
            self.save(step, done=finished)
        self.finished = finished
        if interrupted:
            self._exit_on_signal(step)

    def save(self, step, done):
        """Write ckpt.pt atomically (rank 0), unless a weight or an optimiser state is NaN or
        infinite: then raise NonFinite and keep the last good checkpoint."""
        payload = {k: (dict(v) if isinstance(v, dict) else v.state_dict())
                   for k, v in self.state.items() if k != "streams"}
        bad = non_finite(payload)
        if bad is not None:
            raise NonFinite(f"non-finite values in {bad} after step {step}, not saved")
        if "streams" in self.state:
            data, gen = self.state["streams"]
            payload["rng"] = gather_objects({
                "torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                "python": random.getstate(), "data": data.getstate(), "generator": gen.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})
        payload.update(step=step, done=done, world_size=self.world, kind=self.kind,
                       config=config_dict(self.cfg), model_config=config_dict(self.mcfg),
                       run_config=config_dict(self.rc), inputs=self.inputs, chain=self.chain,
                       teacher=self.teacher,
                       tokenizer=self.tokenizer().definition())
        self.on_main(save_checkpoint, self.ckpt_path, payload)  # every rank learns if it failed
        self.saved_step = step

    def last_good(self):
        if self.saved_step is None:
            return "no checkpoint of this run was written"
        return f"the last good checkpoint ({self.ckpt_path}, step {self.saved_step}) was kept"

    # ---- signals

    def _on_signal(self, signum, frame):
        """The first signal stops the run after its step. A second Ctrl-C stops it at once; a
        repeated SIGTERM or SIGHUP (a scheduler signalling every process, results.py passing it
        on) changes nothing: SIGKILL is the way to stop at once."""
        self.signum = self.signum or signum
        if signal.SIGINT in self.previous_handlers:
            signal.signal(signal.SIGINT, self.previous_handlers[signal.SIGINT])

    def _signalled(self):
        """Whether any rank got a signal (every rank asks at the same step, so all stop there)."""
        got = float(self.signum is not None)
        return all_reduce_sum({"stop": got}, self.device)["stop"] > 0

    def _exit_on_signal(self, step):
        name = signal.Signals(self.signum).name if self.signum else "signal"
        if self.main:
            where = (f"checkpoint saved in {self.rc.out_dir}; {self.hint}"
                     if self.saved_step is not None else "no checkpoint of this run was written")
            print(f"stopped by {name} after step {step}: {where}", file=sys.stderr)
        self._close(clean=False)
        sys.exit(128 + (self.signum or signal.SIGINT))

    # ---- the end

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, OSError) and not isinstance(exc, RunError):  # e.g. a folder not made
            exc = WriteError(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else exc)
        if isinstance(exc, dist.DistError) or (self.world > 1 and isinstance(exc, RuntimeError)
                                               and "gloo" in str(exc).lower()):
            exc = PeerFailed(f"rank {self.rank} lost its peers: another rank failed (its "
                             "message says why) or was killed")
        if isinstance(exc, RunError):  # rank 0 alone tells what every rank decided alike
            if not (getattr(exc, "quiet", False) or isinstance(exc, ConfigError) and not self.main):
                print(f"error: {self._one_line(exc)}", file=sys.stderr)
            self._close(clean=False)
            sys.exit(1)
        if exc is None and self.main and not self.rc.quiet and self.finished:
            if self.step < self.total:
                print(f"finished at step {self.step} of {self.total}")
            first, last = self.first_eval or {}, self.last_eval or {}
            if self.start == 0 and last and set(last) <= set(first):
                print(f"before -> after {self.kind}: "
                      + ", ".join(f"{k} {_number(first[k])} -> {_number(v)}"
                                  for k, v in last.items()))
        self._close(clean=exc is None)
        return False

    def _one_line(self, exc):
        message = str(exc)
        if isinstance(exc, NonFinite) and self.step:
            message += f" (at step {self.step}; lower --lr?)"
        if isinstance(exc, Collapse) and (self.saved_step or 0) >= exc.since:
            return (f"{message}; checkpoints from step {exc.since} on ({self.ckpt_path}) hold the "
                    "collapsed policy")
        return f"{message}; {self.last_good()}" if self.opened else message

    def _close(self, clean):
        if self.bar is not None:
            self.bar.close()
        for s, h in self.previous_handlers.items():
            signal.signal(s, h)
        self.previous_handlers = {}
        if self.metrics is not None:
            self.metrics.close()
        if self.lock is not None:
            self.lock.close()
        self.metrics = self.lock = None
        if clean and self.world > 1:  # no rank reads a file (a warm start's) before it is written
            dist.barrier()
        if self.owns_dist:
            cleanup_dist()
