"""Run statistics every result file reports: per-epoch accuracy, epoch and
step times, peak memory."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch

from bnn_adapt.training.precise_bn import AVERAGED_KEY, PRECISE_KEY


def peak_memory_bytes() -> int:
    """Peak CUDA allocation if on GPU, else peak resident set of this process."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def device_name(trainer: L.Trainer) -> str:
    """Where the run trained, as tables state it: ``cpu`` or ``cuda:0 (NVIDIA H100 ...)``, ``x N`` if several."""
    device = trainer.strategy.root_device
    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return name if trainer.world_size == 1 else f"{name} x {trainer.world_size}"


SPAWNED_STATS = "run_stats"  # callback-metrics key that carries a spawned rank 0's statistics home


class RunStats(L.Callback):
    """Collects what ``metrics.json`` reports; sanity-check epochs are ignored."""

    def __init__(self):
        self.epoch_times: list[float] = []
        self.step_times: list[float] = []
        self.history: list[dict] = []
        self._epoch_start = 0.0
        self._step_start = 0.0
        self.device: str | None = None  # set when fitting starts
        self.resumed_at_epoch = 0
        self.training_ended = False  # every epoch ran: what fails from here on fails after training

    def on_fit_start(self, trainer, pl_module):
        self.device = device_name(trainer)

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
        for key in ("val/acc", "val/loss", "train/loss_epoch", "train/acc", PRECISE_KEY, AVERAGED_KEY):
            if key in metrics:
                record[key] = float(metrics[key])
        self.history.append(record)

    def on_train_end(self, trainer, pl_module):
        self.training_ended = True

    # saved in checkpoints, so a resumed run reports every epoch
    def state_dict(self) -> dict:
        return {"epoch_times": self.epoch_times, "step_times": self.step_times, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.resumed_at_epoch = len(state["history"])
        self.epoch_times = list(state["epoch_times"])
        self.step_times = list(state["step_times"])
        self.history = list(state["history"])

    def on_fit_end(self, trainer, pl_module):
        # Under ddp_spawn every rank trains in a child process and this object in the main
        # process sees nothing; Lightning sends rank 0's callback metrics back: ride along.
        if trainer.world_size > 1 and trainer.is_global_zero:
            state = {**self.state_dict(), "device": self.device, "peak_mem_bytes": peak_memory_bytes()}
            trainer.callback_metrics[SPAWNED_STATS] = state

    def recover_spawned(self, trainer) -> None:
        """After ``trainer.fit``: take over the statistics of a spawned rank 0 (no-op otherwise)."""
        state = trainer.callback_metrics.pop(SPAWNED_STATS, None)
        if state is not None and not self.history:
            self.load_state_dict(state)
            self.device, self._spawned_peak_mem = state["device"], state["peak_mem_bytes"]

    def summary(self) -> dict:
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        return {
            "epoch_time_s": mean(self.epoch_times),
            "step_time_s": mean(self.step_times),
            "peak_mem_bytes": getattr(self, "_spawned_peak_mem", None) or peak_memory_bytes(),
            "epochs_run": len(self.epoch_times),
            "device": self.device,
            "history": self.history,
        }
