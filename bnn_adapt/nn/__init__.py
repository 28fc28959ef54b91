"""Binary building blocks: quantizers (:mod:`.quantizers`) and the layers using them (:mod:`.layers`)."""

from bnn_adapt.nn.layers import (
    ApproxSignActivation,
    BinaryColumnPrunedLinear,
    BinaryConv2d,
    BinaryLinear,
    BinaryModule,
    ChannelsLastMaxPool2d,
    ColumnPrunedLinear,
    LearnableBias,
    PackedScaledBinaryConv2d,
    ScaledBinaryConv2d,
    clamp_latent_weights,
    clamp_to_unit_,
    frozen_binary_weight,
    latent_weights,
)
from bnn_adapt.nn.quantizers import ApproxSign, ScaledSignSTE, SignSTE, approx_sign, binarize, scaled_sign, sign

__all__ = [
    "ApproxSign",
    "ApproxSignActivation",
    "BinaryColumnPrunedLinear",
    "BinaryConv2d",
    "BinaryLinear",
    "BinaryModule",
    "ChannelsLastMaxPool2d",
    "ColumnPrunedLinear",
    "LearnableBias",
    "PackedScaledBinaryConv2d",
    "ScaledBinaryConv2d",
    "ScaledSignSTE",
    "SignSTE",
    "approx_sign",
    "binarize",
    "clamp_latent_weights",
    "clamp_to_unit_",
    "frozen_binary_weight",
    "latent_weights",
    "scaled_sign",
    "sign",
]
