"""``python -m bnn_adapt [+experiment=NAME] [overrides]``: compose, run, report."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from bnn_adapt.errors import UserError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from bnn_adapt.task import run  # imported here so --help stays fast

    try:
        return run(cfg)
    except UserError as exc:
        if cfg.get("debug"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
