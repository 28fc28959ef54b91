"""The XNOR-popcount kernels (``csrc/``) from Python: loading, dispatch level, threads, calls.

The kernels are a plain C library that ``pip install`` builds when a C compiler
is there (``setup.py``); it needs no torch headers and is loaded with ctypes,
fed ``tensor.data_ptr()``. Without it, :func:`library` returns None after one
warning line and callers run the float path.

Layouts (``csrc/bitconv.h``): packed activations are int32 words
``[n][h + 2 pad][w + 2 pad][ceil(c / 32)]``, bit ``c % 32`` of word ``c // 32``
set where the value is not < 0 (sign(0) = sign(NaN) = +1, as :func:`bnn_adapt.nn.quantizers.sign`),
with a border of zero words; packed weights ``[ceil(c_out / 16)][kh][kw][ceil(c_in / 32)][16]``,
16 output channels side by side so that one AVX-512 register holds one word of each.

Dispatch: the best level this CPU runs (``avx512``: VPOPCNTDQ, ``avx2``, ``portable``),
or the one forced by :func:`set_isa` / the environment variable ``BNN_ADAPT_ISA``.
Threads: ``torch.get_num_threads()`` at each call, so the kernels use the same
threads as torch's fp32 convolutions.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

ISAS = ("portable", "avx2", "avx512")
ABI_VERSION = 2
LANES = 16  # output channels per weight block
MAX_TAPS = 64

# epilogue flags (csrc/bitconv.h)
OUT_BITS, SCALE, AFFINE, CLAMP_BEFORE, RESIDUAL, CLAMP_AFTER, REACT = 1, 2, 4, 8, 16, 32, 64

_P = ctypes.c_void_p
_I = ctypes.c_int
_L = ctypes.c_long


class ConvArgs(ctypes.Structure):
    """``bnn_conv_args``: one layer and its epilogue; the per-call fields are filled by the C side."""

    _fields_ = [
        ("input", _P),
        ("n", _I),
        ("in_h", _I),
        ("in_w", _I),
        ("in_pad", _I),
        ("cw", _I),
        ("weights", _P),
        ("tap_pc", _P),
        ("c_in", _I),
        ("c_out", _I),
        ("kh", _I),
        ("kw", _I),
        ("stride", _I),
        ("pad", _I),
        ("out_h", _I),
        ("out_w", _I),
        ("flags", _I),
        ("scale", _P),
        ("alpha", _P),
        ("beta", _P),
        ("bias1", _P),
        ("slope", _P),
        ("bias2", _P),
        ("residual", _P),
        ("res_sn", _L),
        ("res_sc", _L),
        ("res_sh", _L),
        ("res_sw", _L),
        ("out", _P),
        ("lo", _P),
        ("hi", _P),
        ("out_bits", _P),
        ("out_pad", _I),
        ("out_cw", _I),
    ]


_state: dict = {}


def library_path() -> Path | None:
    """The built kernel library next to this file (``_bitconv.<python ABI tag>.so``), if any."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"_bitconv{suffix}").is_file():
            return here / f"_bitconv{suffix}"
    return None


def _load() -> ctypes.CDLL:
    path = library_path()
    if path is None:
        raise OSError("the kernel library was not built (no C compiler when the package was installed?)")
    lib = ctypes.CDLL(str(path))
    if lib.bnn_abi_version() != ABI_VERSION:
        raise OSError(f"{path.name} is from another version; reinstall the package (make install)")
    lib.bnn_conv2d.argtypes = [ctypes.POINTER(ConvArgs), _P, _I, _I, _I, _I, _P, _P, _P, _P, _I, _I, _I]
    lib.bnn_pack_signs.argtypes = [_P, _I, _I, _I, _I, _L, _L, _L, _L, _P, _P, _I, _I, _I]
    lib.bnn_isa_name.restype = ctypes.c_char_p
    wanted = os.environ.get("BNN_ADAPT_ISA")
    if wanted and (wanted not in ISAS or lib.bnn_set_isa(ISAS.index(wanted)) != 0):
        raise OSError(f"BNN_ADAPT_ISA={wanted} is not available here (this CPU runs: {', '.join(supported(lib))})")
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (after one warning line per process) when they cannot load."""
    if "lib" not in _state:
        try:
            _state["lib"] = _load()
        except OSError as exc:
            _state["lib"] = None
            log.warning("packed 1-bit kernels unavailable (%s): predicting with the float path", exc)
    return _state["lib"]


def available() -> bool:
    return library() is not None


def supported(lib: ctypes.CDLL | None = None) -> list[str]:
    """Dispatch levels this CPU and build run."""
    lib = lib or library()
    return [name for i, name in enumerate(ISAS) if lib is not None and lib.bnn_isa_supported(i)]


def isa() -> str:
    """The dispatch level the kernels run at."""
    lib = library()
    return ISAS[lib.bnn_get_isa()] if lib is not None else "none"


def set_isa(name: str) -> None:
    """Force a dispatch level (``portable``, ``avx2``, ``avx512``); ValueError if this CPU lacks it."""
    lib = library()
    if lib is None or name not in ISAS or lib.bnn_set_isa(ISAS.index(name)) != 0:
        raise ValueError(f"kernel level {name!r} is not available here (available: {', '.join(supported())})")


@contextlib.contextmanager
def forced_isa(name: str):
    """Within this block the kernels run at level ``name``."""
    before = isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(before)


def openmp() -> bool:
    lib = library()
    return bool(lib is not None and lib.bnn_openmp())


_timer: list[float] | None = None  # seconds spent in kernel calls while kernel_time() is active


@contextlib.contextmanager
def kernel_time():
    """Within this block, ``[seconds]`` accumulates the wall time of kernel calls (for the benchmark)."""
    global _timer
    outer, _timer = _timer, [0.0]
    try:
        yield _timer
    finally:
        if outer is not None:
            outer[0] += _timer[0]
        _timer = outer


def _timed(call, *args) -> int:
    if _timer is None:
        return call(*args)
    start = time.perf_counter()
    try:
        return call(*args)
    finally:
        _timer[0] += time.perf_counter() - start


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ---------------------------------------------------------------- weights


def pack_weights(signs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``signs`` (bool, ``W >= 0``, shape c_out x c_in x kh x kw) -> (kernel words, tap popcounts).

    Words: int32 ``[cob][kh][kw][cw][16]``; tap popcounts: int32 ``[cob][kh * kw][16]``,
    the number of +1 weights of each output channel's tap (the padding correction).
    """
    c_out, c_in, kh, kw = signs.shape
    cob, cw = -(-c_out // LANES), -(-c_in // 32)
    bits = np.zeros((cob * LANES, cw * 32, kh, kw), dtype=bool)
    bits[:c_out, :c_in] = signs.cpu().numpy()
    bits = bits.reshape(cob, LANES, cw, 32, kh, kw).transpose(0, 4, 5, 2, 1, 3)  # cob kh kw cw lane bit
    words = np.packbits(np.ascontiguousarray(bits), axis=-1, bitorder="little").view("<u4")[..., 0]
    tap_pc = bits.sum(axis=(3, 5), dtype=np.int32).reshape(cob, kh * kw, LANES)
    return torch.from_numpy(words.view(np.int32).copy()), torch.from_numpy(np.ascontiguousarray(tap_pc))


def unpack_weights(words: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Kernel words -> the +-1 float weights (c_out x c_in x kh x kw) they hold: the inverse of :func:`pack_weights`."""
    c_out, c_in, kh, kw = shape
    cob, cw = words.shape[0], words.shape[3]
    raw = words.contiguous().numpy().view(np.uint8).reshape(cob, kh, kw, cw, LANES, 4)
    bits = np.unpackbits(raw, axis=-1, bitorder="little").transpose(0, 4, 3, 5, 1, 2)
    bits = bits.reshape(cob * LANES, cw * 32, kh, kw)[:c_out, :c_in]
    return torch.from_numpy(bits.astype(np.float32) * 2 - 1)


def channel_vector(values: torch.Tensor | float, c_out: int, dtype=torch.float32) -> torch.Tensor:
    """A per-output-channel array as the kernels read it: contiguous, padded to whole blocks of 16."""
    out = torch.zeros(-(-c_out // LANES) * LANES, dtype=dtype)
    out[:c_out] = torch.as_tensor(values, dtype=dtype).detach().reshape(-1).expand(c_out)
    return out


# ---------------------------------------------------------------- activations


class PackedSigns:
    """Signs of an NCHW activation, packed (int32 words ``[n][h + 2 pad][w + 2 pad][cw]``)."""

    __slots__ = ("channels", "height", "pad", "width", "words")

    def __init__(self, words: torch.Tensor, channels: int, height: int, width: int, pad: int):
        self.words, self.channels, self.height, self.width, self.pad = words, channels, height, width, pad

    @classmethod
    def zeros(cls, n: int, channels: int, height: int, width: int, pad: int) -> PackedSigns:
        words = torch.zeros(n, height + 2 * pad, width + 2 * pad, -(-channels // 32), dtype=torch.int32)
        return cls(words, channels, height, width, pad)

    @property
    def batch(self) -> int:
        return self.words.shape[0]

    def to_signs(self) -> torch.Tensor:
        """The +-1 float tensor these bits stand for (NCHW, padding dropped): for tests."""
        p = self.pad
        raw = self.words[:, p : p + self.height, p : p + self.width].contiguous().numpy().view("<u4")
        bits = np.unpackbits(raw.view(np.uint8), axis=-1, bitorder="little")[..., : self.channels]
        return torch.from_numpy(bits.astype(np.float32) * 2 - 1).permute(0, 3, 1, 2)


def float32_cpu(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernels read it: float32 on the CPU, in any memory layout (NCHW, NHWC, ...)."""
    if x.device.type != "cpu":
        raise RuntimeError(f"the packed 1-bit kernels run on the CPU; got a tensor on {x.device}")
    return x if x.dtype == torch.float32 else x.float()


def pack_signs(x: torch.Tensor, pad: int, bias: torch.Tensor | None = None) -> PackedSigns:
    """Bit ``not (x + bias) < 0`` of every element of NCHW ``x`` (bias per channel, added in fp32 as torch does;
    NaN packs as +1, as the float path's sign gives it).

    Reads ``x`` in place whatever its strides; NCHW and NHWC (channels last) have fast paths.
    """
    x = float32_cpu(x)
    n, c, h, w = x.shape
    out = PackedSigns.zeros(n, c, h, w, pad)
    b = None if bias is None else bias.detach().float().reshape(-1).contiguous()
    status = _timed(
        library().bnn_pack_signs,
        _ptr(x),
        n,
        c,
        h,
        w,
        *x.stride(),
        _ptr(b),
        _ptr(out.words),
        pad,
        out.words.shape[-1],
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"bnn_pack_signs failed ({status})")
    return out


def empty_nchw(n: int, c: int, h: int, w: int) -> torch.Tensor:
    """An NCHW float tensor with NHWC memory (what the kernels write)."""
    return torch.empty(n, h, w, c).permute(0, 3, 1, 2)


class ConvPlan:
    """One binary conv and its epilogue, ready to run: the C struct plus the tensors it points into."""

    def __init__(
        self,
        words: torch.Tensor,
        tap_pc: torch.Tensor,
        shape: tuple[int, int, int, int],
        stride: int,
        pad: int,
        flags: int = 0,
        **arrays: torch.Tensor,
    ):
        c_out, c_in, kh, kw = shape
        if kh * kw > MAX_TAPS:
            raise ValueError(f"a {kh}x{kw} kernel has more than {MAX_TAPS} taps")
        self.shape, self.stride, self.pad, self.flags = shape, stride, pad, flags
        self.keep = [words, tap_pc, *arrays.values()]  # the struct holds raw pointers into these
        self.args = ConvArgs(
            cw=-(-c_in // 32),
            weights=_ptr(words),
            tap_pc=_ptr(tap_pc),
            c_in=c_in,
            c_out=c_out,
            kh=kh,
            kw=kw,
            stride=stride,
            pad=pad,
            flags=flags,
            **{k: _ptr(v) for k, v in arrays.items()},
        )

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        _, _, kh, kw = self.shape
        return (height + 2 * self.pad - kh) // self.stride + 1, (width + 2 * self.pad - kw) // self.stride + 1

    def __call__(
        self, x: PackedSigns, residual: torch.Tensor | None = None, out_pad: int = 0
    ) -> torch.Tensor | PackedSigns:
        """Float NCHW output (NHWC memory), or with ``OUT_BITS`` packed signs with ``out_pad``."""
        c_out, c_in = self.shape[:2]
        if x.channels != c_in or x.pad < self.pad:
            raise ValueError(f"packed input: {x.channels} channels, pad {x.pad}; the conv wants {c_in}, pad {self.pad}")
        oh, ow = self.out_size(x.height, x.width)
        out = out_bits = None
        if self.flags & OUT_BITS:
            result = PackedSigns.zeros(x.batch, c_out, oh, ow, out_pad)
            out_bits, out_cw = _ptr(result.words), result.words.shape[-1]
        else:
            result = empty_nchw(x.batch, c_out, oh, ow)
            out, out_cw = _ptr(result), 0
        strides = None
        if residual is not None:
            residual = float32_cpu(residual)
            if residual.shape != (x.batch, c_out, oh, ow):
                raise ValueError(f"residual of shape {tuple(residual.shape)}, output {(x.batch, c_out, oh, ow)}")
            strides = (ctypes.c_long * 4)(*residual.stride())
        status = _timed(
            library().bnn_conv2d,
            ctypes.byref(self.args),
            _ptr(x.words),
            x.batch,
            x.height,
            x.width,
            x.pad,
            _ptr(residual),
            strides,
            out,
            out_bits,
            out_pad,
            out_cw,
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(f"bnn_conv2d failed ({status}) for a {self.shape} conv on {x.words.shape}")
        return result
