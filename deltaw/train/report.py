"""The JSONL training log and the loss-curve PNG drawn from it.

Why JSONL: one self-describing line per event (``"event": "step"`` or ``"eval"``) appends cheaply, survives a
crash up to the last line, and is trivial to load into pandas. A resumed run truncates the log back to its
checkpoint's step, so the log of a resumed run reads like the log of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss_curve.png"


def append(path: Path, record: dict) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: everything before it is still good
                break
    return out


def truncate(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (what a checkpoint at ``step`` had seen)."""
    kept = [r for r in read(path) if r.get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


def plot(log_path: Path, png_path: Path, title: str = "") -> Path | None:
    """Train loss per step (and its running mean) plus validation loss; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install 'deltaw[plot]')", png_path.name)
        return None
    records = read(log_path)
    steps = [r["step"] for r in records if r.get("event") == "step"]
    losses = [r["loss"] for r in records if r.get("event") == "step"]
    evals = [(r["step"], r["val_loss"]) for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if steps:
        window = max(1, len(losses) // 20)
        ax.plot(steps, losses, lw=0.8 if window > 1 else 1.5, alpha=0.45 if window > 1 else 1.0,
                label="train loss (step)")
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.8, label=f"train loss (running mean of {window})")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", lw=1.5, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title or "deltaw training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
