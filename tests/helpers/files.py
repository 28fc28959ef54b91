"""Files the tests write or take apart: image folders for predict, adapter files as stored on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file

from bnn_adapt.adapters.file import METADATA_KEY


def stored(path) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and metadata exactly as on disk (compressed streams still compressed)."""
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[METADATA_KEY])


def rewrite(path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    save_file(arrays, str(path), metadata={METADATA_KEY: json.dumps(meta)})


MODES = ("RGB", "RGB", "RGB", "L", "RGBA")  # grayscale and alpha too: each must become 3 channels


def write_images(folder: Path, n: int = 5) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        sub = folder / ("nested" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        height, width = (32, 32) if i < 3 else (20 + 4 * i, 44 - 4 * i)  # some need resizing, not square
        mode = MODES[i % len(MODES)]
        shape = (height, width) if mode == "L" else (height, width, len(mode))
        paths.append(sub / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(paths[-1])
    (folder / "notes.txt").write_text("not an image")
    return sorted(paths)
