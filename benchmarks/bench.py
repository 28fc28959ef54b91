"""Side-by-side speed and memory benchmark of the adaptation strategies (docs/speed.md).

``make bench`` (``python -m benchmarks.bench``) measures every strategy x
memory mode (``memory=standard|lean``) on the STE base at full width (32x32
images, batch 64) and on ReActNet-18 (224x224, batch 16), on the GPU if there
is one, else on the CPU. Every case trains on the same batch (drawn once per
base, before any model is built).

* ``step_time_s``: median time of a full training step (forward, loss,
  backward, Adam step, latent-weight clamping) after warm-up. The cases are
  timed round-robin, a few steps each per round, so a change in machine load
  hits them all alike: on a shared machine only the ratios mean anything.
* ``saved_activation_bytes`` (and ``_base``, ``_by_layer``): what autograd keeps
  for backward in one step (:class:`~benchmarks.bench_memory.SavedTensorMeter`).
* ``peak_rss_bytes`` (CPU; on GPU ``peak_gpu_bytes``): the minimum over
  ``--peak-repeats`` runs of the case, each in its own fresh process
  (:func:`~benchmarks.bench_memory.isolated_peaks`); ``step_peak_bytes``
  the growth during the steps, ``baseline_rss_bytes`` the bare process.
* Tap cache cases also time building the cache through its real path
  (``tap_cache.build_features``), round-robin with the steps under the same
  allocator setting: ``cache_build_s_per_image``, ``cache_bytes_per_image`` (per
  view) and ``amortized_speedup`` ("views x epochs" -> ratio against finetuning).

* Epoch records (:mod:`~benchmarks.bench_epoch`): training images per second of a whole
  epoch as ``python -m bnn_adapt`` runs it (loader, steps, logging, validation) for finetune /
  serial / udta / udta + tap cache, against a bare PyTorch loop doing the same work on the
  same model and loaders (``framework_vs_bare``); a tiny width on CPU, the thesis's on GPU.

It writes ``benchmarks/results.json`` (one record per case), ``benchmarks/epochs.json``
(one per epoch case), ``benchmarks/results.md`` (:mod:`benchmarks.bench_report`; docs/speed.md includes it)
and ``benchmarks/machine.json`` (each section's run: command, machine, commit, date). ``--only steps`` or
``--only epochs`` keeps the other section's records and report from the earlier run in the folder.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.bench_cases import (
    FULL_SETUPS,
    TINY_SETUPS,
    Case,
    ModelSetup,
    adapter_names,
    build_cache,
    make_base,
    prepare,
    release,
    sync,
    train_step,
)
from benchmarks.bench_epoch import EPOCH_SETUPS, EpochSetup, epoch_records
from benchmarks.bench_memory import SavedTensorMeter, measure_peak, measure_saved  # noqa: F401 (re-exported)
from benchmarks.bench_report import commit, machine, report
from bnn_adapt.files import atomic_output
from bnn_adapt.training import allocator

AMORTIZED = ((1, 10), (1, 75), (4, 10), (4, 75))  # (views, epochs) of the tap cache's amortised speed-up
SECTIONS = ("steps", "epochs")  # step cases (time, memory) and whole-epoch records


def time_cases(cases: list[Case], device: torch.device, warmup: int, rounds: int, steps_per_round: int) -> None:
    """Round-robin: each round runs ``steps_per_round`` steps of every case (and one cache build of each
    tap-cache case)."""
    for case in cases:
        for _ in range(warmup):
            train_step(case)
        if case.cache_taps:
            build_cache(case, device)
    sync(device)
    for _ in range(rounds):
        for case in cases:
            for _ in range(steps_per_round):
                start = time.perf_counter()
                train_step(case)
                sync(device)
                case.times.append(time.perf_counter() - start)
            if case.cache_taps:
                seconds, per_image = build_cache(case, device)
                case.build_times.append(seconds)
                case.record["cache_bytes_per_image"] = per_image


# ---------------------------------------------------------------------------
# running


@dataclass
class Options:
    setups: tuple[ModelSetup, ...]
    strategies: tuple[str, ...] | None
    warmup: int
    rounds: int
    steps_per_round: int
    memory_steps: int
    peak_repeats: int
    sections: tuple[str, ...] = SECTIONS
    epoch_setup: EpochSetup | None = None


def cases_for(setup: ModelSetup, strategies: list[str]) -> list[Case]:
    cases = []
    for strategy in strategies:
        if strategy == "pretrain":
            continue
        for memory in ("standard", "lean"):
            cases.append(Case(setup, strategy, memory))
        if strategy == "udta":
            for memory in ("standard", "lean"):
                cases.append(Case(setup, strategy, memory, cache_taps=True))
    if setup.pretrain and "pretrain" in strategies:
        cases += [Case(setup, "pretrain", memory) for memory in ("standard", "lean", "lean_fp16")]
    return cases


def run_setup(setup: ModelSetup, options: Options, device: torch.device, log=print) -> list[dict]:
    base = make_base(setup)
    cases = cases_for(setup, list(options.strategies or [*adapter_names(), "pretrain"]))
    for case in cases:  # saved bytes, one case alive at a time; peaks in fresh processes
        log(f"  memory {setup.name} {case.label} ({case.memory})")
        prepare(case, base, device)
        measure_saved(case)
        release(case)
        gc.collect()
        if options.peak_repeats:
            measure_peak(case, device, options.memory_steps, options.peak_repeats)
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
            "num_classes": case.num_classes,
            "trainable_params": sum(p.numel() for p in case.model.parameters() if p.requires_grad),
            "step_time_s": statistics.median(case.times),
            "step_times_s": case.times,
            "peak_rss_bytes": None,
            **case.record,
        }
        if case.cache_taps:
            record["cache_build_s_per_image"] = statistics.median(case.build_times) / setup.batch_size
            record["cache_build_times_s"] = case.build_times
        records.append(record)
        release(case)
    add_ratios(records)
    return records


def _key(record: dict) -> tuple:
    return record["model"], record["strategy"], record["cache_taps"]


def _ratio(a, b):
    return a / b if a and b else None


def add_ratios(records: list[dict]) -> None:
    """Speed-up against full finetuning (standard memory) of the same model, per step and, for the
    tap cache, amortised over (views, epochs); saved-activation ratios against the same strategy
    with standard memory."""
    finetune = {r["model"]: r for r in records if r["strategy"] == "full_finetune" and r["memory"] == "standard"}
    standard = {_key(r): r for r in records if r["memory"] == "standard"}
    for r in records:
        reference = finetune.get(r["model"])
        r["speedup_vs_finetune"] = _ratio(reference["step_time_s"], r["step_time_s"]) if reference else None
        same = standard.get(_key(r))
        r["activation_ratio_vs_standard"] = _ratio(same["saved_activation_bytes"], r["saved_activation_bytes"])
        r["activation_ratio_vs_standard_base"] = _ratio(
            same["saved_activation_bytes_base"], r["saved_activation_bytes_base"]
        )
        memory_key = "peak_gpu_bytes" if r.get("peak_gpu_bytes") else "peak_rss_bytes"
        r["peak_memory_ratio_vs_finetune"] = _ratio(reference.get(memory_key), r.get(memory_key)) if reference else None
        if r["cache_taps"] and reference:
            build = r["cache_build_s_per_image"] * r["batch_size"]  # one view of one batch
            r["amortized_speedup"] = {
                f"{views}x{epochs}": epochs * reference["step_time_s"] / (views * build + epochs * r["step_time_s"])
                for views, epochs in AMORTIZED
            }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps: a few minutes on 2 CPU cores")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and images (a smoke test)")
    parser.add_argument("--models", default=None, help="comma-separated base names (default: all)")
    parser.add_argument("--strategies", default=None, help="comma-separated strategies and/or pretrain (default: all)")
    parser.add_argument(
        "--peak-repeats", type=int, default=3, help="fresh processes per case for peak memory (0: skip)"
    )
    parser.add_argument("--out", default="benchmarks", help="folder for results.json / results.md")
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        default=None,
        help="only the step cases (time, memory) or only the whole-epoch records",
    )
    return parser.parse_args(argv)


def _choose(given: str | None, known: list[str], flag: str) -> list[str] | None:
    if not given:
        return None
    wanted = [s.strip() for s in given.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"error: unknown {flag} {unknown}; choose from {known}")
    return wanted


def options_from(args: argparse.Namespace, device: torch.device) -> Options:
    setups = TINY_SETUPS if args.tiny else FULL_SETUPS
    models = _choose(args.models, [s.name for s in setups], "--models")
    if models:
        setups = tuple(s for s in setups if s.name in models)
    strategies = _choose(args.strategies, [*adapter_names(), "pretrain"], "--strategies")
    if args.peak_repeats < 0:
        raise SystemExit(f"error: --peak-repeats {args.peak_repeats} is negative; use 0 to skip peak memory")
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    common = {
        "setups": setups,
        "strategies": tuple(strategies) if strategies else None,
        "peak_repeats": args.peak_repeats,
        "sections": (args.only,) if args.only else SECTIONS,
        "epoch_setup": EPOCH_SETUPS[("cuda" if device.type == "cuda" else "cpu", size)],
    }
    if args.quick or args.tiny:
        return Options(**common, warmup=1, rounds=2 if args.tiny else 3, steps_per_round=1, memory_steps=1)
    return Options(**common, warmup=2, rounds=5, steps_per_round=2, memory_steps=2)


def _device(name: str) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


SECTION_FILES = {"steps": "results.json", "epochs": "epochs.json"}


def kept_sections(out: Path, running: tuple[str, ...]) -> dict[str, tuple[list[dict], dict]]:
    """The records and run description (``machine.json``) of the sections an earlier run in ``out`` wrote and
    this run does not repeat: ``--only epochs`` must not erase the step cases, nor their report."""
    try:
        machines = json.loads((out / "machine.json").read_text())
    except (OSError, ValueError):
        return {}
    one_run = "command" in machines  # written before each section kept its own run's description
    kept = {}
    for section, name in SECTION_FILES.items():
        run_meta = machines if one_run else machines.get(section, {})
        if section in running or not (out / name).is_file() or "command" not in run_meta:
            continue
        with contextlib.suppress(ValueError):
            kept[section] = (json.loads((out / name).read_text()), run_meta)
    return kept


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    options = options_from(args, device)
    given = sys.argv[1:] if argv is None else argv
    meta = {
        "command": " ".join(["python -m benchmarks.bench", *given]),
        "commit": commit(),
        "device": str(device),
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "options": {k: v for k, v in asdict(options).items() if k != "setups"},
    }
    started = time.perf_counter()
    records, epochs = [], []
    if "steps" in options.sections:
        for setup in options.setups:
            print(f"{setup.name}: width {setup.width}, {setup.image_size}x{setup.image_size}, batch {setup.batch_size}")
            records += run_setup(setup, options, device)
    if "epochs" in options.sections:
        e = options.epoch_setup
        print(
            f"epochs: ste_resnet_cifar width {e.width}, {e.train_per_class} + {e.eval_per_class} images per class, "
            f"batch {e.batch_size}, {e.rounds} rounds x {e.epochs} epochs"
        )
        allocator.keep_freed_memory()  # as in training (python -m bnn_adapt)
        epochs = epoch_records(e, device)
    meta["elapsed_s"] = time.perf_counter() - started
    with contextlib.suppress(OSError):
        meta["load_average_end"] = list(os.getloadavg())
    for r in records + epochs:
        r["device"] = meta["device"]
    out = Path(args.out)
    runs = kept_sections(out, options.sections)  # a run of one section keeps the other's earlier records
    runs.update(
        {
            section: (found, meta)
            for section, found in (("steps", records), ("epochs", epochs))
            if section in options.sections
        }
    )
    (step_records, steps_meta), (timed_epochs, epochs_meta) = (runs.get(s, ([], meta)) for s in SECTION_FILES)
    text = report(step_records, steps_meta, timed_epochs, epochs_meta)
    files = {SECTION_FILES[section]: found for section, (found, _) in runs.items()}
    written = {name: json.dumps(found, indent=1) for name, found in files.items() if found}
    machines = {section: run_meta for section, (found, run_meta) in runs.items() if found}
    for name, content in (*written.items(), ("results.md", text), ("machine.json", json.dumps(machines, indent=1))):
        with atomic_output(out / name) as tmp:
            tmp.write_text(content + "\n")
    print(text)
    return records


if __name__ == "__main__":
    main()
