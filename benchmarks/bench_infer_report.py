"""The inference benchmark's tables: per-layer and end-to-end speed-ups, targets, memory (``make bench-infer``)."""

from __future__ import annotations

import statistics

TARGETS = {  # speed-ups to reach on this repository's 2-core reference machine
    "conv3x3": 4.0,
    ("end_to_end", "ste_resnet_cifar", 1): 2.0,
    ("end_to_end", "reactnet18", 1): 1.5,
}


def summary_rows(records: list[dict]) -> list[dict]:
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        for batch in dict.fromkeys(r["batch"] for r in records if r["model"] == model):
            layers = [r for r in records if r["model"] == model and r["batch"] == batch and r["layer"] != "end_to_end"]
            e2e = next(
                (r for r in records if (r["model"], r["batch"], r["layer"]) == (model, batch, "end_to_end")), None
            )
            conv3 = [r["speedup"] for r in layers if r["kernel"] == "3x3"]
            conv1 = [r["speedup"] for r in layers if r["kernel"] == "1x1"]
            rows.append(
                {
                    "model": model,
                    "batch": batch,
                    "layers": len(layers),
                    "all_exact": all(r["exact"] for r in layers),
                    "conv3x3_median": statistics.median(conv3) if conv3 else None,
                    "conv3x3_min": min(conv3, default=None),
                    "conv3x3_max": max(conv3, default=None),
                    "conv1x1_median": statistics.median(conv1) if conv1 else None,
                    "end_to_end": e2e,
                }
            )
            for path in ("packed", "float"):
                per_cycle = [
                    r[f"{path}_macs_per_cycle_per_core"]
                    for r in layers
                    if r["kernel"] == "3x3" and f"{path}_macs_per_cycle_per_core" in r
                ]
                rows[-1][f"conv3x3_{path}_macs_per_cycle"] = statistics.median(per_cycle) if per_cycle else None
    return rows


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:,.2f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.1f}x"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def summary_table(rows: list[dict]) -> list[str]:
    header = [
        "model",
        "batch",
        "3x3 binary convs: median speed-up (min-max)",
        "3x3 MACs/cycle/core, packed / fp32",
        "1x1 convs",
        "every layer exact",
        "end to end fp32 (ms)",
        "packed (ms)",
        "speed-up",
        "images/s fp32 / packed",
        "base alone: speed-up",
        "packed time: kernels / adapter + head",
    ]
    cells = []
    for r in rows:
        e = r["end_to_end"] or {}
        packed, fp32 = r.get("conv3x3_packed_macs_per_cycle"), r.get("conv3x3_float_macs_per_cycle")
        cells.append(
            [
                r["model"],
                str(r["batch"]),
                f"{_x(r['conv3x3_median'])} ({_x(r['conv3x3_min'])}-{_x(r['conv3x3_max'])})",
                f"{packed:.0f} / {fp32:.1f}" if packed and fp32 else "-",
                _x(r["conv1x1_median"]),
                "yes" if r["all_exact"] else "NO",
                _ms(e.get("float_s")),
                _ms(e.get("packed_s")),
                _x(e.get("speedup")),
                f"{e.get('images_per_s_float', 0):,.0f} / {e.get('images_per_s_packed', 0):,.0f}",
                _x(e.get("base_speedup")),
                f"{e.get('kernel_share_packed', 0):.0%} / {e.get('adapter_share_packed', 0):.0%}",
            ]
        )
    return table(header, cells)


def targets_table(rows: list[dict]) -> list[str]:
    cells = []
    for r in rows:
        if r["conv3x3_median"] is not None:
            goal, value = TARGETS["conv3x3"], r["conv3x3_median"]
            state = "met" if value >= goal else "short"
            cells.append(
                [
                    f"{r['model']} batch {r['batch']}: median 3x3 per-layer speed-up",
                    f">= {goal:g}x",
                    f"{value:.1f}x ({state})",
                ]
            )
    for r in rows:
        goal = TARGETS.get(("end_to_end", r["model"], r["batch"]))
        if goal and r["end_to_end"]:
            value = r["end_to_end"]["speedup"]
            state = "met" if value >= goal else "short"
            cells.append([f"{r['model']} batch {r['batch']}: end to end", f">= {goal:g}x", f"{value:.2f}x ({state})"])
    return table(["target", "goal", "measured"], cells)


def memory_table(memory: list[dict]) -> list[str]:
    header = [
        "model",
        "packed file",
        "base tensors in memory, packed / fp32",
        "RSS growth loading the base, packed / fp32",
        "one more copy, packed / fp32",
    ]
    cells = [
        [
            r["model"],
            _mib(r["packed_file_bytes"]),
            f"{_mib(r['live_tensor_packed_bytes'])} / {_mib(r['live_tensor_float_bytes'])}",
            f"{_mib(r['rss_growth_packed_bytes'])} / {_mib(r['rss_growth_float_bytes'])}",
            f"{_mib(r['rss_growth_second_packed_bytes'])} / {_mib(r['rss_growth_second_float_bytes'])}",
        ]
        for r in memory
    ]
    return table(header, cells)


def markdown(records: list[dict], memory: list[dict], meta: dict) -> str:
    m = meta["machine"]
    rows = summary_rows(records)
    rounds = ", ".join(f"{v} (batch {k})" for k, v in meta["rounds"]["end_to_end"].items())
    where = (
        f"`{meta['command']}` at commit `{meta['commit']}` on {m['cpu']} ({m['cpu_cores']} cores, kernels: "
        f"{meta['isa']}, OpenMP {'on' if meta['openmp'] else 'off'}), {m['torch_threads']} threads for both paths; "
        f"torch {m['torch']}, {meta['date']}, {meta['elapsed_s'] / 60:.1f} min; load average "
        f"{m['load_average'][0]:.1f} at the start, {meta['load_average_end'][0]:.1f} at the end."
    )
    notes = (
        f"Medians of {meta['rounds']['layer']} interleaved rounds per layer and of {rounds} end to end. Per layer: "
        "torch's fp32 conv of +-1 inputs and weights against the kernel on packed inputs (packing an input costs "
        "`pack_s` more, once per block; `speedup_with_pack` in the JSON); MACs per cycle and core at the nominal "
        f"{meta['cpu_mhz'] or 0:.0f} MHz (the kernel's step, xor + popcount + add, covers 512 binary MACs; an "
        "AVX-512 FMA 16 fp32 ones). End to end: a preprocessed batch to the top-5 classes of one UDTA adapter "
        "(`BaseWithAdapters.predict`); base alone: its stage outputs; of the packed end-to-end time, the share in "
        "the kernels and in the (float) adapter and head; the rest is the base's float parts (stem, ReActNet's "
        "shortcuts) and Python. Memory: fresh processes, resident set after "
        "`BaseWithAdapters.load` minus before (the first load also pays for code paths used the first time), "
        "and for one more copy of the base."
    )
    lines = [
        where,
        "",
        *summary_table(rows),
        "",
        *targets_table(rows),
        *(["", *memory_table(memory)] if memory else []),
        "",
        notes,
    ]
    return "\n".join(lines)


def layer_table(records: list[dict]) -> str:
    header = [
        "model",
        "batch",
        "layer",
        "kernel/stride",
        "c_in -> c_out",
        "input",
        "fp32 (ms)",
        "packed (ms)",
        "pack (ms)",
        "speed-up",
        "packed GMAC/s",
        "exact",
    ]
    cells = [
        [
            r["model"],
            str(r["batch"]),
            r["layer"],
            f"{r['kernel']}/{r['stride']}",
            f"{r['c_in']} -> {r['c_out']}",
            "x".join(map(str, r["input_hw"])),
            _ms(r["float_s"]),
            _ms(r["packed_s"]),
            _ms(r["pack_s"]),
            _x(r["speedup"]),
            f"{r['packed_gmacs_per_s']:,.0f}",
            "yes" if r["exact"] else "NO",
        ]
        for r in records
        if r["layer"] != "end_to_end"
    ]
    return "\n".join(table(header, cells))
