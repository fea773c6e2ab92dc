"""Faults a careful user meets, each made for real where the machine allows it: a kill at an exact
write, a full or read-only disk, input files cut short or foreign, damaged checkpoints, signals
before the loop, a refusal under torchrun, results.py killed or interrupted. Every one ends in one
line (or a clean resume) and loses no file."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from contextlib import redirect_stderr

import pytest
import torch

import common
import results
import rollout
import train_dpo
import train_grpo
import train_ppo
import train_rm
import train_sft
from conftest import one_line_failure
from dist_helpers import run_on_two_ranks
from test_runs import GRPO_2, ROOT, SFT_RUN, keys, metrics, sft, snapshot
from test_train_dpo import DPO_TINY
from test_train_ppo import PPO_TINY
from test_train_rm import RM_TINY
from test_train_sft import TINY_FLAGS, TINY_MODEL


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A finished 4-step tiny SFT run (tests copy it before changing it)."""
    folder = tmp_path_factory.mktemp("faults") / "sft"
    sft(folder)
    return folder


def copy_of(init, tmp_path, name="run"):
    shutil.copytree(init, tmp_path / name)
    return tmp_path / name


# ----------------------------------------------------------------------------------------------
# Kills at an exact write: every file is the old one or the new one, and --resume goes on

# Runs a script, SIGKILLed at its KILL_AT-th fsync: atomic_write's file is complete, not yet renamed
KILL_AT_FSYNC = """import os, runpy, signal, sys
real, calls = os.fsync, [0]
def fsync(fd):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    real(fd)
os.fsync = fsync
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def script(name, *argv, kill_at=0, prefix=()):
    """Run a script as a user would (one thread), optionally SIGKILLed at its kill_at-th fsync."""
    code = ["-c", KILL_AT_FSYNC] if kill_at else []
    return subprocess.run([*prefix, sys.executable, *code, name, *argv], cwd=ROOT, text=True,
                          capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                    "KILL_AT": str(kill_at)})


def test_a_kill_at_any_atomic_write_of_a_resume_loses_nothing(init, tmp_path):
    """The resume writes config.json (fsync 1), metrics.jsonl cut to the resumed step (2), then
    checkpoints (3, ...). Killed at each in turn, the folder keeps a readable config, every
    metrics line of the steps saved, a checkpoint that loads; the last resume ends as a run that
    was never killed."""
    flags = SFT_RUN + ["--steps", "6", "--ckpt_every", "1"]
    full = copy_of(init, tmp_path, "full")
    sft(full, "--steps", "6", "--ckpt_every", "1", "--resume")
    run = copy_of(init, tmp_path)
    for k in (1, 2, 3):
        before = len(metrics(run))
        out = script("train_sft.py", *flags, "--out_dir", str(run), "--resume",
                     kill_at=k)
        assert out.returncode == -signal.SIGKILL, out.stderr
        json.load(open(run / "config.json"))
        assert len(metrics(run)) >= before
        assert common.load_checkpoint(str(run))["step"] == 4  # the first new one was killed
    assert script("train_sft.py", *flags, "--out_dir", str(run), "--resume").returncode == 0
    assert keys(run) == keys(full) and not [f for f in os.listdir(run) if ".tmp." in f]
    assert common.load_checkpoint(str(run))["step"] == 6


def can_trace():
    return shutil.which("strace") is not None and subprocess.run(
        ["strace", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_trace(), reason="needs strace, allowed to trace")
def test_a_kill_at_the_first_write_to_metrics_keeps_the_curve(init, tmp_path):
    """strace kills the resume at its first write() to metrics.jsonl (an in-place rewrite would
    leave 0 bytes there)."""
    run = copy_of(init, tmp_path)
    before = open(run / "metrics.jsonl").read()
    out = script("train_sft.py", *SFT_RUN, "--out_dir", str(run), "--resume", "--steps", "6",
                 prefix=["strace", "-f", "-qq", "-o", "/dev/null", "-P",
                         str(run / "metrics.jsonl"), "-e", "trace=write", "-e",
                         "inject=write:signal=SIGKILL:when=1"])
    assert out.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), out.stderr
    assert open(run / "metrics.jsonl").read() == before


def test_atomic_write_leaves_the_old_file_when_it_fails_or_is_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")
    for fault in (KeyboardInterrupt, OSError(28, "No space left on device")):
        def fail(fd, fault=fault):
            raise fault
        monkeypatch.setattr(common.os, "fsync", fail)
        with pytest.raises(common.WriteError if isinstance(fault, OSError) else KeyboardInterrupt):
            common.atomic_write(str(path), "new")
        assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


def test_every_file_the_project_writes_goes_through_atomic_write():
    """No line of the project writes a file but atomic_write's, the lock file's and the metrics
    append's (a line torn by a kill is dropped by the next resume): no open() for writing,
    json.dump, savefig or torch.save to a path, pathlib writes."""
    allowed = {("common.py", 'with open(tmp, "wb") as f:'),
               ("common.py", 'f = open(os.path.join(out_dir, ".lock"), "a+")'),
               ("common.py", 'self.metrics = open(path, "a")'),
               ("common.py", "torch.save(payload, buf)"),  # into memory, then atomic_write
               ("plot.py", 'fig.savefig(png, format="png", dpi=110)')}  # into memory too
    writes = re.compile(r'open\(.*"[wax]b?\+?"\)|json\.dump\(|savefig\(|torch\.save\(|'
                        r"write_(text|bytes)\(|np\.save|save_file\(")
    found = {(name, line.strip()) for name in os.listdir(ROOT) if name.endswith(".py")
             for line in open(os.path.join(ROOT, name)) if writes.search(line)}
    assert found == allowed


# ----------------------------------------------------------------------------------------------
# A full or read-only disk: one line naming the last good checkpoint, no temporary file left


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd")
def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_good_one(init, tmp_path,
                                                                            monkeypatch, capsys):
    run = copy_of(init, tmp_path)
    real, writes = common.os.fsync, []

    def full_at_the_second_checkpoint(fd):
        if ".tmp." in os.readlink(f"/proc/self/fd/{fd}") and "ckpt.pt" in os.readlink(
                f"/proc/self/fd/{fd}"):
            writes.append(fd)
            if len(writes) == 2:
                raise OSError(28, "No space left on device")
        real(fd)
    monkeypatch.setattr(common.os, "fsync", full_at_the_second_checkpoint)
    err = one_line_failure(train_sft.main, SFT_RUN + ["--out_dir", str(run), "--resume",
                                                      "--steps", "8", "--ckpt_every", "1"], capsys)
    assert "No space left on device" in err and "(" + str(run / "ckpt.pt") + ", step 5)" in err
    assert not [f for f in os.listdir(run) if ".tmp." in f]
    assert common.load_checkpoint(str(run))["step"] == 5


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_a_real_full_disk_then_a_read_only_one(init, tmpfs, capsys):
    run = copy_of(init, tmpfs)  # a 419 kB checkpoint in 1 MiB: the next one cannot be written
    filler = tmpfs / "filler"
    filler.write_bytes(b"\0" * (1024 ** 2 - 4096 * 4 - os.path.getsize(run / "ckpt.pt") -
                                200 * 1024))
    err = one_line_failure(train_sft.main, SFT_RUN + ["--out_dir", str(run), "--resume",
                                                      "--steps", "6", "--ckpt_every", "1"], capsys)
    assert "could not write" in err and "step 4) was kept" in err
    assert not [f for f in os.listdir(run) if ".tmp." in f]
    assert common.load_checkpoint(str(run))["step"] == 4
    os.remove(filler)
    sft(run, "--steps", "6", "--resume")  # room again: it goes on
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    err = one_line_failure(train_sft.main, SFT_RUN + ["--out_dir", str(run), "--resume",
                                                      "--steps", "8"], capsys)
    assert "not writable" in err


# ----------------------------------------------------------------------------------------------
# Inputs tied to the checkpoints


@pytest.fixture(scope="module")
def dpo_run(init, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpo") / "dpo"
    train_dpo.main(DPO_TINY + ["--init", str(init), "--out_dir", str(folder), "--epochs", "2",
                               "--stop_at", "2", "--ckpt_every", "1"])
    return folder


def cut(path, keep):
    lines = open(path).readlines()
    open(path, "w").writelines(lines[:keep])


def test_a_resume_on_other_pairs_is_refused_before_anything_is_written(dpo_run, tmp_path, capsys):
    run = copy_of(dpo_run, tmp_path)
    cut(run / "pairs_round0.jsonl", 10)
    before = snapshot(run)
    err = one_line_failure(train_dpo.main, DPO_TINY + ["--init", "unused", "--out_dir", str(run),
                                                       "--epochs", "2", "--resume"], capsys)
    assert "is not the file this run's checkpoint was trained on" in err
    assert snapshot(run) == before


def test_a_resume_needs_only_the_run_folders_copy_of_a_pairs_file(dpo_run, init, tmp_path):
    pairs = copy_of(dpo_run, tmp_path, "given") / "pairs_round0.jsonl"
    flags = ["--init", str(init), "--pairs_file", str(pairs), "--epochs", "2"]
    for main, tiny, name in ((train_dpo.main, DPO_TINY, "pairs_round0.jsonl"),
                             (train_rm.main, RM_TINY, "pairs.jsonl")):
        run = tmp_path / name
        main(tiny + flags + ["--out_dir", str(run), "--stop_at", "1"])
        os.rename(pairs, tmp_path / "gone")
        main(tiny + flags + ["--out_dir", str(run), "--resume"])  # the file is gone: it goes on
        assert common.load_checkpoint(str(run))["done"]
        os.rename(tmp_path / "gone", pairs)


def test_ppo_resumes_only_on_its_reward_model(init, tmp_path, capsys):
    for name, seed in (("rm", "0"), ("other", "1")):
        train_rm.main(RM_TINY + ["--init", str(init), "--out_dir", str(tmp_path / name),
                                 "--num_prompts", "8", "--seed", seed])
    flags = PPO_TINY + ["--init", str(init), "--reward", "model", "--reward_model",
                        str(tmp_path / "rm"), "--steps", "2", "--out_dir", str(tmp_path / "ppo")]
    train_ppo.main(flags + ["--stop_at", "1"])
    shutil.copy(tmp_path / "other" / "ckpt.pt", tmp_path / "rm" / "ckpt.pt")
    err = one_line_failure(train_ppo.main, flags + ["--resume"], capsys)
    assert "is not the file this run's checkpoint was trained on (--reward_model)" in err


def pairs_file(dpo_run, tmp_path, change):
    """The DPO run's pairs file, its lines changed by change(lines) -> lines."""
    lines = [json.loads(line) for line in open(dpo_run / "pairs_round0.jsonl")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in change(lines)))
    return path


def with_pair(change):
    def apply(lines):
        change(lines[1])
        return lines
    return apply


BAD_PAIRS = {
    "cut at a line boundary": (lambda ls: ls[:-3], "cut short"),
    "only its settings line": (lambda ls: ls[:1], "cut short"),
    "settings null": (lambda ls: [{"settings": None}] + ls[1:], "no settings line"),
    "one reference log-prob": (with_pair(lambda p: p.pop("ref_rejected_logp")), "two finite"),
    "ids of the wrong type": (with_pair(lambda p: p.update(chosen_ids="135")), "chosen_ids"),
    "ids out of range": (with_pair(lambda p: p.update(prompt_ids=[999])), "prompt_ids"),
    "float ids": (with_pair(lambda p: p.update(rejected_ids=[1.0, 16])), "rejected_ids"),
    "an empty completion": (with_pair(lambda p: p.update(chosen_ids=[])), "chosen_ids"),
    "a prompt too long": (with_pair(lambda p: p.update(prompt_ids=[15] + [4] * 40)), "tokens"),
    "a completion too long": (with_pair(lambda p: p.update(rejected_ids=[4] * 9)), "tokens"),
    "a NaN reference log-prob": (with_pair(lambda p: p.update(ref_chosen_logp=float("nan"))),
                                 "two finite"),
}


@pytest.mark.parametrize("case", BAD_PAIRS)
def test_a_bad_pairs_file_is_one_line_before_anything_is_written(dpo_run, init, tmp_path, case,
                                                                capsys):
    change, expected = BAD_PAIRS[case]
    path = pairs_file(dpo_run, tmp_path, change)
    err = one_line_failure(train_dpo.main, DPO_TINY + ["--init", str(init), "--pairs_file",
                                                       str(path), "--out_dir",
                                                       str(tmp_path / "run")], capsys)
    assert expected in err and not os.path.exists(tmp_path / "run")


def test_held_out_pairs_made_for_a_pairs_file_get_their_reference_log_probs(dpo_run, init,
                                                                           tmp_path):
    """A file of training pairs only: its held-out pairs are made by the run, and scored by the
    reference like the others, though the file's log-probs are this reference's."""
    def train_only(lines):
        kept = [p for p in lines[1:] if p["split"] == "train"]
        return [{"settings": {**lines[0]["settings"], "pairs": {"train": len(kept),
                                                                "heldout": 0}}}] + kept
    path = pairs_file(dpo_run, tmp_path, train_only)
    train_dpo.main(DPO_TINY + ["--init", str(init), "--pairs_file", str(path), "--out_dir",
                               str(tmp_path / "run")])
    pairs, _ = rollout.load_pairs(str(tmp_path / "run" / "pairs_round0.jsonl"))
    assert any(p["split"] == "heldout" for p in pairs)
    assert all("ref_chosen_logp" in p for p in pairs)


def test_an_rm_pairs_file_with_too_few_pairs_says_so(dpo_run, init, tmp_path, capsys):
    def two_pairs(lines):
        kept = [p for p in lines[1:] if p["split"] == "train"][:2]
        return [{"settings": {**lines[0]["settings"], "pairs": {"train": 2, "heldout": 0}}}] + kept
    path = pairs_file(dpo_run, tmp_path, two_pairs)
    err = one_line_failure(train_rm.main, RM_TINY + ["--init", str(init), "--pairs_file",
                                                     str(path), "--out_dir",
                                                     str(tmp_path / "rm")], capsys)
    assert "fewer than --batch_size 4" in err and "--pairs_file" in err


# ----------------------------------------------------------------------------------------------
# Lengths checked against the model actually used, before anything is written


def test_sft_checks_the_length_its_evaluation_samples(tmp_path, capsys):
    err = one_line_failure(train_sft.main, ["--max_seq_len", "14", "--steps", "2", "--quiet",
                                            "--out_dir", str(tmp_path / "s")], capsys)
    assert "--max_seq_len 14 is too short" in err and not os.path.exists(tmp_path / "s")


def test_rl_lengths_are_checked_against_the_init(init, tmp_path, capsys):
    long_init = tmp_path / "sft128"
    train_sft.main(TINY_FLAGS + ["--max_seq_len", "128", "--steps", "1", "--out_dir",
                                 str(long_init)])
    train_grpo.main(GRPO_2 + ["--init", str(long_init), "--max_new_tokens", "100", "--steps",
                              "1", "--out_dir", str(tmp_path / "g")])  # fits the 128-token init
    for main, tiny in ((train_ppo.main, PPO_TINY), (train_rm.main, RM_TINY),
                       (train_grpo.main, GRPO_2)):
        err = one_line_failure(main, tiny + ["--init", str(init), "--max_new_tokens", "40",
                                             "--out_dir", str(tmp_path / "r")], capsys)
        assert "--max_seq_len 32 is too short" in err and not os.path.exists(tmp_path / "r")


def test_a_warm_start_that_could_not_hold_the_run_is_never_made(tmp_path, capsys):
    err = one_line_failure(train_grpo.main, GRPO_2 + TINY_MODEL + [
        "--init", str(tmp_path / "warm"), "--max_new_tokens", "40", "--out_dir",
        str(tmp_path / "g")], capsys)
    assert "too short" in err and os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Damaged or foreign checkpoints and folders: one line


def damaged(init, tmp_path, change):
    run = copy_of(init, tmp_path)
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    change(ckpt)
    torch.save(ckpt, run / "ckpt.pt")
    return run


CKPT_FAULTS = {
    "an unknown model field": (lambda c: c["model_config"].update(bogus=1), "bogus"),
    "wrong tensor shapes": (lambda c: c["model"].update({"embed.weight": torch.zeros(3, 3)}),
                            "does not fit"),
    "no rng": (lambda c: c.pop("rng"), "holds no rng"),
    "a step that is not a number": (lambda c: c.update(step="4"), "not one of ours"),
}


@pytest.mark.parametrize("case", CKPT_FAULTS)
def test_a_damaged_checkpoint_is_one_line_to_resume_and_as_init(init, tmp_path, case, capsys):
    change, expected = CKPT_FAULTS[case]
    run = damaged(init, tmp_path, change)
    before = snapshot(run)
    err = one_line_failure(train_sft.main, SFT_RUN + ["--out_dir", str(run), "--resume",
                                                      "--steps", "6"], capsys)
    assert expected in err and snapshot(run) == before
    if case != "no rng":  # an init needs no random state
        err = one_line_failure(train_grpo.main, GRPO_2 + ["--init", str(run), "--out_dir",
                                                          str(tmp_path / "g")], capsys)
        assert expected in err and not os.path.exists(tmp_path / "g")


def test_a_model_field_missing_from_a_checkpoint_counts_as_its_default(init, tmp_path):
    """A checkpoint saved before a ModelConfig field existed: the same rule as for train configs,
    for a resume and for an init."""
    run = damaged(init, tmp_path, lambda c: c["model_config"].pop("attention"))
    sft(run, "--resume", "--steps", "6")
    train_grpo.main(GRPO_2 + ["--init", str(run), "--steps", "1", "--out_dir",
                              str(tmp_path / "g")])


def test_metrics_with_bytes_that_are_not_text_resume(init, tmp_path):
    run = copy_of(init, tmp_path)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "kind": "train", "x": "\xff\xfe"}\n\xc3\x28\n')
    sft(run, "--resume", "--steps", "6")
    assert [k for k in keys(run) if k[0] == 3].count((3, "train")) == 1


@pytest.mark.parametrize("how", ["dangling symlink", "init under a file", "init is a file"])
def test_bad_folders_are_one_line_naming_their_flag(init, tmp_path, how, capsys):
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    (tmp_path / "file").write_text("x")
    if how == "dangling symlink":
        argv, flag = SFT_RUN + ["--out_dir", str(tmp_path / "link")], "--out_dir"
        main = train_sft.main
    else:
        bad = tmp_path / "file" / ("x" if how == "init under a file" else "")
        argv, flag = GRPO_2 + ["--init", str(bad), "--out_dir", str(tmp_path / "g")], "--init"
        main = train_grpo.main
    err = one_line_failure(main, argv, capsys)
    assert err.startswith(f"error: {flag} ") and sorted(os.listdir(tmp_path)) == ["file", "link"]


# ----------------------------------------------------------------------------------------------
# Signals, and a finished run resumed


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_before_the_loop_is_one_line(init, tmp_path, monkeypatch, signum, capsys):
    real = common.load_or_make_init

    def signalled(*a):
        os.kill(os.getpid(), signum)  # while the init loads
        return real(*a)
    monkeypatch.setattr(common, "load_or_make_init", signalled)
    err = one_line_failure(train_grpo.main, GRPO_2 + ["--init", str(init), "--out_dir",
                                                      str(tmp_path / "g")], capsys)
    assert f"stopped by {signal.Signals(signum).name} after step 0" in err


def signals_at(monkeypatch, call, *signums):
    """Send these signals to this process, in turn, at train_sft.make_batch's call-th call."""
    real, calls = train_sft.make_batch, []

    def wrapped(*a, **kw):
        calls.append(1)
        for signum in signums if len(calls) == call else ():
            os.kill(os.getpid(), signum)
        return real(*a, **kw)
    monkeypatch.setattr(train_sft, "make_batch", wrapped)


def test_a_repeated_sigterm_still_ends_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    """A scheduler signals every process and results.py passes its signal on: the run gets two."""
    signals_at(monkeypatch, 3, signal.SIGTERM, signal.SIGTERM, signal.SIGHUP)
    with pytest.raises(SystemExit) as e:
        sft(tmp_path / "b", "--steps", "6", "--ckpt_every", "100")
    assert e.value.code == 128 + signal.SIGTERM
    assert common.load_checkpoint(str(tmp_path / "b"))["step"] == 3


def test_an_ignored_sighup_stays_ignored(tmp_path, monkeypatch):
    """nohup python train_sft.py: closing the terminal does not stop the run."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        signals_at(monkeypatch, 3, signal.SIGHUP)
        sft(tmp_path / "b", "--steps", "6")
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert common.load_checkpoint(str(tmp_path / "b"))["step"] == 6


def test_an_old_pairs_file_without_counts_still_trains(dpo_run, init, tmp_path):
    def no_counts(lines):
        lines[0]["settings"].pop("pairs")
        return lines
    path = pairs_file(dpo_run, tmp_path, no_counts)
    train_dpo.main(DPO_TINY + ["--init", str(init), "--pairs_file", str(path), "--out_dir",
                               str(tmp_path / "run")])


def test_a_run_finished_early_stays_finished_on_resume(tmp_path, monkeypatch):
    """SFT stopped at --target_acc: --resume has nothing to do (it does not train on)."""
    real, calls = rollout.evaluate, []

    def reached_at_the_second_evaluation(*a, **kw):
        calls.append(1)
        return {**real(*a, **kw), "greedy_acc": 1.0 if len(calls) > 1 else 0.0}
    monkeypatch.setattr(rollout, "evaluate", reached_at_the_second_evaluation)
    sft(tmp_path / "s", "--target_acc", "0.5")
    assert common.load_checkpoint(str(tmp_path / "s"))["step"] == 2
    before = snapshot(tmp_path / "s")
    sft(tmp_path / "s", "--target_acc", "0.5", "--resume")
    after = snapshot(tmp_path / "s")
    assert common.load_checkpoint(str(tmp_path / "s"))["step"] == 2
    assert after["ckpt.pt"] == before["ckpt.pt"] and keys(tmp_path / "s") == [
        (0, "eval"), (1, "train"), (2, "train"), (2, "eval")]


def test_metrics_hold_no_bare_nan(tmp_path):
    run = common.Run("sft", train_sft.SFTConfig(), common.ModelConfig(), common.RunConfig())
    run.metrics = open(tmp_path / "m.jsonl", "w")
    run._write({"step": 1, "auc": float("nan"), "loss": 0.5}, "eval")
    run.metrics.close()

    def no_constants(name):
        raise ValueError(name)
    assert json.loads(open(tmp_path / "m.jsonl").read(), parse_constant=no_constants) == {
        "step": 1, "kind": "eval", "auc": None, "loss": 0.5}


# ----------------------------------------------------------------------------------------------
# torchrun: a refusal on rank 0 ends every rank with one line, no gloo traceback


def _run_into_a_locked_folder(rank, world, folder, out):
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as e:
        train_sft.main(SFT_RUN + ["--out_dir", folder, "--resume", "--steps", "6"])
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        json.dump({"code": e.value.code, "err": err.getvalue()}, f)


def test_a_refusal_on_rank_0_ends_every_rank_with_one_line(init, tmp_path):
    run = copy_of(init, tmp_path)
    lock = common.lock_run_folder(str(run))  # another run holds it
    try:
        run_on_two_ranks(_run_into_a_locked_folder, str(run), str(tmp_path))
    finally:
        lock.close()
    ranks = [json.load(open(tmp_path / f"rank{r}")) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [1, 1]
    assert ranks[0]["err"].count("\n") == 1 and "in use by another run" in ranks[0]["err"]
    assert ranks[1]["err"] == ""


def _lose_a_peer(rank, world, port, folder, out):
    """Rank 1 dies (os._exit, as by kill -9) at its third batch; rank 0 reports how it ended."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    if rank == 1:
        real, calls = train_sft.make_batch, []

        def dies(*a, **kw):
            calls.append(1)
            if len(calls) == 3:
                os._exit(9)
            return real(*a, **kw)
        train_sft.make_batch = dies
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as e:
        train_sft.main(SFT_RUN + ["--out_dir", folder, "--steps", "6", "--ckpt_every", "1"])
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        json.dump({"code": e.value.code, "err": err.getvalue()}, f)
    os._exit(0)  # no teardown of a process group whose peer is gone


def test_a_rank_that_loses_its_peer_stops_with_one_line(tmp_path):
    from dist_helpers import free_port
    ctx = torch.multiprocessing.spawn(_lose_a_peer, args=(2, free_port(), str(tmp_path / "run"),
                                                          str(tmp_path)), nprocs=2, join=False)
    for process in ctx.processes:  # (ctx.join would terminate rank 0 once rank 1 has died)
        process.join(timeout=120)
    assert [p.exitcode for p in ctx.processes] == [0, 9]
    rank0 = json.load(open(tmp_path / "rank0"))
    assert rank0["code"] == 1 and rank0["err"].count("\n") == 1, rank0
    assert "lost its peers" in rank0["err"] and "step 2) was kept" in rank0["err"]


# ----------------------------------------------------------------------------------------------
# results.py: a saved experiment, and the runs it starts


def test_results_keeps_a_finished_run_and_resumes_an_interrupted_one(tmp_path, monkeypatch):
    """Rerun, an experiment reads its finished run again (its checkpoint and wall time kept);
    an interrupted one goes on from its checkpoint; --fresh starts again."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "out" / "results" / "t" / "tiny" / "seed0"
    methods = [("tiny", "train_sft.py", SFT_RUN)]
    sft(folder, "--stop_at", "2")  # interrupted
    kept = metrics(folder)
    first = results.run_methods("t", methods, [0], 0)["tiny"][0]
    assert common.load_checkpoint(str(folder))["step"] == 4 and metrics(folder)[:len(kept)] == kept
    before = snapshot(folder)
    again = results.run_methods("t", methods, [0], 0)["tiny"][0]
    assert again["wall_s"] == first["wall_s"] and snapshot(folder)["ckpt.pt"] == before["ckpt.pt"]
    assert results.keep(str(folder), fresh=True) == "--overwrite"
    assert results.keep(str(tmp_path / "new"), fresh=False) == "--overwrite"


def test_results_table_of_a_cut_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "rft.json").write_text('{"claim": "x", "se')
    with pytest.raises(SystemExit) as e:
        results.main(["rft", "--table"])
    assert "is not a saved experiment" in str(e.value) and len(str(e.value).splitlines()) == 1


# A child that signals results.py (its parent) and reports the signal it then gets
CHILD = """import os, signal, sys
wanted = getattr(signal, sys.argv[1])
signal.pthread_sigmask(signal.SIG_BLOCK, {wanted})
os.kill(os.getppid(), getattr(signal, sys.argv[2]))
print("child got", signal.Signals(signal.sigwait({wanted})).name, flush=True)
"""
PARENT = "import sys, results; sys.exit(results.run_child([sys.executable, '-c', sys.argv[1], " \
         "sys.argv[2], sys.argv[3]]))"


def parent_and_child(wanted, sent):
    return subprocess.run([sys.executable, "-c", PARENT, CHILD, wanted, sent], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_results_passes_ctrl_c_to_its_run_and_waits_for_it():
    out = parent_and_child("SIGINT", "SIGINT")
    assert out.stdout == "child got SIGINT\n"
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "stopped by SIGINT" in out.stderr and "run the same command again" in out.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_a_run_ends_when_results_is_killed():
    """kill -9 of results.py: its run gets SIGTERM (it checkpoints and exits), not orphaned."""
    out = parent_and_child("SIGTERM", "SIGKILL")  # reads until the child has closed stdout too
    assert out.returncode == -signal.SIGKILL and out.stdout == "child got SIGTERM\n"
