"""Evaluation files (rmt_peft/eval/reports.py): CSV rows per (model, point) with the union of the
columns, JSON of anything, and one plotted line per model (the run and its baseline in one figure)."""
import csv
import json

import pytest

from rmt_peft.eval import reports
from rmt_peft.eval.lm import HistoryCurve
from rmt_peft.eval.memory_tasks import LengthPoint

PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def point(n, accuracy, peak_mb):
    return LengthPoint(num_segments=n, num_tokens=8 * n, num_samples=2, accuracy=accuracy, seconds=0.5 * n,
                       wall_seconds=n, seconds_per_sample=0.25 * n, tokens_per_second=16.0,
                       peak_memory_bytes=peak_mb * 2**20, memory_kind="cpu_rss")


@pytest.fixture
def plotted(monkeypatch):
    """The lines each plot_lines call got, by file name (the figures are still drawn)."""
    seen = {}
    draw = reports.plot_lines

    def record(path, curves, x, y, *args, **kwargs):
        seen[path.rsplit("/", 1)[1]] = {model: [(r[x], r[y]) for r in rows] for model, rows in curves.items()}
        return draw(path, curves, x, y, *args, **kwargs)

    monkeypatch.setattr(reports, "plot_lines", record)
    return seen


def test_csv_columns_are_the_union_in_first_seen_order(tmp_path):
    path = reports.write_csv(str(tmp_path / "t.csv"), [{"a": 1, "b": 2}, {"b": 3, "c": 4}])
    assert read_csv(path) == [["a", "b", "c"], ["1", "2", ""], ["", "3", "4"]]
    path = reports.write_json(str(tmp_path / "m.json"), {"path": tmp_path, "n": 1})
    assert json.loads(open(path).read()) == {"path": str(tmp_path), "n": 1} and open(path).read().endswith("}\n")


def test_a_memory_task_curve_writes_one_row_per_model_and_length_and_three_plots(tmp_path, plotted):
    curves = {"run": [point(1, 1.0, 100), point(4, 0.5, 120)], "run (baseline)": [point(1, 0.25, 90)]}
    files = reports.write_memory_task(str(tmp_path), curves)
    table = read_csv(files["csv"])
    assert table[0] == ["model", "num_segments", "num_tokens", "num_samples", "accuracy", "seconds", "wall_seconds",
                        "seconds_per_sample", "tokens_per_second", "peak_memory_bytes", "memory_kind"]
    assert [row[:2] + row[4:5] for row in table[1:]] == [["run", "1", "1.0"], ["run", "4", "0.5"],
                                                         ["run (baseline)", "1", "0.25"]]
    assert plotted["accuracy_vs_length.png"] == {"run": [(1, 1.0), (4, 0.5)], "run (baseline)": [(1, 0.25)]}
    assert plotted["time_vs_length.png"]["run"] == [(8, 0.25), (32, 1.0)]
    assert plotted["memory_vs_length.png"]["run"] == [(8, 100.0), (32, 120.0)]  # MiB
    for name in ("accuracy_plot", "time_plot", "memory_plot"):
        assert open(files[name], "rb").read(8) == PNG


def test_a_history_curve_writes_perplexity_and_loss_by_position(tmp_path, plotted):
    curve = HistoryCurve(history_sizes=[0, 2], perplexity={0: 9.0, 2: 4.0}, loss={0: 2.2, 2: 1.4},
                         position_loss={0: [3.0, 2.0], 2: [1.5, 1.0]}, num_samples=2)
    context = HistoryCurve(history_sizes=[0], context_tokens=64, perplexity={0: 5.0}, loss={0: 1.6},
                           position_loss={0: [2.5, 1.5]}, num_samples=2)
    files = reports.write_history(str(tmp_path), {"rmt": curve, "gpt2": context})
    assert read_csv(files["perplexity_csv"]) == [["model", "history", "perplexity", "loss"], ["rmt", "0", "9.0", "2.2"],
                                                 ["rmt", "2", "4.0", "1.4"], ["gpt2", "0", "5.0", "1.6"]]
    assert read_csv(files["position_csv"])[1:] == [["rmt", "0", "1", "3.0"], ["rmt", "0", "2", "2.0"],
                                                   ["rmt", "2", "1", "1.5"], ["rmt", "2", "2", "1.0"],
                                                   ["gpt2", "0", "1", "2.5"], ["gpt2", "0", "2", "1.5"]]
    # loss by position: each model's longest history, a plain-context model named by its window
    assert plotted["loss_by_position.png"] == {"rmt (history 2)": [(1, 1.5), (2, 1.0)],
                                               "gpt2 (plain context, 64 tokens)": [(1, 2.5), (2, 1.5)]}
    assert open(files["perplexity_plot"], "rb").read(8) == PNG


def test_a_length_perplexity_curve_writes_one_csv_and_a_two_panel_plot(tmp_path):
    class Point:
        def __init__(self, n, all_, last):
            self.row = {"num_segments": n, "perplexity_all": all_, "perplexity_last_segment": last}

        def to_dict(self):
            return dict(self.row)

    files = reports.write_length_perplexity(str(tmp_path), {"rmt": [Point(1, 5.0, 6.0), Point(2, 4.0, 4.5)]},
                                            prefix="lean")
    assert files == {"csv": str(tmp_path / "lean.csv"), "plot": str(tmp_path / "lean.png")}
    assert read_csv(files["csv"]) == [["model", "num_segments", "perplexity_all", "perplexity_last_segment"],
                                      ["rmt", "1", "5.0", "6.0"], ["rmt", "2", "4.0", "4.5"]]
    assert open(files["plot"], "rb").read(8) == PNG
