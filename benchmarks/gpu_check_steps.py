"""The steps of ``make gpu-check``: every one a real command line, at GPU sizes or at tiny CPU ones.

What each step runs and what it needs first; :mod:`benchmarks.gpu_check` runs them, each in its own
process and time limit, and writes the report.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from bnn_adapt.adapters import STRATEGIES

DIGITS = "+experiment=digits5_5"  # the digits adaptation every run step shares; a strategy's step adds adapter=NAME
THESIS_STRATEGIES = {
    "finetune": "+experiment=cifar5_5_finetune",
    "serial": "+experiment=cifar5_5_serial",
    "udta": "+experiment=cifar80_20_udta",
}


@dataclass(frozen=True)
class Sizes:
    """What differs between the GPU check and its CPU rehearsal."""

    trainer: tuple[str, ...]  # the trainer of every single-device step
    digits: tuple[str, ...]  # shrinks (CPU) the digits runs
    thesis_per_class: int  # CIFAR-10 images per class and split (5 target classes: 5,000 -> 25,000)
    thesis: tuple[str, ...]  # the thesis-scale epoch
    search: tuple[str, ...]
    bench: tuple[str, ...]
    limits: dict[str, int] = field(default_factory=dict)  # seconds per kind of step


CUDA = Sizes(
    trainer=("trainer=gpu",),
    digits=(),
    thesis_per_class=5000,
    thesis=("base.width=1.0", "data.batch_size=64", "trainer.limit_val_batches=79"),  # 5,000 test images
    search=(),
    bench=("--quick", "--device", "cuda", "--peak-repeats", "1"),
    limits={"run": 120, "thesis": 180, "search": 240, "bench": 300, "data": 180},
)
CPU = Sizes(
    trainer=("trainer=cpu",),
    digits=(
        "base.width=0.1",
        "base.pretrain.epochs=1",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
    ),
    thesis_per_class=12,
    thesis=("base.width=0.1", "data.batch_size=16", "trainer.limit_val_batches=2"),
    search=("trainer.max_epochs=1",),
    bench=(
        "--quick",
        "--tiny",
        "--device",
        "cpu",
        "--peak-repeats",
        "0",
        "--models",
        "ste_resnet_cifar",
        "--strategies",
        "head_only,udta",
    ),
    limits={"run": 400, "thesis": 400, "search": 900, "bench": 600, "data": 120},
)


@dataclass
class Step:
    name: str
    kind: str  # run | thesis | search | bench | data | predict
    command: list[str]
    run_dirs: list[Path] = field(default_factory=list)  # where the step's metrics.json files land
    env: dict[str, str] = field(default_factory=dict)
    needs: str | None = None  # a step that must have passed first
    skip: str | None = None  # why it does not run on this device


def bnn(*args: str) -> list[str]:
    return [sys.executable, "-m", "bnn_adapt", *args]


def plan(device: str, work: Path, gpus: int) -> list[Step]:
    """Every step of the check, in order, for ``device`` (cuda or cpu) with ``gpus`` visible GPUs."""
    sizes = CUDA if device == "cuda" else CPU
    common = [f"paths.base_dir={work / 'bases'}", f"paths.log_dir={work / 'outputs'}", "logger=csv"]

    def digits(name: str, *overrides: str, kind: str = "run", trainer=sizes.trainer, **kw) -> Step:
        run_dir = work / "runs" / name
        command = bnn(
            DIGITS,
            *([f"adapter={name}"] if name in STRATEGIES else []),
            *common,
            *trainer,
            *sizes.digits,
            *overrides,
            f"hydra.run.dir={run_dir}",
        )
        return Step(name, kind, command, [run_dir], **kw)

    first = next(iter(STRATEGIES))  # its run pretrains the digits base the others adapt
    steps = [digits(name, needs=None if name == first else first) for name in STRATEGIES]
    steps += [
        digits("udta_bf16", "trainer.precision=bf16-mixed", needs=first),
        digits("udta_lean", "memory=lean", needs=first),
        digits("udta_tap_cache", "tap_cache.enabled=true", needs=first),
    ]
    ddp = ("trainer=ddp",) if device == "cuda" else ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    steps.append(
        digits(
            "udta_ddp",
            "trainer.precision=32-true" if device == "cpu" else "trainer.devices=-1",
            trainer=ddp,
            needs=first,
        )
    )
    sync = digits("udta_ddp_sync_bn", "trainer.sync_batchnorm=true", trainer=ddp, needs=first)
    sync.skip = None if device == "cuda" and gpus > 1 else "needs 2+ GPUs (torch's SyncBatchNorm runs on GPUs only)"
    steps.append(sync)
    deploy = work / "deploy"
    steps.append(
        Step(
            "export",
            "run",
            bnn(
                "task=export",
                f"export.adapter_run=[{work / 'runs' / 'udta'}]",
                f"export.dir={deploy}",
                f"hydra.run.dir={work / 'runs' / 'export'}",
            ),
            needs="udta",
        )
    )
    steps.append(
        Step(
            "predict_cpu",
            "predict",
            bnn(
                "task=predict",
                f"base.file={deploy / 'base.bnnpack'}",
                f"adapters=[{deploy / 'udta_head_concat.safetensors'}]",
                f"inputs={work / 'images'}",
                "predict.top_k=2",
                f"predict.output={work / 'predictions.json'}",
                f"hydra.run.dir={work / 'runs' / 'predict'}",
            ),
            env={"CUDA_VISIBLE_DEVICES": ""},
            needs="export",
        )
    )
    search_dir = work / "search"
    steps.append(
        Step(
            "pareto_search",
            "search",
            bnn(
                "--multirun",
                "+experiment=digits5_5",
                "hparams_search=size_vs_accuracy",
                "hydra.sweeper.n_trials=4",
                f"hydra.sweep.dir={search_dir}",
                *common,
                *sizes.trainer,
                *sizes.digits,
                *sizes.search,
            ),
            needs=first,
        )
    )
    steps.append(
        Step(
            "bench_quick",
            "bench",
            [sys.executable, "-m", "benchmarks.bench", *sizes.bench, "--out", str(work / "bench")],
        )
    )
    data_dir = work / "data"
    steps.append(
        Step(
            "thesis_data",
            "data",
            [
                sys.executable,
                "-c",
                (
                    "import sys; from bnn_adapt.training.datasets.cifar10 import write_cifar10; "
                    "write_cifar10(sys.argv[1], n_per_class=int(sys.argv[2]))"
                ),
                str(data_dir / "cifar10"),
                str(sizes.thesis_per_class),
            ],
        )
    )
    thesis_base = work / "bases" / "thesis_cifar10_0-4.pt"
    thesis = [f"paths.data_dir={data_dir}", *common, *sizes.trainer, *sizes.thesis]
    steps.append(
        Step(
            "thesis_base",
            "thesis",
            bnn(
                "+experiment=cifar5_5_base",
                *thesis,
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=20",
                f"base.save_to={thesis_base}",
                f"hydra.run.dir={work / 'runs' / 'thesis_base'}",
            ),
            needs="thesis_data",
        )
    )
    for name, experiment in THESIS_STRATEGIES.items():
        run_dir = work / "runs" / f"thesis_{name}"
        overrides = ["data=cifar5_5"] if name == "udta" else []  # the thesis's UDTA experiment, on CIFAR-10 5-5
        steps.append(
            Step(
                f"thesis_epoch_{name}",
                "thesis",
                bnn(
                    experiment,
                    *overrides,
                    *thesis,
                    "trainer.max_epochs=1",
                    f"base.checkpoint={thesis_base}",
                    f"hydra.run.dir={run_dir}",
                ),
                [run_dir],
                needs="thesis_base",
            )
        )
    return steps
