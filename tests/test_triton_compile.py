"""Every Triton kernel compiles for Hopper (sm_90a) under every autotuning config it would try, fits its shared
memory, keeps its registers (no spills) in at least one config, and puts its 16-bit products on the tensor cores
(the matrix products' tiles, where offered, through the TMA engine).

The interpreter tests check what the kernels compute; this checks what the GPU compiler makes of them, without a
GPU: bench/triton_compile.py captures the launches of the real launchers and compiles them ahead of time for the
target (see its docstring). It runs in subprocesses because the kernels choose their GPU configs at import, with
TRITON_INTERPRET unset, which this test session has set.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
# On a GPU machine the other tests compile (and run) every kernel for the GPU itself, in the session's few minutes.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is here: the kernels are compiled for it by the tests that run them")

# Kernels with 16-bit tl.dot products, which must run on tensor cores (wgmma on Hopper where the tile allows).
DOT_KERNELS = {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_matmul_fused"}


@pytest.fixture(scope="module")
def sm90a_report(tmp_path_factory):
    """Rows of `python -m bench.triton_compile --arch 90a`, run as two concurrent processes (one per core), each
    compiling every other launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_dir = tmp_path_factory.mktemp("triton_compile")
    processes = []
    for i in range(2):
        path = out_dir / f"rows{i}.json"
        cmd = [sys.executable, "-m", "bench.triton_compile", "--arch", "90a", "--json", str(path), "--shard", f"{i}/2"]
        process = subprocess.Popen(cmd, env=env, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        processes.append((path, process))
    rows = []
    for path, process in processes:
        output, _ = process.communicate(timeout=1200)
        assert process.returncode == 0, f"bench.triton_compile failed:\n{output[-4000:]}"
        rows += json.loads(path.read_text())["rows"]
    return rows


def _launches(rows):
    launches = {}
    for row in rows:
        launches.setdefault((row["op"], row["case"], row["kernel"]), []).append(row)
    return launches


def test_every_kernel_compiles(sm90a_report):
    kernels = {row["kernel"] for row in sm90a_report}
    assert kernels == {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq", "_layer_norm_fwd",
                       "_layer_norm_bwd", "_layer_norm_bwd_affine", "_matmul_fused", "_act_bwd"}


def test_every_config_fits_shared_memory(sm90a_report):
    over = [(r["case"], r["kernel"], r["config"], r["shared_bytes"]) for r in sm90a_report
            if r["shared_bytes"] > r["shared_limit"]]
    assert not over, f"configs over sm_90a's {sm90a_report[0]['shared_limit']} bytes of shared memory: {over}"


def test_every_launch_has_a_config_without_spills(sm90a_report):
    # Per copy path: where the autotuner may pick TMA or pointer configs (linear_gelu), each keeps a spill-free one.
    spilling = [(key, copy) for key, rows in _launches(sm90a_report).items() for copy in {r["copy"] for r in rows}
                if all(r["local_bytes"] > 0 for r in rows if r["copy"] == copy)]
    assert not spilling, f"every config of these launches spills registers to local memory: {spilling}"


def test_16bit_products_use_tensor_cores(sm90a_report):
    for (op, case, kernel), rows in _launches(sm90a_report).items():
        if kernel not in DOT_KERNELS or "fp32" in case:
            continue
        instructions = {r["tensor_core"] for r in rows}
        assert "-" not in instructions, (case, kernel, instructions)
        assert "wgmma" in instructions, (case, kernel, instructions)


def test_16bit_matrix_products_offer_tma(sm90a_report):
    """linear_gelu's 16-bit products, and attention's with head dims 64 and 128 (aligned, as on a GPU), get TMA
    configs that copy with the TMA engine, beside pointer configs that copy with cp.async; attention's other cases
    (fp32, head dims 80 and 256) pointer configs only."""
    offered = 0
    for (op, case, kernel), rows in _launches(sm90a_report).items():
        if kernel not in DOT_KERNELS:
            continue
        copies = {tma: {r["copy"] for r in rows if r["config"].endswith(" tma") == tma} for tma in (True, False)}
        if op == "linear_gelu" or ("fp32" not in case and ("d64" in case or "d128" in case)):
            assert copies == {True: {"tma"}, False: {"async"}}, (case, kernel, copies)
            offered += 1
        else:
            assert copies == {True: set(), False: {"async"}}, (case, kernel, copies)
    assert offered >= 20
