"""Test set-up: Triton kernels run on CPU tensors through the interpreter when there is no GPU, and with fixed configs
(no autotuning) on a GPU.

TRITON_INTERPRET must be set before triton (and so fastgpt) is imported: @triton.jit reads it at decoration.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One config per kernel specialisation instead of autotuning each (kernels/common.py): the suite meets hundreds
    # of them. tests/test_triton_configs.py runs every config on a few cases instead.
    os.environ.setdefault("FASTGPT_TRITON_TUNING", "first")

import fastgpt  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """For tests of many tiny ops (modules, models): on a busy 2-core machine OpenMP's thread hand-offs cost far more
    than the arithmetic. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
