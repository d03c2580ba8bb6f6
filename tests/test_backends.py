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


@pytest.mark.parametrize("triton, numpy, refused", [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                    ("3.7.0", "2.4.6", False), ("3.9.0", "2.5.1", False)])
def test_interpreter_and_numpy_pairing(monkeypatch, triton, numpy, refused):
    """Triton 3.6's interpreter cannot run the kernels with NumPy >= 2.4: the backend says so, with the remedy."""
    versions = {"triton": triton, "numpy": numpy}
    monkeypatch.setattr(backends.importlib.metadata, "version", versions.__getitem__)
    monkeypatch.setattr(backends, "_TRITON_INSTALLED", True)
    monkeypatch.setattr(backends, "_TRITON_INTERPRET", True)
    problem = backends._interpreter_problem()
    if refused:
        assert problem == f"Triton {triton}'s interpreter (TRITON_INTERPRET=1) fails with NumPy {numpy}: install " \
                          "numpy<2.4 or triton>=3.7"
    else:
        assert problem is None


def test_environment_variable_forces_a_backend():
    result = _python("import torch, fastgpt; from fastgpt import backends;"
                     "print(backends.select(torch.device('cpu'), lambda name: True))", FASTGPT_BACKEND="reference")
    assert result.stdout.strip() == "reference", result.stderr
    result = _python("import fastgpt", FASTGPT_BACKEND="fast")
    assert result.returncode != 0 and "FASTGPT_BACKEND: unknown backend 'fast'" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Differentiation beyond first-order reverse mode: the kernels' backward ops have no autograd formula and functorch
# cannot see through them, so torch.func transforms and forward-mode AD run the ops on reference, and a backward
# with create_graph=True through a kernel is refused (its second-order gradient would silently be zero).

def _op_calls():
    """Each public op on small float32 inputs (all differentiable), as (name, function, inputs)."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    return [
        ("scaled_dot_product_attention", fastgpt.ops.scaled_dot_product_attention,
         (rand(2, 2, 5, 16), rand(2, 2, 7, 16), rand(2, 2, 7, 16))),  # head dim 16: the kernels take it
        ("layer_norm", lambda x, w, b: fastgpt.ops.layer_norm(x, 9, w, b), (rand(3, 9), rand(9), rand(9))),
        ("add_layer_norm", lambda x, r, w, b: fastgpt.ops.add_layer_norm(x, r, 9, w, b),
         (rand(3, 9), rand(3, 9), rand(9), rand(9))),
        ("linear_gelu", fastgpt.ops.linear_gelu, (rand(3, 6), rand(5, 6), rand(5))),
        ("gelu_ffn", fastgpt.ops.gelu_ffn, (rand(3, 6), rand(10, 6), rand(10), rand(6, 10), rand(6))),
    ]


KERNEL_BACKENDS = [name for name in fastgpt.available_backends("cpu") if name != "reference"]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name,function,inputs", _op_calls(), ids=[c[0] for c in _op_calls()])
def test_func_transforms_and_forward_ad_run_on_reference(backend, name, function, inputs):
    tangents = tuple(torch.randn_like(t) for t in inputs)
    with fastgpt.use_backend("reference"):
        expected_jvp = torch.func.jvp(function, inputs, tangents)[1]
        expected_grad = torch.func.grad(lambda *a: function(*a).square().sum(), argnums=0)(*inputs)
    with fastgpt.use_backend(backend):
        torch.testing.assert_close(torch.func.jvp(function, inputs, tangents)[1], expected_jvp)
        torch.testing.assert_close(torch.func.grad(lambda *a: function(*a).square().sum(), argnums=0)(*inputs),
                                   expected_grad)
        with torch.autograd.forward_ad.dual_level():
            dual = function(*(torch.autograd.forward_ad.make_dual(t, d) for t, d in zip(inputs, tangents)))
            torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(dual).tangent, expected_jvp)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name,function,inputs", _op_calls(), ids=[c[0] for c in _op_calls()])
def test_create_graph_through_a_kernel_is_refused(backend, name, function, inputs):
    inputs = [t.detach().requires_grad_() for t in inputs]
    with fastgpt.use_backend("reference"):
        first = torch.autograd.grad(function(*inputs).square().sum(), inputs[0], create_graph=True)[0]
    assert first.requires_grad  # the reference differentiates twice
    with fastgpt.use_backend(backend):
        out = function(*inputs).square().sum()
        with pytest.raises(RuntimeError, match="backward is not differentiable .*create_graph=True.* reference"):
            torch.autograd.grad(out, inputs[0], create_graph=True)
        out = function(*inputs).square().sum()
        # A first-order backward still runs (float32 kernels: their accuracy is tests/test_<op>.py's to check).
        torch.testing.assert_close(torch.autograd.grad(out, inputs[0])[0], first.detach(), rtol=1e-4, atol=1e-4)
