"""Pure-PyTorch Philox4x32-10: the dropout random numbers every backend draws.

This is Triton's ``tl.philox(seed, c0, c1, c2, c3)`` with 32-bit counters
(triton/language/random.py), each of its four output words turned into a uniform by
``tl.random.uint_to_uniform_float``, so the reference backend, the C++ kernels and the Triton kernels drop the
very same elements for the same seed. An element is kept iff ``u >= p``.

Key: k0 = low 32 bits of the (uint64) seed, k1 = high 32 bits. One round, all in uint32:
    c0' = umulhi(B, c2) ^ c1 ^ k0        c1' = B * c2
    c2' = umulhi(A, c0) ^ c3 ^ k1        c3' = A * c0
    k0 += 0x9E3779B9                     k1 += 0xBB67AE85
with A = 0xD2511F53, B = 0xCD9E8D57, ten rounds; the output words are (c0, c1, c2, c3). Uniform of a word:
x = its int32 bitcast; x = ~x if x < 0; u = float32(x) * 4.6566127342e-10 (in float32), so u is in [0, 1).

PyTorch has no uint32 arithmetic, so the words live in int64 tensors masked to 32 bits; the
64-bit product in umulhi is split over the 16-bit halves of one factor so nothing overflows.

Streams (shared by all backends). One call yields four words, and a call costs some 70 integer instructions, which
would make dropout, not memory, the bound of the fused LayerNorm and of attention if each element drew its own;
so four consecutive elements along the last axis share one call: element n of the axis takes word n % 4 of the
call at c0 = n // 4.
    attention probabilities P[b, h, i, j]:     (c0, c1, c2, c3) = (j // 4, i, b * H + h, 0), word j % 4
    element-wise dropout of a (M, N) tensor:   (c0, c1, c2, c3) = (col // 4, row, 0, 1),     word col % 4
"""

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10  # largest scale with (2**31 - 1) * scale < 1 in float32


def _mul_hi_lo(a: int, x: torch.Tensor):
    """High and low 32-bit words of the 64-bit product of the constant ``a`` and uint32 words ``x``."""
    x_lo, x_hi = x & 0xFFFF, x >> 16
    prod_lo = a * x_lo  # < 2**48
    prod_hi = a * x_hi  # < 2**48
    hi = (prod_hi + (prod_lo >> 16)) >> 16
    lo = (prod_lo + ((prod_hi & 0xFFFF) << 16)) & _MASK32
    return hi & _MASK32, lo


def philox_words(seed, c0, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32-10 at counters (c0, c1, c2, c3), as int64 tensors holding uint32 values.

    The counters are integer tensors (or ints) broadcast together; their low 32 bits are used,
    as Triton does with int32 counters. ``seed`` is a Python int or an int64 tensor of shape ()
    (the op layer's seed, which torch.compile traces without reading its value), taken as a 64-bit pattern.
    """
    tensors = [c for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    c0, c1, c2, c3 = torch.broadcast_tensors(
        *(torch.as_tensor(c, dtype=torch.int64, device=device) & _MASK32 for c in (c0, c1, c2, c3)))
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device, dtype=torch.int64)
    else:
        seed = int(seed)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def word_uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float of uint32 words (held in int64): float32 uniforms in [0, 1)."""
    x = torch.where(word >= 2**31, word - 2**32, word)  # int32 bitcast
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=word.device)


def stream_uniforms(seed, n: int, c1, c2, c3, device=None) -> torch.Tensor:
    """Uniforms of elements 0 .. n-1 of the stream (c1, c2, c3), along a new last axis: element k takes word k % 4
    of the call at c0 = k // 4. c1, c2, c3 broadcast together to the leading shape S; the result is (*S, n)."""
    groups = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=device) for c in (c1, c2, c3))
    words = philox_words(seed, groups, c1.unsqueeze(-1), c2.unsqueeze(-1), c3.unsqueeze(-1))  # (*S, n / 4) each
    return word_uniform(torch.stack(words, dim=-1).flatten(-2)[..., :n])


def attention_dropout_keep(seed, B: int, H: int, Lq: int, Lk: int, p: float,
                           device=None) -> torch.Tensor:
    """Boolean (B, H, Lq, Lk) mask of the attention probabilities kept by dropout with rate ``p``."""
    i = torch.arange(Lq, dtype=torch.int64, device=device).view(1, 1, Lq)
    bh = torch.arange(B * H, dtype=torch.int64, device=device).view(B, H, 1)
    u = stream_uniforms(seed, Lk, i, bh, 0, device)
    return u >= torch.tensor(p, dtype=torch.float32, device=u.device)


def elementwise_dropout_keep(seed, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean (rows, cols) mask of the elements of a row-major (M, N) activation kept by dropout with rate ``p``."""
    row = torch.arange(rows, dtype=torch.int64, device=device)
    u = stream_uniforms(seed, cols, row, 0, 1, device)
    return u >= torch.tensor(p, dtype=torch.float32, device=u.device)


def draw_seed() -> torch.Tensor:
    """A dropout seed: an int64 CPU scalar tensor from torch's default generator (so torch.manual_seed reproduces
    a run, and torch.compile traces the draw instead of baking a value into the graph)."""
    return torch.randint(0, 2**63 - 1, (), dtype=torch.int64)


# The seed of the calls that do not drop: one tensor, made outside inference mode (a tensor made inside it could
# not be saved for a backward pass), and never written to.
with torch.inference_mode(False):
    _NO_SEED = torch.zeros((), dtype=torch.int64)


def dropout_seed(p: float) -> torch.Tensor:
    """The seed an op call hands its kernels: a fresh draw when it drops (p > 0), else 0, which they ignore (a
    tensor all the same, so that the kernels' signatures take one type; the same one each time, as making it cost
    more than a us a call)."""
    return draw_seed() if p > 0.0 else _NO_SEED
