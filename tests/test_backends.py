"""Backend listing, forcing and the environment variable."""

import os
import subprocess
import sys

import pytest
import torch

import fastgpt
from fastgpt import backends


def test_reference_always_available():
    assert fastgpt.available_backends("cpu")[0] == "reference"
    assert "reference" in fastgpt.available_backends(torch.device("cpu"))


def test_csrc_loads_here():
    """CI builds the extension: if it did not load, say why."""
    assert backends.CSRC_LOADED, backends._CSRC_ERROR


def test_extension_built_for_this_cpu():
    """setup.py records the instruction set the CPU kernels were compiled for; this machine must have it."""
    from fastgpt._build_config import CPU_CAPABILITY
    assert CPU_CAPABILITY in ("DEFAULT", "AVX2", "AVX512")
    assert backends._cpu_lacks_build_capability() is None


@pytest.mark.parametrize("capability, check", [("AVX512", "_is_avx512_supported"), ("AVX2", "_is_avx2_supported")])
def test_extension_for_a_missing_instruction_set_is_refused(monkeypatch, capability, check):
    """A build carried to a CPU without its instruction set is not imported (it could die of an illegal
    instruction): the csrc backend is unavailable, with the reason and the rebuild command."""
    import types
    monkeypatch.setitem(sys.modules, "fastgpt._build_config", types.SimpleNamespace(CPU_CAPABILITY=capability))
    monkeypatch.setattr(torch.cpu, check, lambda: False)
    assert backends._cpu_lacks_build_capability() == capability
    message = backends._load_extension()
    assert f"compiled for {capability}, which this CPU lacks" in message and "FASTGPT_CPU_CAPABILITY" in message


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*reference, triton, csrc"):
        with fastgpt.use_backend("cuda"):
            pass


def test_use_backend_nests_and_restores():
    assert backends.forced_backend() is None
    with fastgpt.use_backend("reference"):
        with fastgpt.use_backend("csrc"):
            assert backends.forced_backend() == "csrc"
        assert backends.forced_backend() == "reference"
    assert backends.forced_backend() is None


def test_default_choice_on_cpu_is_csrc_then_reference():
    x = torch.randn(2, 8)
    assert backends.select(x.device, lambda name: True) == "csrc"
    assert backends.select(x.device, lambda name: name != "csrc") == "reference"


def _python(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTGPT_BACKEND")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine triton runs without the interpreter")
def test_triton_on_cpu_needs_the_interpreter():
    result = _python("import fastgpt; print(fastgpt.available_backends('cpu'));"
                     "fastgpt.use_backend('triton').__enter__()")
    assert "'triton'" not in result.stdout
    assert "TRITON_INTERPRET=1" in result.stderr


def test_environment_variable_forces_a_backend():
    result = _python("import torch, fastgpt; from fastgpt import backends;"
                     "print(backends.select(torch.device('cpu'), lambda name: True))", FASTGPT_BACKEND="reference")
    assert result.stdout.strip() == "reference", result.stderr
    result = _python("import fastgpt", FASTGPT_BACKEND="fast")
    assert result.returncode != 0 and "FASTGPT_BACKEND: unknown backend 'fast'" in result.stderr
