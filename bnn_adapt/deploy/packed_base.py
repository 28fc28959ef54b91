"""The deployable base: every binary weight as one bit, everything else fp32.

The size metric (SPEC 4) charges a base ``n_bin / 8 + 4 * n_fp32`` bytes; this
file format makes that real. Layout (little-endian)::

    8 bytes   magic b"BNNPACK1"
    4 bytes   header length n (uint32)
    n bytes   JSON header: arch, arch_config, fingerprint, tensor layout
    ...       binary section: the sign bits of every binary weight (1 = +1),
              concatenated in layout order, np.packbits(bitorder="little")
    ...       fp32 section: every other floating tensor, in layout order

A binary layer's forward only reads ``sign(W)`` (BinaryNet) or
``mean|W| * sign(W)`` per output channel (ReActNet), so one bit per weight
(plus, for ReActNet, the per-channel scale as fp32) rebuilds a model whose
outputs are identical to the trained one. BN running statistics are stored
too: they are buffers, not parameters, so the size formula leaves them out;
they are most of the few-% gap between bytes on disk and the formula.

The fingerprint is a hash of the binary section: adapters record it and
refuse to attach to any other base (:mod:`bnn_adapt.adapter_file`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnn_adapt.bases import BASES, BaseNetwork, rebuild
from bnn_adapt.bases.fingerprint import binary_scale, canonical_tensors, fingerprint_bytes, pack_sign_bits
from bnn_adapt.errors import ExportError
from bnn_adapt.files import atomic_output
from bnn_adapt.nn.layers import PackedScaledBinaryConv2d, ScaledBinaryConv2d

MAGIC = b"BNNPACK1"
FORMAT = "bnn_adapt.packed_base"
VERSION = 1
BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def to_packed_modules(model: nn.Module) -> nn.Module:
    """Swap every ReActNet binary conv for its packed form (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ScaledBinaryConv2d) and not isinstance(module, PackedScaledBinaryConv2d):
            c_out, c_in, k, _ = module.weight.shape
            packed = PackedScaledBinaryConv2d(c_in, c_out, k, module.stride, module.padding)
            with torch.no_grad():
                packed.weight.copy_(module.weight)
                packed.scale.copy_(binary_scale(module))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, packed)
    return model


def _layout(tensors: list[tuple[str, str, torch.Tensor]], model: nn.Module) -> list[list]:
    """``[name, kind, shape]`` entries; a BatchNorm's four tensors collapse into one ``bn`` entry."""
    bn_modules = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    layout, i = [], 0
    while i < len(tensors):
        name, kind, t = tensors[i]
        owner = name.rpartition(".")[0]
        group = tensors[i : i + len(BN_TENSORS)]
        if (
            owner in bn_modules
            and [n for n, _, _ in group] == [f"{owner}.{s}" for s in BN_TENSORS]
            and all(k == "fp32" and g.shape == t.shape for _, k, g in group)
        ):
            layout.append([owner, "bn", list(t.shape)])
            i += len(BN_TENSORS)
        else:
            layout.append([name, kind, list(t.shape)])
            i += 1
    return layout


def pack_base(base: BaseNetwork, meta: dict | None = None) -> tuple[bytes, dict]:
    """The packed file's bytes and its header."""
    tensors = canonical_tensors(base)
    binary = pack_sign_bits([t for _, kind, t in tensors if kind == "bits"])
    fp32 = [t.reshape(-1) for _, kind, t in tensors if kind == "fp32"]
    values = torch.cat(fp32).numpy().astype("<f4") if fp32 else np.zeros(0, "<f4")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "arch": base.arch,
        "arch_config": base.arch_config(),
        "fingerprint": fingerprint_bytes(binary),
        "binary_bits": int(sum(t.numel() for _, kind, t in tensors if kind == "bits")),
        "fp32_values": int(values.size),
        "layout": _layout(tensors, base),
        "meta": meta or {},
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + binary + values.tobytes(), header


def write_packed_base(base: BaseNetwork, path: str | Path, meta: dict | None = None) -> dict:
    """Write ``base`` bit-packed to ``path``; returns the header."""
    data, header = pack_base(base, meta)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return header


def _expand(layout: list[list]) -> list[tuple[str, str, list[int]]]:
    out = []
    for name, kind, shape in layout:
        if kind == "bn":
            out += [(f"{name}.{s}", "fp32", shape) for s in BN_TENSORS]
        else:
            out.append((name, kind, shape))
    return out


def parse_packed(data: bytes, source: str = "<bytes>") -> tuple[dict, list[tuple], bytes, torch.Tensor]:
    """A packed file's checked parts: header, ``(name, kind, shape)`` per tensor, binary section, fp32 values."""
    problem = f"{source} is not a packed base written by task=export"
    if data[: len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + 4:
        raise ExportError(f"{problem} (no {MAGIC!r} magic)")
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(data[start : start + n])
    except ValueError as exc:
        raise ExportError(f"{problem} (unreadable header: {exc})") from None
    if header.get("format") != FORMAT or header.get("arch") not in BASES:
        raise ExportError(f"{problem} (format {header.get('format')!r}, arch {header.get('arch')!r})")
    entries = _expand(header["layout"])
    n_bits, n_values = header["binary_bits"], header["fp32_values"]
    bin_start = start + n
    bin_end = bin_start + (n_bits + 7) // 8
    if len(data) != bin_end + 4 * n_values:
        raise ExportError(f"{problem} (truncated: {len(data)} bytes, expected {bin_end + 4 * n_values})")
    binary = data[bin_start:bin_end]
    if fingerprint_bytes(binary) != header["fingerprint"]:
        raise ExportError(f"{problem}: its binary weights do not match its fingerprint (the file is corrupt)")
    values = torch.from_numpy(np.frombuffer(data, "<f4", count=n_values, offset=bin_end).copy())
    return header, entries, binary, values


def unpack_base(data: bytes, source: str = "<bytes>") -> tuple[BaseNetwork, dict]:
    """Rebuild the base (in eval mode, packed modules) from a packed file's bytes."""
    header, entries, binary, values = parse_packed(data, source)
    problem = f"{source} is not a packed base written by task=export"
    bits = np.unpackbits(np.frombuffer(binary, np.uint8), count=header["binary_bits"], bitorder="little")
    bits = torch.from_numpy(bits.astype(bool))
    base = to_packed_modules(rebuild(header["arch"], header["arch_config"]))
    state, b, v = {}, 0, 0
    for name, kind, shape in entries:
        count = int(np.prod(shape)) if shape else 1
        if kind == "bits":
            state[name] = torch.where(bits[b : b + count], 1.0, -1.0).reshape(shape)
            b += count
        else:
            state[name] = values[v : v + count].reshape(shape)
            v += count
    expected = {k for k, t in base.state_dict().items() if t.is_floating_point()}
    if set(state) != expected:
        wrong = sorted(set(state) ^ expected)[:5]
        raise ExportError(f"{problem}: its layout does not fit a {header['arch']} {header['arch_config']} ({wrong})")
    missing, unexpected = base.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    base.eval()
    return base, header


def read_packed_base(path: str | Path) -> tuple[BaseNetwork, dict]:
    """Load a packed base file: ``(base in eval mode, header)``."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"packed base {path} does not exist; write one with task=export base.checkpoint=...")
    return unpack_base(path.read_bytes(), str(path))


def repack(base: BaseNetwork) -> tuple[BaseNetwork, dict]:
    """``base`` as a packed file would rebuild it (in memory, no file)."""
    return unpack_base(pack_base(base)[0])
