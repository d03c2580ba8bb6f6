"""The profiler's view of the kernels at the issues' target shapes: Nsight Compute (ncu) over one forward and
backward call of each implementation, ours and the peers', to say where the time goes when a target is missed
(stalls, occupancy, tensor-pipe use, shared-memory bank conflicts).

On the GPU machine, `bash bench/gpu_session.sh profile` runs the three steps:

    ncu --profile-from-start off --clock-control none --section ... -o DIR/report \\
        python -m bench.profile_kernels --manifest DIR/cases.json   # the cases, each once, under the profiler
    ncu --import DIR/report.ncu-rep --page raw --csv --print-units base > DIR/raw.csv   (and --page details)
    python -m bench.profile_kernels --summarize DIR     # bench/results/<device>/profile.md (+ profile-details.txt)

The driver first runs every case twice outside the profiled range (Triton's compilation and autotuning, cuBLASLt's
heuristics, PyTorch's SDPA backend selection), then runs each once between cudaProfilerStart and cudaProfilerStop,
after a marker kernel of one program per case number (grid = case number + 1): the summary splits ncu's kernel list
at the markers. Nothing is checked or timed here: the benchmarks (bench/bench_<op>.py) check every implementation
against float64 before timing it, and their times, not ncu's replays, are the results.

    python -m bench.profile_kernels --device cpu --quick    # the driver alone, on small shapes (no profiler)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from . import bench_attention, bench_layer_norm, bench_linear_gelu
from .common import RESULTS, device_flag, device_slug, environment

# Which implementations of each bench module are profiled: fastgpt's kernel backends and the fastest peers.
PEERS = {
    "attention": ("torch-sdpa-flash", "torch-sdpa-cudnn", "flash-attn"),
    "ffn": ("torch-eager",),
    "add_layer_norm": ("torch-eager",),
}


@dataclasses.dataclass
class Case:
    name: str  # "<op> <shape> <implementation>"
    run: Callable[[], object]  # one forward and backward call


def _chosen(impls: dict, op: str) -> dict:
    return {name: fn for name, fn in impls.items()
            if (name.startswith("fastgpt-") and name != "fastgpt-reference") or name in PEERS[op]}


def _forward_backward(forward: Callable[[], torch.Tensor], inputs: tuple, grad: torch.Tensor) -> Callable[[], object]:
    # autograd.grad, not .backward(): accumulating into .grad would add kernels of its own from the second call on.
    return lambda: torch.autograd.grad(forward(), inputs, grad)


def attention_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    # (B, H, L, D, causal): GPT-1's shape (16k tokens, causal), the D = 128, L = 4096 forward target's.
    shapes = [(2, 2, 128, 64, True), (1, 2, 256, 128, False)] if quick else \
        [(32, 12, 512, 64, True), (4, 16, 4096, 128, False)]
    impls = _chosen(bench_attention.implementations(device, False, []), "attention")
    cases = []
    for B, H, L, D, causal in shapes:
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(B, H, L, D, device=device, dtype=dtype)
        shape = f"{B}x{H}x{L}x{D}{' causal' if causal else ''}"
        for impl, fn in impls.items():
            cases.append(Case(f"attention {shape} {impl}",
                              _forward_backward(lambda fn=fn, causal=causal, q=q, k=k, v=v: fn(q, k, v, causal, 0.0),
                                                (q, k, v), grad)))
    return cases


def ffn_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    tokens, d_model, d_ff = (64, 32, 128) if quick else (16384, 768, 3072)  # GPT-1's block, 16k tokens
    x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(d_ff, d_model, device=device) * d_model ** -0.5).to(dtype).requires_grad_()
    b1 = (torch.randn(d_ff, device=device) * 0.1).to(dtype).requires_grad_()
    w2 = (torch.randn(d_model, d_ff, device=device) * d_ff ** -0.5).to(dtype).requires_grad_()
    b2 = (torch.randn(d_model, device=device) * 0.1).to(dtype).requires_grad_()
    params = (x, w1, b1, w2, b2)
    grad = torch.randn(tokens, d_model, device=device, dtype=dtype)
    impls = _chosen(bench_linear_gelu.implementations(device, False, []), "ffn")
    return [Case(f"gelu_ffn {tokens}x{d_model}->{d_ff} {impl}",
                 _forward_backward(lambda fn=fn: fn(*params), params, grad)) for impl, fn in impls.items()]


def add_layer_norm_cases(device: torch.device, dtype: torch.dtype, quick: bool) -> list[Case]:
    rows, cols = (64, 96) if quick else (32768, 768)  # the add+dropout+LayerNorm target's shape
    x, residual = (torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(cols, device=device)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(cols, device=device)).to(dtype).requires_grad_()
    params = (x, residual, weight, bias)
    grad = torch.randn(rows, cols, device=device, dtype=dtype)
    impls = _chosen(bench_layer_norm.add_implementations(device, False, []), "add_layer_norm")
    p = bench_layer_norm.DROPOUT_P
    return [Case(f"add_layer_norm {rows}x{cols} dropout {p} {impl}",
                 _forward_backward(lambda fn=fn: fn(*params, p), params, grad)) for impl, fn in impls.items()]


CASES = {"attention": attention_cases, "ffn": ffn_cases, "add_layer_norm": add_layer_norm_cases}


def _marker():
    """A kernel that does nothing, named for the summary to find: one program per case number."""
    import triton

    @triton.jit
    def _profile_case_marker(X):
        pass

    return _profile_case_marker


def run_cases(cases: list[Case], device: torch.device) -> list[str]:
    """Warms each case up, then runs each once inside the profiler's range after its marker; returns the names of
    the cases that ran (a peer that refuses a shape is left out, with the reason printed)."""
    ready = []
    for case in cases:
        try:
            case.run()
            case.run()
        except RuntimeError as error:  # an SDPA backend that does not take this shape, or out of memory
            print(f"skipped {case.name}: {str(error).splitlines()[0][:120]}")
            continue
        ready.append(case)
    cuda = device.type == "cuda"
    if cuda:
        marker, flag = _marker(), torch.empty(1, device=device)
        marker[(1,)](flag)  # compiled outside the range
        torch.cuda.synchronize(device)
    for number, case in enumerate(ready):
        if cuda:
            torch.cuda.profiler.start()
            marker[(number + 1,)](flag)
        case.run()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.profiler.stop()
        print(f"case {number}: {case.name}")
    return [case.name for case in ready]


# ---------------------------------------------------------------------------------------------------------------
# The summary: one row per kernel, grouped by case, from ncu's raw page (--page raw --csv --print-units base: a
# header of metric names, a row of units, then one row per kernel).

# --print-units base prints times in nanoseconds and sizes in bytes; other prefixes are read too, to the same units.
_UNITS = {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6, "second": 1e9,
          "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KiB": 1024.0, "MiB": 1024.0 ** 2}


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_raw_csv(text: str) -> list[dict[str, tuple[str, str]]]:
    """ncu's raw CSV as one {column: (value, unit)} per kernel (lines before the header, such as ==PROF== ones,
    are skipped)."""
    lines = list(csv.reader(io.StringIO(text)))
    start = next((i for i, row in enumerate(lines) if "Kernel Name" in row), None)
    if start is None:
        raise ValueError("no header row with a 'Kernel Name' column: not ncu's raw CSV")
    header = lines[start]
    body = lines[start + 1:]
    units = [""] * len(header)
    if body and not body[0][header.index("ID")].strip():  # the units row has no kernel ID
        units, body = body[0], body[1:]
    return [{name: (value, unit) for name, value, unit in zip(header, row, units)} for row in body if row]


def _metric(kernel: dict, name: str) -> float | None:
    """A metric's value, times in nanoseconds and sizes in bytes; None when the report lacks it."""
    value, unit = kernel.get(name, (None, ""))
    number = _number(value)
    return None if number is None else number * _UNITS.get(unit, 1.0)


def _matching(kernel: dict, pattern: str) -> dict[str, float]:
    """{first group: value} of the numeric metrics whose name matches `pattern`."""
    found = {}
    for name, (value, _unit) in kernel.items():
        match = re.fullmatch(pattern, name)
        number = _number(value)
        if match and number is not None:
            found[match.group(1)] = number
    return found


def _short_name(name: str) -> str:
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(anonymous namespace\)::|\b\w+::", "", name)
    depth, cut = 0, len(name)
    for i, char in enumerate(name):  # drop the argument list (the outermost parentheses after the template)
        depth += char == "<"
        depth -= char == ">"
        if char == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    return name if len(name) <= 56 else name[:53] + "..."


def _cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def kernel_row(kernel: dict) -> list[str]:
    """Duration (us), SM, memory, DRAM and tensor-pipe % of peak, achieved/theoretical occupancy, registers, shared
    memory (KiB), the three largest stall reasons (cycles per issued instruction), shared-memory bank conflicts."""
    duration = _metric(kernel, "gpu__time_duration.sum")
    tensor = _matching(kernel, r"sm__(?:pipe|inst_executed_pipe)_(tensor\w*)\.avg\.pct_of_peak_sustained_active")
    stalls = _matching(kernel, r"smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)(?:_per_issue_active)?\.ratio")
    stalls = {reason: value for reason, value in stalls.items() if reason not in ("selected", "not_selected")}
    top = sorted(stalls.items(), key=lambda item: -item[1])[:3]
    shared = [_metric(kernel, f"launch__shared_mem_per_block_{kind}") for kind in ("static", "dynamic")]
    conflicts = _matching(kernel, r"l1tex__data_bank_conflicts_pipe_lsu_mem_shared(_op_ld|_op_st)\.sum")
    wavefronts = _matching(kernel, r"l1tex__data_pipe_lsu_wavefronts_mem_shared(_op_ld|_op_st)\.sum")
    occupancy = (_metric(kernel, "sm__warps_active.avg.pct_of_peak_sustained_active"),
                 _metric(kernel, "sm__maximum_warps_per_active_cycle_pct"))
    return [
        _short_name(kernel.get("Kernel Name", ("?", ""))[0]),
        _cell(None if duration is None else duration / 1e3, 1),
        _cell(_metric(kernel, "sm__throughput.avg.pct_of_peak_sustained_elapsed")),
        _cell(_metric(kernel, "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed")),
        _cell(_metric(kernel, "dram__throughput.avg.pct_of_peak_sustained_elapsed")),
        _cell(max(tensor.values()) if tensor else None),
        f"{_cell(occupancy[0])}/{_cell(occupancy[1])}",
        _cell(_metric(kernel, "launch__registers_per_thread")),
        "-" if None in shared else _cell(sum(shared) / 1024, 1),
        ", ".join(f"{reason} {value:.1f}" for reason, value in top) or "-",
        f"{sum(conflicts.values()):.0f}/{sum(wavefronts.values()):.0f}" if conflicts and wavefronts else "-",
    ]


HEADER = ["kernel", "us", "SM %", "mem %", "DRAM %", "tensor %", "occupancy % (achieved/theoretical)", "regs",
          "smem KiB", "top stalls (cycles per instruction)", "smem bank conflicts/wavefronts"]


def summarize(kernels: list[dict], manifest: dict) -> str:
    """The markdown summary: per case, its kernels in launch order and its total time."""
    names = manifest["cases"]
    info = manifest["environment"]
    groups: list[tuple[str, list[dict]]] = []
    for kernel in kernels:
        if "_profile_case_marker" in kernel.get("Kernel Name", ("", ""))[0]:
            programs = _metric(kernel, "launch__grid_size")
            number = int(programs) - 1 if programs is not None else len(groups)
            groups.append((names[number] if 0 <= number < len(names) else f"case {number}", []))
        elif groups:
            groups[-1][1].append(kernel)
    lines = [f"# Nsight Compute: {info['device']}",
             "",
             f"torch {info['torch']}, Triton {info['triton']}, CUDA {info.get('cuda')}, driver {info.get('driver')}, "
             f"commit {info['commit']}, {info['date']}. One forward+backward call per case "
             "(`python -m bench.profile_kernels`), clocks as found (`--clock-control none`); durations are ncu's "
             "replays, the benchmarks' times are the results. Occupancy: achieved/theoretical warps; stalls: cycles "
             "per issued instruction.",
             ""]
    for name, group in groups:
        total = sum(_metric(kernel, "gpu__time_duration.sum") or 0.0 for kernel in group) / 1e3
        lines += [f"## {name}: {total:.1f} us in {len(group)} kernels", "",
                  "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(kernel_row(kernel)) + " |" for kernel in group]
        lines.append("")
    if not groups:
        lines.append("No case markers in the report: did the driver run under ncu with --profile-from-start off?")
    return "\n".join(lines)


def write_summary(folder: Path, results: Path = RESULTS) -> Path:
    """From a profile folder (raw.csv, cases.json, details.txt) to bench/results/<device>/profile.md, with the
    details page beside it as profile-details.txt."""
    manifest = json.loads((folder / "cases.json").read_text())
    kernels = read_raw_csv((folder / "raw.csv").read_text())
    out = results / device_slug(manifest["environment"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "profile.md"
    path.write_text(summarize(kernels, manifest) + "\n")
    if (folder / "details.txt").exists():
        shutil.copyfile(folder / "details.txt", out / "profile-details.txt")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes: the driver alone, for a smoke run")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--manifest", default=None, help="write the cases that ran, in order, to this JSON file")
    parser.add_argument("--summarize", metavar="DIR", default=None,
                        help="write the summary of a profile folder (raw.csv, cases.json) instead of running")
    args = parser.parse_args(argv)
    if args.summarize:
        print(f"summary: {write_summary(Path(args.summarize))}")
        return
    ops = list(CASES) if args.only is None else args.only.split(",")
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        parser.error(f"unknown case group(s) {', '.join(unknown)}: expected some of {', '.join(CASES)}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cases = [case for op in ops for case in CASES[op](device, dtype, args.quick)]
    ran = run_cases(cases, device)
    if args.manifest:
        Path(args.manifest).write_text(json.dumps({"environment": environment(device), "cases": ran}, indent=1))
    if not ran:
        sys.exit("no case ran")


if __name__ == "__main__":
    main()
