"""The train scripts as a user meets them: bad input, faults, signals, locks, resumes and data
streams."""
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import common
import tasks
import train_grpo
import train_sft
from conftest import one_line_cli_error, one_line_failure
from dist_helpers import run_on_two_ranks
from model import Transformer
from test_train_grpo import GRPO_TINY
from test_train_sft import TINY_FLAGS, TINY_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_RUN = TINY_FLAGS + ["--steps", "4", "--eval_every", "2", "--ckpt_every", "2"]
GRPO_2 = GRPO_TINY + ["--n_digits", "2"]


def sft(folder, *extra, **kw):
    return train_sft.main(SFT_RUN + ["--out_dir", str(folder)] + list(extra), **kw)


def grpo(init, folder, *extra):
    return train_grpo.main(
        GRPO_TINY + ["--task", "add", "--n_digits", "2", "--init", str(init), "--steps", "2",
                     "--ckpt_every", "1", "--out_dir", str(folder)] + list(extra))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished tiny SFT run and a GRPO run from it (module-wide: tests copy them before
    changing them)."""
    root = tmp_path_factory.mktemp("runs")
    sft(root / "sft")
    grpo(root / "sft", root / "grpo")
    return root


def snapshot(folder):
    """Every file under folder with its size, time and content: what 'nothing was touched'
    compares."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = (os.path.getmtime(p),
                                               hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def metrics(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]


def same_weights(a, b):
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the flag, a non-zero exit, nothing of an existing run touched

SFT_BAD = [(["--task", "nonsense"], "--task"), (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"),
           (["--weight_decay", "-5"], "--weight_decay"), (["--beta2", "2"], "--beta2"),
           (["--grad_accum", "0"], "--grad_accum"), (["--n_digits", "-3"], "n_digits"),
           (["--n_digits", "30"], "n_digits"),
           (["--eval_size", "0"], "--eval_size"), (["--eval_every", "0"], "--eval_every"),
           (["--ckpt_every", "0"], "--ckpt_every"), (["--batch_size", "-8"], "--batch_size"),
           (["--max_seq_len", "4"], "--max_seq_len"), (["--steps", "0"], "--steps"),
           (["--steps", "-1"], "--steps"),
           (["--target_acc", "2"], "--target_acc"), (["--grad_clip", "-1"], "--grad_clip"),
           (["--lr", "inf"], "--lr"), (["--batch_size", "6", "--grad_accum", "4"], "--batch_size"),
           (["--vocab_size", "20"], "--vocab_size"), (["--resume", "--lr", "0.5"], "lr")]

GRPO_BAD = [(["--task", "nonsense"], "--task"), (["--lr", "nan"], "--lr"),
            (["--beta", "-1"], "--beta"),
            (["--pass_k", "0"], "--pass_k"), (["--max_new_tokens", "1"], "--max_new_tokens"),
            (["--mla_impl", "bogus"], "--mla_impl"), (["--grad_clip", "-1"], "--grad_clip"),
            (["--warmstart_target_acc", "2"], "--warmstart_target_acc"),
            (["--steps", "0"], "--steps"),
            (["--eval_every", "0"], "--eval_every"), (["--batch_size", "-8"], "--batch_size"),
            (["--max_seq_len", "4"], "max_seq_len (32, not 4)"), (["--n_digits", "30"], "n_digits"),
            (["--temperature", "0"], "--temperature"),
            (["--num_generations", "1"], "--num_generations"),
            (["--epsilon", "0"], "--epsilon"), (["--loss_type", "ppo"], "--loss_type"),
            (["--supervision", "process"], "--supervision"),
            (["--num_minibatches", "5"], "--num_minibatches"),
            (["--collapse_patience", "-1"], "--collapse_patience"),
            (["--resume", "--dim", "48"], "dim"), (["--resume", "--beta", "0.5"], "beta")]


def again(argv):
    """Flags that run again in a folder holding a run: --resume, or --overwrite."""
    return argv if "--resume" in argv else argv + ["--overwrite"]


def argv_id(x):
    """A case's test id: its argv's words (and pytest's own id for the flag)."""
    return " ".join(x) if isinstance(x, list) else None


@pytest.mark.parametrize("argv,flag", SFT_BAD, ids=argv_id)
def test_sft_bad_input_is_one_line_and_touches_nothing(runs, argv, flag, capsys):
    before = snapshot(runs)
    err = one_line_failure(train_sft.main, SFT_RUN + ["--out_dir", str(runs / "sft")] + again(argv),
                           capsys)
    assert flag in err
    assert snapshot(runs) == before


@pytest.mark.parametrize("argv,flag", GRPO_BAD, ids=argv_id)
def test_grpo_bad_input_is_one_line_and_touches_nothing(runs, argv, flag, capsys):
    before = snapshot(runs)
    flags = GRPO_2 + ["--init", str(runs / "sft"), "--steps", "2", "--out_dir", str(runs / "grpo")]
    err = one_line_failure(train_grpo.main, flags + again(argv), capsys)
    assert flag in err
    assert snapshot(runs) == before


@pytest.mark.parametrize("main", [train_sft.main, train_grpo.main])
def test_out_dir_under_a_regular_file(tmp_path, main, capsys):
    (tmp_path / "file").write_text("not a folder")
    err = one_line_failure(main, TINY_FLAGS + ["--out_dir", str(tmp_path / "file" / "run")],
                           capsys)
    assert "--out_dir" in err and "is a file" in err
    assert os.listdir(tmp_path) == ["file"]


def test_a_folder_named_ckpt_pt(tmp_path, capsys):
    (tmp_path / "ckpt.pt").mkdir()
    err = one_line_failure(train_sft.main, TINY_FLAGS + ["--out_dir", str(tmp_path), "--resume"],
                           capsys)
    assert "ckpt.pt" in err and "ckpt.pt/ckpt.pt" not in err
    err = one_line_failure(train_sft.main, TINY_FLAGS + ["--out_dir", str(tmp_path)], capsys)
    assert "is not a file" in err and sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


@pytest.fixture(scope="module")
def policy_runs(runs, tmp_path_factory):
    """A tiny run of every policy kind from the SFT run of `runs` (its GRPO run, and a DPO and a
    PPO run made here), and a reward model: what --init may and may not take."""
    import train_dpo
    import train_ppo
    import train_rm
    from test_train_dpo import DPO_TINY
    from test_train_ppo import PPO_TINY
    from test_train_rm import RM_TINY
    root, init = tmp_path_factory.mktemp("kinds"), ["--init", str(runs / "sft")]
    train_dpo.main(DPO_TINY + init + ["--out_dir", str(root / "dpo")])
    train_ppo.main(PPO_TINY + init + ["--steps", "1", "--out_dir", str(root / "ppo")])
    train_rm.main(RM_TINY + init + ["--out_dir", str(root / "rm")])
    return {"sft": runs / "sft", "grpo": runs / "grpo", "dpo": root / "dpo",
            "ppo": root / "ppo", "rm": root / "rm"}


@pytest.mark.parametrize("kind", ["sft", "grpo", "dpo", "ppo"])
def test_init_takes_every_policy_kind_resumes_bitwise_and_records_the_chain(
        policy_runs, kind, tmp_path):
    init = policy_runs[kind]
    full = grpo(init, tmp_path / "a")[0]
    grpo(init, tmp_path / "b", "--stop_at", "1")
    resumed = grpo(init, tmp_path / "b", "--resume")[0]
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    start = common.load_checkpoint(str(init))
    assert all(torch.equal(a, start["model"][n]) for n, a in  # the init's policy, not another net
               common.load_checkpoint(str(tmp_path / "a"))["ref"].items())
    chain = common.load_checkpoint(str(tmp_path / "b"))["chain"]
    assert [(s["run"], s["kind"]) for s in chain] == (
        [(str(policy_runs["sft"]), "sft")] * (kind != "sft") + [(str(init), kind)])
    assert chain[-1]["sha256"] == common.file_digest(os.path.join(init, "ckpt.pt"))


@pytest.mark.parametrize("main", ["grpo", "sft", "sft rft", "dpo"])
def test_a_reward_model_is_no_init_and_nothing_is_written(policy_runs, main, tmp_path, capsys):
    import train_dpo
    from test_train_dpo import DPO_TINY
    rm, out = str(policy_runs["rm"]), str(tmp_path / "out")
    argv = {"grpo": (train_grpo.main, GRPO_2), "sft": (train_sft.main, TINY_FLAGS),
            "sft rft": (train_sft.main, TINY_FLAGS + ["--data", "rft"]),
            "dpo": (train_dpo.main, DPO_TINY)}[main]
    err = one_line_failure(argv[0], argv[1] + ["--init", rm, "--out_dir", out], capsys)
    assert "is a reward model (train_rm.py), not a policy" in err and not os.path.exists(out)
    err = one_line_failure(train_sft.main, TINY_FLAGS + [
        "--data", "rft", "--init", str(policy_runs["sft"]), "--teacher", rm, "--out_dir", out],
        capsys)
    assert "--teacher" in err and "not a policy" in err and not os.path.exists(out)


def test_grpo_resume_names_model_flags_that_differ(runs, capsys):
    err = one_line_failure(train_grpo.main, GRPO_2 + ["--steps", "2", "--resume", "--out_dir",
                                                      str(runs / "grpo"), "--dim", "48"], capsys)
    assert "does not match this run's config in: dim (32, not 48)" in err


# ----------------------------------------------------------------------------------------------
# Faults: divergence, corruption, signals, a second run, stale files


def test_divergence_before_any_checkpoint_says_none_was_kept(tmp_path, monkeypatch, capsys):
    real = Transformer.forward

    def nan_loss(self, *a, **kw):
        logits, loss = real(self, *a, **kw)
        return logits, None if loss is None else loss * float("nan")

    monkeypatch.setattr(Transformer, "forward", nan_loss)
    err = one_line_failure(train_sft.main, SFT_RUN + ["--out_dir", str(tmp_path)], capsys)
    assert ("non-finite loss" in err and "no checkpoint of this run was written" in err
            and "kept" not in err)
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    """Weights that turn infinite after step 4's update: the checkpoint of step 4 is refused and the
    one of step 2 stays, as the message says."""
    real, calls = Transformer.update_router_biases, {"n": 0}

    def poison(self):
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                self.head.weight[0, 0] = float("inf")
        return real(self)

    monkeypatch.setattr(Transformer, "update_router_biases", poison)
    flags = ["--out_dir", str(tmp_path), "--eval_every", "100", "--steps", "6"]
    err = one_line_failure(train_sft.main, SFT_RUN + flags, capsys)
    assert ("non-finite values in model.head.weight after step 4" in err
            and "step 2) was kept" in err)
    assert common.load_checkpoint(str(tmp_path))["step"] == 2


def test_grpo_non_finite_logits_in_sampling(runs, tmp_path, monkeypatch, capsys):
    """Diverged weights surface as NaN logits in the rollouts: one line, no traceback from
    multinomial."""
    real, calls = Transformer.trunk, {"n": 0}

    def nan_when_prefilling(self, idx, positions=None, pad_mask=None, cache=None, start_pos=0):
        h, *rest = real(self, idx, positions, pad_mask, cache, start_pos)
        if cache is not None and start_pos == 0 and not torch.is_grad_enabled():
            calls["n"] += 1  # sampling's prefills: 2 for the first eval, then 1 per step's rollouts
            if calls["n"] >= 3:
                h = h * float("nan")
        return (h, *rest)

    monkeypatch.setattr(Transformer, "trunk", nan_when_prefilling)
    err = one_line_failure(train_grpo.main, GRPO_2 + ["--init", str(runs / "sft"),
                                                      "--out_dir", str(tmp_path)], capsys)
    assert ("non-finite logits" in err and "at step 1" in err
            and "no checkpoint of this run was written" in err)


def test_grpo_collapse_stops_the_run(runs, tmp_path, monkeypatch, capsys):
    """A policy that no longer gets any reward and no gradient cannot change any more (as after
    --lr 1e4): the run stops with an error instead of running on and exiting 0."""
    monkeypatch.setattr(tasks.Addition, "reward", lambda self, c, p: 0.0)
    err = one_line_failure(train_grpo.main, GRPO_2 + ["--init", str(runs / "sft"), "--steps", "8",
                                                      "--collapse_patience", "3",
                                                      "--out_dir", str(tmp_path)], capsys)
    assert "collapsed" in err and "3 steps" in err


def test_flipped_bytes_are_a_clear_error(runs, tmp_path, capsys):
    shutil.copytree(runs / "sft", tmp_path / "sft")
    path = tmp_path / "sft" / "ckpt.pt"
    data = bytearray(path.read_bytes())
    rng = random.Random(0)
    for _ in range(4):
        data[rng.randrange(len(data) // 3, 2 * len(data) // 3)] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(common.CheckpointError, match="fails its CRC32 check"):
        common.load_checkpoint(str(path))
    err = one_line_failure(train_sft.main, SFT_RUN + ["--out_dir", str(tmp_path / "sft"),
                                                      "--resume", "--steps", "6"], capsys)
    assert "damaged" in err


def interrupt_at(monkeypatch, module, name, call, signum):
    """Make module.name send `signum` to this process on its `call`-th call (mid-step)."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*a, **kw):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, wrapped)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])  # Ctrl-C, a closed terminal
def test_ctrl_c_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, monkeypatch, signum,
                                                                  capsys):
    full, _ = sft(tmp_path / "full", "--steps", "6", "--ckpt_every", "100")
    interrupt_at(monkeypatch, train_sft, "make_batch", 3, signum)
    with pytest.raises(SystemExit) as e:
        sft(tmp_path / "b", "--steps", "6", "--ckpt_every", "100")
    assert e.value.code == 128 + signum
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} after step 3" in err and "--resume" in err
    assert common.load_checkpoint(str(tmp_path / "b"))["step"] == 3
    monkeypatch.undo()
    resumed, _ = sft(tmp_path / "b", "--steps", "6", "--ckpt_every", "100", "--resume")
    same_weights(full, resumed)
    timings = ("tokens_per_s", "step_s", "peak_rss_mb")  # measured, not computed
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timings} for r in rs]  # noqa: E731
    assert strip(metrics(tmp_path / "b")) == strip(metrics(tmp_path / "full"))


def test_sigterm_stops_grpo_with_a_checkpoint_and_resumes_exactly(runs, tmp_path, monkeypatch,
                                                                  capsys):
    full, _, _ = grpo(runs / "sft", tmp_path / "full", "--steps", "4", "--ckpt_every", "100")
    interrupt_at(monkeypatch, train_grpo, "make_experience", 2, signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        grpo(runs / "sft", tmp_path / "b", "--steps", "4", "--ckpt_every", "100")
    assert e.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM after step 2" in capsys.readouterr().err
    monkeypatch.undo()
    resumed, _, _ = grpo(runs / "sft", tmp_path / "b", "--steps", "4", "--ckpt_every", "100",
                         "--resume")
    same_weights(full, resumed)


def test_a_second_run_into_a_locked_folder_fails_at_once(runs, tmp_path, capsys):
    shutil.copytree(runs / "sft", tmp_path / "sft")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import common; "
            "f = common.lock_run_folder(sys.argv[2]); print('locked', flush=True); "
            "sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, ROOT, str(tmp_path / "sft")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path)
        err = one_line_failure(train_sft.main, SFT_RUN + ["--out_dir", str(tmp_path / "sft"),
                                                          "--resume", "--steps", "6"], capsys)
        assert f"in use by another run (pid {holder.pid})" in err
        assert snapshot(tmp_path) == before
    finally:
        holder.stdin.close()
        holder.wait()
    sft(tmp_path / "sft", "--resume", "--steps", "6")  # free again once the other run has ended


def test_stale_temporary_checkpoints_are_removed(runs, tmp_path):
    shutil.copytree(runs / "sft", tmp_path / "sft")
    for pid in (11, 22):
        (tmp_path / "sft" / f"ckpt.pt.tmp.{pid}").write_bytes(b"x" * 1000)
    sft(tmp_path / "sft", "--resume", "--steps", "6")
    assert not [f for f in os.listdir(tmp_path / "sft") if ".tmp." in f]


def test_stale_temporary_files_are_found_in_a_folder_named_like_a_glob(runs, tmp_path):
    """A folder named sweep[1] is not the pattern sweep1: its own stale files go, the others'
    stay (an unescaped glob would delete a live run's temporary checkpoint in sweep1)."""
    for name in ("sweep[1]", "sweep1"):
        shutil.copytree(runs / "sft", tmp_path / name)
        (tmp_path / name / "ckpt.pt.tmp.11").write_bytes(b"x")
    sft(tmp_path / "sweep[1]", "--resume", "--steps", "6")
    assert not os.path.exists(tmp_path / "sweep[1]" / "ckpt.pt.tmp.11")
    assert os.path.exists(tmp_path / "sweep1" / "ckpt.pt.tmp.11")


# ----------------------------------------------------------------------------------------------
# A run folder is never overwritten by accident, nor the checkpoint a run starts from


def test_a_finished_run_is_not_overwritten_without_resume_or_overwrite(runs, tmp_path, capsys):
    shutil.copytree(runs / "sft", tmp_path / "sft")
    before = snapshot(tmp_path)
    err = one_line_failure(train_sft.main, SFT_RUN + ["--out_dir", str(tmp_path / "sft")], capsys)
    assert "holds a run (ckpt.pt, metrics.jsonl)" in err and "--resume" in err
    assert "--overwrite" in err and snapshot(tmp_path) == before
    err = one_line_failure(train_grpo.main, GRPO_2 + ["--init", str(runs / "sft"), "--out_dir",
                                                      str(tmp_path / "sft")], capsys)
    assert "holds a run" in err and snapshot(tmp_path) == before
    old = common.load_checkpoint(str(tmp_path / "sft"))
    sft(tmp_path / "sft", "--overwrite", "--steps", "2")  # starts again, as asked
    assert common.load_checkpoint(str(tmp_path / "sft"))["step"] == 2 and old["step"] == 4
    assert [r["step"] for r in metrics(tmp_path / "sft") if r["kind"] == "train"] == [1, 2]


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    err = one_line_cli_error(train_sft.main, TINY_FLAGS + ["--out_dir", str(tmp_path), "--resume",
                                                           "--overwrite"], capsys)
    assert "not both" in err and os.listdir(tmp_path) == []


@pytest.mark.parametrize("how", ["same", "symlink", "file"])
def test_a_run_never_writes_into_its_own_init(runs, tmp_path, how, capsys):
    """--init and --out_dir naming one folder (directly, through a symlink, or the folder of an
    --init .pt file) would overwrite the checkpoint the run starts from: refused, untouched."""
    shutil.copytree(runs / "sft", tmp_path / "sft")
    init = tmp_path / "sft" / ("ckpt.pt" if how == "file" else "")
    out = tmp_path / "sft"
    if how == "symlink":
        os.symlink(tmp_path / "sft", tmp_path / "link")
        out = tmp_path / "link"
    before = snapshot(tmp_path / "sft")
    for main, argv in ((train_grpo.main, GRPO_2), (train_sft.main, TINY_FLAGS + ["--data", "rft"])):
        err = one_line_failure(main, argv + ["--init", str(init), "--out_dir", str(out),
                                             "--overwrite"], capsys)
        assert "would overwrite the checkpoint it starts from" in err
    assert snapshot(tmp_path / "sft") == before


def test_a_warm_start_is_made_only_in_a_new_folder(runs, tmp_path, capsys):
    """An --init folder with no checkpoint: a warm start is made only where nothing else is (a
    folder of other files stays untouched); a warm start killed before its first checkpoint is
    made again."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "results.json").write_text("{}")
    before = snapshot(tmp_path / "notes")
    err = one_line_failure(train_grpo.main, GRPO_2 + ["--init", str(tmp_path / "notes"),
                                                      "--out_dir", str(tmp_path / "g")], capsys)
    assert "holds no checkpoint" in err and snapshot(tmp_path / "notes") == before
    assert not os.path.exists(tmp_path / "g")
    warm = GRPO_2 + TINY_MODEL + ["--init", str(tmp_path / "warm"), "--warmstart_steps", "2",
                                       "--steps", "1", "--out_dir", str(tmp_path / "g")]
    real_save = common.Run.save

    def killed_at_the_first_checkpoint(self, step, done):
        if self.kind == "sft":
            raise KeyboardInterrupt  # the warm start dies before writing a checkpoint
        return real_save(self, step, done)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common.Run, "save", killed_at_the_first_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            train_grpo.main(warm)
    assert sorted(os.listdir(tmp_path / "warm")) == [".lock", "config.json", "metrics.jsonl"]
    train_grpo.main(warm)  # the same warm start, made again
    assert common.load_checkpoint(str(tmp_path / "warm"))["step"] == 2


def test_an_unfinished_sft_run_of_other_settings_is_no_init(tmp_path, capsys):
    sft(tmp_path / "sft", "--steps", "4", "--stop_at", "2", "--seed", "5")
    err = one_line_failure(train_grpo.main, GRPO_2 + ["--init", str(tmp_path / "sft"),
                                                      "--out_dir", str(tmp_path / "g")], capsys)
    assert "unfinished sft run (step 2)" in err and not os.path.exists(tmp_path / "g")


# ----------------------------------------------------------------------------------------------
# metrics.jsonl: one line per (step, kind), whatever the history of kills and resumes


def keys(folder):
    return [(r["step"], r["kind"]) for r in metrics(folder)]


def test_sft_metrics_after_stop_crash_and_finished_resume(tmp_path, monkeypatch):
    flags = ("--steps", "6", "--eval_every", "3", "--ckpt_every", "3")
    sft(tmp_path / "full", *flags)
    expected = keys(tmp_path / "full")
    assert expected.count((6, "eval")) == 1 and expected.count((3, "eval")) == 1
    sft(tmp_path / "b", *flags, "--stop_at", "3")
    assert keys(tmp_path / "b") == [k for k in expected if k[0] <= 3]
    # killed after step 6's evaluation, before its checkpoint; the kill tears the last line too
    real_save = common.Run.save

    def killed(self, step, done):
        if step == 6:
            with open(os.path.join(self.rc.out_dir, "metrics.jsonl"), "a") as f:
                f.write('{"step": 7, "ki')
            raise KeyboardInterrupt
        return real_save(self, step, done)

    monkeypatch.setattr(common.Run, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        sft(tmp_path / "b", *flags, "--resume")
    monkeypatch.undo()
    sft(tmp_path / "b", *flags, "--resume")
    assert keys(tmp_path / "b") == expected
    sft(tmp_path / "b", *flags, "--resume")  # a finished run: nothing to do, nothing logged
    assert keys(tmp_path / "b") == expected


def test_grpo_metrics_keep_the_eval_at_stop_at(runs, tmp_path):
    flags = ("--steps", "4", "--eval_every", "2", "--ckpt_every", "2")
    grpo(runs / "sft", tmp_path / "full", *flags)
    grpo(runs / "sft", tmp_path / "b", *flags, "--stop_at", "2")
    assert (2, "eval") in keys(tmp_path / "b")
    grpo(runs / "sft", tmp_path / "b", *flags, "--resume")
    grpo(runs / "sft", tmp_path / "b", *flags, "--resume")
    assert keys(tmp_path / "b") == keys(tmp_path / "full")
    assert len(set(keys(tmp_path / "b"))) == len(keys(tmp_path / "b"))


# ----------------------------------------------------------------------------------------------
# Data streams: each stage its own problems, each rank its own after a resume on more ranks


def record_prompts(monkeypatch, into):
    real = tasks.Task.sample

    def sample(self, rng):
        p = real(self, rng)
        into.append(p.prompt)
        return p

    monkeypatch.setattr(tasks.Task, "sample", sample)


def test_grpo_does_not_replay_the_sft_problems(tmp_path, monkeypatch):
    seen_sft, seen_grpo = [], []
    record_prompts(monkeypatch, seen_sft)
    sft(tmp_path / "sft")
    monkeypatch.undo()
    record_prompts(monkeypatch, seen_grpo)
    grpo(tmp_path / "sft", tmp_path / "grpo")
    assert len(seen_grpo) == 8 and len(seen_sft) == 32
    assert len(set(seen_grpo) & set(seen_sft)) <= 1  # 2-digit additions: a shared problem is chance


def _resume_on_two_ranks(rank, world, root):
    seen = []
    real = tasks.Task.sample

    def sample(self, rng):
        p = real(self, rng)
        seen.append(p.prompt)
        return p

    tasks.Task.sample = sample
    sft(os.path.join(root, "sft"), "--resume", "--steps", "6")
    n_sft = len(seen)
    grpo(os.path.join(root, "sft"), os.path.join(root, "grpo"), "--resume", "--steps", "4")
    with open(os.path.join(root, f"seen.{rank}"), "w") as f:
        json.dump([seen[:n_sft], seen[n_sft:]], f)


def test_resume_on_more_ranks_gives_every_rank_its_own_problems(tmp_path):
    """A run saved on 1 rank and resumed on 2: rank 1 must not replay rank 0's problems."""
    sft(tmp_path / "sft", "--steps", "4")
    grpo(tmp_path / "sft", tmp_path / "grpo", "--steps", "4", "--stop_at", "2")
    run_on_two_ranks(_resume_on_two_ranks, str(tmp_path))
    (sft0, grpo0), (sft1, grpo1) = (json.load(open(tmp_path / f"seen.{r}")) for r in (0, 1))
    assert len(sft0) == len(sft1) > 0 and len(grpo0) == len(grpo1) > 0
    assert len(set(sft0) & set(sft1)) <= 1 and len(set(grpo0) & set(grpo1)) <= 1
    assert common.load_checkpoint(str(tmp_path / "grpo"))["world_size"] == 2
