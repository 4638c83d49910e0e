"""``mlic train --log tensorboard``: the training curves as TensorBoard event files in the run folder.

Each epoch's record of :func:`mlic.engine.loop.drive` (``train_loss``, ``val_mAP``, ``lr``, ...) becomes one
scalar per key at step ``epoch`` (1-based) under ``train/`` or ``val/``; the kept model's test metrics are
written at the end under ``test/`` (step = the best epoch). ``tensorboard --logdir RUN_OR_SWEEP_FOLDER`` shows
them; a resumed run appends a new event file beside the first.
"""

from __future__ import annotations

import math
from pathlib import Path

from mlic.errors import MlicError

LOG_TARGETS = ("tensorboard",)
INSTALL = "pip install -e '.[tensorboard]'"


def check_log_to(log_to: str) -> None:
    """Refuse an unknown ``--log`` target, or ``tensorboard`` without the package, before any work."""
    if log_to not in LOG_TARGETS:
        raise MlicError(f"--log {log_to!r}: choose {', '.join(LOG_TARGETS)}")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise MlicError(f"--log tensorboard needs the tensorboard package: {INSTALL}") from None


def scalar_name(key: str) -> str | None:
    """``val_mAP`` -> ``val/mAP``, ``train_loss`` -> ``train/loss``, ``lr`` -> ``train/lr``; bookkeeping: None."""
    if key in ("epoch", "bad_images", "val_bad_images", "skipped_steps", "train_s", "epoch_s"):
        return None
    split, _, name = key.partition("_")
    return f"{split}/{name}" if split in ("train", "val", "test") and name else f"train/{key}"


class TensorBoardLog:
    """A SummaryWriter on ``out_dir``, fed the loop's epoch records and the test metrics.

    Args:
        out_dir: the run folder; the event files go straight into it.
    """

    def __init__(self, out_dir: str | Path) -> None:
        check_log_to("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir))

    def epoch(self, record: dict) -> None:
        """One scalar per numeric entry of an epoch record (the lines of metrics.jsonl)."""
        for key, value in record.items():
            name = scalar_name(key)
            if name is not None and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(name, value, record["epoch"])
        self.writer.flush()

    def test(self, metrics: dict | None, epoch: int) -> None:
        """The kept model's test metrics (the numeric entries), at step ``epoch``."""
        for key, value in (metrics or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"test/{key}", float(value), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class NoLog:
    """What :func:`open_log` gives when nothing is asked: every call does nothing."""

    def epoch(self, record: dict) -> None:
        pass

    def test(self, metrics: dict | None, epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


def open_log(log_to: str | None, out_dir: Path | None, main: bool = True) -> TensorBoardLog | NoLog:
    """The curve writer a job asks for (``TrainJob.log_to``), on rank 0 with a run folder; else :class:`NoLog`."""
    if log_to is None or out_dir is None or not main:
        return NoLog()
    check_log_to(log_to)
    return TensorBoardLog(out_dir)
