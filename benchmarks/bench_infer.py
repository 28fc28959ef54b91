"""1-bit inference benchmark: packed XNOR-popcount kernels against torch's fp32 convs.

``make bench-infer`` (``python -m benchmarks.bench_infer``) measures, in one
run and on the same threads, the STE base at full width (32x32 images) and
ReActNet-18 (224x224), at batch 1 and 64:

* every binary conv of the base: torch's fp32 conv of +-1 inputs with the same
  +-1 weights against the packed kernel on the packed input (``packed_s``; packing
  that input, which a block does once for its convs, is ``pack_s``), the integer
  outputs compared element for element (``exact``);
* end to end: ``BaseWithAdapters`` with one UDTA adapter attached, a preprocessed
  batch to logits, on the kernels and on fp32 convs (latency and images/s; the
  share of the packed time spent outside the kernels, i.e. in the float parts);
* memory, each in a fresh process: the resident-set growth from loading the
  base file, and from loading one more copy, next to the file's size.

Cases are interleaved round by round and medians reported, so that load from
other processes hits both paths alike; the load average is recorded. Freed
memory stays in the process (``allocator.keep_freed_memory``, both paths),
so that page faults of fresh output tensors do not dominate. Writes
``benchmarks/inference.json`` and ``benchmarks/inference.md`` (docs/speed.md includes it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_infer_report import layer_table, markdown, summary_rows
from benchmarks.bench_report import commit, machine
from bnn_adapt.adapters import Parallel
from bnn_adapt.adapters.file import export_adapter
from bnn_adapt.bases import BASES
from bnn_adapt.deploy import packed_kernels as kernels
from bnn_adapt.deploy.packed_base import write_packed_base
from bnn_adapt.deploy.packed_layers import PackedBinaryConv2d
from bnn_adapt.deploy.predict import BaseWithAdapters
from bnn_adapt.nn.layers import BinaryConv2d, ScaledBinaryConv2d
from bnn_adapt.training import allocator


@dataclass(frozen=True)
class Setup:
    name: str
    width: float
    image_size: int
    num_classes: int
    batches: tuple[int, ...]


FULL = (Setup("ste_resnet_cifar", 1.0, 32, 10, (1, 64)), Setup("reactnet18", 1.0, 224, 1000, (1, 64)))
TINY = (Setup("ste_resnet_cifar", 0.1, 16, 5, (1, 3)), Setup("reactnet18", 0.0625, 32, 10, (1, 3)))


@dataclass(frozen=True)
class Rounds:
    layer: int  # interleaved rounds per layer
    end_to_end: dict  # batch -> rounds
    min_time_s: float  # a timing repeats its call until it lasts this long


def nominal_mhz() -> float | None:
    """The CPU clock /proc/cpuinfo reports (nominal: boost and throttling not included)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1])
    return None


def trained_like(base: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with both signs and BN statistics as training leaves them (speed does not depend on
    values, but exactness and the thresholds are checked on non-trivial ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in base.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(torch.randn(c, generator=gen).abs() + 0.2)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.3)
                module.running_mean.copy_(torch.randn(c, generator=gen) * 3)
                module.running_var.copy_(torch.rand(c, generator=gen) * 20 + 5)
            elif getattr(module, "weight", None) is not None and module.weight.dim() == 4:
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.05)
    return base.eval()


def timed(fn, min_time_s: float) -> float:
    """Seconds per call of ``fn``, repeated until ``min_time_s`` has passed (at least once)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s:
            return elapsed / calls


def layer_inputs(base: nn.Module, size: int) -> dict[str, tuple[nn.Module, tuple]]:
    """Each binary conv of the float base (STE's stem excluded: its input is the image) and its input shape."""
    shapes, handles = {}, []

    def record(name: str, module: nn.Module, args: tuple) -> None:
        shapes.setdefault(name, (module, tuple(args[0].shape[1:])))

    for name, module in base.named_modules():
        if isinstance(module, ScaledBinaryConv2d) or (isinstance(module, BinaryConv2d) and module.binarize_input):
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: record(name, m, args)))
    with torch.no_grad():
        base(torch.randn(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return shapes


def bench_layers(
    setup: Setup, float_base: nn.Module, packed_base: nn.Module, batch: int, rounds: Rounds, log=print
) -> list[dict]:
    """Every binary conv alone, fp32 conv vs packed kernel on the same +-1 weights, interleaved."""
    gen = torch.Generator().manual_seed(batch)
    cases = []
    for name, (module, shape) in layer_inputs(float_base, setup.image_size).items():
        packed = packed_base.get_submodule(name)
        assert isinstance(packed, PackedBinaryConv2d)
        signs = torch.where(torch.randn(batch, *shape, generator=gen) >= 0, 1.0, -1.0)
        weight = torch.where(module.weight.detach() >= 0, 1.0, -1.0)
        plan = kernels.ConvPlan(*packed.packed_weight(), packed.kernel_shape, packed.step, packed.pad)
        bits = kernels.pack_signs(signs, packed.pad)
        stride, pad = packed.step, packed.pad
        cases.append(
            {
                "name": name,
                "signs": signs,
                "bits": bits,
                "plan": plan,
                "pad": pad,
                "float": lambda x=signs, w=weight, s=stride, p=pad: F.conv2d(x, w, stride=s, padding=p),
                "times": {"float": [], "packed": [], "pack": []},
            }
        )
    for _ in range(rounds.layer):
        for case in cases:
            case["times"]["float"].append(timed(case["float"], rounds.min_time_s))
            case["times"]["packed"].append(timed(lambda c=case: c["plan"](c["bits"]), rounds.min_time_s))
            pack = lambda c=case: kernels.pack_signs(c["signs"], c["pad"])
            case["times"]["pack"].append(timed(pack, rounds.min_time_s))
    records, mhz = [], nominal_mhz()
    for case in cases:
        expected, got = case["float"](), case["plan"](case["bits"])
        c_out, c_in, kh, kw = case["plan"].shape
        t = {k: statistics.median(v) for k, v in case["times"].items()}
        macs = expected.numel() * c_in * kh * kw
        records.append(
            {
                "model": setup.name,
                "batch": batch,
                "layer": case["name"],
                "kernel": f"{kh}x{kw}",
                "c_in": c_in,
                "c_out": c_out,
                "input_hw": list(case["signs"].shape[2:]),
                "stride": case["plan"].stride,
                "packed_s": t["packed"],
                "float_s": t["float"],
                "speedup": t["float"] / t["packed"],
                "pack_s": t["pack"],
                "speedup_with_pack": t["float"] / (t["packed"] + t["pack"]),
                "exact": bool(torch.equal(got, expected)),
                "binary_macs": macs,
                "packed_gmacs_per_s": macs / t["packed"] / 1e9,
                "float_gmacs_per_s": macs / t["float"] / 1e9,
            }
        )
        if mhz:  # per core and cycle at the nominal clock: the kernel's step is xor + popcount + add per 512 MACs
            cycles = mhz * 1e6 * torch.get_num_threads()
            records[-1]["packed_macs_per_cycle_per_core"] = macs / t["packed"] / cycles
            records[-1]["float_macs_per_cycle_per_core"] = macs / t["float"] / cycles
        r = records[-1]
        log(
            f"  {setup.name} b{batch} {r['layer']:<28} {r['kernel']} float {r['float_s'] * 1e3:8.3f} ms  "
            f"packed {r['packed_s'] * 1e3:7.3f} ms (+pack {r['pack_s'] * 1e3:.3f})  {r['speedup']:5.1f}x  "
            f"exact={r['exact']}"
        )
    return records


def make_bank(base: nn.Module, setup: Setup, folder: Path, packed: bool) -> BaseWithAdapters:
    """The base as deployed (its packed file) with one UDTA adapter (concat head) attached."""
    torch.manual_seed(1)
    model = Parallel(base, num_classes=10, head="concat")
    trained_like(model.adapter, seed=2)
    trained_like(model.head, seed=3)
    adapter = folder / f"{setup.name}_udta.safetensors"
    if not adapter.exists():
        export_adapter(model, adapter, reference_base=base, class_names=[str(i) for i in range(10)])
    bank = BaseWithAdapters.load(folder / f"{setup.name}.bnnpack", packed=packed)
    bank.attach(adapter)
    return bank


def bench_end_to_end(setup: Setup, banks: dict[str, BaseWithAdapters], batch: int, rounds: Rounds, log=print) -> dict:
    """``BaseWithAdapters.predict`` on a preprocessed batch, and the base alone (its stage outputs)."""
    x = torch.randn(batch, 3, setup.image_size, setup.image_size, generator=torch.Generator().manual_seed(7))
    calls = {}
    for path, bank in banks.items():
        calls[path] = lambda b=bank: b.predict(x, k=5, batch_size=batch)
        calls[f"base_{path}"] = lambda b=bank: b.base.stage_outputs(x)
    times = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():
            call()  # warm-up: thresholds, folds, oneDNN primitives
        for _ in range(rounds.end_to_end[batch]):
            for name, call in calls.items():
                times[name].append(timed(call, rounds.min_time_s))
        shares = []
        for _ in range(3):
            with kernels.kernel_time() as in_kernels:
                start = time.perf_counter()
                calls["packed"]()
                shares.append(in_kernels[0] / (time.perf_counter() - start))
        logits, expected = banks["packed"](x), banks["float"](x)
    t = {k: statistics.median(v) for k, v in times.items()}
    kernel_share = statistics.median(shares)
    record = {
        "model": setup.name,
        "batch": batch,
        "layer": "end_to_end",
        "adapter": "udta (concat head)",
        "packed_s": t["packed"],
        "float_s": t["float"],
        "speedup": t["float"] / t["packed"],
        "images_per_s_packed": batch / t["packed"],
        "images_per_s_float": batch / t["float"],
        "exact": bool(torch.equal(logits, expected)),
        "max_abs_logit_diff": float((logits - expected).abs().max()),
        "max_abs_logit": float(expected.abs().max()),
        "same_top1": bool(torch.equal(logits.argmax(1), expected.argmax(1))),
        "base_packed_s": t["base_packed"],
        "base_float_s": t["base_float"],
        "base_speedup": t["base_float"] / t["base_packed"],
        "kernel_share_packed": kernel_share,
        "float_share_packed": 1 - kernel_share,
        "adapter_share_packed": max(0.0, 1 - t["base_packed"] / t["packed"]),
    }
    log(
        f"  {setup.name} b{batch} end to end: float {t['float'] * 1e3:.2f} ms, packed {t['packed'] * 1e3:.2f} ms, "
        f"{record['speedup']:.2f}x (base alone {record['base_speedup']:.2f}x); packed time: "
        f"{kernel_share:.0%} kernels, {record['adapter_share_packed']:.0%} adapter and head"
    )
    return record


def memory_probe(path: str, packed: bool) -> dict:
    """Resident-set growth of loading a packed base file (run in a fresh process)."""
    from benchmarks.bench_memory import resident_bytes

    def rss() -> int:
        gc.collect()
        return resident_bytes()

    kernels.library()
    before = rss()
    first = BaseWithAdapters.load(path, packed=packed)
    after_first = rss()
    second = BaseWithAdapters.load(path, packed=packed)
    after_second = rss()
    live = sum(t.numel() * t.element_size() for t in (*first.base.parameters(), *first.base.buffers()) if not t.is_meta)
    assert second.base is not first.base
    return {
        "rss_growth_bytes": after_first - before,
        "rss_growth_second_bytes": after_second - after_first,
        "live_tensor_bytes": live,
    }


def bench_memory(setup: Setup, folder: Path) -> dict:
    path = folder / f"{setup.name}.bnnpack"
    record = {"model": setup.name, "packed_file_bytes": path.stat().st_size}
    for mode in ("packed", "float"):
        code = (
            "import json, sys; from benchmarks.bench_infer import memory_probe; "
            f"print(json.dumps(memory_probe({str(path)!r}, {mode == 'packed'})))"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path])}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        record.update({f"{k.removesuffix('_bytes')}_{mode}_bytes": v for k, v in probe.items()})
    return record


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a few minutes on 2 CPU cores")
    parser.add_argument("--tiny", action="store_true", help="tiny widths and images (a smoke test)")
    parser.add_argument("--models", default=None, help="comma-separated base names (default: both)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,64)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both paths (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes (fresh processes)")
    parser.add_argument("--isa", default=None, choices=kernels.ISAS, help="force a kernel level (default: the best)")
    parser.add_argument("--out", default="benchmarks", help="folder for inference.json / inference.md")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if kernels.library() is None:
        raise SystemExit("the packed kernels are not built: install with a C compiler (make install)")
    if args.isa:
        kernels.set_isa(args.isa)
    allocator.keep_freed_memory()
    setups = TINY if args.tiny else FULL
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        if set(wanted) - {s.name for s in setups}:
            raise SystemExit(f"unknown --models {wanted}; choose from {[s.name for s in setups]}")
        setups = tuple(s for s in setups if s.name in wanted)
    if args.batches:
        batches = tuple(int(b) for b in args.batches.split(","))
        setups = tuple(Setup(s.name, s.width, s.image_size, s.num_classes, batches) for s in setups)
    batches = sorted({b for s in setups for b in s.batches})
    if args.tiny:
        rounds = Rounds(layer=2, end_to_end={b: 2 for b in batches}, min_time_s=0.0)
    elif args.quick:
        rounds = Rounds(layer=3, end_to_end={b: 5 if b == 1 else 2 for b in batches}, min_time_s=0.02)
    else:
        rounds = Rounds(layer=7, end_to_end={b: 15 if b == 1 else 4 for b in batches}, min_time_s=0.05)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.bench_infer" + "".join(f" {a}" for a in given)
    meta = {
        "command": command,
        "commit": commit() or "unknown",
        "machine": machine(),
        "isa": kernels.isa(),
        "cpu_mhz": nominal_mhz(),
        "openmp": kernels.openmp(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "rounds": {"layer": rounds.layer, "end_to_end": rounds.end_to_end},
        "allocator": "keep_freed_memory",
    }
    print(f"{command}: kernels {meta['isa']}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    started = time.perf_counter()
    records, memory = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for setup in setups:
            torch.manual_seed(0)
            base = trained_like(BASES[setup.name](num_classes=setup.num_classes, width=setup.width))
            write_packed_base(base, folder / f"{setup.name}.bnnpack")
            banks = {"packed": make_bank(base, setup, folder, True), "float": make_bank(base, setup, folder, False)}
            del base
            for batch in setup.batches:
                records += bench_layers(setup, banks["float"].base, banks["packed"].base, batch, rounds)
                records.append(bench_end_to_end(setup, banks, batch, rounds))
            del banks
            gc.collect()
            if not args.no_memory:
                memory.append(bench_memory(setup, folder))
    meta["elapsed_s"] = time.perf_counter() - started
    meta["load_average_end"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "records": records, "memory": memory, "summary": summary_rows(records)}
    (out / "inference.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(records, memory, meta)
    (out / "inference.md").write_text(text + "\n\n" + layer_table(records) + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
