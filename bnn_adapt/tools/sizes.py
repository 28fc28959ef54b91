"""Bytes on disk at the thesis configurations: ``python -m bnn_adapt.tools.sizes`` (``make sizes``).

Builds every base and adapter strategy from the real experiment configs (full
width, random weights: sizes do not depend on the values; pruned rows are
pruned at their configured rates), exports them with :mod:`bnn_adapt.deploy.export`
into a temporary folder and prints Markdown tables: the fp32 state dict next to
the bit-packed base, and each adapter file (fp32 / fp16 / int8) next to the
size formula ``n_bin / 8 + 4 * n_fp32`` (SPEC 4).
"""

from __future__ import annotations

import copy
import io
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from bnn_adapt import accounting
from bnn_adapt.adapters.file import export_adapter
from bnn_adapt.deploy.export import formula_bytes
from bnn_adapt.deploy.packed_base import write_packed_base
from bnn_adapt.run import builders
from bnn_adapt.run.config import compose

BASES = [
    ("STE ResNet, CIFAR-10 5-5 base (5 classes)", ["+experiment=cifar5_5_head_only"]),
    ("STE ResNet, CIFAR-100 80-20 base (80 classes)", ["+experiment=cifar80_20_head_only"]),
    ("ReActNet-18, ImageNet (1000 classes)", ["+experiment=flowers102_head_only"]),
]
C100 = ["+experiment=cifar80_20_udta"]
FLOWERS = ["+experiment=flowers102_udta"]
ADAPTERS = [
    ("CIFAR-10 5-5", "head only", ["+experiment=cifar5_5_head_only"]),
    ("CIFAR-10 5-5", "full finetune", ["+experiment=cifar5_5_finetune"]),
    ("CIFAR-10 5-5", "serial, stages 1-3, g=1", ["+experiment=cifar5_5_serial"]),
    ("CIFAR-10 5-5", "serial, stages 1-3, g=20",
     ["+experiment=cifar5_5_serial", "adapter.groups=20"]),
    ("CIFAR-100 80-20", "udta concat", C100),
    ("CIFAR-100 80-20", "udta concat, g=channels", [*C100, "adapter.groups=channels"]),
    ("CIFAR-100 80-20", "udta concat, prune 0.9", [*C100, "reduction=prune", "reduction.rate=0.9"]),
    ("CIFAR-100 80-20", "udta concat, prune 0.99", [*C100, "reduction=prune", "reduction.rate=0.99"]),
    ("CIFAR-100 80-20", "udta concat, prune_iterative 0.9 + head 0.5",
     [*C100, "reduction=prune_iterative", "reduction.rate=0.9", "reduction.head_rate=0.5"]),
    ("CIFAR-100 80-20", "lora, rank 4, all stages", [*C100, "adapter=lora"]),
    ("CIFAR-100 80-20", "bitfit", [*C100, "adapter=bitfit"]),
    ("Flowers-102 (ReActNet)", "head only", ["+experiment=flowers102_head_only"]),
    ("Flowers-102 (ReActNet)", "full finetune", ["+experiment=flowers102_finetune"]),
    ("Flowers-102 (ReActNet)", "udta concat", FLOWERS),
    ("Flowers-102 (ReActNet)", "udta adapter head, prune 0.9",
     [*FLOWERS, "adapter.head=adapter", "reduction=prune", "reduction.rate=0.9"]),
    ("Flowers-102 (ReActNet)", "lora, rank 4, all stages", [*FLOWERS, "adapter=lora"]),
    ("Flowers-102 (ReActNet)", "bitfit", [*FLOWERS, "adapter=bitfit"]),
]  # fmt: skip


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


def base_rows(tmp: Path) -> list[str]:
    lines = [
        "| base | binary params | fp32 params | fp32 state dict (torch.save) | packed base | formula "
        "| packed / formula |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (label, overrides) in enumerate(BASES):
        base = builders.build_base(compose(overrides, output_dir=tmp / "cfg"))
        like_trained(base, i)
        fp32, binary = accounting.totals(accounting.parameter_rows(base))
        buffer = io.BytesIO()
        torch.save(base.state_dict(), buffer)
        path = tmp / f"base{i}.bnnpack"
        write_packed_base(base, path)
        packed, formula = path.stat().st_size, formula_bytes(fp32, binary)
        lines.append(
            f"| {label} | {binary:,} | {fp32:,} | {len(buffer.getvalue()):,} | {packed:,} | {round(formula):,} "
            f"| {packed / formula:.3f} |"
        )
    return lines


def adapter_rows(tmp: Path) -> list[str]:
    lines = [
        "| data | strategy | fp32 / binary params introduced | formula | fp32 file | fp32 / formula | fp16 file "
        "| int8 file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    bases: dict[tuple, nn.Module] = {}
    for i, (data, label, overrides) in enumerate(ADAPTERS):
        cfg = compose(overrides, output_dir=tmp / "cfg")
        key = (cfg.base.name, str(cfg.base.net.num_classes))
        if key not in bases:
            bases[key] = builders.build_base(cfg)
            like_trained(bases[key], 100 + len(bases))
        reference = bases[key]
        base = copy.deepcopy(reference) if cfg.adapter.name == "full_finetune" else reference
        model = builders.build_adapted(cfg, base, builders.target_num_classes(cfg))
        for part in [model.adapter, model.head] + ([base] if base is not reference else []):
            if part is not None:
                like_trained(part, i)
        plan = builders.pruning_plan(cfg)
        if plan is not None:
            plan.apply(model)
        model.eval()
        s = accounting.summarize(model)
        fp32 = s["adapter_fp32_params"] + s["head_fp32_params"]
        binary = s["adapter_binary_params"] + s["head_binary_params"]
        sizes = {}
        for dtype in ("fp32", "fp16", "int8"):
            path = tmp / f"adapter{i}_{dtype}.safetensors"
            export_adapter(model, path, reference_base=reference, dtype=dtype)
            sizes[dtype] = path.stat().st_size
        formula = formula_bytes(fp32, binary)
        lines.append(
            f"| {data} | {label} | {fp32:,} / {binary:,} | {round(formula):,} | {sizes['fp32']:,} "
            f"| {sizes['fp32'] / formula:.3f} | {sizes['fp16']:,} | {sizes['int8']:,} |"
        )
    return lines


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(base_rows(Path(tmp))))
        print()
        print("\n".join(adapter_rows(Path(tmp))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
