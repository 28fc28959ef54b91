"""Tiny generated datasets in the real on-disk formats, each written by its dataset's module; gathered here
for the tests."""

from bnn_adapt.thesis.synthetic import write_reactnet_checkpoint  # noqa: F401
from bnn_adapt.training.datasets.cifar10 import write_cifar10  # noqa: F401
from bnn_adapt.training.datasets.cifar100 import write_cifar100  # noqa: F401
from bnn_adapt.training.datasets.fashion_mnist import write_fashion_idx  # noqa: F401
from bnn_adapt.training.datasets.flowers102 import write_flowers102  # noqa: F401
from bnn_adapt.training.datasets.generated import class_images, labelled_images  # noqa: F401
from bnn_adapt.training.datasets.imagefolder import write_imagefolder  # noqa: F401
from bnn_adapt.training.datasets.pets import write_pets  # noqa: F401
