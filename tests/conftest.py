import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_flush_denormal(True)

import model  # noqa: E402


def tiny_config(**overrides):
    """A model small enough that every test runs in well under a second on CPU."""
    kw = dict(vocab_size=18, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_dense_layers=1,
              n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
              n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, max_seq_len=32,
              mtp_depth=1)
    kw.update(overrides)
    return model.ModelConfig(**kw)


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(scope="module")
def sft_ckpt(tmp_path_factory):
    """A 4-step SFT run of the tiny model on 2-digit addition: the RL scripts' tests' --init."""
    import train_sft
    from test_train_sft import TINY_FLAGS
    out = tmp_path_factory.mktemp("sft")
    train_sft.main(TINY_FLAGS + ["--out_dir", str(out), "--steps", "4", "--eval_every", "100"])
    return str(out)


def one_line_cli_error(main, argv, capsys):
    """Run a train script's main on bad flags: it must exit with code 2 and one line on stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def one_line_failure(main, argv, capsys):
    """Run a train script's main on bad input: it must exit non-zero with one line on stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err
