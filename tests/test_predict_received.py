"""``task=predict`` on files from others: a bad image or a refused adapter is one warning naming it and the
rest is still predicted; adapters with one file name get distinct names; what a file says is printed escaped;
predictions.json is valid JSON and a failed write loses nothing."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bnn_adapt.deploy.predict as predict_module
from bnn_adapt.adapters.file import export_adapter
from bnn_adapt.deploy.predict import BaseWithAdapters, FilesSkipped
from bnn_adapt.errors import ConfigError, DataError, ExportError
from bnn_adapt.files import WriteError
from bnn_adapt.run import task
from bnn_adapt.training.received_data import open_rgb
from tests.helpers.files import write_images
from tests.helpers.models import CLASSES, PREPROCESS, adapted, make_base


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A 1x1 PNG whose header (IHDR, its CRC recomputed) declares ``width`` x ``height``: a decompression bomb
    as Pillow's header reader sees it, a few dozen bytes on disk."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after the signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def predict_cfg(make_cfg, exported, adapters: str, inputs: Path, out: Path, name: str = "predict", k: int = 2):
    overrides = [f"base.file={exported['base']}", f"adapters={adapters}", f"inputs={inputs}", f"predict.output={out}"]
    return make_cfg("task=predict", *overrides, f"predict.top_k={k}", name=name)


def warnings_of(caplog) -> list[str]:
    ours = [r for r in caplog.records if r.name == predict_module.__name__]
    return [r.getMessage() for r in ours if r.levelno == logging.WARNING]


def test_open_rgb_refuses_a_bomb_from_its_header(tmp_path, monkeypatch):
    """Past Pillow's limit the image is an error naming the file, also where Pillow itself would only warn."""
    bomb = png_declaring(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 100
    with pytest.raises(DataError, match=r"bomb\.png is refused as a decompression bomb"):
        open_rgb(str(bomb))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.new("RGB", (12, 12)).save(tmp_path / "warned.png")  # 144 pixels: more than the limit, less than twice it
    with pytest.raises(DataError, match=r"warned\.png is refused as a decompression bomb \(it declares 12x12 pixels"):
        open_rgb(str(tmp_path / "warned.png"))
    Image.new("RGB", (10, 10)).save(tmp_path / "fine.png")
    assert open_rgb(str(tmp_path / "fine.png")).size == (10, 10)


def test_bad_images_are_one_warning_each_and_the_others_are_predicted(exported, make_cfg, tmp_path, caplog):
    images = tmp_path / "images"
    good = write_images(images, n=3)
    bad = [
        png_declaring(images / "bomb.png", 20000, 20000),
        truncated_jpeg(images / "cut.jpg"),
        images / "text.png",
    ]
    bad[2].write_text("not an image")
    out = tmp_path / "preds.json"
    cfg = predict_cfg(make_cfg, exported, f"[{exported['files']['udta']}]", images, out)
    with caplog.at_level(logging.WARNING), pytest.raises(FilesSkipped, match="3 file.s. were skipped") as info:
        task.run(cfg)
    assert all(str(b) in str(info.value) for b in bad)
    assert info.value.result["images"] == 3
    warnings = warnings_of(caplog)
    assert len(warnings) == 3
    assert all(sum(str(b) in w for w in warnings) == 1 for b in bad)
    assert all("\n" not in w for w in warnings)
    written = json.loads(out.read_text())
    assert list(written["predictions"]["udta"]) == [str(p) for p in good]
    assert [(s["file"], s["kind"]) for s in written["skipped"]] == [(str(b), "image") for b in sorted(bad)]
    assert "decompression bomb" in next(s["reason"] for s in written["skipped"] if s["file"] == str(bad[0]))


def test_no_readable_image_is_one_error(exported, make_cfg, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    png_declaring(images / "bomb.png", 20000, 20000)
    cfg = predict_cfg(make_cfg, exported, f"[{exported['files']['udta']}]", images, tmp_path / "preds.json")
    with pytest.raises(DataError, match="none of the 1 image"):
        task.run(cfg)


def test_a_refused_adapter_is_skipped_and_the_others_run(exported, make_cfg, tmp_path, caplog):
    images = tmp_path / "images"
    write_images(images, n=2)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(exported["files"]["lora"].read_bytes()[:100])
    other_base, _ = make_base("ste", seed=7)
    foreign = tmp_path / "foreign.safetensors"
    export_adapter(adapted("udta", other_base), foreign, reference_base=other_base)
    files = [exported["files"]["udta"], corrupt, foreign, exported["files"]["lora"]]
    out = tmp_path / "preds.json"
    cfg = predict_cfg(make_cfg, exported, f"[{','.join(map(str, files))}]", images, out)
    with caplog.at_level(logging.WARNING), pytest.raises(FilesSkipped, match="2 file.s. were skipped") as info:
        task.run(cfg)
    assert info.value.result["adapters"] == ["udta", "lora"]
    warnings = warnings_of(caplog)
    assert len(warnings) == 2 and str(corrupt) in warnings[0] and "fingerprint" in warnings[1]
    written = json.loads(out.read_text())
    assert set(written["predictions"]) == {"udta", "lora"}
    assert [(s["file"], s["kind"]) for s in written["skipped"]] == [(str(f), "adapter") for f in (corrupt, foreign)]
    with pytest.raises(ExportError, match="none of the 2 adapter file"):
        task.run(predict_cfg(make_cfg, exported, f"[{corrupt},{foreign}]", images, out, name="none_left"))


def test_adapters_with_one_file_name_are_named_after_their_folders(exported, make_cfg, tmp_path):
    """Every run writes adapter.safetensors: the list form names each after its run folder (table rows
    included), numbered where folders are named alike too; the API picks the same way."""
    runs = [tmp_path / "run_a", tmp_path / "table" / "row=lora,seed=2", tmp_path / "other" / "run_a"]
    for run in runs:
        run.mkdir(parents=True)
        shutil.copy(exported["files"]["udta"], run / "adapter.safetensors")
    images = tmp_path / "images"
    write_images(images, n=1)
    listed = ",".join(str(run / "adapter.safetensors") for run in runs)
    out = tmp_path / "preds.json"
    result = task.run(predict_cfg(make_cfg, exported, f"[{listed}]", images, out))
    assert result["adapters"] == ["run_a", "row=lora,seed=2", "run_a_2"]
    assert json.loads(out.read_text())["adapters"]["run_a_2"] == str(runs[2] / "adapter.safetensors")
    bank = BaseWithAdapters.load(exported["base"])
    assert [bank.attach(exported["files"]["udta"]) for _ in range(2)] == ["udta", "udta_2"]
    with pytest.raises(ConfigError, match="'udta' is attached already.*'udta_3'"):
        bank.attach(exported["files"]["udta"], name="udta")


def test_adapters_named_on_the_command_line(exported, make_cfg, tmp_path):
    run = tmp_path / "row=udta_g20"
    run.mkdir()
    shutil.copy(exported["files"]["udta"], run / "adapter.safetensors")
    images = tmp_path / "images"
    write_images(images, n=1)
    out = tmp_path / "preds.json"
    named = f"{{flowers: {run / 'adapter.safetensors'}, pets: {exported['files']['lora']}}}"
    result = task.run(predict_cfg(make_cfg, exported, named, images, out))
    assert result["adapters"] == ["flowers", "pets"]
    written = json.loads(out.read_text())
    assert written["adapters"] == {"flowers": str(run / "adapter.safetensors"), "pets": str(exported["files"]["lora"])}
    assert [r["class"] for r in next(iter(written["predictions"]["pets"].values()))][0] in CLASSES["lora"]


def test_names_from_files_are_printed_escaped(exported, make_cfg, tmp_path, capsys):
    """An escape sequence in a class name or a file name reaches the terminal escaped, and a newline in a
    class name cannot forge a result line; the JSON file keeps the real strings."""
    forged = "ant\nfake.png  [udta]  dog 1.000"
    names = ["\x1b]0;owned\x07", forged, "\x1b[2Jcat", "dog"]
    evil = tmp_path / "evil.safetensors"
    model = exported["models"]["udta"]
    export_adapter(model, evil, reference_base=model.base, class_names=names, preprocess=PREPROCESS)
    images = tmp_path / "images"
    write_images(images, n=2)
    Image.new("RGB", (8, 8)).save(images / "x\x1b[2Jy.png")
    out = tmp_path / "preds.json"
    task.run(predict_cfg(make_cfg, exported, f"[{evil}]", images, out, k=4))
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\x07" not in printed
    lines = printed.splitlines()
    assert len(lines) == 3 + 1 and not any(line.startswith("fake.png") for line in lines)
    assert "x\\x1b[2Jy.png" in printed and "\\x1b]0;owned\\x07" in printed and "ant\\x0afake.png" in printed
    written = json.loads(out.read_text())
    rows = written["predictions"]["evil"]
    assert str(images / "x\x1b[2Jy.png") in rows
    assert {r["class"] for row in rows.values() for r in row} == set(names)


def test_non_finite_probabilities_are_written_as_null(exported, make_cfg, tmp_path, monkeypatch, caplog):
    images = tmp_path / "images"
    write_images(images, n=2)
    monkeypatch.setattr(BaseWithAdapters, "__call__", lambda self, x: torch.full((len(x), 4), float("nan")))
    out = tmp_path / "preds.json"
    with caplog.at_level(logging.WARNING):
        task.run(predict_cfg(make_cfg, exported, f"[{exported['files']['udta']}]", images, out))

    def no_constants(name: str):
        raise AssertionError(f"predictions.json holds {name}, which is not JSON")

    written = json.loads(out.read_text(), parse_constant=no_constants)
    assert all(r["prob"] is None for row in written["predictions"]["udta"].values() for r in row)
    assert any("NaN or infinite probabilities for 2 image" in w for w in warnings_of(caplog))


@pytest.mark.parametrize("failure", ["parent_is_a_file", "read_only"])
def test_a_failed_write_says_the_predictions_were_printed(exported, make_cfg, tmp_path, monkeypatch, capsys, failure):
    images = tmp_path / "images"
    write_images(images, n=2)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker / "sub" / "preds.json" if failure == "parent_is_a_file" else tmp_path / "ro" / "preds.json"
    if failure == "read_only":  # as root a read-only mode does not stop writes: the rename fails as on a RO mount

        def read_only(self, target):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(Path, "replace", read_only)
    cfg = predict_cfg(make_cfg, exported, f"[{exported['files']['udta']}]", images, out)
    with pytest.raises(WriteError, match=rf"cannot write {out}.*; the predictions are printed above") as info:
        task.run(cfg)
    assert "\n" not in str(info.value)
    assert failure != "read_only" or "EROFS" in str(info.value)
    printed = capsys.readouterr().out
    assert sum(line.startswith(str(images)) and "[udta]" in line for line in printed.splitlines()) == 2
    assert not out.exists()
    assert failure != "read_only" or not list(out.parent.glob(".*.tmp"))  # the temporary file is cleaned up
