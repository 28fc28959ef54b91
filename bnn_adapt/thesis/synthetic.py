"""The smoke data: each dataset's generated data in its real on-disk format, and a tiny ReActNet checkpoint.

Each dataset writes its own (``DatasetSpec.synthetic``, :mod:`bnn_adapt.training.datasets`).

``PROFILE=smoke`` (conf/profile/smoke.yaml) runs every thesis table on these, so the
whole pipeline -- torchvision's readers, class splits, base pretraining, adapters,
tables -- is exercised on any machine without downloads.

``python -m bnn_adapt.thesis.synthetic [ROOT]`` writes everything the smoke profile reads
(default ROOT: ``$BNN_ADAPT_ROOT/data/smoke``, the smoke profile's ``paths.data_dir``).
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from bnn_adapt.training.datasets import built_in, find


def write_reactnet_checkpoint(path, width: float = 0.25, num_classes: int = 1000, seed: int = 0) -> Path:
    """A randomly initialised ReActNet-18 saved in the authors' ``model_best.pth.tar`` format."""
    import torch

    from bnn_adapt.bases.reactnet import ReActNet18
    from bnn_adapt.bases.reactnet_checkpoint import save_reactnet_checkpoint

    torch.manual_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_reactnet_checkpoint(ReActNet18(num_classes=num_classes, width=width), str(path))
    return path


SMOKE_REACTNET_WIDTH = 0.25  # = base.width in conf/profile/smoke.yaml


def write_smoke_data(root) -> Path:
    """Everything ``PROFILE=smoke`` reads, under ``root`` (its ``paths.data_dir``): each dataset's synthetic
    data in ``root/<name>`` (its ``data.root`` there), and a ReActNet checkpoint; existing parts are kept."""
    root = Path(root)
    parts = {name: find(name).synthetic for name in built_in()}
    parts = {name: partial(write, root / name) for name, write in parts.items() if write is not None}
    parts["reactnet18/model_best.pth.tar"] = partial(
        write_reactnet_checkpoint, root / "reactnet18" / "model_best.pth.tar", width=SMOKE_REACTNET_WIDTH
    )
    for name, write in parts.items():
        if not (root / name).exists():
            write()
            print(f"generated {root / name}")
    return root


def main(argv: list[str] | None = None) -> int:
    default = Path(os.environ.get("BNN_ADAPT_ROOT", ".")) / "data" / "smoke"
    parser = argparse.ArgumentParser(prog="python -m bnn_adapt.thesis.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("root", nargs="?", default=str(default), help=f"where to write (default {default})")
    args = parser.parse_args(argv)
    write_smoke_data(args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
