"""What each tensor of an adapter file is: its records in the order of the rebuilt model's state dicts.

The writer and the reader of :mod:`bnn_adapt.adapters.file_records` walk the same list
(:func:`slots`) and derive the same default codec for each record
(:func:`default_codec`), so a file lists only the encodings that differ; a hash
of the list (:func:`layout_hash`) makes a file load only into the model it was
written from.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from bnn_adapt.bases.fingerprint import sign_weight_names
from bnn_adapt.errors import ExportError
from bnn_adapt.nn.folding import BatchNorm
from bnn_adapt.nn.layers import weight_bits


def parts(model: nn.Module) -> list[tuple[str, nn.Module, dict]]:
    """``(prefix, module, BN pairs)`` of what a file holds: the adapter (with the strategy's copies of base BN
    pairs, its ``norm_pairs``) and the head."""
    adapter = [("adapter.", model.adapter, model.norm_pairs())] if model.adapter is not None else []
    return [*adapter, ("head.", model.head, {})]


def slots(part: nn.Module, pairs: dict) -> list[tuple[str, str, object]]:
    """``(state-dict key, kind, detail)`` in state-dict order: the records a file holds for ``part``.

    kinds: ``norm`` (a BatchNorm, at its weight's key: scale then shift; detail: the module's name),
    ``pair`` (a copy of a base BN pair, from ``pairs``: detail ``(bias key, the base's BN)``), ``quantized``
    (a weight below 32 bits: detail its bits), ``sign`` (a binary weight), ``mask`` (a bool buffer),
    ``value`` (any other floating tensor). Integer buffers and what a pair or norm covers are skipped.
    """
    modules = dict(part.named_modules())
    norms = {n for n, m in modules.items() if isinstance(m, BatchNorm)}
    covered = {bias for bias, _ in pairs.values()}
    signs = sign_weight_names(part)
    out = []
    for key, value in part.state_dict().items():
        owner, _, attr = key.rpartition(".")
        if owner in norms:
            if attr == "weight":
                out.append((key, "norm", owner))
        elif key in covered or not (value.is_floating_point() or value.dtype == torch.bool):
            continue
        elif key in pairs:
            out.append((key, "pair", pairs[key]))
        elif key in signs:
            out.append((key, "sign", None))
        elif attr == "weight" and weight_bits(modules[owner]):
            out.append((key, "quantized", weight_bits(modules[owner])))
        else:
            out.append((key, "mask" if value.dtype == torch.bool else "value", None))
    return out


def default_codec(kind: str, dtype: str, ndim: int, detail=None) -> str:
    """The codec a record has unless its file says otherwise (writer and reader alike)."""
    if kind == "quantized":
        return f"q{detail}"
    if kind in ("sign", "mask"):
        return "sign" if kind == "sign" else "bits"
    if dtype == "fp32":
        return "f32"
    return "i8" if dtype == "int8" and ndim >= 2 and kind == "value" else "f16"


def layout(model: nn.Module) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, kind, shape)`` of each slot of the adapter and the head, in the order a file holds them."""
    items = []
    for prefix, part, pairs in parts(model):
        state = part.state_dict()
        items += [(prefix + key, kind, tuple(state[key].shape)) for key, kind, _ in slots(part, pairs)]
    return items


def layout_hash(model: nn.Module) -> str:
    """Hash of the records' order, kinds and shapes: a file only loads into the model it was written from."""
    items = [[name, kind, list(shape)] for name, kind, shape in layout(model)]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:12]


def load_part(module: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ExportError(
            f"the {what} in the file does not fit its strategy (missing {missing[:3]}, extra {unexpected[:3]})"
        )
