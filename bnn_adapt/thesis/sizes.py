"""Bytes on disk at the thesis configurations: ``python -m bnn_adapt.thesis.sizes`` (``make sizes``).

Builds every base and adapter strategy from the real experiment configs (full
width unless a row says otherwise, random weights: sizes do not depend on the
values; pruned rows are pruned at their configured rates), exports them with
the code ``task=export`` uses into a temporary folder and prints Markdown tables:
the fp32 state dict next to the bit-packed base, and each adapter file at every
``adapter.bits`` next to the size formula at real bits (docs/concepts.md, Size: each weight at
its width, ``n_bin / 8 + 4 * n_fp32`` bytes at 32 bits), with the post-training
fp16 / int8 exports of the 32-bit adapters.

    python -m bnn_adapt.thesis.sizes            # every table (a few minutes on 2 CPU cores)
    python -m bnn_adapt.thesis.sizes --json F   # also the numbers, one record per file
    python -m bnn_adapt.thesis.sizes --runs outputs/demo/*   # trained runs' own files instead

The tables use random weights; ``--runs`` measures trained adapters (each run's
``adapter.safetensors`` against the formula in its ``metrics.json``), with the
bytes the same file takes with its streams uncompressed (file format 2).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from bnn_adapt import accounting
from bnn_adapt.adapters.file import ADAPTER_FILE, export_adapter, read_adapter_file
from bnn_adapt.deploy.export import formula_bytes
from bnn_adapt.deploy.packed_base import write_packed_base
from bnn_adapt.nn.layers import ColumnPrunedLinear
from bnn_adapt.nn.quantizers import BITS
from bnn_adapt.run import builders
from bnn_adapt.run.config import compose
from bnn_adapt.run.record import RunRecord

#: the file-size targets: packed base and adapter files against the formula at real bits
BASE_TARGET, ADAPTER_TARGET = 1.02, 1.10

BASES = [
    ("STE ResNet, CIFAR-10 5-5 base (5 classes)", ["+experiment=cifar5_5_head_only"]),
    ("STE ResNet, CIFAR-100 80-20 base (80 classes)", ["+experiment=cifar80_20_head_only"]),
    ("ReActNet-18, ImageNet (1000 classes)", ["+experiment=flowers102_head_only"]),
    ("STE ResNet width 0.25, digits 0-4 base (the demo's)", ["+experiment=digits5_5_head_only", "base.width=0.25"]),
    ("ReActNet-18 width 0.25 (102 classes)", ["+experiment=flowers102_head_only", "base.width=0.25"]),
]
C100 = ["+experiment=cifar80_20_udta"]
FLOWERS = ["+experiment=flowers102_udta"]
ADAPTERS = [
    ("CIFAR-10 5-5", "head only", ["+experiment=cifar5_5_head_only"]),
    ("CIFAR-10 5-5", "full finetune", ["+experiment=cifar5_5_finetune"]),
    ("CIFAR-10 5-5", "serial, stages 1-3, g=1", ["+experiment=cifar5_5_serial"]),
    ("CIFAR-10 5-5", "serial, stages 1-3, g=20", ["+experiment=cifar5_5_serial", "adapter.groups=20"]),
    ("CIFAR-100 80-20", "udta concat", C100),
    ("CIFAR-100 80-20", "udta concat, g=channels", [*C100, "adapter.groups=channels"]),
    ("CIFAR-100 80-20", "udta concat, prune 0.9", [*C100, "reduction=prune", "reduction.rate=0.9"]),
    ("CIFAR-100 80-20", "udta concat, prune 0.99", [*C100, "reduction=prune", "reduction.rate=0.99"]),
    (
        "CIFAR-100 80-20",
        "udta concat, prune_iterative 0.9 + head 0.5",
        [*C100, "reduction=prune_iterative", "reduction.rate=0.9", "reduction.head_rate=0.5"],
    ),
    ("CIFAR-100 80-20", "lora, rank 4, all stages", [*C100, "adapter=lora"]),
    ("CIFAR-100 80-20", "bitfit", [*C100, "adapter=bitfit"]),
    ("Flowers-102 (ReActNet)", "head only", ["+experiment=flowers102_head_only"]),
    ("Flowers-102 (ReActNet)", "full finetune", ["+experiment=flowers102_finetune"]),
    ("Flowers-102 (ReActNet)", "udta concat", FLOWERS),
    (
        "Flowers-102 (ReActNet)",
        "udta adapter head, prune 0.9",
        [*FLOWERS, "adapter.head=adapter", "reduction=prune", "reduction.rate=0.9"],
    ),
    ("Flowers-102 (ReActNet)", "lora, rank 4, all stages", [*FLOWERS, "adapter=lora"]),
    ("Flowers-102 (ReActNet)", "bitfit", [*FLOWERS, "adapter=bitfit"]),
]


@dataclass
class AdapterFile:
    """One exported adapter file next to its formula."""

    data: str
    label: str
    bits: int
    dtype: str
    fp32: int
    quantized: int
    binary: int
    formula: float  # bytes: every parameter at its width
    file: int  # bytes on disk
    positions: float = 0.0  # bytes: the least any file needs to say where a pruned model's kept weights are

    @property
    def ratio(self) -> float:
        return self.file / self.formula

    @property
    def ratio_with_positions(self) -> float:
        """Against the least a file can hold: the formula plus where the kept weights are."""
        return self.file / (self.formula + self.positions)


def position_bytes(model: nn.Module) -> float:
    """What saying where a pruned model's kept weights are costs at least, in bytes: log2 C(n, k) / 8 for
    every pruned weight of the adapter and head (k of n kept; a column-pruned classifier: k of n columns).
    The formula charges the kept weights only; a mask of no known structure needs this on top."""
    bits = 0.0
    for part in (model.adapter, model.head):
        for m in part.modules() if part is not None else ():
            if isinstance(m, ColumnPrunedLinear):
                n, kept = m.kept_columns.numel(), int(m.kept_columns.sum())
            elif isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2:
                n, kept = m.weight.numel(), int(m.weight.count_nonzero())
            else:
                continue
            if 0 < kept < n:
                bits += (math.lgamma(n + 1) - math.lgamma(kept + 1) - math.lgamma(n - kept + 1)) / math.log(2)
    return bits / 8


@torch.no_grad()
def like_trained(module: nn.Module, seed: int) -> None:
    """Non-zero, non-default values everywhere (fresh BN is all 0/1, LoRA's up-projection all 0),
    so sparse storage is chosen only where pruning made zeros."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if not t.is_floating_point():
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
        elif name.endswith(("running_mean", "up.weight")) or t.dim() == 1:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
        else:
            t.add_(torch.randn(t.shape, generator=gen) * 1e-3)


def base_records(tmp: Path) -> list[dict]:
    records = []
    for i, (label, overrides) in enumerate(BASES):
        base = builders.build_base(compose(overrides, output_dir=tmp / "cfg"))
        like_trained(base, i)
        fp32, binary = accounting.totals(accounting.parameter_rows(base))
        buffer = io.BytesIO()
        torch.save(base.state_dict(), buffer)
        path = tmp / f"base{i}.bnnpack"
        write_packed_base(base, path)
        records.append(
            {
                "label": label,
                "binary": binary,
                "fp32": fp32,
                "state_dict": len(buffer.getvalue()),
                "file": path.stat().st_size,
                "formula": formula_bytes(fp32, binary),
            }
        )
    return records


def adapter_files(tmp: Path, configs=ADAPTERS, bits=BITS) -> list[AdapterFile]:
    """Every configuration at every width it trains at (full finetuning: 32 only), plus fp16 / int8 at 32."""
    found, bases = [], {}
    for i, (data, label, overrides) in enumerate(configs):
        for width in bits:
            cfg = compose([*overrides, f"adapter.bits={width}"], output_dir=tmp / "cfg")
            if width != 32 and cfg.adapter.name == "full_finetune":
                continue
            key = (cfg.base.name, str(cfg.base.net.num_classes), cfg.base.width)
            if key not in bases:
                bases[key] = builders.build_base(cfg)
                like_trained(bases[key], 100 + len(bases))
            reference = bases[key]
            base = copy.deepcopy(reference) if cfg.adapter.name == "full_finetune" else reference
            torch.manual_seed(i)
            model = builders.build_adapted(cfg, base, builders.target_num_classes(cfg))
            for part in [model.adapter, model.head] + ([base] if base is not reference else []):
                if part is not None:
                    like_trained(part, i)
            plan = builders.pruning_plan(cfg)
            if plan is not None:
                plan.apply(model)
            model.eval()
            s = accounting.summarize(model)
            positions = position_bytes(model) if plan is not None else 0.0
            if width != 32 and not s["introduced_quantized_params"]:
                continue  # nothing below 32 bits here (an STE head is binary already)
            for dtype in ("fp32", "fp16", "int8") if width == 32 else ("fp32",):
                path = tmp / f"adapter{i}_{width}_{dtype}.safetensors"
                export_adapter(model, path, reference_base=reference, dtype=dtype)
                found.append(
                    AdapterFile(
                        data,
                        label,
                        width,
                        dtype,
                        s["introduced_fp32_params"],
                        s["introduced_quantized_params"],
                        s["introduced_binary_params"],
                        s["introduced_bits"] / 8,
                        path.stat().st_size,
                        positions,
                    )
                )
    return found


def base_table(records: list[dict]) -> list[str]:
    lines = [
        "| base | binary params | fp32 params | fp32 state dict (torch.save) | packed base | formula "
        "| packed / formula |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['label']} | {r['binary']:,} | {r['fp32']:,} | {r['state_dict']:,} | {r['file']:,} "
            f"| {round(r['formula']):,} | {r['file'] / r['formula']:.3f} |"
        )
    return lines


def adapter_table(files: list[AdapterFile], bits=BITS) -> list[str]:
    """One row per configuration: bytes at 32 and 1 bits, file / formula at every width, post-training exports."""
    rows: dict[tuple[str, str], dict] = {}
    for f in files:
        rows.setdefault((f.data, f.label), {})[(f.bits, f.dtype)] = f
    widths = " | ".join(f"{b}" for b in bits)
    lines = [
        f"| data | strategy | formula at 32 bits | file | file / formula at {widths} bits | formula at 1 bit | file "
        "| pruned positions, at least | post-training fp16 / int8 of the 32-bit file |",
        "|---|---|---|---|" + "---|" * len(bits) + "---|---|---|---|",
    ]
    for (data, label), by in rows.items():
        f32, f1 = by[(32, "fp32")], by.get((1, "fp32"))
        ratios = " | ".join(f"{by[(b, 'fp32')].ratio:.3f}" if (b, "fp32") in by else "-" for b in bits)
        one = f"{round(f1.formula):,} | {f1.file:,}" if f1 else "- | -"
        positions = f"{round(f32.positions):,}" if f32.positions else "-"
        lines.append(
            f"| {data} | {label} | {round(f32.formula):,} | {f32.file:,} | {ratios} | {one} | {positions} "
            f"| {by[(32, 'fp16')].file:,} / {by[(32, 'int8')].file:,} |"
        )
    return lines


def run_table(run_dirs: list[str]) -> list[str]:
    """Trained runs' adapter files against their formula, compressed (as written) and plain."""
    lines = [
        "| run | strategy | bits | formula | file | file / formula | plain streams | plain / formula |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in map(Path, run_dirs):
        path, metrics = run / ADAPTER_FILE, RunRecord.read(run)
        if not (path.is_file() and metrics):
            continue
        with safe_open(str(path), framework="np") as f:
            stored = sum(f.get_tensor(k).nbytes for k in f.keys())
        plain = path.stat().st_size - stored + sum(a.nbytes for a in read_adapter_file(path)[0].values())
        formula, file = metrics.introduced_bits / 8, path.stat().st_size
        adapter, reduction = metrics.config["adapter"], metrics.config.get("reduction") or {}
        strategy = adapter["name"] + (f", {reduction['name']} {reduction['rate']}" if "rate" in reduction else "")
        lines.append(
            f"| {run} | {strategy} | {adapter.get('bits', 32)} | {round(formula):,} | {file:,} "
            f"| {file / formula:.3f} | {plain:,} | {plain / formula:.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnn_adapt.thesis.sizes", description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write every measured file as JSON records here")
    parser.add_argument("--runs", nargs="+", help="measure these trained runs' adapter files instead")
    args = parser.parse_args(argv)
    if args.runs:
        table = run_table(args.runs)
        print("\n".join(table) if len(table) > 2 else f"no run with {ADAPTER_FILE} and metrics.json in {args.runs}")
        return 0 if len(table) > 2 else 2
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bases = base_records(Path(tmp))
        files = adapter_files(Path(tmp))
    print("\n".join(base_table(bases)))
    print()
    print("\n".join(adapter_table(files)))
    over = [f for f in files if f.dtype == "fp32" and f.ratio > ADAPTER_TARGET]
    print(
        f"\nadapter files above {ADAPTER_TARGET} x the formula: {len(over)} of {sum(f.dtype == 'fp32' for f in files)}"
    )
    for f in over:
        why = (
            f"; with the positions of its kept weights ({round(f.positions):,} bytes at least) "
            f"{f.ratio_with_positions:.3f}"
            if f.positions
            else ""
        )
        print(
            f"  {f.data}, {f.label}, {f.bits} bits: {f.file:,} bytes, formula {round(f.formula):,} ({f.ratio:.3f}){why}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"bases": bases, "adapters": [vars(f) for f in files]}, indent=1))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
