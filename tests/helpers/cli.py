"""The command line, ``python -m MODULE ARGS`` with every output under a root folder: in this process (the fast
tier) or as a subprocess (the integration tier, which proves the command-line contract itself)."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
# digits pretrain their base on the fly; smoke sizes, tiny trials; no pruner unless a test sets one
SEARCH = (
    "+experiment=digits5_5",
    "+profile=smoke",
    "hparams_search=size_vs_accuracy",
    "base.pretrain.epochs=1",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
)


@dataclass
class Result:
    """What a finished command left: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(BNN_ADAPT_ROOT=str(root), OMP_NUM_THREADS="1")
    return env


def run_module(root: Path, module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` as a subprocess from the repository root, every output under ``root``."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=environment(root),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_here(root: Path, module: str, *args: str) -> Result:
    """``python -m MODULE ARGS`` in this process (``bnn_adapt``'s ``cli`` or the module's ``main(argv)``), from the
    repository root with ``BNN_ADAPT_ROOT=root``; the working folder, environment, torch's threads and the logging
    handlers come back."""
    entry = importlib.import_module("bnn_adapt.__main__").cli if module == "bnn_adapt" else None
    entry = entry or importlib.import_module(module).main
    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    handlers, level = logging.root.handlers[:], logging.root.level  # Hydra configures logging for its job
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.pop("HYDRA_FULL_ERROR", None)
    os.environ["BNN_ADAPT_ROOT"] = str(root)
    os.chdir(REPO_ROOT)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                code = entry(list(args))
            except SystemExit as stop:  # argparse's usage errors
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch.set_num_threads(threads)
        for handler in set(logging.root.handlers) - set(handlers):
            handler.close()
        logging.root.handlers[:], logging.root.level = handlers, level
    return Result(code or 0, stdout.getvalue(), stderr.getvalue())
