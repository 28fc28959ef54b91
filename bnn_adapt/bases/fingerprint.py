"""A base's identity in bits: what a packed file stores of it, and the fingerprint adapters check.

A binary layer's forward only reads ``sign(W)`` (BinaryNet) or
``mean|W| * sign(W)`` per output channel (ReActNet), so a base is its weights'
signs, ReActNet's per-channel scales and its other (fp32) tensors, each
BatchNorm folded into one scale and one shift per channel
(:mod:`bnn_adapt.nn.folding`: bit-identical outputs). A BatchNorm whose output
only ever reaches a sign function (``sign_only_norms`` of the base: the STE
net's pre-classifier BN, read only by its binary classifiers) becomes an
exact per-channel threshold, ``direction * (x - t) >= 0``. The fingerprint
hashes everything that decides a base's outputs: its architecture (name and
constructor arguments: block type, width, classes), the signs and every
folded fp32 value. An adapter file records it and refuses to attach to any
other base; a packed file whose header or values were edited no longer
matches its own.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from torch import nn

from bnn_adapt.nn.folding import BatchNorm, fold_batch_norm, is_folded, load_folded, sign_threshold
from bnn_adapt.nn.layers import STE, BinaryModule, PackedScaledBinaryConv2d, ScaledBinaryConv2d
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


def folded_norm(model: nn.Module, name: str, bn: BatchNorm) -> tuple[str, torch.Tensor, torch.Tensor]:
    """``(kind, weight, bias)`` of ``bn`` as a packed base stores it (running mean 0, variance 1, ``FOLDED_EPS``):
    kind ``bn``, its folded scale and shift; kind ``threshold`` (a sign-only norm), direction +-1 and
    ``-direction * threshold``."""
    scale, shift = fold_batch_norm(bn)
    if name not in getattr(model, "sign_only_norms", ()):
        return "bn", scale, shift
    direction, threshold = sign_threshold(scale, shift)
    return "threshold", direction, -direction * threshold


def canonical_tensors(model: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """``(name, kind, tensor)`` for everything a packed file stores, in state-dict order.

    kind ``bits``: a binary weight, as ``W >= 0`` (the sign, BinaryNet's sign(0) = +1);
    kind ``fp32``: any other floating tensor, and the sign(W) of a binarizer that keeps zeros
    (``base.binarize=thesis_code``: -1/0/+1, which a packed base refuses). ReActNet binary convs add their
    ``<conv>.scale``. A BatchNorm is its folded ``weight`` and ``bias``
    (:func:`folded_norm`); its running statistics and integer buffers (BN's
    ``num_batches_tracked``) are left out: an eval-mode forward of the folded
    norm never reads them.
    """
    signs = sign_weight_names(model)
    modules = dict(model.named_modules())
    norms = {n: m for n, m in modules.items() if isinstance(m, BatchNorm)}
    out = []
    for key, value in model.state_dict().items():
        owner, _, attr = key.rpartition(".")
        if not value.is_floating_point() or (owner in norms and attr in ("running_mean", "running_var", "bias")):
            continue
        value = value.detach().cpu()
        if owner in norms:  # its weight: the folded pair
            _, weight, bias = folded_norm(model, owner, norms[owner])
            out += [(key, "fp32", weight), (f"{owner}.bias", "fp32", bias)]
        elif key in signs and getattr(modules[owner], "binarizer", STE).ternary:
            out.append((key, "fp32", torch.sign(value).float()))
        elif key in signs:
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


def fingerprint_of(arch: str, arch_config: dict, tensors: list[tuple[str, str, torch.Tensor]]) -> str:
    """Hash of an architecture and its canonical tensors (:func:`canonical_tensors`): names, kinds, shapes
    and values (signs packed one bit each, fp32 values as little-endian bytes)."""
    config = {
        k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        for k, v in sorted(arch_config.items())
    }
    layout = [[name, kind, list(t.shape)] for name, kind, t in tensors]
    digest = hashlib.sha256(json.dumps([arch, config, layout], sort_keys=True).encode())
    digest.update(pack_sign_bits([t for _, kind, t in tensors if kind == "bits"]))
    for _, kind, t in tensors:
        if kind != "bits":
            digest.update(t.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()[:16]


def fingerprint(model: nn.Module) -> str:
    """The identity adapters check: :func:`fingerprint_of` the base's architecture and canonical tensors."""
    return fingerprint_of(model.arch, model.arch_config(), canonical_tensors(model))


def norms_folded(model: nn.Module) -> bool:
    """Whether every BatchNorm of ``model`` is folded (as a packed base rebuilds it)."""
    return all(is_folded(m) for m in model.modules() if isinstance(m, BatchNorm))


@torch.no_grad()
def fold_norms(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm of ``model`` in place, as a packed base stores it: outputs stay identical
    (a sign-only norm's real outputs change, their signs do not)."""
    for name, m in model.named_modules():
        if isinstance(m, BatchNorm):
            _, weight, bias = folded_norm(model, name, m)
            load_folded(m, weight, bias)
    return model
