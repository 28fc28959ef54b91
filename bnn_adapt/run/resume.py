"""Resuming killed runs (``resume=true``) exactly where their last epoch ended.

Lightning's checkpoint holds model, optimiser, loop and callback states; this
module adds what it lacks for an identical continuation (the global RNG
states, see :class:`RNGState`), writes and reads checkpoints so that none is
ever half there (:class:`CheckpointFiles`), and finds the checkpoint to
continue from: the run directory itself (fixed sweep directories) or, for a
single run started with the same command, the newest unfinished run with the
same config hash.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO

from bnn_adapt.errors import CheckpointError
from bnn_adapt.files import atomic_output, load_weights, read_json_or_none
from bnn_adapt.run.claims import held_by_another
from bnn_adapt.run.record import RunRecord

CHECKPOINT = Path("checkpoints") / "last.ckpt"
RUN_FILE = "run.json"


class RNGState(L.Callback):
    """Saves and restores python, numpy and torch RNG states with each checkpoint."""

    def state_dict(self) -> dict:
        # plain lists and tensors only: Lightning loads checkpoints with weights_only=True
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        numpy_state = [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]
        state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


DAMAGED = "it was cut short or damaged; run the same command without resume=true to train afresh"


class CheckpointFiles(TorchCheckpointIO):
    """Lightning's checkpoint writer and reader for the run directory.

    Written beside its final name and renamed onto it (:func:`bnn_adapt.files.atomic_output`): a full or
    read-only disk leaves the previous checkpoint and one line naming the path and the cause, never a
    truncated file under a checkpoint's name (Lightning's own writer stages it in the system's temporary
    folder and copies it across file systems). Read as data only, a damaged one refused in one line.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()  # torch.save's own writer reports a failed write without its errno
        torch.save(checkpoint, buffer)
        with atomic_output(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_weights(path, "checkpoint", DAMAGED, error=CheckpointError)


def unfinished(run_dir: Path, cfg_hash: str, data: dict | None = None) -> bool:
    """Started with this config (and, when given, on this ``data``: its location and fingerprint;
    a run that started before its files were there, ``data.download``, is not held to them),
    has a checkpoint, and never wrote complete metrics."""
    run = read_json_or_none(run_dir / RUN_FILE)
    if not run or run.get("config_hash") != cfg_hash or not (run_dir / CHECKPOINT).is_file():
        return False
    started_on = run.get("data") or {}
    if data is not None and started_on.get("files") and started_on != data:
        return False
    record = RunRecord.read(run_dir)
    return record is None or not record.complete


def find_resumable(output_dir: Path, runs_root: Path, cfg_hash: str, data: dict | None = None) -> Path | None:
    """The run directory to continue: this one, else the newest matching run."""
    if unfinished(output_dir, cfg_hash, data):
        return output_dir
    if not runs_root.is_dir():
        return None
    candidates = [
        d
        for d in runs_root.iterdir()
        if d.is_dir() and d != output_dir and unfinished(d, cfg_hash, data) and not held_by_another(d)
    ]
    return max(candidates, key=lambda d: (d / CHECKPOINT).stat().st_mtime, default=None)


def load_trained_weights(model: torch.nn.Module, run_dir: Path) -> torch.nn.Module:
    """``model`` (built as the run built it) with the weights of the run's last checkpoint: what
    training left, for the steps after it that failed (``resume=true``, bnn_adapt.run.task)."""
    state = load_weights(run_dir / CHECKPOINT, "checkpoint", DAMAGED, error=CheckpointError)["state_dict"]
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    return model


def keep_csv_before_resume(csv_dir: Path) -> Path | None:
    """Lightning's CSVLogger deletes an existing metrics.csv: set it aside."""
    path = csv_dir / "metrics.csv"
    if not path.is_file():
        return None
    kept = csv_dir / "metrics_before_resume.csv"
    path.replace(kept)
    return kept


def merge_resumed_csv(kept: Path, csv_dir: Path, resumed_epoch: int) -> None:
    """One metrics.csv: the earlier rows of finished epochs, then the new ones."""
    new_path = csv_dir / "metrics.csv"
    with kept.open(newline="") as f:
        old_rows = [r for r in csv.DictReader(f) if r.get("epoch") and int(float(r["epoch"])) < resumed_epoch]
    new_rows = []
    if new_path.is_file():
        with new_path.open(newline="") as f:
            new_rows = list(csv.DictReader(f))
    fields = sorted({k for row in old_rows + new_rows for k in row})
    with atomic_output(new_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old_rows + new_rows)
    kept.unlink()
