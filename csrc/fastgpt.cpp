// Every op's schema, in one place. Implementations are registered per device by TORCH_LIBRARY_IMPL in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake (meta) implementations and autograd live in fastgpt/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

// fastgpt._C is only a vehicle for the static registrations below and in the per-device files: importing it
// registers the ops with the dispatcher; the module itself exposes nothing.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(fastgpt, m) {
  // fastgpt/ops/layer_norm.py: y = LN(input (+ residual)) over rows of a contiguous (M, N) input.
  // mean, rstd: (M,) float32. weight, bias: (N,) in input's dtype or float32.
  m.def("layer_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor output, Tensor mean, Tensor rstd)");
  // Returns (dz, dweight, dbias); dweight and dbias are float32 (N,) sums, empty unless compute_affine_grads.
  m.def("layer_norm_bwd(Tensor grad_output, Tensor input, Tensor? residual, Tensor? weight, Tensor mean,"
        " Tensor rstd, bool compute_affine_grads) -> (Tensor grad_z, Tensor grad_weight, Tensor grad_bias)");
  // fastgpt/ops/attention.py: out = dropout(softmax(q k^T * scale + attn_mask)) v, flash-style (no Lq x Lk matrix).
  // q (B, H, Lq, D), k (B, Hk, Lk, D), v (B, Hk, Lk, Dv), H % Hk == 0; attn_mask None, or bool (True = attend) or
  // additive in q's dtype, broadcastable to (B, H, Lq, Lk) by strides; is_causal top-left aligned. seed: int64
  // CPU scalar for the shared Philox dropout. out (B, H, Lq, Dv) in q's dtype; lse (B, H, Lq) float32 log-sum-exp
  // of the scaled, masked scores (-inf for a row that sees no key).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, bool is_causal, float scale,"
        " float dropout_p, Tensor seed) -> (Tensor out, Tensor lse)");
  // Recomputes the probabilities from lse and regenerates the dropout mask from seed; dq, dk, dv like q, k, v.
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask,"
        " bool is_causal, float scale, float dropout_p, Tensor seed) -> (Tensor dq, Tensor dk, Tensor dv)");
}
