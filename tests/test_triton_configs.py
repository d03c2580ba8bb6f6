"""On a GPU: every autotuning config of the Triton kernels computes the right result, not only the one the
autotuner happens to pick on this GPU today.

The rest of the suite runs each kernel with the first config of its candidates (tests/conftest.py sets
FASTGPT_TRITON_TUNING=first on GPUs, see kernels/common.py); here each candidate index is forced in turn, on one
case per tile class with lengths that are not multiples of any tile, against the float64 reference.
"""

import pytest
import torch
import triton

from fastgpt.kernels import attention as attention_kernels
from fastgpt.kernels import common, linear_gelu
from tests.test_attention import _check, _inputs, _mask
from tests.test_linear_gelu import _check_ffn

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="no CUDA GPU here: the configs are only compiled on a GPU machine")

ATTENTION_CASES = [  # dtype, head dim, causal, mask kind, Lq, Lk: one per tile class of kernels/attention.py
    (torch.bfloat16, 64, True, None, 300, 300),
    (torch.float16, 128, False, "key_padding", 203, 331),
    (torch.bfloat16, 256, True, "bool", 97, 130),
    (torch.float32, 64, False, "additive", 113, 203),
]
TILE_TABLES = (attention_kernels._FWD_TILES, attention_kernels._DKDV_TILES, attention_kernels._DQ_TILES)
# Each tile at most twice: through TMA and through pointers (on Hopper, for 16-bit inputs).
MOST_CANDIDATES = 2 * max(len(tiles) for table in TILE_TABLES for tiles in table.values())


@pytest.fixture
def forced_candidate(monkeypatch):
    """Sets the candidate index the autotuned kernels take; their per-key choices are forgotten before and after."""
    kernels = (*attention_kernels.AUTOTUNED, linear_gelu._matmul_fused)

    def force(index):
        monkeypatch.setattr(common, "TUNING", str(index))
        for kernel in kernels:
            kernel.cache.clear()
    yield force
    for kernel in kernels:
        kernel.cache.clear()


@pytest.mark.parametrize("tuning,expected", [("autotune", ["a", "b", "c"]), ("first", ["a"]), ("1", ["b"]),
                                             ("4", ["b"])])
def test_tuning_policy(monkeypatch, tuning, expected):
    monkeypatch.setattr(common, "TUNING", tuning)
    assert common.tuned_candidates(["a", "b", "c"]) == expected
    if tuning != "autotune":  # a fixed choice is not benchmarked (autotune's benchmark needs a GPU)
        runs = []
        assert common.benchmark_candidates(lambda: runs.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
        assert not runs


def test_tuning_policy_rejects_unknown_values(monkeypatch):
    monkeypatch.setattr(common, "TUNING", "fastest")
    with pytest.raises(ValueError, match="FASTGPT_TRITON_TUNING"):
        common.tuned_candidates(["a"])


@needs_gpu
@pytest.mark.parametrize("index", range(MOST_CANDIDATES))
@pytest.mark.parametrize("dtype,D,is_causal,kind,Lq,Lk", ATTENTION_CASES, ids=str)
def test_attention_config(monkeypatch, forced_candidate, index, dtype, D, is_causal, kind, Lq, Lk):
    """The index-th of the candidates each attention kernel is offered for these inputs: on Hopper the TMA configs
    and the pointer ones, elsewhere the pointer ones (wrapping around where a kernel has fewer)."""
    q, k, v, grad_out = _inputs("cuda", dtype, 2, 4, 2, Lq, Lk, D, D)
    meta = {"BLOCK_D": triton.next_power_of_2(D), "BLOCK_DV": triton.next_power_of_2(D),
            "TMA_POLICY": attention_kernels._descriptors(q)[0]}
    monkeypatch.setattr(common, "TUNING", "autotune")  # the whole list, as the autotuner's pruning leaves it
    candidates = max(len(kernel.early_config_prune(kernel.configs, {"Q": q}, **meta))
                     for kernel in attention_kernels.AUTOTUNED)
    if index >= candidates:
        pytest.skip(f"these inputs have {candidates} candidates")
    forced_candidate(index)
    _check("cuda", "triton", q, k, v, grad_out, _mask(kind, "cuda", dtype, 2, 4, Lq, Lk), is_causal)


@needs_gpu
@pytest.mark.parametrize("index", range(len(linear_gelu._matmul_configs())))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_feed_forward_config(forced_candidate, index, dtype):
    """The whole GELU block, forward and backward (every epilogue of _matmul_fused), with the index-th of the
    candidates that its launches are offered: on Hopper the TMA configs and the pointer ones, elsewhere the pointer
    ones (wrapping around)."""
    forced_candidate(index)
    _check_ffn("cuda", "triton", dtype, "gelu_tanh", 0.1, True, shape=(3, 101, 264), d_ff=1048)
