"""The ReActNet authors' checkpoint format (``model_best.pth.tar``).

Their training script saves a DataParallel model: a dict with ``state_dict``
(keys prefixed ``module.``), ``epoch``, ``best_top1_acc`` and ``optimizer``.
Module names inside the stem and the blocks of :class:`ReActNet18` follow the
authors' code, so one small prefix table maps the keys.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch

from bnn_adapt.bases.base import BaseNetwork, rebuild
from bnn_adapt.bases.received import check_state, expected_shapes
from bnn_adapt.errors import CheckpointError
from bnn_adapt.files import atomic_output, load_weights

ARCH = "reactnet18"  # the architecture this format holds

# our key prefix -> the authors' key prefix (stem modules share their names)
_KEY_PREFIXES = (
    ("stages.0.", "layer1."),
    ("stages.1.", "layer2."),
    ("stages.2.", "layer3."),
    ("stages.3.", "layer4."),
    ("classifier.", "fc."),
    ("stem.", ""),
)


_CHECKPOINT_HELP = (
    "The pretrained ReActNet-18 comes from the ReActNet authors' GitHub release "
    "(github.com/liuzechun/ReActNet, the ResNet-18 based model, file model_best.pth.tar); "
    "download it yourself and pass it with base.checkpoint=PATH (there is no automatic download)."
)


def _to_authors_key(key: str) -> str:
    for ours, theirs in _KEY_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(key)


def authors_state_dict(model: BaseNetwork) -> OrderedDict[str, torch.Tensor]:
    """The model's state dict under the authors' key names (no ``module.`` prefix)."""
    return OrderedDict((_to_authors_key(k), v) for k, v in model.state_dict().items())


def save_reactnet_checkpoint(model: BaseNetwork, path: str, epoch: int = 0, best_top1_acc: float = 0.0) -> None:
    """Write ``model`` as the authors' training script does (DataParallel keys)."""
    state = OrderedDict(("module." + k, v.detach().cpu()) for k, v in authors_state_dict(model).items())
    payload = {
        "epoch": epoch,
        "state_dict": state,
        "best_top1_acc": best_top1_acc,
        "optimizer": {"state": {}, "param_groups": []},
    }
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def load_reactnet_checkpoint(path: str, num_classes: int = 1000, width: float = 1.0) -> BaseNetwork:
    """Build a :class:`ReActNet18` from the authors' ``model_best.pth.tar``.

    The file is read as data only (tensors, numbers and plain containers: all the
    authors' format holds), and its tensors are checked against the architecture's
    names and shapes before the network is built. Raises :class:`CheckpointError`
    if the file is missing, unreadable, holds anything else or another architecture.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"ReActNet checkpoint file is missing: {path}. {_CHECKPOINT_HELP}")
    checkpoint = load_weights(path, "ReActNet checkpoint", _CHECKPOINT_HELP, error=CheckpointError)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(
            f"{path} is not a ReActNet checkpoint: expected a dict with a 'state_dict' of tensors. " + _CHECKPOINT_HELP
        )
    state = {k.removeprefix("module."): v for k, v in state.items()}
    config = {"num_classes": num_classes, "width": width}
    shapes = {_to_authors_key(k): shape for k, shape in expected_shapes(ARCH, config).items()}
    # BN counters are absent from checkpoints of old PyTorch versions: the new network keeps its own
    shapes = {k: shape for k, shape in shapes.items() if k in state or not k.endswith("num_batches_tracked")}
    check_state(state, shapes, f"ReActNet checkpoint {path}", f"ReActNet-18 (num_classes={num_classes}, width={width})")
    model = rebuild(ARCH, config)
    model.load_state_dict({k: state.get(_to_authors_key(k), v) for k, v in model.state_dict().items()})
    return model
