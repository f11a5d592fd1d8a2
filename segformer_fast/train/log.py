"""What a training run shows besides its checkpoints: the per-step log, the curves and TensorBoard.

  <out>/log.jsonl     one JSON object per logged step (every ``log_every`` steps): step, epoch, loss,
                      loss_avg (the running average the progress bar shows), lr (the base rate) and
                      lr_groups (every AdamW group's), images_per_s, memory (bytes: CUDA max allocated,
                      else the process's resident set) and time (seconds since the run began,
                      resumed segments included). Each line is written with one call and flushed,
                      so a crash leaves at most a partial last line, which reading drops.
  <out>/curves.png    loss (per step and smoothed), learning rate and validation mIoU, redrawn
                      (atomically) at each validation; needs matplotlib, drawn off-screen (Agg).
  <out>/tensorboard/  the same scalars for TensorBoard (``--tensorboard``; needs the tensorboard package).

A resumed run keeps the log lines up to its checkpoint's step and appends after them, so the log
reads as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import warnings

from ..utils.atomic import atomic_path, atomic_write_text, finite_for_json

__all__ = ["LOG_NAME", "CURVES_NAME", "TENSORBOARD_DIR", "TENSORBOARD_MISSING", "StepLog", "read_log",
           "write_curves", "tensorboard_writer_class"]

LOG_NAME = "log.jsonl"
CURVES_NAME = "curves.png"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package: pip install tensorboard"


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` in order ([] when there is none); a line that does not parse as a
    JSON object (the cut-short last line of a crashed run) is dropped.

    Example:
        >>> losses = [r["loss"] for r in read_log("runs/segformer/log.jsonl")]
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class StepLog:
    """``<out>/log.jsonl``, opened for appending after the records of steps <= ``start``.

    Args:
        out: the run's output folder.
        start: the step the run starts from (0 for a new run: the log starts empty).
        source: the folder of the run being resumed (default ``out``), whose log lines up to ``start``
            are kept; lines after ``start`` (steps a crashed or interrupted run logged after its last
            checkpoint) are dropped, so the resumed run's lines do not repeat them.
    """

    def __init__(self, out: str, start: int = 0, source: str | None = None):
        self.path = os.path.join(out, LOG_NAME)
        kept = [r for r in read_log(os.path.join(source or out, LOG_NAME)) if r["step"] <= start] if start else []
        atomic_write_text(self.path, "".join(_line(r) for r in kept))
        self.records = kept
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.records.append(record)
        self._file.write(_line(record))  # one write of a whole line, then flushed
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _line(record: dict) -> str:
    return json.dumps(finite_for_json(record), allow_nan=False) + "\n"


_warned_matplotlib = False


def write_curves(path: str, records: list[dict], history: list[dict]) -> bool:
    """Draw loss, learning rate and validation mIoU to the PNG ``path`` (atomically); False when
    matplotlib is missing (a warning says so once).

    Args:
        records: log records (``StepLog.records``): step, loss, loss_avg, lr.
        history: validation points (``metrics.json``'s history): step, miou.
    """
    global _warned_matplotlib
    try:  # the object-oriented API with the Agg canvas: no pyplot, no GUI backend, no global state
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned_matplotlib:
            warnings.warn("curves.png needs matplotlib: pip install matplotlib", stacklevel=2)
            _warned_matplotlib = True
        return False
    fig = Figure(figsize=(12, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr, ax_miou = fig.subplots(1, 3)
    losses = [(r["step"], r["loss"], r.get("loss_avg")) for r in records if _finite(r.get("loss"))]
    if losses:
        steps = [s for s, _, _ in losses]
        ax_loss.plot(steps, [v for _, v, _ in losses], color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        smooth = [(s, a) for s, _, a in losses if _finite(a)]
        ax_loss.plot([s for s, _ in smooth], [a for _, a in smooth], color="tab:blue", label="running average")
        ax_loss.legend(loc="upper right")
    ax_loss.set(title="training loss", xlabel="step")
    lrs = [(r["step"], r["lr"]) for r in records if _finite(r.get("lr"))]
    if lrs:
        ax_lr.plot([s for s, _ in lrs], [v for _, v in lrs], color="tab:orange")
    ax_lr.set(title="learning rate (base; heads x head_lr_mult)", xlabel="step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    points = [(h["step"], h["miou"]) for h in history if _finite(h.get("miou"))]
    if points:
        ax_miou.plot([s for s, _ in points], [v for _, v in points], color="tab:green", marker="o")
        best = max(points, key=lambda p: p[1])
        ax_miou.set_title(f"validation mIoU (best {best[1]:.3f} at step {best[0]})")
    else:
        ax_miou.set_title("validation mIoU")
    ax_miou.set(xlabel="step", ylim=(0.0, 1.0))
    for ax in (ax_loss, ax_lr, ax_miou):
        ax.grid(alpha=0.3)
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    return True


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def tensorboard_writer_class():
    """torch's ``SummaryWriter``; ImportError with the ``pip install`` line when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(TENSORBOARD_MISSING) from None
    return SummaryWriter
