"""``python -m bnn_adapt [+experiment=NAME] [overrides]``: compose, run, report."""

from __future__ import annotations

import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import execution_whitelist
from omegaconf import DictConfig

# our ${range:...} etc. must exist before Hydra snapshots the OmegaConf resolvers for launcher
# workers (joblib, submitit), which restore that snapshot before every job
from bnn_adapt.errors import UserError
from bnn_adapt.run.config import CONF_DIR, TRUSTED_TARGETS, quote_path_overrides, search_as_multirun

# Lightning 2.6 asks torch's pytree a deprecated question on every step; nothing for our users to act on
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict | tuple | float | None:
    """User errors print one line (``debug=true``: the traceback); in a sweep a
    failing run is recorded in its metrics.json and the sweep goes on. With
    ``optimized_metrics`` (hparams_search) the sweeper gets those values."""
    from bnn_adapt.run.console import one_line_per_message
    from bnn_adapt.run.record import FAILED, RunRecord
    from bnn_adapt.run.task import run, sweeper_value  # imported here so --help stays fast
    from bnn_adapt.training.allocator import keep_freed_memory

    one_line_per_message()  # Lightning's messages through Hydra's logging only, not twice
    keep_freed_memory()  # large activations reused, not re-faulted every step (allocator.py)
    try:
        return sweeper_value(cfg, run(cfg))
    except Exception as exc:
        if cfg.get("debug"):
            raise
        if in_multirun():
            print(f"error: this run failed and the sweep goes on: {type(exc).__name__}: {exc}", file=sys.stderr)
            return RunRecord(status=FAILED, error=f"{type(exc).__name__}: {exc}").to_dict()
        if isinstance(exc, UserError):
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise


def cli(argv: list[str]) -> int:
    """``python -m bnn_adapt ARGV`` in this process (the tests call it so); returns the exit status."""
    from hydra.core.global_hydra import GlobalHydra

    argv = quote_path_overrides(argv)  # run directories (row=...) as paths, unquoted
    argv = search_as_multirun(argv)  # hparams_search=...: a multirun, as before Hydra 1.4
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        with execution_whitelist(TRUSTED_TARGETS):  # what Hydra instantiates for us (callbacks, the search's hook)
            main()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.argv = saved
        GlobalHydra.instance().clear()
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
