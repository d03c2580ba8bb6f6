"""How every kernel backend of an op is registered with torch.library."""

from __future__ import annotations

from typing import Callable


def register_kernel_op(fwd_op, bwd_op, fwd_fake: Callable, bwd_fake: Callable,
                       autograd_for: Callable[[object], Callable], setup_context: Callable) -> None:
    """Fake (meta) implementations for a backend's forward and backward custom ops, so torch.compile and
    torch.library.opcheck can trace them, and the forward op's autograd formula, whose backward calls `bwd_op`
    (`autograd_for(bwd_op)` builds it). The fakes and the formula are the op's, shared by all its backends."""
    import torch

    torch.library.register_fake(fwd_op)(fwd_fake)
    torch.library.register_fake(bwd_op)(bwd_fake)
    torch.library.register_autograd(fwd_op, autograd_for(bwd_op), setup_context=setup_context)
