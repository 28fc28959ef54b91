"""A packed base (``.bnnpack``) received from someone else: a crafted or damaged file is one ``ExportError``
line naming it, is refused before its header or declared sizes can take memory, and never builds a network
its layout does not fit; what loads is exactly what its fingerprint names."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib

import pytest
import torch

from bnn_adapt.bases.fingerprint import fingerprint
from bnn_adapt.deploy import packed_base
from bnn_adapt.deploy.packed_base import MAGIC, pack_base, read_packed_base, unpack_base
from bnn_adapt.deploy.packed_inference import load_packed_base
from bnn_adapt.errors import ExportError
from tests.helpers.models import make_base


@pytest.fixture(scope="module")
def ste_file() -> tuple[bytes, dict]:
    """A valid packed STE base (width 0.1): its bytes and header."""
    return pack_base(make_base("ste")[0])


def sections(data: bytes) -> bytes:
    """Everything after the header: the binary and fp32 sections."""
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    return data[len(MAGIC) + 4 + n :]


def with_header(data: bytes, header: object, magic: bytes = MAGIC, head: bytes | None = None) -> bytes:
    """``data`` with another header (``head``: its bytes as stored, else ``header`` as JSON, compressed)."""
    head = zlib.compress(json.dumps(header).encode()) if head is None else head
    return magic + struct.pack("<I", len(head)) + head + sections(data)


def edited(header: dict, **changes) -> dict:
    copy = json.loads(json.dumps(header))
    copy.update(changes)
    return copy


def refused(data: bytes, match: str, tmp_path, name: str = "received.bnnpack") -> str:
    """The one line with which both ways of loading refuse ``data`` written to a file."""
    path = tmp_path / name
    path.write_bytes(data)
    messages = []
    for load in (read_packed_base, load_packed_base):
        with pytest.raises(ExportError, match=match) as caught:
            load(path)
        messages.append(str(caught.value))
    assert all("\n" not in m and name in m for m in messages), messages
    return messages[0]


def inflating_header(header: dict, mib: int) -> bytes:
    """A valid zlib stream of ``header``'s JSON followed by ``mib`` MiB of spaces (JSON whitespace), built in
    milliseconds: a full flush makes each compressed MiB independent of the ones before, so it is repeated."""
    text, chunk = json.dumps(header).encode(), b" " * (1 << 20)
    compressor = zlib.compressobj(9)
    start = compressor.compress(text) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush()[:-4]  # the last (empty) block; the checksum covers every repeat
    checksum = zlib.adler32(text)
    for _ in range(mib):
        checksum = zlib.adler32(chunk, checksum)
    return start + block * mib + end + struct.pack(">I", checksum)


def test_a_header_that_inflates_to_a_gigabyte_is_refused_without_inflating_it(ste_file, tmp_path):
    data, header = ste_file
    head = inflating_header(header, 1024)
    assert len(head) < 2 << 20  # a small file ...
    bomb = zlib.decompressobj()
    assert bomb.decompress(inflating_header(header, 4)).strip() == json.dumps(header).encode() and bomb.eof
    (tmp_path / "bomb.bnnpack").write_bytes(with_header(data, None, head=head))
    tracemalloc.start()
    try:
        with pytest.raises(ExportError, match="inflates to more than"):
            read_packed_base(tmp_path / "bomb.bnnpack")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # ... that inflated would take a GiB


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: [h], "header is a JSON list"),
        (lambda h: {k: v for k, v in h.items() if k != "binary_bits"}, "no 'binary_bits'"),
        (lambda h: edited(h, extra=1), "unknown key 'extra'"),
        (lambda h: edited(h, version=3), "version 3"),
        (lambda h: edited(h, fp32_values=-1), "fp32_values is -1, not a non-negative integer"),
        (lambda h: edited(h, binary_bits=True), "binary_bits is True"),
        (lambda h: edited(h, fingerprint=None), "fingerprint is None, not a string"),
        (lambda h: edited(h, arch_config={**h["arch_config"], "colour": "red"}), "colour"),
        (lambda h: edited(h, arch_config={**h["arch_config"], "num_classes": "5"}), "not an integer"),
        (lambda h: edited(h, layout=[[8, 3, 3, 3], *h["layout"][1:]]), "entry 0, .* is not \\[name, kind, shape\\]"),
        (lambda h: edited(h, layout=[["stem.0.weight", "bits", [8, 3, 3, 3.0]], *h["layout"][1:]]), "non-negative"),
        (lambda h: edited(h, layout=h["layout"][:-1]), "ends after"),
        (lambda h: edited(h, layout=[*h["layout"], h["layout"][-1]]), "no further entry"),
        (lambda h: edited(h, layout=[e[:3] for e in h["layout"]]), "feature_norm.*directions"),
        (lambda h: edited(h, binary_bits=h["binary_bits"] - 8), "declares"),
    ],
)
def test_a_malformed_header_is_one_line_naming_what_is_wrong(ste_file, tmp_path, edit, match):
    data, header = ste_file
    refused(with_header(data, edit(header)), match, tmp_path)


def no_build_on_cpu(monkeypatch) -> None:
    """Fail the test if the packed base builds a network anywhere but on the meta device (no memory)."""
    real = packed_base.rebuild

    def rebuild(arch, arch_config):
        assert torch.get_default_device().type == "meta", f"built a {arch} {arch_config} before checking it"
        return real(arch, arch_config)

    monkeypatch.setattr(packed_base, "rebuild", rebuild)


def test_a_reshaped_tensor_is_refused_before_a_network_is_built(ste_file, tmp_path, monkeypatch):
    """A layout entry of the right size but another shape (that a reshape would accept) misfits the
    architecture; and so does a width within the limits but not the file's."""
    data, header = ste_file
    reshaped = edited(header)
    reshaped["layout"][2][2] = [16, 4, 3, 3]  # stages.0.0.conv1: 8x8x3x3
    assert reshaped["layout"][2][0] == "stages.0.0.conv1.weight"
    no_build_on_cpu(monkeypatch)
    message = refused(with_header(data, reshaped), "layout does not fit", tmp_path)
    assert "stages.0.0.conv1.weight" in message and "[8, 8, 3, 3]" in message
    wider = edited(header, arch_config={**header["arch_config"], "width": 0.2})
    refused(with_header(data, wider), "layout does not fit", tmp_path)


def test_a_width_of_40_is_refused_before_anything_is_built(ste_file, tmp_path, monkeypatch):
    data, header = ste_file
    no_build_on_cpu(monkeypatch)
    wide = edited(header, arch_config={**header["arch_config"], "width": 40})
    message = refused(with_header(data, wide), "width=40, outside", tmp_path)
    assert message.startswith(f"packed base {tmp_path / 'received.bnnpack'}")


def test_nan_is_refused_naming_the_tensor_and_an_infinite_threshold_loads(tmp_path):
    """NaN with a matching fingerprint (a base written from a diverged run) is refused; a sign-only
    norm's channel of constant sign has an infinite threshold, which is a real base."""
    base, _ = make_base("ste")
    with torch.no_grad():
        base.feature_norm.weight[0] = 0.0  # a constant sign: threshold -inf or +inf
    data, header = pack_base(base)
    rebuilt = unpack_base(data)[0]
    assert torch.isinf(rebuilt.feature_norm.bias).any()
    assert fingerprint(rebuilt) == header["fingerprint"]  # folding a folded threshold again keeps it infinite
    with torch.no_grad():
        base.classifier[0].bias[1] = float("nan")
    refused(pack_base(base)[0], "tensor classifier.0.bias holds NaN", tmp_path)


def test_an_edited_block_type_is_refused_by_its_fingerprint(ste_file, tmp_path):
    """The same layout, another block: only the fingerprint tells, on the packed kernels' path too."""
    data, header = ste_file
    other = edited(header, arch_config={**header["arch_config"], "block": "binarynet"})
    refused(with_header(data, other), "do not match its fingerprint", tmp_path)


def test_a_file_cut_anywhere_is_one_line_saying_so(ste_file, tmp_path):
    """Cut within the magic, the header's length, the header, or either section."""
    data, _ = ste_file
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    cuts = [*range(1, 12 + n + 20), 12 + n + 100, len(data) - 8, len(data) - 1]
    for at in cuts:
        with pytest.raises(ExportError, match="truncated") as caught:
            unpack_base(data[:at], "cut.bnnpack")
        assert "\n" not in str(caught.value) and "cut.bnnpack" in str(caught.value), at
    refused(data[:11], "truncated", tmp_path)
    refused(data[: len(data) - 1], "truncated", tmp_path)


def test_an_empty_file_a_folder_a_pipe_and_trailing_bytes_are_one_line(ste_file, tmp_path):
    data, _ = ste_file
    refused(b"", "is empty", tmp_path)
    refused(data + b"\0", "trailing bytes", tmp_path)
    (tmp_path / "folder.bnnpack").mkdir()
    os.mkfifo(tmp_path / "pipe.bnnpack")
    for name in ("folder.bnnpack", "pipe.bnnpack"):
        for load in (read_packed_base, load_packed_base):
            with pytest.raises(ExportError, match=f"{name} is not a file"):
                load(tmp_path / name)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_one_line(ste_file, tmp_path):
    path = tmp_path / "locked.bnnpack"
    path.write_bytes(ste_file[0])
    path.chmod(0)
    with pytest.raises(ExportError, match="unreadable"):
        read_packed_base(path)


def test_only_the_current_magic_is_read(ste_file, tmp_path):
    """One format: the earlier magic with its plain JSON header, or any other start, is refused."""
    data, header = ste_file
    old = with_header(data, None, magic=b"BNNPACK1", head=json.dumps(header).encode())
    refused(old, "starts with b'BNNPACK1', not b'BNNPACK2'", tmp_path)
    refused(b"PK\x03\x04" + data[4:], "starts with", tmp_path)
