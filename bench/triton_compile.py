"""What ptxas makes of every Triton kernel for a GPU, compiled ahead of time on a machine without one.

Each case runs one of the kernels' own launchers (kernels/<op>.py) on small CPU tensors with the kernel launches
captured instead of run, then compiles the captured launch for the target under every autotuning config the
autotuner would try (after its own pruning), exactly as the launch would specialise it (dtypes, constexprs, unit
strides, 16-byte alignment), and reads the cubin's resource usage:

- registers per thread and local-memory bytes (spills: LDL/STL in the SASS, much slower than registers);
- shared memory, against the chip's per-block limit: a config over it is an OutOfResources at autotuning time;
- how tiles reach shared memory: `tma` (the bulk tensor copy engine, cp.async.bulk.tensor, sm_90), `async`
  (cp.async, sm_80's asynchronous copies, which software pipelining needs) or `-` (plain loads);
- the instruction the tensor-core products became: `wgmma` (Hopper's warpgroup MMA, sm_90a), `mma` (mma.sync,
  Ampere's), or `-` (no tensor-core product: fp32 IEEE dots and element-wise kernels);
- resident programs per SM, from registers (64K per SM) and shared memory, the occupancy the launch can reach.

It answers, without the GPU, what a GPU session would otherwise spend its time on: does this Triton compile the
kernel for that chip, does every config fit, does anything spill, do the products use the chip's tensor cores.
tests/test_triton_compile.py asserts those for CI's Triton; run this under the GPU machine's Triton (3.6) to
check it too.

    python -m bench.triton_compile --arch 90a [--only attention] [--json out.json]

Needs TRITON_INTERPRET unset: the kernels choose their GPU configs at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("bench.triton_compile compiles for a GPU: run it with TRITON_INTERPRET unset")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

from fastgpt.kernels import attention, common, layer_norm, linear_gelu  # noqa: E402

from .common import cuda_tool  # noqa: E402

# Per-block shared memory a kernel may opt into, in bytes (CUDA programming guide, compute capabilities table),
# and the register file per SM.
SHARED_LIMIT = {80: 166912, 90: 232448}
REGISTERS_PER_SM = 65536
MAX_PROGRAMS_PER_SM = 32


class _TargetDriver:
    """Enough of a Triton driver for `JITFunction.run(..., warmup=True)`: it compiles for `target` and never
    touches a device (warmup returns the compiled kernel before loading or launching it)."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        # Triton caches compiled kernels per device: one pseudo-device per target keeps targets apart.
        return self.target.arch

    def get_current_stream(self, device=None) -> int:
        return 0


@dataclasses.dataclass
class Launch:
    """One captured kernel launch: the kernel object as the launcher sees it and its arguments."""
    op: str
    case: str
    name: str
    kernel: object  # triton Autotuner, Heuristics or JITFunction
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Compiled:
    op: str
    case: str
    kernel: str
    config: str
    registers: int
    local_bytes: int
    shared_bytes: int
    shared_limit: int
    tensor_core: str
    copy: str
    programs_per_sm: int
    num_warps: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.shared_limit


def _capture(module, names: list[str], op: str, case: str, run: Callable[[], object]) -> list[Launch]:
    """Run `run()` with `module`'s kernels replaced by recorders; return the launches in order."""
    launches: list[Launch] = []

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                launches.append(Launch(op, case, self.name, self.kernel, args, kwargs))
            return record

    originals = {name: getattr(module, name) for name in names}
    try:
        for name, kernel in originals.items():
            setattr(module, name, Recorder(name, kernel))
        run()
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)
    return launches


def _configs(launch: Launch) -> list[triton.Config | None]:
    """The configs the autotuner would benchmark for this launch (None: a kernel that is not autotuned)."""
    kernel = launch.kernel
    if not isinstance(kernel, triton.runtime.Autotuner):
        return [None]
    configs = kernel.configs
    if kernel.early_config_prune:
        named = dict(zip(kernel.arg_names, launch.args))
        configs = kernel.early_config_prune(configs, named, **launch.kwargs)
    return list(configs)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, local-memory bytes per thread) from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuda_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    registers, stack, local = (int(g) for g in match.groups())
    return registers, stack + local


# PTX markers, most specific first: the tensor-core instruction and the global-to-shared copy path.
TENSOR_CORE_MARKERS = (("wgmma.mma_async", "wgmma"), ("mma.sync", "mma"))
COPY_MARKERS = (("cp.async.bulk.tensor", "tma"), ("cp.async", "async"))


def _first_marker(ptx: str, markers) -> str:
    return next((name for marker, name in markers if marker in ptx), "-")


def _config_label(config: triton.Config) -> str:
    """'M128 N64 w4 s3' for BLOCK_M=128, BLOCK_N=64, 4 warps, 3 stages (GROUP_M is G); a true flag USE_X adds 'x'."""
    sizes = [f"{name.split('_')[-1] if name.startswith('BLOCK_') else name[0]}{value}"
             for name, value in config.kwargs.items() if not isinstance(value, bool)]
    flags = [name.removeprefix("USE_").lower() for name, value in config.kwargs.items() if value is True]
    return " ".join(sizes + [f"w{config.num_warps}", f"s{config.num_stages}"] + flags)


def compile_launch(launch: Launch, target: GPUTarget) -> list[Compiled]:
    """Compile one launch for `target` under each of its configs."""
    jit = launch.kernel.fn if isinstance(launch.kernel, triton.runtime.Autotuner) else launch.kernel
    shared_limit = SHARED_LIMIT[target.arch]
    results = []
    for config in _configs(launch):
        kwargs = dict(launch.kwargs)
        if config is not None:
            kwargs.update(config.all_kwargs())
            if config.pre_hook is not None:  # what the autotuner does before each run (e.g. TMA block shapes)
                config.pre_hook({**dict(zip(jit.arg_names, launch.args)), **kwargs})
        compiled = jit.run(*launch.args, grid=None, warmup=True, **kwargs)
        registers, local_bytes = _resource_usage(compiled.asm["cubin"])
        num_warps = compiled.metadata.num_warps
        shared = compiled.metadata.shared
        threads = 32 * num_warps
        by_registers = REGISTERS_PER_SM // (max(registers, 1) * threads)
        by_shared = shared_limit // shared if shared else MAX_PROGRAMS_PER_SM
        label = "launch" if config is None else _config_label(config)
        results.append(Compiled(launch.op, launch.case, launch.name, label, registers, local_bytes, shared,
                                shared_limit, _first_marker(compiled.asm["ptx"], TENSOR_CORE_MARKERS),
                                _first_marker(compiled.asm["ptx"], COPY_MARKERS),
                                min(by_registers, by_shared, MAX_PROGRAMS_PER_SM), num_warps))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Cases: the shapes and variants that matter on a GPU (GPT-1's, the issues' sweep points) and one of each variant
# that changes the generated code (dtype, head dim, mask kind, dropout, epilogue). Tensors are small: only their
# dtypes, strides and alignment reach the compiler, and sequence lengths only through the autotuning key.
# ----------------------------------------------------------------------------------------------------------------

def _attention_launches() -> list[Launch]:
    names = ["_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"]
    cases = [  # name, dtype, head dim, Lq = Lk, causal, mask, dropout
        ("gpt1 bf16 d64 causal", torch.bfloat16, 64, 512, True, None, 0.0),
        ("bf16 d128 L4096", torch.bfloat16, 128, 4096, False, None, 0.0),
        ("fp16 d64 key-padding dropout", torch.float16, 64, 512, False, "padding", 0.1),
        ("fp16 d80 additive", torch.float16, 80, 512, False, "additive", 0.0),
        ("bf16 d64 full bool mask", torch.bfloat16, 64, 512, False, "bool", 0.0),
        ("bf16 d256 causal", torch.bfloat16, 256, 1024, True, None, 0.0),
        ("fp32 d64", torch.float32, 64, 512, False, None, 0.0),
    ]
    launches = []
    for case, dtype, d, length, causal, mask_kind, dropout_p in cases:
        q, k, v = (torch.randn(1, 2, length, d, dtype=dtype) for _ in range(3))
        mask = None
        if mask_kind == "padding":
            mask = torch.ones(1, 1, 1, length, dtype=torch.bool)
        elif mask_kind == "bool":
            mask = torch.ones(1, 2, length, length, dtype=torch.bool)
        elif mask_kind == "additive":
            mask = torch.zeros(1, 2, length, length, dtype=dtype)
        out = torch.empty_like(q)
        lse = torch.empty(1, 2, length)

        def run():
            attention.attention_forward(q, k, v, mask, causal, d ** -0.5, dropout_p, 0)
            attention.attention_backward(torch.empty_like(out), q, k, v, out, lse, mask, causal, d ** -0.5,
                                         dropout_p, 0)
        launches += _capture(attention, names, "attention", case, run)
    return launches


def _layer_norm_launches() -> list[Launch]:
    names = ["_layer_norm_fwd", "_layer_norm_bwd", "_layer_norm_bwd_affine"]
    cases = [  # name, dtype, width, residual + dropout
        ("gpt1 bf16 768 add+dropout", torch.bfloat16, 768, True),
        ("fp32 4096", torch.float32, 4096, False),
        ("fp32 16384", torch.float32, 16384, False),
        ("bf16 65536 add+dropout", torch.bfloat16, 65536, True),
    ]
    launches = []
    for case, dtype, n, fused in cases:
        x = torch.randn(64, n, dtype=dtype)
        residual = torch.randn_like(x) if fused else None
        weight, bias = torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype)
        dropout_p, seed = (0.1, torch.tensor(1)) if fused else (0.0, None)
        mean = rstd = torch.empty(64)

        def run():
            layer_norm.layer_norm_forward(x, residual, weight, bias, 1e-5, dropout_p, seed)
            layer_norm.layer_norm_backward(x, x, residual, weight, mean, rstd, True, dropout_p, seed)
        launches += _capture(layer_norm, names, "layer_norm", case, run)
    return launches


def _linear_gelu_launches() -> list[Launch]:
    names = ["_matmul_fused", "_act_bwd"]
    launches = []
    for case, dtype, (m, k, n) in [("gpt1 bf16 768->3072", torch.bfloat16, (256, 768, 3072)),
                                   ("fp16 4096->16384", torch.float16, (256, 4096, 16384))]:
        x = torch.randn(m, k, dtype=dtype)
        w1, b1 = torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
        pre = torch.randn(m, n, dtype=dtype)
        w2 = torch.randn(k, n, dtype=dtype)
        grad = torch.randn(m, k, dtype=dtype)

        def run():
            linear_gelu.linear_act(x, w1, b1, "gelu_tanh", store_pre=True)
            linear_gelu.linear_act(pre, w2, b1[:k], "none", store_pre=False, dropout_p=0.1, seed=1)
            linear_gelu.linear_dact(grad, w2, pre, "gelu_tanh", bias_grad=True)
            linear_gelu.linear_dact_recompute(x, w1, b1, pre, "gelu", bias_grad=True)
            linear_gelu.act_bwd(grad, None, "none", bias_grad=True, dropout_p=0.1, seed=1)
        for launch in _capture(linear_gelu, names, "linear_gelu", case, run):
            if launch.name == "_matmul_fused":  # four launches of one kernel: tell them apart by their epilogue
                launch.case += f" {launch.kwargs['EPILOGUE']}" + (" dropout" if launch.kwargs["DROPOUT"] else "")
            launches.append(launch)
    return launches


CASES = {"attention": _attention_launches, "layer_norm": _layer_norm_launches, "linear_gelu": _linear_gelu_launches}


def parse_arch(arch: str) -> GPUTarget:
    """'80' -> sm_80, '90a' -> sm_90a (the suffix is what enables wgmma)."""
    capability = int(arch.rstrip("a"))
    if capability not in SHARED_LIMIT:
        raise ValueError(f"--arch: expected one of 80, 90, 90a, got {arch!r}")
    return GPUTarget("cuda", capability, 32)


def compile_all(arch: str, ops: list[str] | None = None, shard: tuple[int, int] = (0, 1)) -> list[Compiled]:
    """Every launch of `ops` (default: all) compiled for `arch` under each of its configs; shard (i, n): only launches
    i, i + n, i + 2n, ... of them, so that n processes share the work."""
    target = parse_arch(arch)
    common.TUNING = "autotune"  # report every candidate, whatever FASTGPT_TRITON_TUNING says
    # The captures' CPU tensors stand in for the target's: offer the TMA configs where the launchers would (sm_90+).
    common.tma_device = lambda device: target.arch >= 90
    # For the rest of the process: this machine may have no GPU driver to return to.
    driver.set_active(_TargetDriver(target))
    launches = [launch for op, make in CASES.items() if ops is None or op in ops for launch in make()]
    index, count = shard
    return [compiled for launch in launches[index::count] for compiled in compile_launch(launch, target)]


def _table(results: list[Compiled]) -> str:
    header = (f"{'op':<12}{'case':<38}{'kernel':<24}{'config':<28}{'regs':>5}{'local':>6}{'smem KB':>8}{'tc':>6}"
              f"{'copy':>6}{'/SM':>4}")
    lines = [header, "-" * len(header)]
    for r in results:
        over = "!" if not r.fits else ""
        lines.append(f"{r.op:<12}{r.case:<38}{r.kernel:<24}{r.config:<28}{r.registers:>5}{r.local_bytes:>6}"
                     f"{r.shared_bytes / 1024:>7.0f}{over:1}{r.tensor_core:>6}{r.copy:>6}{r.programs_per_sm:>4}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90a", help="target compute capability: 80, 90 or 90a (default 90a)")
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="ops to compile (default: all)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--shard", default="0/1", help="I/N: compile launches I, I + N, ... only (default 0/1: all)")
    args = parser.parse_args(argv)
    index, count = (int(part) for part in args.shard.split("/"))
    if not 0 <= index < count:
        parser.error(f"--shard: expected I/N with 0 <= I < N, got {args.shard!r}")
    results = compile_all(args.arch, args.only, (index, count))
    print(f"{datetime.date.today()}: Triton {triton.__version__} (torch {torch.__version__}), target sm_{args.arch}, "
          f"{len(results)} compiled kernels "
          "(smem '!' = over the per-block limit, tc = tensor-core instruction, copy = global-to-shared copies, "
          "/SM = resident programs per SM)")
    print(_table(results))
    if args.json:
        payload = {"triton": triton.__version__, "torch": torch.__version__, "arch": args.arch,
                   "rows": [dataclasses.asdict(r) for r in results]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
