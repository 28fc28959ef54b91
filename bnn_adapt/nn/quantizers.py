"""Quantizers: what a binary layer does to a real tensor, with its gradient.

As in Larq's ``quantizers`` module, these are small functions apart from the
layers that use them (:mod:`bnn_adapt.nn.layers`):

* :func:`sign` -- sign with sign(0) = +1 (BinaryNet), no gradient;
* :func:`binarize` -- sign forward, straight-through backward cancelled where
  ``|x| > 1`` (the hardtanh derivative; Hubara et al. 2016);
* :func:`approx_sign` -- sign forward, ReActNet/Bi-Real's piecewise-polynomial
  gradient backward (Liu et al. 2018);
* :func:`scaled_sign` / :class:`ScaledSignSTE` -- magnitude-aware sign:
  ``mean|W|`` per output channel times sign(W) (ReActNet's weights);
* :class:`SignBinarizer` objects (:data:`BINARIZERS`, ``base.binarize``) that the
  STE net's binary layers carry, as Larq's layers carry their quantizers: ``ste``
  (the STE above) or ``thesis_code`` (the thesis code's BinaryNet.pytorch layers:
  ``torch.sign`` with sign(0) = 0, identity gradient).
"""

from __future__ import annotations

import torch


def sign(x: torch.Tensor) -> torch.Tensor:
    """Sign with sign(0) = +1 (also for -0.0), as in BinaryNet; never in place.

    sign(sign(x) + 0.5) maps -1/0/+1 to -1/+1/+1 in three cheap passes over one
    new tensor: several times faster on CPU than ``torch.where`` with filled
    tensors, which dominated the frozen base's forward pass (docs/speed.md).
    """
    return torch.sign(x).add_(0.5).sign_()


class SignSTE(torch.autograd.Function):
    """sign(x) forward; gradient * 1{|x| <= 1} backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad_output * (x.abs() <= 1).to(grad_output.dtype)


def binarize(x: torch.Tensor) -> torch.Tensor:
    return SignSTE.apply(x)


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


class IdentitySign(torch.autograd.Function):
    """``torch.sign`` forward (sign(0) = 0); the gradient passes unchanged, as when BinaryNet.pytorch's layers
    binarise ``tensor.data`` (no |x| <= 1 mask)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output


class SignBinarizer:
    """How the STE net's binary layers binarise inputs and weights (``base.binarize``), with its gradient.

    ``ternary``: sign(0) = 0, so activations (and weights) exactly 0 stay 0: a packed base (1 bit each)
    or a lean layer (1-bit saved signs) cannot hold them. ``in_place``: the block binarises its input once
    and the shortcut reads the binarised tensor too (the thesis code binarises ``input.data`` in place).
    """

    name = "ste"
    ternary = False
    in_place = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return binarize(x)

    def frozen(self, w: torch.Tensor) -> torch.Tensor:
        """The binarised value of a weight that needs no gradient."""
        return sign(w)

    def binarizes_linear_input(self, in_features: int) -> bool:
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ThesisCodeBinarizer(SignBinarizer):
    """The thesis code's layers (BinaryNet.pytorch's ``Binarize``): ``tensor.sign()`` on ``.data``, so
    sign(0) = 0 and the gradient is the identity; its ``BinarizeLinear`` leaves a 784-feature input real."""

    name = "thesis_code"
    ternary = True
    in_place = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return IdentitySign.apply(x)

    def frozen(self, w: torch.Tensor) -> torch.Tensor:
        return torch.sign(w)

    def binarizes_linear_input(self, in_features: int) -> bool:
        return in_features != 784


#: ``base.binarize`` choices
BINARIZERS = {b.name: b for b in (SignBinarizer(), ThesisCodeBinarizer())}


def binarizer(name: str) -> SignBinarizer:
    """The :data:`BINARIZERS` entry ``name``, or a ConfigError naming the choices."""
    from bnn_adapt.errors import ConfigError  # noqa: PLC0415 - errors imports nothing of ours

    if name not in BINARIZERS:
        raise ConfigError(f"base.binarize={name!r} is invalid: use one of {', '.join(BINARIZERS)}")
    return BINARIZERS[name]


# --------------------------------------------------------------------------- weights below 32 bits (adapter.bits)

#: the weight widths an adapter trains at (``adapter.bits``); 32 means plain fp32 layers
BITS = (32, 16, 8, 4, 2, 1)
#: clipping ratios searched for the per-channel scale of >= 2-bit codes (1.0 = the channel's max |W|)
CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(17))  # 1.0 ... 0.2


def check_bits(bits) -> int:
    """``bits`` as an int, or a ConfigError naming the allowed widths."""
    from bnn_adapt.errors import ConfigError  # noqa: PLC0415 - errors imports nothing of ours

    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits not in BITS:
        raise ConfigError(f"adapter.bits={bits!r} is invalid: use one of {', '.join(map(str, BITS))}")
    return int(bits)


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _per_row(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.view(-1, *[1] * (like.dim() - 1))


class ChannelQuantizer:
    """Symmetric ``bits``-bit weights with one fp32 scale per output channel (dim 0).

    ``W ~ scale * code``: at 1 bit ``code = sign(W)`` and ``scale = mean |W|`` over the
    channel's non-zero weights (XNOR-Net, Rastegari et al. 2016); at b >= 2 bits
    ``code = clamp(round(W / scale), -L, L)``, ``L = 2**(b-1) - 1``, with the scale
    ``r * max|W| / L`` whose clipping ratio ``r`` (:data:`CLIP_RATIOS`) gives the
    smallest squared error (so that 2 bits are ternary weights with a sensible
    threshold, as TWN's, Li et al. 2016). A zero weight always has code 0: pruned
    weights stay exactly zero, also at 1 bit. Calling it gives ``scale * code``
    with a straight-through gradient (Bengio et al. 2013); :meth:`encode` gives the
    integer codes and scales an adapter file stores, the very values training used.

    ``scale`` given: the weights already hold ``scale * code`` (an adapter loaded
    from its file); calling returns them as they are and :meth:`encode` recovers
    the codes exactly.
    """

    def __init__(self, bits: int, scale: torch.Tensor | None = None):
        self.bits = check_bits(bits)
        if self.bits == 32:
            raise ValueError("a 32-bit weight needs no quantizer")
        self.levels = max(1, 2 ** (self.bits - 1) - 1)
        self.scale = scale

    def __repr__(self) -> str:
        return f"ChannelQuantizer(bits={self.bits}{', stored' if self.scale is not None else ''})"

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scale)``: integer-valued codes (float tensor, shape of ``w``) and fp32 scales (dim 0)."""
        w = w.detach().float()
        if self.scale is not None:
            scale = self.scale.to(w.device)
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = torch.round(w / _per_row(safe, w)).clamp_(-self.levels, self.levels)
            return codes * _per_row(scale > 0, w), scale
        rows = _rows(w)
        if self.bits == 1:
            codes = torch.sign(w)
            count = (rows != 0).sum(dim=1)
            total = rows.abs().double().sum(dim=1)  # double: the same scale whatever the summation order
            scale = torch.where(count > 0, total / count.clamp_min(1), 0.0).float()
            return codes, scale
        amax = rows.abs().amax(dim=1)
        best_err = best_scale = None
        for ratio in CLIP_RATIOS:
            scale = amax * ratio / self.levels
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(rows / safe[:, None]).clamp_(-self.levels, self.levels)
            err = (q * scale[:, None] - rows).double().pow_(2).sum(dim=1)
            if best_err is None:
                best_err, best_scale = err, scale
            else:
                better = err < best_err
                best_err, best_scale = torch.where(better, err, best_err), torch.where(better, scale, best_scale)
        safe = torch.where(best_scale > 0, best_scale, torch.ones_like(best_scale))
        codes = torch.round(w / _per_row(safe, w)).clamp_(-self.levels, self.levels)
        return codes, best_scale

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            return w
        return QuantizeSTE.apply(w, self)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * codes`` per output channel: what a quantised layer computes with (one place, so it is bit-exact)."""
    return codes * _per_row(scale, codes)


class QuantizeSTE(torch.autograd.Function):
    """:meth:`ChannelQuantizer.encode` forward (as ``scale * code``); the gradient passes straight through."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, quantizer: ChannelQuantizer) -> torch.Tensor:
        codes, scale = quantizer.encode(w)
        return dequantize(codes, scale).to(w.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None
