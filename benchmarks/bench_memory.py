"""Memory meters of the benchmark: bytes autograd keeps for backward, and peak memory
measured in isolated processes (``make bench``, docs/speed.md).

* :class:`SavedTensorMeter` counts what autograd saves during one training step
  (saved-tensor hooks, once per storage), split into activations, the part
  saved inside the base's layers, and everything else.
* :class:`PeakMemory` measures a block's peak: GPU allocations, or on CPU the
  process's resident-set high-water mark (``VmHWM``), reset first through
  ``/proc/self/clear_refs``. A reset that does not take is an error: the peak
  would silently be the process's lifetime peak.
* :func:`isolated_peaks` runs one benchmark case (``python -m
  benchmarks.bench_memory CASE``) once per repeat, each in a fresh process,
  so that no case inherits another's heap or allocator state, and reports the
  minimum with the steps' own growth.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import bnn_adapt
from benchmarks.bench_cases import Case, ModelSetup, make_base, prepare, sync, train_step
from bnn_adapt.run.config import compose
from bnn_adapt.training import allocator

WORKER_MARK = "bench-memory-result: "  # the worker's result line on stdout


# ---------------------------------------------------------------------------
# what autograd saves


@dataclass
class SavedBytes:
    activation: int = 0
    activation_base: int = 0
    other: int = 0
    by_layer: dict[str, int] = field(default_factory=dict)  # activation bytes by the saving layer's class


class SavedTensorMeter:
    """Bytes autograd saves for backward while the block runs, by storage.

    A saved tensor counts once per underlying storage. Parameters and buffers
    are not activations and are skipped; a tensor whose leading dimension is
    not the batch size (a binarised weight copy, per-channel BN statistics)
    counts as ``other``. Each activation is charged to the innermost module
    running when it was saved: to the base when that module is one of
    ``base``'s (or ``base.pre_classifier`` runs), and to its class in ``by_layer``.
    """

    def __init__(self, model: nn.Module, batch_size: int, base: nn.Module | None = None):
        self.model, self.batch_size, self.base = model, batch_size, base
        self.saved = SavedBytes()
        self._seen: set[int] = set()
        self._stack: list[tuple[str, bool]] = []
        self._skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self._base_ids = {id(m) for m in base.modules()} if base is not None else set()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._skip or key in self._seen or storage.nbytes() == 0:
            return tensor
        self._seen.add(key)
        size = storage.nbytes()
        if tensor.dim() and tensor.shape[0] == self.batch_size:
            layer, in_base = self._stack[-1] if self._stack else ("(outside any module)", False)
            self.saved.activation += size
            self.saved.by_layer[layer] = self.saved.by_layer.get(layer, 0) + size
            if in_base:
                self.saved.activation_base += size
        else:
            self.saved.other += size
        return tensor

    def _enter(self, module, *args):
        self._stack.append((type(module).__name__, id(module) in self._base_ids))

    def _leave(self, *args):
        self._stack.pop()

    @contextlib.contextmanager
    def measuring(self):
        modules = {id(m): m for m in (*self.model.modules(), *(self.base.modules() if self.base else ()))}
        handles = []
        for module in modules.values():
            handles.append(module.register_forward_pre_hook(self._enter))
            handles.append(module.register_forward_hook(self._leave))
        base = self.base
        patched = base is not None and hasattr(base, "pre_classifier")
        if patched:
            plain_pre_classifier = base.pre_classifier

            def pre_classifier(*args, **kwargs):
                self._stack.append(("pre_classifier", True))
                try:
                    return plain_pre_classifier(*args, **kwargs)
                finally:
                    self._stack.pop()

            base.pre_classifier = pre_classifier
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self.saved
        finally:
            for handle in handles:
                handle.remove()
            if patched:
                del base.pre_classifier


# ---------------------------------------------------------------------------
# peak memory


class PeakResetError(RuntimeError):
    """The peak could not be reset: a measurement would report an earlier, larger peak."""


def _status_bytes(*fields: str) -> tuple[int, ...]:
    """Fields of /proc/self/status in bytes (Linux)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError as err:
        raise PeakResetError(f"cannot read /proc/self/status ({err}): CPU peak memory needs Linux") from err
    found = [re.search(rf"{name}:\s+(\d+) kB", status) for name in fields]
    if not all(found):
        raise PeakResetError(f"/proc/self/status has no {', '.join(fields)}")
    return tuple(int(m.group(1)) * 1024 for m in found)


def resident_bytes() -> int:
    return _status_bytes("VmRSS")[0]


RESET_SLACK = 1 << 20  # after a reset the high-water mark is the resident set (page accounting: < 1 MiB apart)


def reset_resident_peak() -> int:
    """Hand freed heap back (``malloc_trim``), reset VmHWM to VmRSS; returns VmRSS.

    Raises :class:`PeakResetError` when the reset does not take (no
    ``/proc/self/clear_refs``, no permission, an old kernel).
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        raise PeakResetError(f"cannot reset the resident-set peak through /proc/self/clear_refs ({err})") from err
    hwm, rss = _status_bytes("VmHWM", "VmRSS")
    if hwm > rss + RESET_SLACK:
        raise PeakResetError(f"the resident-set peak did not reset (VmHWM {hwm:,} B, VmRSS {rss:,} B)")
    return rss


class PeakMemory:
    """Peak memory of a block: GPU allocations (``torch.cuda.max_memory_allocated``),
    or this process's resident set (VmHWM after :func:`reset_resident_peak`).

    ``before``: what was held when the block started; ``peak - before`` is the
    block's own growth. On CPU, run it after ``allocator.return_freed_memory()``
    so that the resident set tracks live tensors rather than free lists.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.before = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            if torch.cuda.max_memory_allocated(self.device) != self.before:
                raise PeakResetError("torch.cuda.reset_peak_memory_stats did not reset the peak")
            return self
        self.before = reset_resident_peak()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _status_bytes("VmHWM")[0]

    @property
    def growth(self) -> int:
        return self.peak - self.before


# ---------------------------------------------------------------------------
# the benchmark's cases: saved bytes in this process, peaks in fresh ones


def measure_saved(case: Case) -> None:
    """Bytes autograd keeps for backward in one training step of a prepared case."""
    model = case.model
    base = model if case.strategy == "pretrain" else getattr(model, "base", None)
    meter = SavedTensorMeter(model, case.setup.batch_size, base=base)
    with meter.measuring():
        train_step(case)
    case.record.update(
        saved_activation_bytes=meter.saved.activation,
        saved_activation_bytes_base=meter.saved.activation_base,
        saved_other_bytes=meter.saved.other,
        saved_activation_bytes_by_layer=dict(sorted(meter.saved.by_layer.items(), key=lambda kv: -kv[1])),
    )


def memory_worker(spec: dict) -> dict:
    """One case's peak memory, in this (fresh) process: ``python -m benchmarks.bench_memory CASE``.

    ``baseline``: the resident set with every library loaded and the config
    machinery run, before anything is built; ``before``: what is held when the
    measured steps begin (after one step, so Adam's state exists).
    """
    from hydra.utils import instantiate  # noqa: F401  (loaded before the baseline, as the case needs it)

    import bnn_adapt.adapters  # noqa: F401

    device = torch.device(spec["device"])
    compose([])
    _load_optimizer()
    baseline = resident_bytes() if device.type == "cpu" else 0
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    allocator.return_freed_memory()  # the resident set follows the live tensors
    setup = ModelSetup(**spec["setup"])
    case = Case(setup, spec["strategy"], spec["memory"], spec["cache_taps"])
    base = make_base(setup)
    prepare(case, base, device)
    del base
    train_step(case)
    with PeakMemory(device) as peak:
        for _ in range(spec["steps"]):
            train_step(case)
        sync(device)
    return {"peak": peak.peak, "before": peak.before, "baseline": baseline, "pid": os.getpid()}


def _load_optimizer() -> None:
    """One Adam step on one number: Adam's first use loads about 150 MB of torch's
    compiler machinery, which belongs to the baseline rather than to any case."""
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight])
    weight.sum().backward()
    optimizer.step()


def worker_env() -> dict:
    """A worker's environment: this process's, with this copy of bnn_adapt first on the path."""
    env = dict(os.environ)
    root = str(Path(bnn_adapt.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def run_worker(spec: dict) -> dict:
    """Run one worker process; its marked JSON line, or a RuntimeError with its output's tail."""
    command = [sys.executable, "-m", __name__, json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, env=worker_env(), check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(WORKER_MARK)]
    if done.returncode or not lines:
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"memory worker for {spec.get('strategy')} failed (exit {done.returncode}):\n{tail}")
    return json.loads(lines[-1][len(WORKER_MARK) :])


def isolated_peaks(spec: dict, repeats: int) -> dict:
    """Run :func:`memory_worker` ``repeats`` times, each in a fresh process.

    Returned: the minimum peak, the minimum growth ``peak - before`` (the
    steps' own), the minimum baseline and every run's values.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    runs = [run_worker(spec) for _ in range(repeats)]
    return {
        "peak_bytes": min(r["peak"] for r in runs),
        "step_growth_bytes": min(r["peak"] - r["before"] for r in runs),
        "baseline_bytes": min(r["baseline"] for r in runs),
        "runs": runs,
    }


def measure_peak(case: Case, device: torch.device, steps: int, repeats: int) -> None:
    """The case's peak over ``steps`` steps: the minimum of ``repeats`` isolated runs."""
    spec = {
        "setup": asdict(case.setup),
        "strategy": case.strategy,
        "memory": case.memory,
        "cache_taps": case.cache_taps,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps": steps,
    }
    result = isolated_peaks(spec, repeats)
    gpu = device.type == "cuda"
    case.record.update(
        peak_rss_bytes=None if gpu else result["peak_bytes"],
        step_peak_bytes=result["step_growth_bytes"],
        baseline_rss_bytes=None if gpu else result["baseline_bytes"],
        peak_runs=result["runs"],
    )
    if gpu:
        case.record["peak_gpu_bytes"] = result["peak_bytes"]


if __name__ == "__main__":
    print(WORKER_MARK + json.dumps(memory_worker(json.loads(sys.argv[1]))), flush=True)
