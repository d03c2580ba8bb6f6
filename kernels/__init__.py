"""Triton kernels of fastgpt, one module per op (installed as ``fastgpt.kernels``).

Each module holds the ``@triton.jit`` kernels of one op and the launchers that ``fastgpt/ops/<op>.py`` calls.
"""
