"""Operation counts in the manner of Larq's ``models.summary``: multiply-accumulates (MACs)
for one image, split into binary and fp32 ones.

A binary MAC multiplies a +-1 input by a +-1 weight, which a deployed BNN does
with XNOR and popcount, 64 or more at a time; an fp32 MAC is a real multiply-add.
The counts come from one forward pass of a single zero image at the configured
size through the model in eval mode (forward hooks read each layer's output
shape), so they follow the model's real data path: layers the model skips (the
base's classifier under a new head) count nothing, LoRA branches count where they
run.

What counts, per image:

* convolution: ``H_out * W_out * weights`` (``weights = c_out * c_in / groups * k * k``);
  binary when both its input and its weights are binarised (a ``BinaryModule``
  whose ``binary_input`` holds: BinaryNet's binary convs, ReActNet's scaled binary
  conv after its sign), fp32 otherwise -- the STE net's stem has binary weights
  but reads the real image, so it is fp32 here;
* linear layer: ``in_features * out_features`` (binary for a binary linear);
* batch norm: one MAC per output value (scale and shift), fp32;
* pruned weights (the prune targets of a pruned adapter, a column-pruned head) do
  no work: only non-zero / kept weights count.

Not counted: activations, poolings, additions, learnable biases, ReActNet's
per-channel weight scale (foldable into the following BN) -- they are no MACs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from bnn_adapt.nn.layers import BinaryModule, ColumnPrunedLinear

PARTS = ("base", "adapter", "head")


@dataclass
class LayerMacs:
    name: str
    part: str  # "base", "adapter" or "head"
    type: str  # the layer's class
    kind: str  # "binary" or "fp32"
    macs: int


def _is_binary(module: nn.Module) -> bool:
    """Both operands are signs: the layer says so (:attr:`BinaryModule.binary_input`)."""
    return isinstance(module, BinaryModule) and module.binary_input


def _weights_that_work(module: nn.Module, pruned_ids: set[int]) -> int:
    """Weights doing one MAC per output position: all, the non-zeros of a pruned layer, the kept columns."""
    if isinstance(module, ColumnPrunedLinear):
        return module.live_params("weight")
    weight = module.weight
    return int(weight.count_nonzero()) if id(module) in pruned_ids else weight.numel()


def layer_macs(module: nn.Module, output: torch.Tensor, pruned_ids: set[int]) -> tuple[str, int] | None:
    """(kind, MACs) of one call of ``module`` producing ``output`` (batch of one), or None if it does none."""
    binary_weight = isinstance(module, BinaryModule) and module.weight.dim()
    if isinstance(module, nn.Conv2d) or binary_weight == 4:
        positions = output.shape[-2] * output.shape[-1]
        return ("binary" if _is_binary(module) else "fp32"), positions * _weights_that_work(module, pruned_ids)
    if isinstance(module, (nn.Linear, ColumnPrunedLinear)) or binary_weight == 2:
        rows = output.numel() // output.shape[-1]
        return ("binary" if _is_binary(module) else "fp32"), rows * _weights_that_work(module, pruned_ids)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "fp32", output.numel()
    return None


def _parts(model: nn.Module) -> dict[int, str]:
    """Module id -> the part it belongs to: adapter, head, or (everything else) base."""
    part_of = {}
    if hasattr(model, "introduced_modules"):
        for part, modules in model.introduced_modules().items():
            for top in modules:
                part_of.update({id(m): part for m in top.modules()})
    return part_of


@torch.no_grad()
def mac_rows(model: nn.Module, image_size: int, pruned: Iterable[nn.Module] = (), channels: int = 3) -> list[LayerMacs]:
    """One row per layer that does MACs, for one ``channels x image_size x image_size`` image.

    Runs one forward pass in eval mode and restores every module's mode after.
    """
    pruned_ids, part_of = {id(m) for m in pruned}, _parts(model)
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[int, LayerMacs] = {}

    def hook(module, args, output):
        counted = layer_macs(module, output, pruned_ids)
        if counted is None:
            return
        kind, macs = counted
        row = found.get(id(module))
        if row is None:
            found[id(module)] = LayerMacs(
                names[id(module)], part_of.get(id(module), "base"), type(module).__name__, kind, macs
            )
        else:  # a layer called twice counts twice
            row.macs += macs

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        model.eval()
        model(torch.zeros(1, channels, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return list(found.values())  # in the order the forward pass ran them


def mac_totals(rows: list[LayerMacs], adapted: bool = True) -> dict:
    """``macs_binary``, ``macs_fp32``, ``binary_mac_share`` (of all MACs) and, for an adapted
    model, ``adapter_macs`` and ``head_macs`` (what its adapter and its new head compute)."""
    binary = sum(r.macs for r in rows if r.kind == "binary")
    fp32 = sum(r.macs for r in rows if r.kind == "fp32")
    share = binary / (binary + fp32) if binary + fp32 else 0.0
    totals = {"macs_binary": binary, "macs_fp32": fp32, "binary_mac_share": share}
    if adapted:
        totals["adapter_macs"] = sum(r.macs for r in rows if r.part == "adapter")
        totals["head_macs"] = sum(r.macs for r in rows if r.part == "head")
    return totals


def operation_counts(model: nn.Module, image_size: int, pruned: Iterable[nn.Module] = ()) -> dict:
    """What ``summary.json`` and ``metrics.json`` report: the totals, and per layer under ``macs_per_layer``."""
    rows = mac_rows(model, image_size, pruned)
    return {
        **mac_totals(rows, adapted=hasattr(model, "introduced_modules")),
        "mac_image_size": image_size,
        "macs_per_layer": [asdict(r) for r in rows],
    }


def human(count: float) -> str:
    """1234567 -> '1.23 M' (as Lightning's summary writes counts)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f}"


def totals_line(counts: dict) -> str:
    """One line: binary and fp32 MACs per image, the binary share, what the adapter and head add."""
    size = counts.get("mac_image_size")
    line = (
        f"MACs per {size}x{size} image: {human(counts['macs_binary'])} binary + {human(counts['macs_fp32'])} fp32 "
        f"({100 * counts['binary_mac_share']:.1f}% binary)"
    )
    if "adapter_macs" in counts:
        line += f"; the adapter adds {human(counts['adapter_macs'])}, the new head {human(counts['head_macs'])}"
    return line


def mac_table(counts: dict) -> str:
    """Per-layer MACs (every layer that does any), then the totals line."""
    header = f"{'layer':<48} {'part':<8} {'type':<22} {'kind':<7} {'MACs':>14}"
    lines = [header, "-" * len(header)]
    for r in counts["macs_per_layer"]:
        lines.append(f"{r['name']:<48} {r['part']:<8} {r['type']:<22} {r['kind']:<7} {r['macs']:>14,}")
    lines += ["-" * len(header), totals_line(counts)]
    return "\n".join(lines)
