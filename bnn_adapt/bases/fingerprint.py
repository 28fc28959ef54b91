"""A base's identity in bits: what a packed file stores of it, and the fingerprint adapters check.

A binary layer's forward only reads ``sign(W)`` (BinaryNet) or
``mean|W| * sign(W)`` per output channel (ReActNet), so a base is its weights'
signs, ReActNet's per-channel scales and its other (fp32) tensors. The
fingerprint hashes the signs: an adapter file records it and refuses to attach
to any other base.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from bnn_adapt.nn.layers import BinaryModule, PackedScaledBinaryConv2d, ScaledBinaryConv2d
from bnn_adapt.nn.quantizers import ScaledSignSTE


def binary_scale(module: ScaledBinaryConv2d) -> torch.Tensor:
    """The per-output-channel scale ReActNet's forward multiplies ``sign(W)`` by."""
    if isinstance(module, PackedScaledBinaryConv2d):
        return module.scale.detach().clone()
    with torch.no_grad():
        effective = ScaledSignSTE.apply(module.weight.detach())  # scale * (+-1): |.| is the scale exactly
    return effective.abs().flatten(1).amax(dim=1)


def sign_weight_names(model: nn.Module) -> set[str]:
    """State-dict names of weights whose forward reads only their sign."""
    return {
        f"{name}.weight" if name else "weight"
        for name, m in model.named_modules()
        if isinstance(m, BinaryModule) and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


def canonical_tensors(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """``(name, kind, tensor)`` for everything a packed file stores, in state-dict order.

    kind ``bits``: a binary weight, as ``W >= 0`` (the sign, BinaryNet's sign(0) = +1);
    kind ``fp32``: any other floating tensor. ReActNet binary convs add their
    ``<conv>.scale``. Integer buffers (BN's ``num_batches_tracked``) are left
    out: an eval-mode forward never reads them.
    """
    signs = sign_weight_names(model)
    modules = dict(model.named_modules())
    out = []
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        value = value.detach().cpu()
        if key in signs:
            out.append((key, "bits", value >= 0))
            owner = modules[key.rpartition(".")[0]]
            if isinstance(owner, ScaledBinaryConv2d) and not isinstance(owner, PackedScaledBinaryConv2d):
                out.append((key.rpartition(".")[0] + ".scale", "fp32", binary_scale(owner)))
        else:
            out.append((key, "fp32", value.float()))
    return out


def pack_sign_bits(bits: list[torch.Tensor]) -> bytes:
    flat = np.concatenate([b.reshape(-1).numpy().astype(bool) for b in bits]) if bits else np.zeros(0, bool)
    return np.packbits(flat, bitorder="little").tobytes()


def fingerprint_bytes(binary_section: bytes) -> str:
    return hashlib.sha256(binary_section).hexdigest()[:16]


def fingerprint(model: nn.Module) -> str:
    """Hash of the packed binary weights: the identity adapters check."""
    return fingerprint_bytes(pack_sign_bits([t for _, kind, t in canonical_tensors(model) if kind == "bits"]))
