"""What a person reads on the console while a run trains: each of Lightning's messages once,
and a model summary that counts what a BNN computes.

Lightning gives its ``lightning`` logger a console handler of its own and lets
messages propagate too, so under Hydra (whose job logging puts a console handler
on the root logger) every line printed twice. Lightning's model summary ends with
"Total FLOPs: 0" for any model without an ``example_input_array``, which is
false here; :class:`MacSummary` prints our binary / fp32 MAC counts instead
(:mod:`bnn_adapt.accounting.operations`).
"""

from __future__ import annotations

import logging

import lightning as L
from torch import nn

from bnn_adapt.accounting import operations
from bnn_adapt.accounting.summary import pruned_modules

#: Lightning's advertisements for its hosted services, printed by every Trainer
ADVERTS = ("💡 Tip:",)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERTS)


def one_line_per_message() -> None:
    """Under a logging setup with root handlers (Hydra's job logging), Lightning's own console
    handlers go: its messages reach the console once, through the root logger (and Hydra's
    log file). Without one (tests, notebooks) Lightning's handler stays, the only one.
    Lightning's tips about its hosted services are dropped either way."""
    if logging.getLogger().hasHandlers():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            for handler in list(lg.handlers):
                if type(handler) is logging.StreamHandler:
                    lg.removeHandler(handler)
            lg.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in lg.filters):
            lg.addFilter(_DropAdverts())


class MacSummary(L.Callback):
    """In place of Lightning's model summary: one row per part of the model (base, adapter,
    head; a bare base: stem, stages, classifier) with its parameters and its binary and fp32
    MACs for one image at ``image_size``; no FLOPs column (Lightning's reads 0 for any model
    without an example input)."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            print(self.table(pl_module.model))

    def table(self, model: nn.Module) -> str:
        counts = operations.operation_counts(model, self.image_size, pruned_modules(model))
        macs: dict[str, dict[str, int]] = {}
        for row in counts["macs_per_layer"]:
            part = macs.setdefault(row["name"].split(".")[0], {"binary": 0, "fp32": 0})
            part[row["kind"]] += row["macs"]
        human = operations.human
        rows = [("name", "type", "params", "trainable", "binary MACs", "fp32 MACs")]
        for name, module in model.named_children():
            done = macs.get(name, {"binary": 0, "fp32": 0})
            rows.append(
                (
                    name,
                    type(module).__name__,
                    human(_params(module)),
                    human(_params(module, trainable=True)),
                    human(done["binary"]),
                    human(done["fp32"]),
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [
            " | ".join(v.ljust(w) if c < 2 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths, strict=True)))
            for r in rows
        ]
        rule = "-" * len(lines[0])
        footer = f"{human(_params(model, trainable=True))} trainable of {human(_params(model))} params; "
        return "\n".join([lines[0], rule, *lines[1:], rule, footer + operations.totals_line(counts)])


def _params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
