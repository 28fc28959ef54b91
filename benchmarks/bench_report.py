"""Reporting the benchmark (``make bench``): the machine and commit it ran on, the case
table, the tap cache's costs, the targets, and the README section between the bench markers."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch

from bnn_adapt.run.provenance import git_commit as commit  # noqa: F401 - the benchmarks' records name it

# (label, goal, strategy, cache_taps, memory, field): the step and memory goals, as ratios from one run
TARGETS = (
    ("udta step vs full finetune", 2.5, "udta", False, "standard", "speedup_vs_finetune"),
    ("udta + tap cache step vs full finetune", 8.0, "udta", True, "standard", "speedup_vs_finetune"),
    ("serial step vs full finetune", 1.6, "serial", False, "standard", "speedup_vs_finetune"),
    ("serial, lean: fewer saved bytes, all", 3.5, "serial", False, "lean", "activation_ratio_vs_standard"),
    ("serial, lean: fewer saved bytes, base", 20.0, "serial", False, "lean", "activation_ratio_vs_standard_base"),
    ("pretrain, lean: fewer saved bytes", 3.0, "pretrain", False, "lean", "activation_ratio_vs_standard"),
    ("pretrain, lean_fp16: fewer saved bytes", 3.0, "pretrain", False, "lean_fp16", "activation_ratio_vs_standard"),
)

# the epoch goals: on CPU an epoch within 1.3x of the bare loop (tiny width, one thread); on one H200,
# full-width STE on CIFAR-10 5-5 images at batch 64, training images per second
EPOCH_RATIO_GOAL = 1.3
EPOCH_GPU_GOALS = {("full_finetune", False): 15_000, ("udta", False): 40_000, ("udta", True): 100_000}

# The thesis's target sets (thesis ch. 5-6): which base reads them and how many images the cache holds.
# (name, base, training images, evaluation images)
THESIS_DATASETS = (
    ("CIFAR-10 5-5 (labels 5-9)", "ste_resnet_cifar", 25_000, 5_000),
    ("CIFAR-100 80-20 (labels 0-19)", "ste_resnet_cifar", 10_000, 2_000),
    ("Flowers-102 (train / val)", "reactnet18", 1_020, 1_020),
    ("Oxford-IIIT Pets (trainval / test)", "reactnet18", 3_680, 3_669),
)
CACHE_VIEWS = (1, 4)


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


def _gb(n) -> str:
    return f"{n / 1e9:,.2f} GB"


def label(record: dict) -> str:
    return record["strategy"] + (" + tap cache" if record["cache_taps"] else "")


def peak(record: dict):
    return record.get("peak_gpu_bytes") or record.get("peak_rss_bytes")


def markdown_table(records: list[dict]) -> str:
    """Ratios against full finetuning with standard memory, per model."""
    rows = [
        "| model | strategy | memory | step time (s) | speed-up vs finetune | saved activations (MiB) "
        "| of which base (MiB) | fewer saved bytes than standard (all / base) | peak memory (MiB) "
        "| step growth (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        rows.append(
            f"| {r['model']} | {label(r)} | {r['memory']} | {r['step_time_s']:.3f} | {_x(r['speedup_vs_finetune'])} "
            f"| {_mb(r['saved_activation_bytes'])} | {_mb(r['saved_activation_bytes_base'])} "
            f"| {_x(r['activation_ratio_vs_standard'])} / {_x(r['activation_ratio_vs_standard_base'])} "
            f"| {_mb(peak(r))} | {_mb(r.get('step_peak_bytes'))} |"
        )
    return "\n".join(rows)


def tap_cache_table(records: list[dict]) -> str:
    """What the tap cache costs and returns: build time, bytes, the speed-up amortised over (views, epochs)."""
    cached = [r for r in records if r["cache_taps"] and r.get("amortized_speedup")]
    if not cached:
        return ""
    keys = list(cached[0]["amortized_speedup"])
    rows = [
        "| model | memory | cached step (s) | speed-up per step | build (ms per image and view) "
        "| features per image and view | "
        + " | ".join(f"amortised {k.replace('x', ' views x ')} epochs" for k in keys)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(keys),
    ]
    for r in cached:
        rows.append(
            f"| {r['model']} | {r['memory']} | {r['step_time_s']:.3f} | {_x(r['speedup_vs_finetune'])} "
            f"| {r['cache_build_s_per_image'] * 1e3:.2f} | {r['cache_bytes_per_image'] / 1e3:,.1f} kB | "
            + " | ".join(_x(r["amortized_speedup"][k]) for k in keys)
            + " |"
        )
    return "\n".join(rows)


def cache_memory_table(records: list[dict]) -> str:
    """The cache's size for each thesis target set, from the measured bytes per image and view."""
    per_image = {r["model"]: r["cache_bytes_per_image"] for r in records if r.get("cache_bytes_per_image")}
    rows = [
        "| target set | base | training images | eval images | per image and view | "
        + " | ".join(f"cache, {v} view{'s' if v > 1 else ''}" for v in CACHE_VIEWS)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(CACHE_VIEWS),
    ]
    found = False
    for name, model, train, held_out in THESIS_DATASETS:
        if model not in per_image:
            continue
        found = True
        size = per_image[model]
        rows.append(
            f"| {name} | {model} | {train:,} | {held_out:,} | {size / 1e3:,.1f} kB | "
            + " | ".join(_gb((train * views + held_out) * size) for views in CACHE_VIEWS)
            + " |"
        )
    return "\n".join(rows) if found else ""


def targets_table(records: list[dict]) -> str:
    models = list(dict.fromkeys(r["model"] for r in records))
    rows = ["| target | goal | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for text, goal, strategy, cached, memory, key in TARGETS:
        cells = []
        for model in models:
            found = [
                r[key]
                for r in records
                if (r["model"], r["strategy"], r["cache_taps"], r["memory"]) == (model, strategy, cached, memory)
            ]
            value = found[0] if found else None
            cells.append("-" if value is None else f"{value:.2f}x " + ("(met)" if value >= goal else "(short)"))
        rows.append(f"| {text} | >= {goal:g}x | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _baseline(records: list[dict]) -> str:
    values = [r["baseline_rss_bytes"] for r in records if r.get("baseline_rss_bytes")]
    if not values:
        return ""
    return (
        f" Every CPU peak includes the worker process's baseline, {_mb(min(values))}-{_mb(max(values))} MiB "
        "(Python, torch, bnn_adapt and Hydra loaded, one Adam step on one number taken, nothing built: "
        "`baseline_rss_bytes`)."
    )


def run_line(meta: dict) -> str:
    """What ran where: the command, machine, torch, date, commit, duration and load of one bench run."""
    m = meta["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads"
    load = m.get("load_average")
    return (
        f"`{meta['command']}` on {where} ({meta['device']}); torch {m['torch']}, {meta['date']}"
        + (f", commit {meta['commit']}" if meta.get("commit") else "")
        + f", {meta['elapsed_s'] / 60:.1f} min"
        + (f"; load average {load[0]:.1f} at the start, {meta['load_average_end'][0]:.1f} at the end" if load else "")
        + "."
    )


def report(records: list[dict], meta: dict, epochs: list[dict] = (), epochs_meta: dict | None = None) -> str:
    """The Markdown report: what ran where, then the step cases (``records``) and the epoch records; the
    epoch records name their own run (``epochs_meta``) when an earlier run than the steps' timed them."""
    epochs_meta = epochs_meta or meta
    lines = [run_line(meta if records or not epochs else epochs_meta)]
    if records:
        lines += ["", *step_sections(records, meta)]
    if epochs:
        if records and epochs_meta != meta:
            lines += ["", "Whole epochs: " + run_line(epochs_meta)]
        lines += ["", epoch_table(epochs), "", epoch_notes(epochs, epochs_meta)]
    return "\n".join(lines)


def step_sections(records: list[dict], meta: dict) -> list[str]:
    options = meta["options"]
    gpu = meta["device"].startswith("cuda")
    peak_text = (
        f"Peak memory: the minimum over {options['peak_repeats']} runs of the case, each in its own fresh process "
        f"(`python -m benchmarks.bench_memory`), of the peak over {options['memory_steps']} training steps"
        + (
            " (GPU allocations); step growth: that peak minus what was allocated before the steps (model, Adam's "
            "state, batch)."
            if gpu
            else " (resident-set high-water mark, reset just before the steps, freed tensors returned to the OS); "
            "step growth: that peak minus the resident set before the steps (Python, torch, the model, Adam's "
            "state and the batch)." + _baseline(records)
        )
    )
    lines = [
        markdown_table(records),
        "",
        targets_table(records),
        "",
        f"Step time: median over {options['rounds']} rounds x {options['steps_per_round']} steps after "
        f"{options['warmup']} warm-up steps, cases interleaved, every case training on the same batch. "
        "Saved activations: per-sample tensors autograd keeps for backward in one training step. "
        + (peak_text if options["peak_repeats"] else "Peak memory: not measured (`--peak-repeats 0`).")
        + " `pretrain` trains the bare base (task=pretrain); `tap cache` trains from cached base features "
        "(tap_cache.enabled=true).",
    ]
    cache = tap_cache_table(records)
    if cache:
        lines += [
            "",
            cache,
            "",
            "Tap cache: building it is one base forward per training image and view without autograd "
            "(`tap_cache.build_features`, the real build path: batches, view-major host storage), timed "
            "round-robin with the steps under the same allocator setting; data loading and augmentation are "
            "not included. Amortised speed-up over V views x E epochs = E x finetune step / (V x batch x build "
            "time per image + E x cached step), training steps only (the eval set, cached once, is left out).",
        ]
    sizes = cache_memory_table(records)
    if sizes:
        lines += ["", sizes, "", "Cache size = (training images x views + eval images) x bytes per image and view."]
    return lines


def _goal(record: dict) -> str:
    """The record against its goal: on a CPU the 1.3x ratio (of CPU times), on a GPU images/s at full width."""
    if not record["device"].startswith("cuda"):
        ratio = record["framework_vs_bare_cpu"]
        return f"<= {EPOCH_RATIO_GOAL}x: " + (
            "met" if ratio <= EPOCH_RATIO_GOAL else f"short by {ratio / EPOCH_RATIO_GOAL:.2f}x"
        )
    goal = EPOCH_GPU_GOALS.get((record["strategy"], record["cache_taps"]))
    if goal is None or record["width"] != 1.0:
        return "-"
    rate = record["images_per_s"]
    return f">= {goal:,} images/s (H200): " + ("met" if rate >= goal else f"short by {goal / rate:.2f}x")


def epoch_table(epochs: list[dict]) -> str:
    rows = [
        "| strategy | width | train + eval images | precision | epoch (s) | images/s | bare loop epoch (s) "
        "| bare loop images/s | framework / bare | framework / bare, CPU time | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in epochs:
        rows.append(
            f"| {label(r)} | {r['width']:g} | {r['train_images']:,} + {r['eval_images']:,} | {r['precision']} "
            f"| {r['epoch_time_s']:.3f} | {r['images_per_s']:,.0f} | {r['bare_epoch_time_s']:.3f} "
            f"| {r['bare_images_per_s']:,.0f} | {r['framework_vs_bare']:.2f}x | {r['framework_vs_bare_cpu']:.2f}x "
            f"| {_goal(r)} |"
        )
    return "\n".join(rows)


def epoch_notes(epochs: list[dict], meta: dict) -> str:
    e = meta["options"]["epoch_setup"]
    return (
        f"Epochs: training images per second of a whole epoch (training on the train images, then validation "
        f"on the eval images), STE base at width {e['width']:g}, batch {e['batch_size']}, generated CIFAR-10 5-5 "
        f"in its real format; median over {e['rounds']} rounds x {e['epochs'] - 1} epochs after a warm-up epoch, "
        "cases interleaved. Framework: `bnn_adapt.run.fit.fit` as `python -m bnn_adapt` runs it (the "
        "datamodule's loaders, the Lightning module and trainer, logging, checkpointing, validation); bare loop: "
        "plain PyTorch over the same loaders with the same optimiser, scheduler, forward, backward, step and "
        "latent clamping, and an evaluation pass (`benchmarks.bench_epoch`). CPU time: this process's, "
        "which other processes on a shared machine do not inflate as they do wall time; the CPU goal "
        "is judged on it."
    )
