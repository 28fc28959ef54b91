"""BitFit for BNNs (Ben Zaken et al. 2022), one of the thesis's future-work
adapters: train only the base's BN affine parameters, learnable
biases/thresholds and PReLU slopes, as a task-specific copy.

The copies live in the adapter and are swapped into the base only while the
adapted model runs (:func:`substituted`), so the base object itself never
changes and many BitFit adapters can share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bnn_adapt.adapters.strategy import AdaptedModel, substituted
from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.nn.layers import LearnableBias


def bitfit_parameter_names(base: nn.Module) -> list[str]:
    """BN gamma/beta, learnable biases and PReLU slopes of the base, its classifier excluded."""
    names = []
    for mod_name, m in base.named_modules():
        if mod_name == "classifier" or mod_name.startswith("classifier."):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            names += [f"{mod_name}.weight", f"{mod_name}.bias"]
        elif isinstance(m, LearnableBias):
            names.append(f"{mod_name}.bias")
        elif isinstance(m, nn.PReLU):
            names.append(f"{mod_name}.weight")
    return names


class BitFitAdapter(nn.Module):
    """Trainable copies of :func:`bitfit_parameter_names` of ``base``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.names = bitfit_parameter_names(base)
        params = dict(base.named_parameters())
        # ParameterDict keys may not contain '.': stages.0.0.bn1.weight is "stages/0/0/bn1/weight"
        self.tensors = nn.ParameterDict(
            {n.replace(".", "/"): nn.Parameter(params[n].detach().clone()) for n in self.names}
        )

    def overrides(self) -> dict[str, torch.Tensor]:
        return {n: self.tensors[n.replace(".", "/")] for n in self.names}


@dataclass
class BitFitOptions:
    """:class:`BitFit`'s options: the bits of the new head's weights (where it is fp32: ReActNet's)."""

    bits: int = 32


class BitFit(AdaptedModel):
    """Only the base's BN affine params, learnable biases and PReLU slopes train
    (as a task-specific copy in the adapter), plus the new head (thesis future work)."""

    strategy = "bitfit"
    options_class = BitFitOptions
    sign_sensitive = True

    def __init__(self, base: BaseNetwork, num_classes: int, freeze_bn: bool = True, bits: int = 32):
        super().__init__(base, num_classes, freeze_bn)
        self.adapter = BitFitAdapter(base)
        self.head = base.new_head(base.stage_channels[-1], num_classes)
        self.config = BitFitOptions(bits)
        self.train_at_bits(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with substituted(self.base, self.adapter.overrides()):
            features = self.base.pre_classifier(self.base.stage_outputs(x)[-1])
        return self.head(features)

    def norm_pairs(self) -> dict[str, tuple[str, nn.Module]]:
        """Every copied BN weight with its bias (stored folded with the base BN's running statistics)."""
        pairs = {}
        for name in self.adapter.names:
            owner, _, attr = name.rpartition(".")
            module = self.base.get_submodule(owner)
            if attr == "weight" and isinstance(module, nn.modules.batchnorm._BatchNorm):
                key = "tensors." + owner.replace(".", "/")
                pairs[f"{key}/weight"] = (f"{key}/bias", module)
        return pairs
