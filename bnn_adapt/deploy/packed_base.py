"""The deployable base: every binary weight as one bit, every BatchNorm folded, everything else fp32.

The size metric (SPEC 4) charges a base ``n_bin / 8 + 4 * n_fp32`` bytes; this
file format makes that real. Layout (little-endian)::

    8 bytes   magic b"BNNPACK2"
    4 bytes   header length n (uint32)
    n bytes   zlib-compressed JSON header: arch, arch_config, fingerprint, tensor layout
    ...       binary section: the sign bits of every binary weight (1 = +1),
              concatenated in layout order, np.packbits(bitorder="little")
    ...       fp32 section: every other floating tensor, in layout order

A binary layer's forward only reads ``sign(W)`` (BinaryNet) or
``mean|W| * sign(W)`` per output channel (ReActNet), so one bit per weight
(plus, for ReActNet, the per-channel scale as fp32) rebuilds a model whose
outputs are identical to the trained one. Each BatchNorm is stored folded
(:mod:`bnn_adapt.nn.folding`): one scale and one shift per channel, exactly
what the formula charges for its affine parameters, rebuilt as running mean
0, variance 1, ``FOLDED_EPS`` with bit-identical outputs; a norm whose output only
reaches a sign function (``sign_only_norms``) is one threshold per channel
(its directions in the header). Files written before (``BNNPACK1``: plain JSON
header, the four BN tensors) still load.

The fingerprint is a hash of the binary section: adapters record it and
refuse to attach to any other base (:mod:`bnn_adapt.adapters.file`).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnn_adapt.bases import BASES, BaseNetwork, rebuild
from bnn_adapt.bases.fingerprint import binary_scale, canonical_tensors, fingerprint_of, pack_sign_bits
from bnn_adapt.errors import ExportError
from bnn_adapt.files import atomic_output
from bnn_adapt.nn.folding import BatchNorm, mark_folded
from bnn_adapt.nn.layers import PackedScaledBinaryConv2d, ScaledBinaryConv2d

MAGIC = b"BNNPACK2"
MAGIC_V1 = b"BNNPACK1"  # plain JSON header, BatchNorms as their four tensors (layout kind "bn")
FORMAT = "bnn_adapt.packed_base"
VERSION = 2
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


def _layout(tensors: list[tuple[str, str, torch.Tensor]], model: nn.Module) -> tuple[list[list], list[torch.Tensor]]:
    """``[name, kind, shape]`` entries and the fp32 values in their order: a folded BatchNorm's pair is one
    ``bnfold`` entry (scale, then shift), a sign-only norm's one ``threshold`` entry (its thresholds; the
    directions, +-1 per channel, as a string of ``+`` and ``-`` in the entry)."""
    norms = {n for n, m in model.named_modules() if isinstance(m, BatchNorm)}
    sign_only = set(getattr(model, "sign_only_norms", ()))
    layout, values, i = [], [], 0
    while i < len(tensors):
        name, kind, t = tensors[i]
        owner = name.rpartition(".")[0]
        if owner in norms and name == f"{owner}.weight":
            bias = tensors[i + 1][2]
            if owner in sign_only:  # weight = direction, bias = -direction * threshold
                layout.append([owner, "threshold", list(t.shape), "".join("+" if d > 0 else "-" for d in t.tolist())])
                values.append(-t * bias)
            else:
                layout.append([owner, "bnfold", list(t.shape)])
                values += [t, bias]
            i += 2
            continue
        layout.append([name, kind, list(t.shape)])
        if kind == "fp32":
            values.append(t)
        i += 1
    return layout, values


def pack_base(base: BaseNetwork, meta: dict | None = None) -> tuple[bytes, dict]:
    """The packed file's bytes and its header."""
    tensors = canonical_tensors(base)
    binary = pack_sign_bits([t for _, kind, t in tensors if kind == "bits"])
    layout, fp32 = _layout(tensors, base)
    values = torch.cat([t.reshape(-1) for t in fp32]).numpy().astype("<f4") if fp32 else np.zeros(0, "<f4")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "arch": base.arch,
        "arch_config": base.arch_config(),
        "fingerprint": fingerprint_of(base.arch, base.arch_config(), tensors),
        "binary_bits": int(sum(t.numel() for _, kind, t in tensors if kind == "bits")),
        "fp32_values": int(values.size),
        "layout": layout,
        "meta": meta or {},
    }
    head = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return MAGIC + struct.pack("<I", len(head)) + head + binary + values.tobytes(), header


def write_packed_base(base: BaseNetwork, path: str | Path, meta: dict | None = None) -> dict:
    """Write ``base`` bit-packed to ``path``; returns the header."""
    data, header = pack_base(base, meta)
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return header


def _read_header(data: bytes, problem: str) -> tuple[dict, int]:
    """The header and where the binary section starts."""
    magic = data[: len(MAGIC)]
    if magic not in (MAGIC, MAGIC_V1) or len(data) < len(MAGIC) + 4:
        raise ExportError(f"{problem} (no {MAGIC!r} magic)")
    (n,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        raw = data[start : start + n]
        header = json.loads(zlib.decompress(raw) if magic == MAGIC else raw)
    except (ValueError, zlib.error) as exc:
        raise ExportError(f"{problem} (unreadable header: {exc})") from None
    if header.get("format") != FORMAT or header.get("arch") not in BASES:
        raise ExportError(f"{problem} (format {header.get('format')!r}, arch {header.get('arch')!r})")
    return header, start + n


def parse_packed(data: bytes, source: str = "<bytes>") -> tuple[dict, bytes, torch.Tensor]:
    """A packed file's checked parts: header, binary section (sign bits) and fp32 values."""
    problem = f"{source} is not a packed base written by task=export"
    header, bin_start = _read_header(data, problem)
    n_bits, n_values = header["binary_bits"], header["fp32_values"]
    bin_end = bin_start + (n_bits + 7) // 8
    if len(data) != bin_end + 4 * n_values:
        raise ExportError(f"{problem} (truncated: {len(data)} bytes, expected {bin_end + 4 * n_values})")
    binary = data[bin_start:bin_end]
    values = torch.from_numpy(np.frombuffer(data, "<f4", count=n_values, offset=bin_end).copy())
    return header, binary, values


def decode_layout(header: dict, values: torch.Tensor) -> tuple[dict, list[tuple[str, list[int], int]], list[str]]:
    """The file's layout decoded: ``(float state, [(weight name, shape, first bit)], folded norms)``.

    Float state holds every fp32 tensor, BatchNorms rebuilt from their folded scale and shift (or
    threshold) as running mean 0, variance 1; the folded norms need ``FOLDED_EPS`` (:func:`~bnn_adapt.nn.folding.mark_folded`) to compute the same."""
    state, binary, folded, b, v = {}, [], [], 0, 0
    for entry in header["layout"]:
        name, kind, shape = entry[:3]
        count = int(np.prod(shape)) if shape else 1
        if kind == "bits":
            binary.append((name, shape, b))
            b += count
            continue
        n_tensors = {"bn": 4, "bnfold": 2, "threshold": 1}.get(kind, 1)
        found = values[v : v + n_tensors * count].reshape(n_tensors, *shape)
        v += n_tensors * count
        if kind == "fp32":
            state[name] = found[0]
        elif kind == "bn":  # BNNPACK1
            state.update({f"{name}.{t}": found[k] for k, t in enumerate(BN_TENSORS)})
        else:
            if kind == "threshold":
                direction = torch.tensor([1.0 if c == "+" else -1.0 for c in entry[3]])
                found = torch.stack([direction, -direction * found[0]])
            state.update({f"{name}.weight": found[0], f"{name}.bias": found[1], f"{name}.running_mean":
                          torch.zeros(shape), f"{name}.running_var": torch.ones(shape)})  # fmt: skip
            folded.append(name)
    return state, binary, folded


def unpack_base(data: bytes, source: str = "<bytes>") -> tuple[BaseNetwork, dict]:
    """Rebuild the base (in eval mode, packed modules, BatchNorms folded) from a packed file's bytes."""
    problem = f"{source} is not a packed base written by task=export"
    header, binary, values = parse_packed(data, source)
    bits = np.unpackbits(np.frombuffer(binary, np.uint8), count=header["binary_bits"], bitorder="little")
    bits = torch.from_numpy(bits.astype(bool))
    base = to_packed_modules(rebuild(header["arch"], header["arch_config"]))
    state, binary_entries, folded = decode_layout(header, values)
    for name, shape, first in binary_entries:
        count = int(np.prod(shape)) if shape else 1
        state[name] = torch.where(bits[first : first + count], 1.0, -1.0).reshape(shape)
    for name in folded:
        mark_folded(base.get_submodule(name))
    expected = {k for k, t in base.state_dict().items() if t.is_floating_point()}
    if set(state) != expected:
        wrong = sorted(set(state) ^ expected)[:5]
        raise ExportError(f"{problem}: its layout does not fit a {header['arch']} {header['arch_config']} ({wrong})")
    missing, unexpected = base.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)
    base.eval()
    if fingerprint_of(header["arch"], header["arch_config"], canonical_tensors(base)) != header["fingerprint"]:
        raise ExportError(f"{problem}: its architecture or weights do not match its fingerprint (the file is corrupt "
                          "or was edited)")  # fmt: skip
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
