"""How every kernel backend of an op is registered with torch.library, and how eager code calls it."""

from __future__ import annotations

from typing import Callable


def register_kernel_op(fwd_op, bwd_op, fwd_fake: Callable, bwd_fake: Callable,
                       autograd_for: Callable[[object], Callable], setup_context: Callable) -> Callable:
    """Fake (meta) implementations for a backend's forward and backward custom ops, so torch.compile and
    torch.library.opcheck can trace them, and the forward op's autograd formula, whose backward calls `bwd_op`
    (`autograd_for(bwd_op)` builds it, given the op as eager code calls it: `direct_when_eager`). The fakes and the
    formula are the op's, shared by all its backends. Returns the forward op as eager code should call it
    (`eager_call`)."""
    import torch

    torch.library.register_fake(fwd_op)(fwd_fake)
    torch.library.register_fake(bwd_op)(bwd_fake)
    # The op's qualified name: a custom_op's (Triton) _qualname, an OpOverload's (C++) name().
    name = getattr(fwd_op, "_qualname", None) or fwd_op.name()
    backward = first_order_only(name, autograd_for(direct_when_eager(bwd_op)))
    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)
    return eager_call(fwd_op, backward, setup_context)


def direct_when_eager(op) -> Callable:
    """`op` as eager code calls it. A custom op written in Python (torch.library.custom_op: the Triton backend's
    launchers) pays about 13 us a call in the dispatcher before its function runs (dynamo disabled around it, the
    outputs checked for aliasing; measured on a CPU with the launch itself stubbed out), several times what a small
    kernel takes on a GPU. When nothing could see the dispatcher's work, the function the op wraps is called
    directly, with the same arguments and results: not under torch.compile or torch.jit.trace (which record the op),
    nor under a torch function or dispatch mode (FakeTensorMode, FlopCounterMode, torch.device(...)), nor while the
    autograd profiler records (it names ops), nor for tensor subclasses (DTensor, wrapper subclasses) other than
    nn.Parameter.
    C++ ops (OpOverloads) are returned as they are: their dispatch is the C++ dispatcher's, a few us."""
    import torch

    # The function custom_op wrapped (CustomOpDef._init_fn, since torch 2.4); without it, the op is always called.
    kernel = getattr(op, "_init_fn", None)
    if kernel is None:
        return op
    plain = (torch.Tensor, torch.nn.Parameter)
    profiler = torch.autograd.profiler

    def call(*args):
        if (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
                or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack()
                or profiler._is_profiler_enabled
                or any(type(a) not in plain for a in args if isinstance(a, torch.Tensor))):
            return op(*args)
        return kernel(*args)

    return call


def refuse_create_graph(op_name: str) -> None:
    """Raises when a backward runs with create_graph=True (grad mode on inside the backward): the kernels' backward
    ops have no autograd formula of their own, so a gradient of the gradient would silently be zero. torch.compile
    traces backwards with grad mode off and is left alone."""
    import torch

    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{op_name}: the kernels' backward is not differentiable (backward with create_graph=True, "
                           f"for a gradient of a gradient); run this op on the reference backend: "
                           f"with fastgpt.use_backend('reference')")


def first_order_only(op_name: str, backward: Callable) -> Callable:
    """`backward`, refusing create_graph=True (refuse_create_graph)."""
    def checked(ctx, *grads):
        refuse_create_graph(op_name)
        return backward(ctx, *grads)

    return checked


def eager_call(op, backward: Callable, setup_context: Callable) -> Callable:
    """`op` with the autograd formula registered for it, minus what torch.library's Python autograd wrapper adds to
    a plain autograd.Function (argument defaults refilled, a redispatch): 5 of the 33 us of a small LayerNorm call
    with grad on a CPU, 3 of 16 without (the kernel itself takes 7).
    In eager mode an autograd.Function with the very same setup_context and backward runs the op below autograd;
    under torch.compile the registered op itself is called, which it traces (torch.func transforms never get here:
    backends.select sends them to reference)."""
    import torch

    run = direct_when_eager(op)

    class Function(torch.autograd.Function):
        # forward takes ctx and calls setup_context itself: with a separate setup_context staticmethod,
        # Function.apply binds the arguments through inspect.signature on every call (18 of the 54 us of a small
        # LayerNorm call with grad on a CPU).
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = run(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return Function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return run(*args)

    return call
