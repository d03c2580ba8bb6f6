"""What ptxas makes of fastgpt's CUDA kernels (csrc/cuda/*.cu) for each target, compiled without a GPU.

The counterpart of bench/triton_compile.py for the CUDA C++ backend. Every kernel instantiation of each source is
compiled to a cubin per target with the build's flags, and the report gives, per instantiation:

- registers per thread, and the spill stores / loads and stack frame bytes (local memory, much slower than
  registers; `make cuda-check` fails on any);
- the tensor-core instructions in its SASS: HGMMA (Hopper's wgmma, sm_90a) and HMMA (mma.sync), with their counts;
- its global-to-shared copies: LDGSTS (cp.async) and UTMALDG (the bulk tensor copy engine, TMA);
- LDSM, the ldmatrix loads that feed mma.sync from shared memory (wgmma reads its shared operands itself).

The counts are of instructions in the code, not executed ones: an unrolled loop body counts once per copy.

    python -m bench.cuda_compile [--arch 80 90a] [--only attention] > bench/results/compile/cuda-nvcc-<version>.txt

Needs nvcc (CUDA_HOME or PATH) and cuobjdump (Triton's wheel bundles one); linear_gelu.cu needs the cuBLAS headers
that `make cuda-check` unpacks into .cache/cublas/include.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from .common import cuda_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The SASS opcodes the report counts, by column: tensor-core products, copies, ldmatrix.
OPCODES = ("HGMMA", "HMMA", "UTMALDG", "LDGSTS", "LDSM")


def _includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths
    return [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(ROOT, 'csrc')}",
                                                  f"-I{os.path.join(ROOT, '.cache', 'cublas', 'include')}"]


def compile_source(source: str, arch: str, workdir: str) -> tuple[str, str]:
    """(ptxas's verbose log, the cubin's path) for one source and one target, with setup.py's nvcc flags."""
    cubin = os.path.join(workdir, f"{os.path.basename(source)}.sm_{arch}.cubin")
    cmd = [cuda_tool("nvcc"), "-cubin", source, "-o", cubin, "-std=c++20", "-O3", "--use_fast_math",
           "--expt-relaxed-constexpr", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-Xptxas", "-v",
           "-gencode", f"arch=compute_{arch},code=sm_{arch}", *_includes()]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"nvcc failed on {source} for sm_{arch}:\n{result.stderr[-4000:]}")
    return result.stderr, cubin


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel name: registers, stack frame and spill bytes, from `ptxas -v`."""
    kernels: dict[str, dict[str, int]] = {}
    name = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = m.group(1)
            kernels[name] = {"regs": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
        elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                      line)):
            kernels[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            kernels[name]["regs"] = int(m.group(1))
    return kernels


def sass_counts(cubin: str) -> dict[str, collections.Counter]:
    return count_opcodes(subprocess.run([cuda_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                                        check=True).stdout)


def count_opcodes(sass: str) -> dict[str, collections.Counter]:
    """Per mangled kernel name: how many instructions of each of OPCODES a `cuobjdump -sass` listing holds."""
    counts: dict[str, collections.Counter] = {}
    current = None
    for line in sass.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            current = counts.setdefault(m.group(1), collections.Counter())
        elif current is not None and (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)):
            if m.group(1) in OPCODES:
                current[m.group(1)] += 1
    return counts


# csrc/cuda/attention_common.cuh's MaskMode, which c++filt prints as a cast of its value.
MASK_MODES = {"(MaskMode)0": "kNone", "(MaskMode)1": "kCausal", "(MaskMode)2": "kTensor"}


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable: without `void`, the namespaces and the argument list, MaskMode values by name."""
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    readable = []
    for line in out.splitlines():
        name = re.sub(r"^void |fastgpt::(?:[a-z_]\w*::)?", "", line.strip())
        depth = 0
        for i in range(len(name) - 1, -1, -1) if name.endswith(")") else ():  # drop the argument list
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
        readable.append(re.sub(r"\(MaskMode\)\d", lambda m: MASK_MODES[m.group(0)], name))
    return dict(zip(names, readable))


def report(sources: list[str], archs: list[str]) -> list[str]:
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = {(s, a): pool.submit(compile_source, s, a, workdir) for s in sources for a in archs}
        rows = []
        for (source, arch), job in jobs.items():
            log, cubin = job.result()
            usage, counts = parse_ptxas(log), sass_counts(cubin)
            names = demangle(sorted(usage))
            for mangled in sorted(usage, key=names.get):
                rows.append((os.path.basename(source), f"sm_{arch}", names[mangled], usage[mangled],
                             counts.get(mangled, collections.Counter())))
    width = max(len(r[2]) for r in rows)
    header = (f"{'source':<15} {'target':<7} {'kernel':<{width}} {'regs':>4} {'spill':>5} {'stack':>5} "
              + " ".join(f"{op:>7}" for op in OPCODES))
    lines = [header, "-" * len(header)]
    for source, arch, kernel, use, count in rows:
        spill = use["spill_stores"] + use["spill_loads"]
        lines.append(f"{source:<15} {arch:<7} {kernel:<{width}} {use['regs']:>4} {spill:>5} {use['stack']:>5} "
                     + " ".join(f"{count[op]:>7}" for op in OPCODES))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90a"], help="targets, as in -gencode (default 80 90a)")
    parser.add_argument("--only", nargs="+", help="sources by op name (attention, layer_norm, linear_gelu)")
    args = parser.parse_args()
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if args.only:
        sources = [s for s in sources if os.path.basename(s)[:-3] in args.only]
    version = re.search(r"release ([\d.]+)", subprocess.run([cuda_tool("nvcc"), "--version"], capture_output=True,
                                                            text=True).stdout)
    print(f"{datetime.date.today()}: nvcc {version.group(1) if version else '?'}, targets "
          f"{', '.join('sm_' + a for a in args.arch)}, {len(sources)} sources (spill: spill store + load bytes; "
          f"instruction columns: how many of each the kernel's SASS holds)")
    print("\n".join(report(sources, args.arch)))


if __name__ == "__main__":
    main()
