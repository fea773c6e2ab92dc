import json

import pytest

import plot
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
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "tr')  # the torn last line of a killed run
    s = plot.series(tmp_path / "run" / "metrics.jsonl")
    assert s["reward_mean"] == ((1, 2), (0.25, 0.5))
    assert s["eval_greedy_acc"] == ((0, 2), (50.0, 75.0))
    assert "note" not in s and "kind" not in s


def test_missing_run_folder_is_a_one_line_error(tmp_path, capsys):
    assert "no metrics file" in one_line_failure(plot.main, [str(tmp_path / "nothing")], capsys)


def test_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # an optional extra: CI installs only the core packages
    write_metrics(tmp_path / "a", RECORDS)
    write_metrics(tmp_path / "b", RECORDS[1:])
    write_metrics(tmp_path / "c", RECORDS)
    write_metrics(tmp_path / "c" / "a", RECORDS)  # two runs called "a": both are drawn, each under its path
    out = plot.main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c" / "a"), "--out", str(tmp_path / "x.png")])
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_results_reads_a_run_folder(tmp_path):
    import results
    write_metrics(tmp_path / "run", RECORDS + [{"step": 2, "kind": "train", "completion_len": 5.5},
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
