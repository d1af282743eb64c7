"""Write evaluation results: ``metrics.json``, one CSV per curve and PNG plots.

Every curve is a mapping ``model name -> results`` so a run and its no-memory baseline land in
the same files: one CSV row per (model, point) and one line per model in each plot. Plots use
matplotlib's Agg backend (no display), labelled axes and a log x axis for input length.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import FuncFormatter  # noqa: E402


def write_csv(path: str, rows: Iterable[dict]) -> str:
    rows = list(rows)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(path: str, data: dict) -> str:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    return path


def _figure(xlabel: str, ylabel: str, title: str):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _save(fig, ax, path: str) -> str:
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    finally:  # a full disk: the figure is closed all the same
        plt.close(fig)
    return path


def _draw(ax, curves: dict[str, list[dict]], x: str, y: str, logx: bool, logy: bool, symlogx: bool) -> None:
    for i, (model, rows) in enumerate(curves.items()):
        ax.plot([r[x] for r in rows], [r[y] for r in rows], "o-", color=f"C{i % 10}", label=model, markersize=4)
    if symlogx:  # history sizes start at 0
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(sorted({r[x] for rows in curves.values() for r in rows}))
    elif logx:
        ax.set_xscale("log", base=2)
    if logx or symlogx:  # 1, 2, 4, ... rather than 2^0, 2^1, ...
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    if logy:
        ax.set_yscale("log")


def plot_lines(path: str, curves: dict[str, list[dict]], x: str, y: str, xlabel: str, ylabel: str, title: str,
               logx: bool = True, logy: bool = False, symlogx: bool = False, ylim: tuple | None = None) -> str:
    """One line per model: ``curves[model]`` is a list of rows with keys ``x`` and ``y``.
    ``ylim``: fixed y range, e.g. accuracy on 0..1, memory from 0 (so a flat curve looks flat)."""
    fig, ax = _figure(xlabel, ylabel, title)
    _draw(ax, curves, x, y, logx, logy, symlogx)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return _save(fig, ax, path)


def length_rows(curves: dict[str, list]) -> dict[str, list[dict]]:
    return {model: [p.to_dict() for p in points] for model, points in curves.items()}


def write_memory_task(out_dir: str, curves: dict[str, list]) -> dict[str, str]:
    """Accuracy, time and peak memory vs number of segments (``length_generalization`` results)."""
    rows = length_rows(curves)
    files = {"csv": write_csv(os.path.join(out_dir, "accuracy_vs_length.csv"),
                              [{"model": m, **r} for m, rs in rows.items() for r in rs])}
    for r in (r for rs in rows.values() for r in rs):
        r["peak_memory_mb"] = r["peak_memory_bytes"] / 2**20
    files["accuracy_plot"] = plot_lines(os.path.join(out_dir, "accuracy_vs_length.png"), rows, "num_segments",
                                        "accuracy", "input length, segments (log scale)", "exact-match accuracy",
                                        "Memory task: accuracy vs input length", ylim=(-0.02, 1.02))
    files["time_plot"] = plot_lines(os.path.join(out_dir, "time_vs_length.png"), rows, "num_tokens",
                                    "seconds_per_sample", "input length, tokens (log scale)",
                                    "seconds per sample (log scale)", "Time per sample vs input length (slope 1 = linear)",
                                    logy=True)
    files["memory_plot"] = plot_lines(os.path.join(out_dir, "memory_vs_length.png"), rows, "num_tokens",
                                      "peak_memory_mb", "input length, tokens (log scale)", "peak memory, MiB",
                                      "Peak memory vs input length",
                                      ylim=(0, 1.1 * max(r["peak_memory_mb"] for rs in rows.values() for r in rs)))
    return files


def write_history(out_dir: str, curves: dict) -> dict[str, str]:
    """Perplexity vs history size and loss by position inside the target (``history_curve`` results)."""
    ppl_rows, pos_rows, ppl_lines, pos_lines = [], [], {}, {}
    for model, curve in curves.items():
        ppl_lines[model] = [{"history": h, "perplexity": curve.perplexity[h], "loss": curve.loss[h]}
                            for h in curve.history_sizes]
        ppl_rows += [{"model": model, **r} for r in ppl_lines[model]]
        for h in curve.history_sizes:
            pos_rows += [{"model": model, "history": h, "position": i + 1, "loss": loss}
                         for i, loss in enumerate(curve.position_loss[h])]
        longest = max(curve.history_sizes)
        label = (f"{model} (history {longest})" if curve.context_tokens is None
                 else f"{model} (plain context, {curve.context_tokens} tokens)")
        pos_lines[label] = [
            {"position": i + 1, "loss": loss} for i, loss in enumerate(curve.position_loss[longest])]
    return {
        "perplexity_csv": write_csv(os.path.join(out_dir, "perplexity_vs_history.csv"), ppl_rows),
        "position_csv": write_csv(os.path.join(out_dir, "loss_by_position.csv"), pos_rows),
        "perplexity_plot": plot_lines(os.path.join(out_dir, "perplexity_vs_history.png"), ppl_lines, "history",
                                      "perplexity", "history size, segments before the target",
                                      "target-segment perplexity", "Perplexity vs history size", symlogx=True),
        "position_plot": plot_lines(os.path.join(out_dir, "loss_by_position.png"), pos_lines, "position", "loss",
                                    "position inside the target segment", "mean token loss (nats)",
                                    "Loss by position inside the target segment", logx=False),
    }


def write_length_perplexity(out_dir: str, curves: dict[str, list], prefix: str = "perplexity_vs_length") -> dict[str, str]:
    """Perplexity on all tokens and on the last segment vs number of segments (Lean): two panels,
    one line per model in each."""
    rows = length_rows(curves)
    path = os.path.join(out_dir, f"{prefix}.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, what in zip(axes, ("perplexity_all", "perplexity_last_segment"), ("all tokens", "the last segment")):
        _draw(ax, rows, "num_segments", key, logx=True, logy=False, symlogx=False)
        ax.set_xlabel("input length, segments (log scale)")
        ax.set_ylabel(f"perplexity on {what}")
        ax.set_title(f"Perplexity on {what}")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return {
        "csv": write_csv(os.path.join(out_dir, f"{prefix}.csv"), [{"model": m, **r} for m, rs in rows.items() for r in rs]),
        "plot": path,
    }
