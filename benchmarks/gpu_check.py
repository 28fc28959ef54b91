"""``make gpu-check``: the whole GPU story in one prepared run, each step in its own process and time limit.

Every step is a real command line (``python -m bnn_adapt ...``, the benchmark), run with a timeout so
that one failure or hang does not hide the others: every strategy on the digits with ``trainer=gpu``
(16-mixed), once with bf16-mixed, ``memory=lean``, the tap cache, ``trainer=ddp`` on every visible GPU
(and with ``trainer.sync_batchnorm=true``), export of a GPU-trained run and predict with it on CPU, a
4-trial Pareto search, ``make bench`` quick on the device, and a thesis-scale epoch: CIFAR-format
generated data of CIFAR-10 5-5's size (25,000 target training images), the full-width STE net, batch
64, for finetune, serial and UDTA, with the loader as configured. It writes ``gpu_check.md`` and
``gpu_check.json``: device, versions, and per step its status, time, top-1, epoch time, images per
second and peak memory (GPU: ``torch.cuda.max_memory_allocated`` of the run; CPU: peak resident set).

``--device cpu`` runs the same steps at tiny sizes (width 0.1, a few batches) in a few minutes: the
test in CI. ``--expect torch==2.11.0 ...`` fails when an installed version differs (``make test-compat``).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from benchmarks.gpu_check_steps import CPU, CUDA, Step, plan
from bnn_adapt.files import write_json
from bnn_adapt.run.config import REPO_ROOT
from bnn_adapt.run.record import RunRecord
from bnn_adapt.run.results import package_versions

BUDGET_S = 8 * 60  # the whole check on one GPU; steps that would start later are skipped, and say so


def write_images(folder: Path, n: int = 6) -> None:
    """A few scikit-learn digits 5-9 as PNG files: what ``task=predict`` reads."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415
    from sklearn.datasets import load_digits  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    for i, k in enumerate(np.flatnonzero(digits.target >= 5)[:n]):
        Image.fromarray((digits.images[k] * 255 / 16).astype(np.uint8)).save(folder / f"digit_{i}.png")


def run_step(step: Step, limit: float, log_dir: Path) -> dict:
    """Run one step in its own process with a time limit; its record (status, time, measured values)."""
    record = {"step": step.name, "command": " ".join(step.command[1:])}
    log = log_dir / f"{step.name}.log"
    start = time.perf_counter()
    try:
        with log.open("w") as out:
            done = subprocess.run(
                step.command,
                cwd=REPO_ROOT,
                env={**os.environ, **step.env},
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=limit,
                check=False,
            )
        record["status"] = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired:
        record["status"] = f"timed out ({limit:.0f} s)"
    record["time_s"] = round(time.perf_counter() - start, 1)
    if record["status"] != "ok":
        record["log_tail"] = log.read_text(errors="replace")[-1500:]
    for run_dir in step.run_dirs:
        record.update(run_measures(run_dir))
    return record


def run_measures(run_dir: Path) -> dict:
    """Top-1, epoch time, training images per second and peak memory from a run's record."""
    m = RunRecord.read(run_dir)
    if m is None:
        return {}
    batch = (m.config or {}).get("data", {}).get("batch_size")
    return {
        "top1": m.test_top1,
        "epoch_time_s": m.epoch_time_s,
        "images_per_s": round(batch / m.step_time_s, 1) if batch and m.step_time_s else None,
        "peak_mem_bytes": m.peak_mem_bytes,
        "run_device": m.device,
    }


def environment(device: str) -> dict:
    import torch  # noqa: PLC0415

    env = {
        "device": device,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "versions": package_versions(),
        "cuda": torch.version.cuda,
        "gpus": [],
    }
    if device == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return env


def markdown(report: dict) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        "# GPU check",
        "",
        (
            f"Device: {env['device']} ({', '.join(env['gpus']) or env.get('cpu_capability', '')}); {versions}; "
            f"CUDA {env['cuda']}; commit {report['commit']}; {report['total_s']:.0f} s in all."
        ),
        "",
        "| step | status | time (s) | top-1 | epoch (s) | images/s | peak memory (MB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["steps"]:
        cells = [
            r["step"],
            r["status"],
            f"{r['time_s']:.1f}" if "time_s" in r else "",
            *(
                f"{r[k]:{fmt}}" if r.get(k) is not None else ""
                for k, fmt in (("top1", ".4f"), ("epoch_time_s", ".2f"), ("images_per_s", ".0f"))
            ),
            f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_versions(expected: list[str]) -> list[str]:
    """``pkg==version`` pins that the installed packages do not match."""
    wrong = []
    for pin in expected:
        name, _, version = pin.partition("==")
        have = metadata.version(name)
        if have != version:
            wrong.append(f"{name} {have} is installed, expected {version}")
    return wrong


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for gpu_check.md / .json (default: benchmarks/ on cuda, the work folder on cpu)",
    )
    parser.add_argument("--work", default="outputs/gpu_check", help="runs, data and logs of the steps")
    parser.add_argument("--only", default=None, help="comma-separated step names (and the steps they need)")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole check (default: {BUDGET_S} on cuda, 3 x that on cpu)",
    )
    parser.add_argument("--expect", nargs="*", default=[], help="pkg==version pins the environment must have")
    args = parser.parse_args(argv)
    wrong = check_versions(args.expect)
    if wrong:
        print("error: " + "; ".join(wrong), file=sys.stderr)
        return 2
    import torch  # noqa: PLC0415

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: no CUDA GPU is visible to torch here; run `make gpu-check DEVICE=cpu` for the CPU rehearsal",
            file=sys.stderr,
        )
        return 2
    work = Path(args.work).resolve()
    out = Path(args.out or ("benchmarks" if args.device == "cuda" else work))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    write_images(work / "images")
    steps = plan(args.device, work, torch.cuda.device_count() if args.device == "cuda" else 0)
    if args.only:
        wanted = set(args.only.split(","))
        by_name = {s.name: s for s in steps}
        for name in list(wanted):
            while by_name[name].needs:
                name = by_name[name].needs
                wanted.add(name)
        steps = [s for s in steps if s.name in wanted]
    limits = (CUDA if args.device == "cuda" else CPU).limits
    budget = args.budget or (BUDGET_S if args.device == "cuda" else 3 * BUDGET_S)
    start, records, passed = time.perf_counter(), [], set()
    for step in steps:
        left = budget - (time.perf_counter() - start)
        if step.skip or (step.needs and step.needs not in passed) or left < 10:
            why = step.skip or (
                f"{step.needs} did not pass" if step.needs and step.needs not in passed else "over the time budget"
            )
            records.append({"step": step.name, "status": f"skipped: {why}"})
        else:
            records.append(
                run_step(step, min(limits[step.kind if step.kind in limits else "run"], left), work / "logs")
            )
            if records[-1]["status"] == "ok":
                passed.add(step.name)
        print(f"{records[-1]['step']:24} {records[-1]['status']}  {records[-1].get('time_s', '')}", flush=True)
    from benchmarks.bench_report import commit  # noqa: PLC0415

    report = {
        "environment": environment(args.device),
        "commit": commit(),
        "steps": records,
        "total_s": round(time.perf_counter() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_check.json", report)
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"report: {out / 'gpu_check.md'}")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped: needs") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
