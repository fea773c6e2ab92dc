import json
import re

import pytest

import common
import plot
import results
import train_grpo
import train_sft
from model import ModelConfig
from conftest import one_line_failure


def write_metrics(path, records):
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


RECORDS = [{"step": 2, "kind": "train", "reward_mean": 0.5, "kl": 0.1, "note": "text"},
           {"step": 1, "kind": "train", "reward_mean": 0.25, "kl": 0.0},
           {"step": 0, "kind": "eval", "eval_greedy_acc": 0.5},
           {"step": 2, "kind": "eval", "eval_greedy_acc": 0.75}]


def test_series_sorts_by_step_and_reads_accuracy_in_percent(tmp_path):
    write_metrics(tmp_path / "run", RECORDS)
    with open(tmp_path / "run" / "metrics.jsonl", "ab") as f:  # JSON that is not a record, bytes
        f.write(b'[1, 2]\n"text"\n{"kl": 9}\n\xff\xfe\n')  # that are not text, and the torn
        f.write(b'{"step": 3, "kind": "tr')  # last line of a killed run
    s = plot.series(tmp_path / "run" / "metrics.jsonl")
    assert s["reward_mean"] == ((1, 2), (0.25, 0.5))
    assert s["eval_greedy_acc"] == ((0, 2), (50.0, 75.0))
    assert "note" not in s and "kind" not in s


def test_missing_run_folder_is_a_one_line_error(tmp_path, capsys):
    assert "no metrics file" in one_line_failure(plot.main, [str(tmp_path / "nothing")], capsys)


def test_out_into_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    write_metrics(tmp_path / "run", RECORDS)
    out = str(tmp_path / "no" / "x.png")
    err = one_line_failure(plot.main, [str(tmp_path / "run"), "--out", out], capsys)
    assert "no folder" in err


def test_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # an optional extra: CI installs only the core packages
    write_metrics(tmp_path / "a", RECORDS)
    write_metrics(tmp_path / "b", RECORDS[1:])
    write_metrics(tmp_path / "c", RECORDS)
    # two runs called "a": both are drawn, each under its path
    write_metrics(tmp_path / "c" / "a", RECORDS)
    out = plot.main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c" / "a"),
                     "--out", str(tmp_path / "x.png")])
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_results_reads_a_run_folder(tmp_path):
    import results
    write_metrics(tmp_path / "run", RECORDS + [
        {"step": 2, "kind": "train", "completion_len": 5.5},
        {"step": 3, "kind": "eval", "eval_greedy_acc": 1.0, "eval_pass@4": 1.0}])
    got = results.read_run(tmp_path / "run")
    assert got["curve"] == [(0, 0.5), (2, 0.75), (3, 1.0)]
    assert got["final"] == {"greedy_acc": 1.0, "pass@4": 1.0}
    assert got["length"] == [(2, 5.5)]
    assert results.spread([0.5, 0.7]) == pytest.approx((0.6, 0.1414213), abs=1e-6)


def test_results_rejects_an_unknown_experiment(capsys):
    import results
    with pytest.raises(SystemExit) as e:
        results.main(["everything"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_results_reads_samples_seconds_memory_and_maxvio_of_an_rl_run(tmp_path):
    """Samples seen = step x prompts x G, training seconds = the sum of each step's completions
    over its samples/s, parameters held = the sum of the params_ fields of step 1: checked against
    the numbers written, not against results' own arithmetic."""
    import results
    write_metrics(tmp_path / "run", [
        {"step": 0, "kind": "eval", "eval_greedy_acc": 0.5},
        {"step": 1, "kind": "train", "params_policy": 10, "params_reference": 10,
         "peak_rss_mb": 100.0, "samples_per_s": 8.0, "maxvio_mean": 2.0},
        {"step": 2, "kind": "train", "peak_rss_mb": 120.0, "samples_per_s": 16.0,
         "maxvio_mean": 1.0},
        {"step": 2, "kind": "eval", "eval_greedy_acc": 0.75}])
    config = {"grpo": {"batch_size": 2, "num_generations": 4}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    got = results.read_run(tmp_path / "run")
    assert got["samples"] == [(0, 0.5), (16, 0.75)]  # 8 completions a step
    assert got["seconds"] == [(0.0, 0.5), (8 / 8.0 + 8 / 16.0, 0.75)]
    assert got["params_held"] == 20 and got["peak_rss_mb"] == 120.0
    assert got["maxvio"] == [(1, 2.0), (2, 1.0)]
    assert results.smooth([(1, 2.0), (2, 1.0), (3, 4.0)], 2) == [(1.5, 1.5), (3, 4.0)]


def test_results_measures_the_kv_cache_of_an_sft_run(tmp_path, tiny):
    """KV-cache bytes per token, measured on a fresh cache, against the elements the paper's
    formula gives: MLA caches kv_lora_rank + qk_rope_head_dim per token and layer, MHA every
    head's K and V."""
    import dataclasses
    import results
    for attention, per_layer in (("mla", 16 + 4), ("mha", 2 * (8 + 4 + 8))):
        cfg = tiny(attention=attention)
        folder = tmp_path / attention
        write_metrics(folder, [{"step": 0, "kind": "eval", "eval_greedy_acc": 0.0}])
        config = {"sft": {}, "model": dataclasses.asdict(cfg)}
        (folder / "config.json").write_text(json.dumps(config))
        got = results.read_run(folder)
        assert got["kv_bytes_per_token"] == per_layer * cfg.n_layers * 4  # float32
        assert got["params_main"] > 0


def test_results_table_reprints_a_saved_experiment(tmp_path, monkeypatch, capsys):
    """--table runs nothing: the table comes from results/<experiment>.json, with each seed's first
    step at 90% ("never" for a run that did not get there)."""
    import results
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    def run(seed, curve):
        return {"seed": seed, "wall_s": 10.0, "curve": curve,
                "final": {"greedy_acc": curve[-1][1]}}
    on = [run(0, [(0, 0.0), (50, 0.95)]), run(1, [(0, 0.0), (50, 0.5), (100, 0.91)])]
    off = [run(0, [(0, 0.0), (100, 0.25)]), run(1, [(0, 0.0), (100, 0.75)])]
    saved = {"claim": "MTP helps", "seeds": [0, 1], "wall_s": 60.0,
             "runs": {"on": on, "off": off}}
    (tmp_path / "results" / "mtp.json").write_text(json.dumps(saved))
    results.main(["mtp", "--table"])
    out = capsys.readouterr().out
    assert "| on | 93.0% +- 2.8% | 95.0%, 91.0% | 50, 100 | 10 s |" in out
    assert "| off | 50.0% +- 35.4% | 25.0%, 75.0% | never, never | 10 s |" in out
    with pytest.raises(SystemExit) as e:
        results.main(["balance", "--table"])
    assert "no results/balance.json" in str(e.value.code)


@pytest.mark.parametrize("name", sorted(results.EXPERIMENTS))
def test_every_experiment_command_is_a_valid_run(name):
    """Each method's command parses into its script's configs (a typo in a flag would only show
    after the runs before it), a shared run names a method of another experiment with the same
    command, and a stage's {seed} and {run} are filled in, a run of another experiment named
    by its folder (an --init, a --teacher) being one of its methods."""
    import train_dpo
    import train_ppo
    mains = {"train_sft.py": train_sft.parse, "train_grpo.py": None, "train_dpo.py": None,
             "train_ppo.py": None}
    classes = {"train_grpo.py": [train_grpo.GRPOConfig], "train_dpo.py": [train_dpo.DPOConfig],
               "train_ppo.py": [train_ppo.PPOConfig]}
    for method, script, flags, *same in results.EXPERIMENTS[name][1]:
        argv = [f.format(seed=0, run="seed0") for f in flags] + ["--out_dir", "out/x"]
        for other, slug in re.findall(r"out/results/(\w+)/([\w-]+)/\{run\}", " ".join(flags)):
            assert slug in [results.slug(m[0]) for m in results.EXPERIMENTS[other][1]], (
                method, other, slug)
        if mains[script] is not None:
            mains[script](argv)
        else:
            common.parse_config(classes[script] + [ModelConfig], argv)
        if same:
            other, slug = same[0].split("/")
            shared = [m for m in results.EXPERIMENTS[other][1]
                      if results.slug(m[0]) == slug]
            assert shared and shared[0][1:3] == (script, flags), (method, same)


def test_results_draws_through_the_plot_module():
    """results.py saves its figures with plot.save_png: no name of its own hides the module (a
    function named plot did, and every PNG failed where matplotlib is installed)."""
    assert results.plot is plot and callable(plot.save_png) and callable(results.draw)
