"""The thesis code's checkpoints of its ``ResNet_cifar10``, read as an STE base.

The thesis's repository (``NN_Thesis/trainer.py``) writes two files: ``Trainer.save``'s dict
(``epoch``, ``model_state_dict``, ``optimizer_state_dict``, ``lr_scheduler_state_dict``, ``loss``)
and ``Trainer.save_Best``'s plain state dict. Its module names (``conv1``, ``bn1``,
``layerN.j.conv1``, ``layerN.0.downsample.0/1``, ``bn2``, ``fc``, ``bn3``) map one to one onto
:class:`~bnn_adapt.bases.ste_resnet.STEResNetCIFAR` with ``block="thesis"`` and
``binarize="thesis_code"``; its 16/32/64 x ``inflate`` channels are width ``inflate / 5``.
"""

from __future__ import annotations

import re

from bnn_adapt.bases.base import BaseNetwork, rebuild
from bnn_adapt.bases.received import check_state, checked_arch, expected_shapes, few
from bnn_adapt.errors import CheckpointError

ARCH = "ste_resnet_cifar"
#: the keys of ``Trainer.save``'s dict
SAVE_KEYS = frozenset({"epoch", "model_state_dict", "optimizer_state_dict", "lr_scheduler_state_dict", "loss"})
# our key prefix -> the thesis code's (the stages are mapped by :func:`to_thesis_key`)
_KEY_PREFIXES = (
    ("stem.0.", "conv1."),
    ("stem.1.", "bn1."),
    ("feature_norm.", "bn2."),
    ("classifier.0.", "fc."),
    ("classifier.1.", "bn3."),
)
_STAGE = re.compile(r"stages\.(\d+)\.(\d+)\.(.*)")


def to_thesis_key(key: str) -> str:
    """Our state-dict name of an STE base -> the thesis code's ``ResNet_cifar10`` name."""
    stage = _STAGE.fullmatch(key)
    if stage:
        return f"layer{int(stage[1]) + 1}.{stage[2]}." + stage[3].replace("shortcut.", "downsample.", 1)
    for ours, theirs in _KEY_PREFIXES:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise KeyError(key)


def thesis_state(payload: object) -> tuple[dict, str] | None:
    """``(state dict, which file)`` when ``payload`` is one of the thesis code's files, else None."""
    if isinstance(payload, dict) and SAVE_KEYS <= set(payload) and isinstance(payload["model_state_dict"], dict):
        return payload["model_state_dict"], f"Trainer.save, epoch {payload['epoch']!r}"
    if isinstance(payload, dict) and "conv1.weight" in payload and any(str(k).startswith("layer1.") for k in payload):
        return payload, "Trainer.save_Best"
    return None


def _architecture(state: dict, source: str) -> dict:
    """The constructor arguments the tensors' shapes imply, or a one-line refusal naming what was found."""
    names = [k for k in state if isinstance(k, str)]
    if any(k.startswith("layer4.") for k in names):
        raise CheckpointError(
            f"{source} holds a thesis-code network with a layer4 (ResNet_Cifar100 or ResNet_imagenet); "
            "only its ResNet_cifar10 loads as a base (base=ste_resnet_cifar)"
        )
    blocks = {int(m[1]) for k in names if (m := re.match(r"layer1\.(\d+)\.", k))}
    if not blocks or not any(k.startswith("layer1.0.conv2.") for k in names):
        found = few({k.split(".", 2)[0] + "." + k.split(".", 2)[1] for k in names if "." in k})
        raise CheckpointError(
            f"{source} holds no ResNet_cifar10 of BasicBlocks (conv1, bn1, conv2, bn2 in each; found {found})"
        )
    for key in ("conv1.weight", "fc.weight"):
        if key not in state or getattr(state[key], "dim", lambda: 0)() < 2:
            raise CheckpointError(f"{source} holds no 2-D or larger tensor {key}: it is no ResNet_cifar10")
    c0 = int(state["conv1.weight"].shape[0])
    if c0 % 16:
        raise CheckpointError(f"{source}: conv1 has {c0} channels, not 16 x inflate: it is no ResNet_cifar10")
    config = {
        "num_classes": int(state["fc.weight"].shape[0]),
        "width": c0 / 80,  # 16 * inflate channels, ours 80 * width
        "blocks_per_stage": max(blocks) + 1,
        "block": "thesis",
        "binarize": "thesis_code",
    }
    return checked_arch(ARCH, config, source)


def load_thesis_checkpoint(payload: object, path: str) -> BaseNetwork | None:
    """The STE base a thesis-code checkpoint holds (``payload``: the file read as data only), checked
    against the architecture its shapes imply; None when ``payload`` is not a thesis-code file."""
    found = thesis_state(payload)
    if found is None:
        return None
    state, which = found
    source = f"thesis-code checkpoint {path} ({which})"
    state = {k.removeprefix("module.") if isinstance(k, str) else k: v for k, v in state.items()}
    config = _architecture(state, source)
    shapes = {to_thesis_key(k): shape for k, shape in expected_shapes(ARCH, config).items()}
    # BN counters are absent from files of old PyTorch versions: the new network keeps its own
    shapes = {k: shape for k, shape in shapes.items() if k in state or not k.endswith("num_batches_tracked")}
    inflate = round(config["width"] * 5, 4)
    check_state(state, shapes, source, f"ResNet_cifar10 (inflate={inflate:g}, num_classes={config['num_classes']})")
    base = rebuild(ARCH, config)
    base.load_state_dict({k: state.get(to_thesis_key(k), v) for k, v in base.state_dict().items()})
    base.origin = f"thesis code ({which})"
    return base
