"""Tiny generated datasets in the real on-disk formats (moved to :mod:`bnn_adapt.thesis.synthetic`,
which ``PROFILE=smoke`` also uses); re-exported here for the tests."""

from bnn_adapt.thesis.synthetic import (  # noqa: F401
    class_images,
    labelled_images,
    write_cifar10,
    write_cifar100,
    write_fashion_idx,
    write_flowers102,
    write_imagefolder,
    write_pets,
    write_reactnet_checkpoint,
)
