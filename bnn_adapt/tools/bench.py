"""Side-by-side speed and memory benchmark of the adaptation strategies (SPEC 7).

``make bench`` (``python -m bnn_adapt.tools.bench``) measures, in one process and one
run, every strategy x memory mode (``memory=standard|lean``) on the
STE base at full width (32x32 images, batch 64) and on ReActNet-18 (224x224,
batch 16), on the GPU if there is one, else on the CPU:

* ``step_time_s``: median time of a full training step (forward, loss,
  backward, Adam step, latent-weight clamping) after warm-up. The cases are
  timed round-robin, a few steps each per round, so a change in machine load
  hits them all alike: on a shared machine only the ratios mean anything.
* ``saved_activation_bytes``: bytes of per-sample tensors autograd keeps for
  backward, counted once per storage with saved-tensor hooks (parameters,
  buffers and weight-sized tensors excluded; ``saved_other_bytes`` has the
  latter, e.g. the binarised weight copies standard autograd keeps), and
  ``saved_activation_bytes_base``, the part saved inside the base's layers.
* ``peak_rss_bytes`` (CPU; on GPU ``peak_gpu_bytes``): the process's peak
  during that case's steps, measured with only that case alive and freed
  tensors handed straight back to the OS (``step_peak_bytes``: the peak minus
  the memory held before the step).

It writes ``benchmarks/results.json`` (one record per case) and
``benchmarks/results.md`` (ratios against full finetuning with standard
memory), and with ``--readme`` puts the table into the README. Inputs are
random with a fixed seed: speed and memory do not depend on the data.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import functools
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.nn.layers import clamp_latent_weights
from bnn_adapt.run.config import CONF_DIR, compose
from bnn_adapt.training import allocator
from bnn_adapt.training.lean import set_memory_mode

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
FIRST_STRATEGIES = ("full_finetune", "head_only", "serial", "udta")  # the thesis's, in table order


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
# process memory


def _hwm_and_rss() -> tuple[int, int] | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    hwm = re.search(r"VmHWM:\s+(\d+) kB", status)
    rss = re.search(r"VmRSS:\s+(\d+) kB", status)
    return (int(hwm.group(1)) * 1024, int(rss.group(1)) * 1024) if hwm and rss else None


class PeakMemory:
    """Peak memory of a block: GPU allocations, or this process's resident set.

    On Linux the resident-set peak (VmHWM) is reset through
    ``/proc/self/clear_refs`` and freed heap is handed back first
    (``malloc_trim``), so earlier cases do not inflate or hide this one's
    peak; run it after ``allocator.return_freed_memory()`` so that the
    resident set tracks live tensors rather than the allocator's free lists.
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
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        now = _hwm_and_rss()
        self.before = now[1] if now else None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            now = _hwm_and_rss()
            self.peak = now[0] if now else None


# ---------------------------------------------------------------------------
# the cases


@dataclass(frozen=True)
class ModelSetup:
    """One base as benchmarked: its config name, size and the batch it trains on."""

    name: str  # conf/base/<name>.yaml
    width: float
    image_size: int
    batch_size: int
    base_classes: int
    target_classes: int
    pretrain: bool  # also time task=pretrain (training the bare base)


FULL_SETUPS = (
    ModelSetup("ste_resnet_cifar", 1.0, 32, 64, 5, 5, pretrain=True),  # CIFAR-10 5-5
    ModelSetup("reactnet18", 1.0, 224, 16, 1000, 102, pretrain=False),  # ImageNet -> Flowers-102
)
TINY_SETUPS = (
    ModelSetup("ste_resnet_cifar", 0.1, 16, 6, 5, 5, pretrain=True),
    ModelSetup("reactnet18", 0.0625, 32, 4, 10, 5, pretrain=False),
)


@dataclass
class Case:
    setup: ModelSetup
    strategy: str  # a conf/adapter name, or "pretrain" (the bare base, everything trains)
    memory: str
    cache_taps: bool = False
    model: nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    inputs: object = field(default=None, repr=False)
    times: list[float] = field(default_factory=list, repr=False)
    record: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.strategy + (" + tap cache" if self.cache_taps else "")


def adapter_names() -> list[str]:
    """Strategies with a config in conf/adapter/, the thesis's first."""
    found = sorted(p.stem for p in (CONF_DIR / "adapter").glob("*.yaml"))
    return [s for s in FIRST_STRATEGIES if s in found] + [s for s in found if s not in FIRST_STRATEGIES]


@functools.cache
def adapter_config(setup: ModelSetup, strategy: str, stages: int):
    """The real config of ``adapter=<strategy>`` with its defaults (g=1, rank 4, ...);
    serial adapters go after every one of the base's ``stages``."""
    overrides = [f"adapter={strategy}", f"base={setup.name}", f"base.width={setup.width}"]
    if strategy == "serial":
        overrides.append(f"adapter.stages=[{','.join(str(s) for s in range(1, stages + 1))}]")
    return compose(overrides).adapter.model


def build_model(setup: ModelSetup, strategy: str, base: nn.Module) -> nn.Module:
    if strategy == "pretrain":
        return base
    from hydra.utils import instantiate

    config = adapter_config(setup, strategy, len(base.stages))
    return instantiate(config, base=base, num_classes=setup.target_classes, freeze_bn=True)


def make_base(setup: ModelSetup) -> nn.Module:
    from bnn_adapt.bases import BASES

    torch.manual_seed(0)
    return BASES[setup.name](num_classes=setup.base_classes, width=setup.width)


def prepare(case: Case, base: nn.Module, device: torch.device) -> None:
    """Build the case's model and optimiser and its fixed batch (cached features for the tap cache)."""
    setup = case.setup
    torch.manual_seed(1)
    model = build_model(setup, case.strategy, copy.deepcopy(base)).to(device)
    set_memory_mode(model, case.memory)
    model.train()
    classes = setup.base_classes if case.strategy == "pretrain" else setup.target_classes
    images = torch.randn(setup.batch_size, 3, setup.image_size, setup.image_size, device=device)
    labels = torch.randint(0, classes, (setup.batch_size,), device=device)
    inputs = images
    if case.cache_taps:
        with torch.no_grad():
            inputs = tuple(t.clone() for t in model.frozen_features(images))
    case.model, case.inputs = model, (inputs, labels)
    case.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def train_step(case: Case) -> None:
    inputs, labels = case.inputs
    case.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(case.model(inputs), labels)
    loss.backward()
    case.optimizer.step()
    clamp_latent_weights(case.model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_memory(case: Case, device: torch.device, steps: int) -> None:
    """Saved-for-backward bytes of one step (which also creates Adam's state),
    then the peak over ``steps`` steps."""
    model = case.model
    base = model if case.strategy == "pretrain" else getattr(model, "base", None)
    meter = SavedTensorMeter(model, case.setup.batch_size, base=base)
    with meter.measuring():
        train_step(case)
    with PeakMemory(device) as peak:
        for _ in range(steps):
            train_step(case)
        _sync(device)
    case.record.update(
        saved_activation_bytes=meter.saved.activation,
        saved_activation_bytes_base=meter.saved.activation_base,
        saved_other_bytes=meter.saved.other,
        saved_activation_bytes_by_layer=dict(sorted(meter.saved.by_layer.items(), key=lambda kv: -kv[1])),
    )
    key = "peak_gpu_bytes" if device.type == "cuda" else "peak_rss_bytes"
    case.record[key] = peak.peak
    case.record["step_peak_bytes"] = (peak.peak - peak.before) if peak.peak and peak.before else None
    if device.type == "cuda":
        case.record["peak_rss_bytes"] = None


def time_cases(cases: list[Case], device: torch.device, warmup: int, rounds: int, steps_per_round: int) -> None:
    """Round-robin: each round runs ``steps_per_round`` steps of every case."""
    for case in cases:
        for _ in range(warmup):
            train_step(case)
    _sync(device)
    for _ in range(rounds):
        for case in cases:
            for _ in range(steps_per_round):
                start = time.perf_counter()
                train_step(case)
                _sync(device)
                case.times.append(time.perf_counter() - start)


def cache_build_time(case: Case, device: torch.device, repeats: int = 3) -> float:
    """Seconds per image to compute the cached features (one base forward, no autograd)."""
    images = torch.randn(
        case.setup.batch_size, 3, case.setup.image_size, case.setup.image_size, device=device
    )
    model = case.model
    with torch.no_grad():
        model.frozen_features(images)
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            model.frozen_features(images)
        _sync(device)
    return (time.perf_counter() - start) / repeats / case.setup.batch_size


# ---------------------------------------------------------------------------
# running and reporting


@dataclass
class Options:
    setups: tuple[ModelSetup, ...]
    warmup: int
    rounds: int
    steps_per_round: int
    memory_steps: int


def cases_for(setup: ModelSetup, strategies: list[str]) -> list[Case]:
    cases = []
    for strategy in strategies:
        for memory in ("standard", "lean"):
            cases.append(Case(setup, strategy, memory))
        if strategy == "udta":
            for memory in ("standard", "lean"):
                cases.append(Case(setup, strategy, memory, cache_taps=True))
    if setup.pretrain:
        cases += [Case(setup, "pretrain", memory) for memory in ("standard", "lean", "lean_fp16")]
    return cases


def run_setup(setup: ModelSetup, options: Options, device: torch.device, log=print) -> list[dict]:
    base = make_base(setup)
    cases = cases_for(setup, adapter_names())
    # memory: one case alive at a time, so each peak is that case's own
    allocator.return_freed_memory()
    for case in cases:
        log(f"  memory {setup.name} {case.label} ({case.memory})")
        prepare(case, base, device)
        measure_memory(case, device, options.memory_steps)
        if case.cache_taps:
            case.record["cache_build_s_per_image"] = cache_build_time(case, device)
        case.model = case.optimizer = case.inputs = None
    # time: every case alive, interleaved
    allocator.keep_freed_memory()  # as in training (python -m bnn_adapt)
    log(f"  timing {len(cases)} cases of {setup.name}: {options.rounds} rounds x {options.steps_per_round} steps")
    for case in cases:
        prepare(case, base, device)
    time_cases(cases, device, options.warmup, options.rounds, options.steps_per_round)
    records = []
    for case in cases:
        record = {
            "model": setup.name,
            "strategy": case.strategy,
            "cache_taps": case.cache_taps,
            "memory": case.memory,
            "width": setup.width,
            "image_size": setup.image_size,
            "batch_size": setup.batch_size,
            "num_classes": setup.base_classes if case.strategy == "pretrain" else setup.target_classes,
            "trainable_params": sum(p.numel() for p in case.model.parameters() if p.requires_grad),
            "step_time_s": statistics.median(case.times),
            "step_times_s": case.times,
            **case.record,
        }
        records.append(record)
        case.model = case.optimizer = case.inputs = None
    add_ratios(records)
    return records


def _key(record: dict) -> tuple:
    return record["model"], record["strategy"], record["cache_taps"]


def add_ratios(records: list[dict]) -> None:
    """Speed-up against full finetuning (standard memory) of the same model;
    saved-activation ratios against the same strategy with standard memory."""
    finetune = {r["model"]: r for r in records if r["strategy"] == "full_finetune" and r["memory"] == "standard"}
    standard = {_key(r): r for r in records if r["memory"] == "standard"}

    def ratio(a, b):
        return a / b if a and b else None

    for r in records:
        reference = finetune.get(r["model"])
        r["speedup_vs_finetune"] = ratio(reference["step_time_s"], r["step_time_s"]) if reference else None
        same = standard.get(_key(r))
        r["activation_ratio_vs_standard"] = ratio(same["saved_activation_bytes"], r["saved_activation_bytes"])
        r["activation_ratio_vs_standard_base"] = ratio(
            same["saved_activation_bytes_base"], r["saved_activation_bytes_base"]
        )
        memory_key = "peak_gpu_bytes" if r.get("peak_gpu_bytes") else "peak_rss_bytes"
        r["peak_memory_ratio_vs_finetune"] = (
            ratio(reference.get(memory_key), r.get(memory_key)) if reference else None
        )


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        info["load_average"] = list(os.getloadavg())
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _x(n) -> str:
    return "-" if n is None else f"{n:.2f}x"


def markdown_table(records: list[dict]) -> str:
    """Ratios against full finetuning with standard memory, per model."""
    rows = [
        "| model | strategy | memory | step time (s) | speed-up vs finetune | saved activations (MiB) "
        "| of which base (MiB) | fewer saved bytes than standard (all / base) | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        peak = r.get("peak_gpu_bytes") or r.get("peak_rss_bytes")
        label = r["strategy"] + (" + tap cache" if r["cache_taps"] else "")
        rows.append(
            f"| {r['model']} | {label} | {r['memory']} | {r['step_time_s']:.3f} | {_x(r['speedup_vs_finetune'])} "
            f"| {_mb(r['saved_activation_bytes'])} | {_mb(r['saved_activation_bytes_base'])} "
            f"| {_x(r['activation_ratio_vs_standard'])} / {_x(r['activation_ratio_vs_standard_base'])} "
            f"| {_mb(peak)} |"
        )
    return "\n".join(rows)


# (label, goal, strategy, cache_taps, memory, field): the goals of issue #6, as ratios from one run
TARGETS = (
    ("udta step vs full finetune", 2.5, "udta", False, "standard", "speedup_vs_finetune"),
    ("udta + tap cache step vs full finetune", 8.0, "udta", True, "standard", "speedup_vs_finetune"),
    ("serial step vs full finetune", 1.6, "serial", False, "standard", "speedup_vs_finetune"),
    ("serial, lean: fewer saved bytes, all", 3.5, "serial", False, "lean", "activation_ratio_vs_standard"),
    ("serial, lean: fewer saved bytes, base", 20.0, "serial", False, "lean", "activation_ratio_vs_standard_base"),
    ("pretrain, lean: fewer saved bytes", 3.0, "pretrain", False, "lean", "activation_ratio_vs_standard"),
    ("pretrain, lean_fp16: fewer saved bytes", 3.0, "pretrain", False, "lean_fp16", "activation_ratio_vs_standard"),
)


def targets_table(records: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for r in records))
    rows = ["| target | goal | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for label, goal, strategy, cached, memory, key in TARGETS:
        cells = []
        for model in models:
            found = [
                r[key] for r in records
                if (r["model"], r["strategy"], r["cache_taps"], r["memory"]) == (model, strategy, cached, memory)
            ]  # fmt: skip
            value = found[0] if found else None
            cells.append("-" if value is None else f"{value:.2f}x " + ("(met)" if value >= goal else "(short)"))
        rows.append(f"| {label} | >= {goal:g}x | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report(records: list[dict], meta: dict) -> str:
    m = meta["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads"
    load = m.get("load_average")
    lines = [
        f"`{meta['command']}` on {where} ({meta['device']}); torch {m['torch']}, {meta['date']}, "
        f"{meta['elapsed_s'] / 60:.1f} min"
        + (f"; load average {load[0]:.1f} at the start, {meta['load_average_end'][0]:.1f} at the end" if load else "")
        + ".",
        "",
        markdown_table(records),
        "",
        targets_table(records),
        "",
        "Step time: median over "
        f"{meta['options']['rounds']} rounds x {meta['options']['steps_per_round']} steps after "
        f"{meta['options']['warmup']} warm-up steps, cases interleaved. Saved activations: per-sample tensors "
        "autograd keeps for backward in one training step. Peak memory: the process's peak over "
        f"{meta['options']['memory_steps']} steps with only that case alive"
        + (
            " (GPU allocations)."
            if meta["device"].startswith("cuda")
            else " (resident set with freed tensors returned to the OS; it includes Python, torch, the model and "
            "Adam's state; `step_peak_bytes` in the JSON is the growth during the step)."
        )
        + " `pretrain` trains the bare base (task=pretrain); `tap cache` trains from cached base features "
        "(tap_cache.enabled=true; building the cache costs one base forward per image and view).",
    ]
    return "\n".join(lines)


def update_readme(path: Path, text: str, start_marker: str = README_START, end_marker: str = README_END) -> None:
    content = path.read_text()
    start, end = content.find(start_marker), content.find(end_marker)
    if start < 0 or end < start:
        raise SystemExit(f"{path} has no {start_marker} ... {end_marker} section to fill")
    path.write_text(content[: start + len(start_marker)] + "\n" + text + "\n" + content[end:])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bnn_adapt.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: a few minutes on 2 CPU cores")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and images (a smoke test)")
    parser.add_argument("--models", default=None, help="comma-separated base names (default: all)")
    parser.add_argument("--out", default="benchmarks", help="folder for results.json / results.md")
    parser.add_argument("--readme", default=None, help="README to update between the bench markers")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> Options:
    setups = TINY_SETUPS if args.tiny else FULL_SETUPS
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = set(wanted) - {s.name for s in setups}
        if unknown:
            raise SystemExit(f"unknown --models {sorted(unknown)}; choose from {[s.name for s in setups]}")
        setups = tuple(s for s in setups if s.name in wanted)
    if args.quick or args.tiny:
        return Options(setups, warmup=1, rounds=2 if args.tiny else 3, steps_per_round=1, memory_steps=1)
    return Options(setups, warmup=2, rounds=5, steps_per_round=2, memory_steps=2)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = options_from(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    command = "python -m bnn_adapt.bench" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(argv if argv is not None else sys.argv[1:]))
    meta = {
        "command": command,
        "device": str(device),
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "options": {k: v for k, v in asdict(options).items() if k != "setups"},
    }
    started = time.perf_counter()
    records = []
    for setup in options.setups:
        print(f"{setup.name}: width {setup.width}, {setup.image_size}x{setup.image_size}, batch {setup.batch_size}")
        records += run_setup(setup, options, device)
    meta["elapsed_s"] = time.perf_counter() - started
    with contextlib.suppress(OSError):
        meta["load_average_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in records:
        r["device"] = meta["device"]
    (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    text = report(records, meta)
    (out / "results.md").write_text(text + "\n")
    (out / "machine.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(text)
    if args.readme:
        update_readme(Path(args.readme), text)
    return records


if __name__ == "__main__":
    main()
