"""Figures: cross-attention heatmaps (one panel per layer and head) and training curves of runs.

matplotlib is an optional extra (`pip install 'mt[plot]'`); without it these raise an MtError that says so.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch

from mt import checkpoint
from mt.errors import MtError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MtError("plotting needs matplotlib: pip install 'mt[plot]'") from None
    return plt


MAX_ATTENTION_TOKENS = 150


def attention_figure(weights: torch.Tensor, source: Sequence[str], output: Sequence[str],
                     layer: int | None = None, head: int | None = None):
    """A grid of heatmaps of cross-attention `weights` (layers, heads, output, source): one row per layer,
    one column per head, or only the `layer` / `head` asked for (0-based).

    Raises:
        MtError: if `layer` or `head` is out of range, or a side is longer than `MAX_ATTENTION_TOKENS`.
    """
    plt = _pyplot()
    n_layers, n_heads = weights.shape[:2]
    longest = max(len(source), len(output))
    if longest > MAX_ATTENTION_TOKENS:  # a heatmap of a whole page is unreadable, and its figure takes GBs
        raise MtError(f"--attention draws sentences of up to {MAX_ATTENTION_TOKENS} subwords a side; this "
                      f"one has {longest}")
    for name, value, count in (("layer", layer, n_layers), ("head", head, n_heads)):
        if value is not None and not 0 <= value < count:
            raise MtError(f"--{name} {value + 1} is out of range: the model has {count} {name}s (1 to {count})")
    layers = [layer] if layer is not None else list(range(n_layers))
    heads = [head] if head is not None else list(range(n_heads))
    cell = 0.35
    fig, axes = plt.subplots(len(layers), len(heads), squeeze=False,
                             figsize=(max(3.0, cell * len(source)) * len(heads) + 1,
                                      max(2.5, cell * len(output)) * len(layers) + 1))
    for row, li in enumerate(layers):
        for col, hi in enumerate(heads):
            ax = axes[row][col]
            ax.imshow(weights[li, hi].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_title(f"layer {li + 1}, head {hi + 1}", fontsize=9)
            ax.set_xticks(range(len(source)), source, rotation=90, fontsize=7)
            ax.set_yticks(range(len(output)), output, fontsize=7)
            ax.set_xlabel("source (French)")
            ax.set_ylabel("output (English)")
    fig.tight_layout()
    return fig


def training_figure(run_dirs: Sequence[Path]):
    """Training loss, validation loss and validation BLEU against steps; one line per run.

    Raises:
        MtError: if a folder is not a run, or a run has no metrics.jsonl.
    """
    plt = _pyplot()
    fig, (loss_ax, valid_ax, bleu_ax) = plt.subplots(1, 3, figsize=(15, 4))
    for run_dir in run_dirs:
        records = checkpoint.read_metrics(checkpoint.check_run(Path(run_dir)))
        if not records:
            raise MtError(f"{run_dir} has no training records yet ({checkpoint.METRICS})")
        name = Path(run_dir).name
        train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
        valid = [(r["step"], r["valid_loss"], r["valid_bleu"]) for r in records
                 if "valid_bleu" in r and "averaged" not in r]
        if train:
            loss_ax.plot(*zip(*train, strict=True), label=name)
        if valid:
            steps, losses, bleus = zip(*valid, strict=True)
            valid_ax.plot(steps, losses, marker=".", label=name)
            bleu_ax.plot(steps, bleus, marker=".", label=name)
    for ax, title in ((loss_ax, "training loss (label-smoothed)"), (valid_ax, "validation loss"),
                      (bleu_ax, "validation BLEU (greedy)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # nothing to label when a run has no records of this kind
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def png(fig, dpi: int = 90) -> bytes:
    """`fig` as the bytes of a PNG file."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        _pyplot().close(fig)
    return buffer.getvalue()


def save(fig, path: Path) -> Path:
    """Writes `fig` to `path` (a PNG when it has no suffix) and returns the path written.

    Raises:
        MtError: for a folder, a path in no folder, or a suffix that names no format matplotlib writes.
    """
    try:
        if path.is_dir():
            raise MtError(f"{path} is a folder; give a file name, e.g. {path / 'figure.png'}")
        if not path.parent.is_dir():
            raise MtError(f"cannot draw {path}: folder {path.parent} not found")
        path = path if path.suffix else path.with_suffix(".png")
        formats = fig.canvas.get_supported_filetypes()
        if path.suffix[1:].lower() not in formats:
            raise MtError(f"cannot draw {path}: matplotlib writes {', '.join(sorted(formats))}, not "
                          f"{path.suffix[1:]}")
        fig.savefig(path, dpi=110)
        return path
    finally:
        _pyplot().close(fig)
