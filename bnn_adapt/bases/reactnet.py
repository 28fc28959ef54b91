"""ReActNet ResNet-18 for 224x224 ImageNet images (SPEC 1.2).

Liu et al., "ReActNet: Towards Precise Binary Neural Network with Generalized
Activation Functions", ECCV 2020, on the Bi-Real Net structure (Liu et al.
2018): every block holds one binary 3x3 conv and a real-valued shortcut.
Module names inside the stem and the blocks follow the authors' code
(github.com/liuzechun/ReActNet, ``resnet/``) so their released
``model_best.pth.tar`` loads through one small prefix table.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bnn_adapt.bases.base import BaseNetwork
from bnn_adapt.bases.ste_resnet import scaled
from bnn_adapt.binary import BinaryModule, frozen_binary_weight, sign
from bnn_adapt.errors import CheckpointError


class ApproxSign(torch.autograd.Function):
    """sign(x) forward; ReActNet/Bi-Real's piecewise-polynomial gradient backward.

    The gradient of the quadratic approximation of sign: 2 + 2x on [-1, 0),
    2 - 2x on [0, 1), 0 elsewhere; closer to sign than the STE's box.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * (2.0 - 2.0 * x.abs()).clamp_min(0.0)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    return ApproxSign.apply(x)


class ApproxSignActivation(nn.Module):
    """:func:`approx_sign` as a layer, so lean training (bnn_adapt.lean) can swap it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx_sign(x)


def scaled_sign(w: torch.Tensor) -> torch.Tensor:
    """mean|W| per output channel * sign(W): ReActNet's binary weights."""
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True) * sign(w)


class ScaledSignSTE(torch.autograd.Function):
    """mean|W| (per output channel) * sign(W) forward; gradient * 1{|W| <= 1} back.

    As the authors' ``HardBinaryConv`` in training: the scale is treated as a
    constant and the weight sees the gradient of clamp(W, -1, 1).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return scaled_sign(w)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return grad_output * (w.abs() <= 1).to(grad_output.dtype)


class ScaledBinaryConv2d(nn.Module, BinaryModule):
    """Bias-free conv whose weights are sign(W) * mean|W| per output channel.

    Its input is used as given: the block binarises it after a learnable bias.
    Latent weights are not clamped (ReActNet trains them unclamped).
    """

    binary_param_names = ("weight",)
    clamp_latent = False

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.stride = stride
        self.padding = padding
        # the authors' initialisation: small positive uniform values
        self.weight = nn.Parameter(torch.rand(c_out, c_in, kernel_size, kernel_size) * 1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = frozen_binary_weight(self, scaled_sign)
        weight = ScaledSignSTE.apply(self.weight) if weight is None else weight
        return F.conv2d(x, weight, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        c_out, c_in, k, _ = self.weight.shape
        return f"{c_in}, {c_out}, kernel_size={k}, stride={self.stride}, padding={self.padding}"


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that, when no gradient is needed on CPU, pools a channels-last copy.

    A frozen base spent 12 % of its forward pass in the stem's max pool: the
    NCHW CPU kernel (which also computes indices) took 60 ms for 16x64x112x112,
    the NHWC one 5 ms, 37 ms with both layout copies. A max is exact, so the
    output is identical; with autograd the NCHW kernel's backward is faster,
    so training takes the usual path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or self.return_indices or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class LearnableBias(nn.Module):
    """Per-channel shift (ReActNet's RSign/RPReLU thresholds), shape (1, C, 1, 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ReActBlock(nn.Module):
    """move0 -> sign -> binary conv3x3 -> BN -> (+ shortcut) -> move1 -> PReLU -> move2."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.move0 = LearnableBias(c_in)
        self.binarize = ApproxSignActivation()
        self.binary_conv = ScaledBinaryConv2d(c_in, c_out, stride=stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.move1 = LearnableBias(c_out)
        self.prelu = nn.PReLU(c_out)
        self.move2 = LearnableBias(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            # indices 0/1/2 match the authors' keys downsample.1.*, downsample.2.*
            self.downsample = nn.Sequential(
                nn.AvgPool2d(kernel_size=2, stride=stride),
                nn.Conv2d(c_in, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.binary_conv(self.binarize(self.move0(x))))
        return self.move2(self.prelu(self.move1(out + residual)))


class ReActNet18(BaseNetwork):
    """Stem (7x7/2 conv, BN, 3x3/2 maxpool), 4 stages of 4 blocks, fp32 linear head.

    Stages have 64/128/256/512 channels (x ``width``) at 56/28/14/7 pixels.
    """

    arch = "reactnet18"
    input_size = 224
    min_input_size = 32  # five halvings: stem conv, max-pool, stages 2-4

    def __init__(self, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        self.num_classes = num_classes
        self.width = width
        channels = [scaled(c, width) for c in (64, 128, 256, 512)]
        self.stage_channels = channels
        self.stem = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, channels[0], 7, stride=2, padding=3, bias=False),
                bn1=nn.BatchNorm2d(channels[0]),
                maxpool=ChannelsLastMaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        )
        stages = []
        c_prev = channels[0]
        for i, c in enumerate(channels):
            blocks = [ReActBlock(c_prev, c, stride=1 if i == 0 else 2)]
            blocks += [ReActBlock(c, c) for _ in range(3)]
            stages.append(nn.Sequential(*blocks))
            c_prev = c
        self.stages = nn.ModuleList(stages)
        self.classifier = self.new_head(channels[-1], num_classes)


# ---------------------------------------------------------------------------
# The authors' checkpoint format

# our key prefix -> the authors' key prefix (stem modules share their names)
_KEY_PREFIXES = (
    ("stages.0.", "layer1."),
    ("stages.1.", "layer2."),
    ("stages.2.", "layer3."),
    ("stages.3.", "layer4."),
    ("classifier.", "fc."),
    ("stem.", ""),
)

_CHECKPOINT_HELP = (
    "The pretrained ReActNet-18 comes from the ReActNet authors' GitHub release "
    "(github.com/liuzechun/ReActNet, the ResNet-18 based model, file model_best.pth.tar); "
    "download it yourself and pass it with base.checkpoint=PATH (there is no automatic download)."
)


def _to_authors_key(key: str) -> str:
    for ours, theirs in _KEY_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(key)


def authors_state_dict(model: ReActNet18) -> "OrderedDict[str, torch.Tensor]":
    """The model's state dict under the authors' key names (no ``module.`` prefix)."""
    return OrderedDict((_to_authors_key(k), v) for k, v in model.state_dict().items())


def save_reactnet_checkpoint(
    model: ReActNet18, path: str, epoch: int = 0, best_top1_acc: float = 0.0
) -> None:
    """Write ``model`` as the authors' training script does (DataParallel keys)."""
    state = OrderedDict(("module." + k, v.detach().cpu()) for k, v in authors_state_dict(model).items())
    torch.save(
        {
            "epoch": epoch,
            "state_dict": state,
            "best_top1_acc": best_top1_acc,
            "optimizer": {"state": {}, "param_groups": []},
        },
        path,
    )


def _few(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:5])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")


def load_reactnet_checkpoint(path: str, num_classes: int = 1000, width: float = 1.0) -> ReActNet18:
    """Build a :class:`ReActNet18` from the authors' ``model_best.pth.tar``.

    Raises :class:`CheckpointError` if the file is missing, unreadable, or
    holds another architecture (keys or shapes that do not match).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"ReActNet checkpoint file is missing: {path}. {_CHECKPOINT_HELP}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise CheckpointError(f"cannot read ReActNet checkpoint {path}: {exc}. {_CHECKPOINT_HELP}") from exc
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(
            f"{path} is not a ReActNet checkpoint: expected a dict with a 'state_dict' of tensors. "
            + _CHECKPOINT_HELP
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}

    model = ReActNet18(num_classes=num_classes, width=width)
    expected = authors_state_dict(model)
    # BN counters are absent from checkpoints of old PyTorch versions
    missing = {k for k in expected.keys() - state.keys() if not k.endswith("num_batches_tracked")}
    unexpected = state.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"{path} does not hold a ReActNet-18 (num_classes={num_classes}, width={width})."]
        if missing:
            parts.append(f"Missing keys: {_few(missing)}.")
        if unexpected:
            parts.append(f"Unexpected keys: {_few(unexpected)}.")
        raise CheckpointError(" ".join(parts))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path} has shapes of another ReActNet-18 (num_classes={num_classes}, width={width}): "
            + _few(wrong)
        )
    ours = {k: state.get(_to_authors_key(k), v) for k, v in model.state_dict().items()}
    model.load_state_dict(ours)
    return model
