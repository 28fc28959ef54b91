"""Run statistics every result file reports: per-epoch accuracy, epoch and
step times, peak memory."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch


def peak_memory_bytes() -> int:
    """Peak CUDA allocation if on GPU, else peak resident set of this process."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class RunStats(L.Callback):
    """Collects what ``metrics.json`` reports; sanity-check epochs are ignored."""

    def __init__(self):
        self.epoch_times: list[float] = []
        self.step_times: list[float] = []
        self.history: list[dict] = []
        self._epoch_start = 0.0
        self._step_start = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_times.append(time.perf_counter() - self._step_start)

    def on_train_epoch_end(self, trainer, pl_module):
        # Lightning runs validation before this hook: train + val time
        self.epoch_times.append(time.perf_counter() - self._epoch_start)
        metrics = trainer.callback_metrics
        record = {"epoch": trainer.current_epoch}
        for key in ("val/acc", "val/loss", "train/loss_epoch", "train/acc"):
            if key in metrics:
                record[key] = float(metrics[key])
        self.history.append(record)

    def summary(self) -> dict:
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {
            "epoch_time_s": mean(self.epoch_times),
            "step_time_s": mean(self.step_times),
            "peak_mem_bytes": peak_memory_bytes(),
            "epochs_run": len(self.epoch_times),
            "history": self.history,
        }
