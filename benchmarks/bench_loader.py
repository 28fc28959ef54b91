"""Training-loader throughput: images per second through the real loaders, augmentation included.

``python -m benchmarks.bench_loader`` writes CIFAR-10-sized data in its real format
(:func:`bnn_adapt.training.datasets.cifar10.write_cifar10`), sets up the CIFAR datamodule and times whole
training epochs of two loaders side by side, round-robin, at one torch thread by default:

* ``tensor``: the small-image path (images decoded once, a batch cropped, flipped and
  normalised at once, :mod:`bnn_adapt.training.image_tensors`), on ``--device``;
* ``per_image``: the per-image torchvision pipeline the small sets used before (``ClassSubset``
  with ``ClassSplitDataModule.transform(train=True)``, ``num_workers=0``), CPU only.

``images_per_cpu_s`` counts images per second of this process's CPU time (``time.process_time``):
at one thread, images per second per thread, whatever else the machine runs; ``images_per_s`` is
wall-clock (on a GPU after synchronising). :func:`loader_records` is what a bench calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from bnn_adapt.training.batches import EpochShuffle
from bnn_adapt.training.datamodule import ClassSplitDataModule, ClassSubset
from bnn_adapt.training.datasets.cifar10 import write_cifar10


def _epoch(loader: DataLoader, epoch: int, device: torch.device) -> tuple[int, float, float]:
    """Images, wall seconds and CPU seconds of one pass over ``loader``."""
    sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
    sampler.set_epoch(epoch)
    wall, cpu, images = time.perf_counter(), time.process_time(), 0
    for batch, _ in loader:
        images += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, time.perf_counter() - wall, time.process_time() - cpu


def loader_records(
    device: torch.device, images_per_class: int = 1000, batch_size: int = 64, epochs: int = 3, per_image: bool = True
) -> list[dict]:
    """One record per loader: median images/s (wall and per CPU second) over ``epochs`` timed epochs
    after one warm-up epoch, for ``10 * images_per_class`` generated 32x32 CIFAR-10 images."""
    with tempfile.TemporaryDirectory() as root:
        write_cifar10(root, n_per_class=images_per_class)
        dm = ClassSplitDataModule("cifar10", root=root, target_classes=list(range(10)), batch_size=batch_size)
        dm.setup()
        loaders = {"tensor": dm.loader(dm.train_set, shuffle=True, device=device)}
        if per_image and device.type == "cpu":
            subset = ClassSubset(dm.train_set.dataset, dm.train_set.indices, dm.train_set.labels, dm.transform(True))
            loaders["per_image"] = DataLoader(subset, batch_size=batch_size, sampler=EpochShuffle(len(subset), 0))
        times: dict[str, list[tuple[int, float, float]]] = {name: [] for name in loaders}
        for epoch in range(epochs + 1):  # epoch 0 warms up
            for name, loader in loaders.items():
                timed = _epoch(loader, epoch, device)
                if epoch:
                    times[name].append(timed)
    return [
        {
            "record": "loader",
            "loader": name,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "batch_size": batch_size,
            "image_size": 32,
            "images": runs[0][0],
            "augment": "crop 32 pad 4 + horizontal flip + normalise",
            "images_per_s": statistics.median(n / wall for n, wall, _ in runs),
            "images_per_cpu_s": statistics.median(n / cpu for n, _, cpu in runs),
        }
        for name, runs in times.items()
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_loader", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (the tensor loader's device)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: per-thread figures)")
    parser.add_argument("--images-per-class", type=int, default=1000, help="generated images per CIFAR-10 class")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (after one warm-up)")
    parser.add_argument("--out", default=None, help="also write the records to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = loader_records(torch.device(args.device), args.images_per_class, args.batch_size, args.epochs)
    print("| loader | device | threads | batch | images/s | images per CPU-s |\n|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r['loader']} | {r['device']} | {r['threads']} | {r['batch_size']} | {r['images_per_s']:,.0f} | "
            f"{r['images_per_cpu_s']:,.0f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
