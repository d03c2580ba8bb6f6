"""Timing, device ceilings and result files shared by the benchmarks.

Timing rules: inputs are random (never zeros); results are checked against the reference before anything is
timed; each measurement rotates through several copies of its inputs, together larger than the last-level cache,
so that small shapes are not flattered by a warm cache; the reported time is the median over many repeats, with
the 20th-80th percentile spread. On CUDA, CUDA events bracket each call; on CPU, perf_counter does.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastgpt import backends

RESULTS = Path(__file__).resolve().parent / "results"
# A --quick run's results: a smoke run's numbers, kept apart from the recorded ones that the README's table shows.
QUICK_RESULTS = Path(__file__).resolve().parent.parent / ".cache" / "bench-quick"
CACHE_BYTES = 256 << 20  # rotate inputs through more than this: beyond H100's 50 MB L2 and CPU caches


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    pass_: str
    impl: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    metric: float  # GB/s for memory-bound ops, TFLOP/s for compute-bound ones
    unit: str
    fraction_of_ceiling: float | None = None
    peak_memory_mb: float | None = None
    speedup_vs_best_peer: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def environment(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "commit": _commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda,
                    driver=_nvidia_driver())
    else:
        info.update(device=_cpu_name(), threads=torch.get_num_threads(), cpu_allocator=_steady_cpu_allocator())
    return info


def _commit() -> str | None:
    """The fastgpt commit measured (with "+changes" when the working tree differs from it), if this is a git
    checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+changes" if dirty else "")


def _steady_cpu_allocator() -> str:
    """PyTorch's CPU tensors come from malloc. glibc's default maps large blocks afresh (page faults on every call)
    and moves that threshold with the sizes freed, so whether a tensor of a few MB costs page faults on each call
    depended on the order of earlier allocations: the same op measured 3 ms or 11 ms per call, and so did
    PyTorch's, by turns. With mmap off and trimming off, freed blocks of any size stay in the heap and are reused,
    as a caching allocator would: every implementation is timed without the operating system's page faults."""
    m_trim_threshold, m_mmap_max = -1, -4
    try:
        libc = _libc()
        if libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 1 << 30):
            return "glibc: no mmap, no trimming (freed blocks reused)"
    except (OSError, AttributeError, TypeError):
        pass
    return "system default"


def _nvidia_driver() -> str | None:
    try:
        import subprocess
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.processor()} ({os.cpu_count()} cores)"


def cuda_tool(name: str) -> str:
    """The path of a CUDA toolkit program (nvcc, cuobjdump): Triton's wheel bundles some (cuobjdump, ptxas) and is
    tried first, then CUDA_HOME/bin (default /usr/local/cuda), then PATH. Exits naming the program if none has it."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name), shutil.which(name)]
    try:
        import triton
        candidates.insert(0, os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    found = next((c for c in candidates if c and os.path.exists(c)), None)
    if found is None:
        sys.exit(f"{name} not found (in Triton's wheel, CUDA_HOME/bin or PATH)")
    return found


def device_slug(info: dict) -> str:
    return backends.device_slug(info["device"])


# A benchmark times only what it has checked. The gradient check's bound, relative to each gradient's largest
# magnitude, catches a wrong backward (zeros, a missing term, garbage); its accuracy is the tests' to verify.
GRAD_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def check_gradients(name: str, got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor],
                    dtype: torch.dtype) -> None:
    """Asserts each gradient in `got` is `expected`'s (float64) within GRAD_TOLERANCE[dtype] of its magnitude."""
    for i, (g, e) in enumerate(zip(got, expected)):
        error = (g.double() - e).abs().max().item() / max(1.0, e.abs().max().item()) if e.numel() else 0.0
        assert error < GRAD_TOLERANCE[dtype], f"{name}: gradient of input {i} is wrong: relative error {error:.3g}"


def rotations(bytes_per_call: int) -> int:
    """How many copies of a call's inputs to cycle through so that the set exceeds the caches (at most 32)."""
    return max(1, min(32, -(-CACHE_BYTES // max(bytes_per_call, 1))))


def time_calls(fns: Sequence[Callable[[], object]], device: torch.device, *, warmup: int = 3,
               repeats: int = 30, min_seconds: float = 0.2) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile milliseconds of one call, rotating through `fns` (one per input copy).

    On a GPU the calls are queued back to back in batches of `repeats`, as a training loop queues them, each between
    two events read once the batch is done: a call's time is the device's, from the start of its first kernel to
    the end of its last, plus only the host time the device waited for (a call whose host work outlasts its
    kernels is timed as long as that work). Synchronizing after every call instead started each one on an idle
    device, so that its host work up to the first launch counted as device time, tens of us for any Python op."""
    for i in range(warmup):
        fns[i % len(fns)]()
    times: list[float] = []
    cuda = device.type == "cuda"
    started = time.perf_counter()
    i = 0
    while len(times) < repeats or (time.perf_counter() - started < min_seconds and len(times) < 10 * repeats):
        if cuda:
            events = []
            for _ in range(repeats):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fns[i % len(fns)]()
                end.record()
                events.append((begin, end))
                i += 1
            events[-1][1].synchronize()
            times += [begin.elapsed_time(end) for begin, end in events]
        else:
            fn = fns[i % len(fns)]
            i += 1
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]


@contextlib.contextmanager
def triton_choices(impl: str):
    """Within: the config each autotuned Triton kernel of fastgpt launched with (its autotuner's pick on this device:
    tiles, warps, stages, copy path), gathered as 'kernel: config' strings in the yielded set, when `impl` is the
    triton backend's row; an empty set for any other implementation. LayerNorm's kernels are not autotuned."""
    choices: set[str] = set()
    if impl != "fastgpt-triton":
        yield choices
        return
    from fastgpt.kernels import attention, linear_gelu

    def recording(kernel):
        run = kernel.run

        def record(*args, **kwargs):
            result = run(*args, **kwargs)
            choices.add(f"{kernel.fn.__name__}: {kernel.best_config}")
            return result
        return record

    kernels = (*attention.AUTOTUNED, linear_gelu._matmul_fused)
    for kernel in kernels:
        kernel.run = recording(kernel)  # launches (kernel[grid](...)) call the instance's run
    try:
        yield choices
    finally:
        for kernel in kernels:
            del kernel.run


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory one call allocates beyond what was live before it. CUDA: the caching allocator's peak. CPU
    (Linux): the process's peak resident set (VmHWM), reset just before the call through /proc/self/clear_refs,
    after glibc has returned its free heap to the system, so that memory freed earlier is not reused unseen;
    None where /proc does not allow it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if device.type != "cpu":
        return None
    try:
        _trim_heap()
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        before = _proc_status_kb("VmRSS")
        fn()
        return (_proc_status_kb("VmHWM") - before) / 1024
    except (OSError, ValueError):
        return None


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"/proc/self/status has no {field}")


def _libc():
    import ctypes
    import ctypes.util
    return ctypes.CDLL(ctypes.util.find_library("c"))


def _trim_heap() -> None:
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass


@functools.cache
def copy_bandwidth_gbs(device: torch.device) -> float:
    """The device's measured copy rate (bytes read + written per second): the ceiling for memory-bound ops.
    Measured once per process, so that a suite of benchmarks shares one ceiling."""
    numel = (512 << 20) // 4 if device.type == "cuda" else (64 << 20) // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    median, _, _ = time_calls([lambda: dst.copy_(src)], device, repeats=20)
    return 2 * src.numel() * 4 / (median * 1e-3) / 1e9


@functools.cache
def matmul_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """The device's measured dense matrix-product rate in `dtype` (torch.matmul, once per process and dtype): the
    ceiling for compute-bound ops in that dtype. On CPU the rates differ by more than 4x between dtypes (float32
    through MKL, bfloat16 through oneDNN's AVX512-BF16 kernels on CPUs that have them), so each dtype gets its own."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    median, _, _ = time_calls([lambda: a @ b], device, repeats=10)
    return 2 * n**3 / (median * 1e-3) / 1e12


def matmul_ceilings(device: torch.device, dtypes, info: dict) -> dict:
    """matmul_tflops for each dtype ({dtype: TFLOP/s}), recorded in the result file's environment `info` too."""
    ceilings = {dtype: matmul_tflops(device, dtype) for dtype in dtypes}
    info["matmul_tflops"] = {str(dtype).removeprefix("torch."): rate for dtype, rate in ceilings.items()}
    return ceilings


def rates_text(info: dict) -> str:
    """The measured matrix-product rates of `info` for a printed line: 'float32 0.168, bfloat16 0.61 TFLOP/s'."""
    return ", ".join(f"{dtype} {rate:.3g}" for dtype, rate in info["matmul_tflops"].items()) + " TFLOP/s"


def cost(row) -> float:
    """What a row minimises: its peak memory for a memory measurement (unit MiB), else its time. `row` is a Row or
    its dict in a result file."""
    get = row.get if isinstance(row, dict) else lambda key: getattr(row, key)
    return get("metric") if get("unit") == "MiB" else get("median_ms")


def mark_speedups(rows: list[Row], ours_prefix: str = "fastgpt") -> None:
    """Each fastgpt row's gain against the best non-fastgpt row of the same op, shape, dtype and pass: the peer's
    time over ours (for a memory row, the peer's peak memory over ours)."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.op, row.shape, row.dtype, row.pass_), []).append(row)
    for group in groups.values():
        peers = [cost(r) for r in group if not r.impl.startswith(ours_prefix) and cost(r) > 0]
        if peers:
            for row in group:
                if row.impl.startswith(ours_prefix) and cost(row) > 0:
                    row.speedup_vs_best_peer = min(peers) / cost(row)


def write_results(name: str, rows: list[Row], info: dict, out_dir: Path | None = None) -> Path:
    """Writes <out_dir>/<device>/<name>.json and .csv; returns the JSON path."""
    folder = (out_dir or RESULTS) / device_slug(info)
    folder.mkdir(parents=True, exist_ok=True)
    records = [asdict(r) for r in rows]
    json_path = folder / f"{name}.json"
    _replace(json_path, json.dumps({"environment": info, "rows": records}, indent=1) + "\n")
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=[k for k in records[0] if k != "extra"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    _replace(folder / f"{name}.csv", table.getvalue())
    return json_path


def _replace(path: Path, text: str) -> None:
    """Writes `path` whole or not at all: a run killed mid-write (a GPU call's time limit) leaves the previous file."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def print_table(rows: list[Row], info: dict) -> None:
    print(f"\n{info['device']} | torch {info['torch']} | triton {info.get('triton')} | {info['date']}")
    # Each column is as wide as its widest cell: a rate in tokens/s runs to 15 characters.
    cells = [(r, f"{r.p20_ms:.4f}-{r.p80_ms:.4f}", f"{r.metric:.1f} {r.unit}",
              f"{r.fraction_of_ceiling:.0%}" if r.fraction_of_ceiling is not None else "-",
              f"{r.speedup_vs_best_peer:.2f}x" if r.speedup_vs_best_peer is not None else "-") for r in rows]
    shape_w = max([16] + [len(r.shape) for r in rows]) + 2
    impl_w = max([22] + [len(r.impl) for r in rows]) + 2
    spread_w = max([17] + [len(c[1]) for c in cells]) + 2
    rate_w = max([12] + [len(c[2]) for c in cells]) + 2
    header = f"{'op':<17}{'shape':<{shape_w}}{'dtype':<10}{'pass':<9}{'impl':<{impl_w}}{'median ms':>11}" \
             f"{'spread':>{spread_w}}{'rate':>{rate_w}}{'of ceil':>9}{'vs best':>9}"
    print(header)
    print("-" * len(header))
    for r, spread, rate, ceiling, speedup in cells:
        print(f"{r.op:<17}{r.shape:<{shape_w}}{r.dtype:<10}{r.pass_:<9}{r.impl:<{impl_w}}{r.median_ms:>11.4f}"
              f"{spread:>{spread_w}}{rate:>{rate_w}}{ceiling:>9}{speedup:>9}")


def device_flag(value: str) -> str:
    """argparse type of --device: a device torch knows and this machine has."""
    try:
        device = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {value!r}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        raise argparse.ArgumentTypeError(f"{value!r}: this machine runs the benchmarks on "
                                         f"{'cpu or cuda' if torch.cuda.is_available() else 'cpu only'}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return value


def positive_int(value: str) -> int:
    """argparse type of a size flag: an int >= 1."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value!r}")
    return number


def probability(value: str) -> float:
    """argparse type of a dropout rate: a float in [0, 1)."""
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {value!r}")
    return number


def _dtype_list(value: str) -> list[torch.dtype]:
    names = value.split(",")
    unknown = [n for n in names if n not in DTYPE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(DTYPE_NAMES)}, got {', '.join(unknown)}")
    return [DTYPE_NAMES[n] for n in names]


def _compile_modes(value: str) -> list[str]:
    modes = [] if value == "none" else value.split(",")
    unknown = [m for m in modes if m not in COMPILE_MODES]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected 'none' or some of {', '.join(COMPILE_MODES)}, got "
                                         f"{', '.join(unknown)}")
    return modes


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def standard_parser(description: str, dtypes_example: str = "bfloat16,float32") -> argparse.ArgumentParser:
    """The flags every benchmark takes (a benchmark adds its own): --device, --quick, --dtypes, --compile,
    --include-interpreter, --out. `python -m bench` forwards --device, --quick and --out."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_flag, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few small shapes (a smoke run)")
    parser.add_argument("--dtypes", type=_dtype_list, default=None,
                        help=f"comma-separated, of {', '.join(DTYPE_NAMES)}; e.g. {dtypes_example}")
    parser.add_argument("--compile", type=_compile_modes, default=None,
                        help="torch.compile modes to compare, comma-separated (default, max-autotune); 'none' skips")
    parser.add_argument("--include-interpreter", action="store_true",
                        help="also time the triton backend on CPU through the interpreter (very slow; needs "
                             "TRITON_INTERPRET=1 in the environment)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results; with --quick, "
                                                    ".cache/bench-quick)")
    return parser


DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def chosen_dtypes(args, default: Sequence[torch.dtype]) -> list[torch.dtype]:
    return args.dtypes if args.dtypes else list(default)


def chosen_compile_modes(args, default: Sequence[str]) -> list[str]:
    return list(default) if args.compile is None else args.compile


def fastgpt_backends(device: torch.device, include_interpreter: bool, with_reference: bool = False) -> list[str]:
    """fastgpt's backends to time on `device`: Triton on a CPU runs through the interpreter, slow by design, so only
    when asked; an op's `reference` backend is plain PyTorch, timed already as torch-eager (a model benchmark keeps
    it: there it is fastgpt's own modules on PyTorch's ops)."""
    return [name for name in backends.available_backends(device)
            if (with_reference or name != "reference")
            and not (name == "triton" and device.type == "cpu" and not include_interpreter)]


# Competitors that did not run in this process (not installed, no GPU, a shape they refuse): listed in the table's
# footer and in the result file, never silently dropped.
SKIPPED: list[str] = []


def skip(impl: str, reason: str) -> None:
    SKIPPED.append(f"{impl}: {reason}")


def optional_peer(impls: dict, impl: str, device: torch.device, build: Callable[[], Callable],
                  cuda_only: bool = True) -> None:
    """Adds competitor `impl` made by `build()` (which imports it) to `impls`, or records why it is skipped."""
    if cuda_only and device.type != "cuda":
        skip(impl, "CUDA only")
        return
    try:
        impls[impl] = build()
    except ImportError as error:
        skip(impl, f"not installed ({error.name or error})")


def results_root(args: argparse.Namespace) -> Path:
    """Where a run's result files go: --out, else bench/results, or .cache/bench-quick for a --quick run."""
    return Path(args.out) if args.out else QUICK_RESULTS if args.quick else RESULTS


def run_grid(name: str, shapes: Sequence, measure: Callable[..., list[Row]], info: dict,
             args: argparse.Namespace) -> Path:
    """measure(*shape) -> rows, for each shape in order, then finish(). After each shape but the last, the rows so
    far are written as the results, marked "partial" in their environment: a run stopped part-way (a GPU session's
    time limit) keeps what it measured, and says it stopped. Grids list the issues' target shapes first."""
    rows: list[Row] = []
    for done, shape in enumerate(shapes, 1):
        rows += measure(*shape)
        if done < len(shapes) and rows:
            mark_speedups(rows)
            write_results(name, rows, {**info, "skipped": list(dict.fromkeys(SKIPPED)),
                                       "partial": f"{done} of {len(shapes)} shapes measured"}, results_root(args))
    return finish(name, rows, info, args)


def finish(name: str, rows: list[Row], info: dict, args: argparse.Namespace) -> Path:
    """Speed-ups against the best peer, the result files (under results_root(args)), the printed table with the
    skipped competitors."""
    mark_speedups(rows)
    skipped = list(dict.fromkeys(SKIPPED))
    SKIPPED.clear()
    path = write_results(name, rows, {**info, "skipped": skipped}, results_root(args))
    print_table(rows, info)
    for line in skipped:
        print(f"skipped {line}")
    print(f"\nresults: {path} (+ .csv)")
    return path
