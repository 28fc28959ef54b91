"""Small-image datasets as tensors: decoded once, then augmented and normalised a batch at a time.

Datasets of images up to ``TENSOR_MAX_SIZE`` px (arrays in memory or image files) are
decoded and resized once, when the datamodule is set up, into one tensor per split. Each batch
is indexed from it, augmented as the thesis did (a random crop with ``size // 8`` zero padding,
and horizontal flips where the dataset has them: the distributions of torchvision's
``RandomCrop`` and ``RandomHorizontalFlip``) and normalised, on the device that computes it.
The per-image pipeline (``ClassSplitDataModule.transform``) decoded and augmented every image
again in every epoch; this gives the same evaluation tensors, bit for bit (tests/test_image_tensors.py).

Stored values are those of that pipeline before ``ToDtype``: uint8 images stay uint8 (0..255);
float images (values 0..1, as scikit-learn's bundled 8x8 set holds them) stay float32, so that
their values are exactly the per-image pipeline's. Grayscale images keep one channel and
become RGB in the normalisation (``RGB()`` repeats the channel: the same numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset, default_convert
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

TENSOR_MAX_SIZE = 64  # px: small-image sets at most this size are held as tensors
DECODE_CHUNK = 4096  # images resized at once while decoding


def _stored_images(dataset: Dataset) -> torch.Tensor | None:
    """All images of a dataset that holds them as one array: (N, C, H, W), else None."""
    if isinstance(dataset, TensorDataset):  # (N, C, H, W), float or uint8
        return dataset.tensors[0]
    data = getattr(dataset, "data", None)
    if (
        data is not None and getattr(data, "ndim", 0) == 4 and str(data.dtype) == "uint8"
    ):  # torchvision's CIFAR: (N, H, W, 3)
        return torch.from_numpy(data).permute(0, 3, 1, 2)
    return None


def decode(dataset: Dataset, indices: list[int], size: int) -> torch.Tensor:
    """``dataset[i]`` for every ``i`` in ``indices``, resized to ``size`` as the per-image pipeline's
    ``ToImage, RGB, Resize`` does: (N, C, size, size), C = 1 for grayscale arrays, else 3."""
    stored = _stored_images(dataset)
    if stored is None:  # image files: decode each one (sizes differ)
        prefix = v2.Compose([v2.ToImage(), v2.RGB(), v2.Resize((size, size))])
        images = [prefix(dataset[i][0]).as_subclass(torch.Tensor) for i in indices]
        return torch.stack(images) if images else torch.empty(0, 3, size, size, dtype=torch.uint8)
    index = torch.as_tensor(indices, dtype=torch.long)
    chunks = [
        TF.resize(stored[index[k : k + DECODE_CHUNK]].contiguous(), [size, size], antialias=True)
        for k in range(0, len(index), DECODE_CHUNK)
    ]
    return torch.cat(chunks) if chunks else stored[:0]


def crop_and_flip(images: torch.Tensor, padding: int, hflip: bool) -> torch.Tensor:
    """A random crop of each image from its ``padding``-px zero-padded copy (offsets uniform over
    0..2 * padding, as ``RandomCrop(size, padding)``), mirrored with probability 0.5 when ``hflip``.

    The random numbers come from torch's global CPU generator, as the per-image transforms'
    did: a resumed run restores it (``run.resume.RNGState``) and sees the same batches.
    """
    b, c, h, w = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (b, 2)).to(images.device)
    flips = (torch.rand(b) < 0.5) if hflip else torch.zeros(b, dtype=torch.bool)
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, :1] + torch.arange(h, device=images.device)
    columns = torch.arange(w, device=images.device).expand(b, w)
    columns = torch.where(flips.to(images.device)[:, None], w - 1 - columns, columns) + offsets[:, 1:]
    index = rows[:, :, None] * (w + 2 * padding) + columns[:, None, :]  # (b, h, w) into the padded plane
    return padded.reshape(b, c, -1).gather(2, index.reshape(b, 1, h * w).expand(b, c, h * w)).reshape(b, c, h, w)


class BatchTransform:
    """Crop and flip (training) and normalise a batch, where it lies.

    The arithmetic is torchvision's ``ToDtype(float32, scale=True)`` then ``Normalize``:
    ``x.to(float32) * (1 / 255)``, minus the mean, divided by the std.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], padding: int = 0, hflip: bool = False):
        self.mean, self.std, self.padding, self.hflip = tuple(mean), tuple(std), padding, hflip
        self.augments = padding > 0 or hflip
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            self._stats[device] = tuple(
                torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1) for v in (self.mean, self.std)
            )
        return self._stats[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.augments:
            images = crop_and_flip(images, self.padding, self.hflip)
        floats = images.to(torch.float32)
        if images.dtype == torch.uint8:
            floats = floats.mul_(1.0 / 255)
        mean, std = self._on(images.device)
        return floats.sub(mean).div_(std)  # (b, 1, h, w) grayscale broadcasts to RGB

    def __getstate__(self) -> dict:  # device tensors are remade where it is unpickled
        return {**self.__dict__, "_stats": {}}


class ImageTensors(Dataset):
    """The decoded images of one split and their labels; a DataLoader fetches a whole batch at once
    (``__getitems__``), transformed on ``device`` (default: where the images are). ``dataset`` and
    ``indices`` say where the images came from, as a ``ClassSubset``'s do."""

    collate_fn = staticmethod(default_convert)  # the batch is made already: a DataLoader passes it on

    def __init__(
        self,
        images: torch.Tensor,
        labels: list[int],
        transform: BatchTransform,
        device: torch.device | None = None,
        dataset: Dataset | None = None,
        indices: list[int] | None = None,
    ):
        self.images, self.labels, self.transform = images, list(labels), transform
        self.dataset, self.indices = dataset, indices
        self.targets = torch.as_tensor(self.labels, dtype=torch.long, device=images.device)
        self.device = images.device if device is None else torch.device(device)
        self._copies: dict[tuple[torch.device, torch.device], ImageTensors] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long).to(self.images.device)
        images, labels = self.images[index].to(self.device), self.targets[index].to(self.device)
        return self.transform(images), labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([i])
        return images[0], int(labels[0])

    def with_transform(self, transform: BatchTransform) -> ImageTensors:
        """The same images (shared, not copied) under another transform."""
        return ImageTensors(self.images, self.labels, transform, self.device, self.dataset, self.indices)

    def placed(self, device: torch.device, store_there: bool) -> ImageTensors:
        """Transformed on ``device``; the images held there too when ``store_there``, else in host
        memory. Copied once per place (kept here, never pickled: ``ddp_spawn`` sends host tensors)."""
        device = torch.device(device)
        store = device if store_there else torch.device("cpu")
        if self.device == device and self.images.device == store:
            return self
        if (device, store) not in self._copies:
            self._copies[device, store] = ImageTensors(
                self.images.to(store), self.labels, self.transform, device, self.dataset, self.indices
            )
        return self._copies[device, store]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_copies": {}}
