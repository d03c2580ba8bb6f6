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
  // fastgpt/ops/layer_norm.py: y = LN(dropout(input) (+ residual)) over rows of a contiguous (M, N) input.
  // mean, rstd: (M,) float32. weight, bias: (N,) in input's dtype or float32. Dropout (dropout_p > 0) keeps element
  // (row, col) iff its uniform in the (row, 0, 1) stream is >= dropout_p (csrc/philox.h); seed: int64 CPU scalar
  // tensor.
  m.def("layer_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, float dropout_p,"
        " Tensor? seed) -> (Tensor output, Tensor mean, Tensor rstd)");
  // Returns (dinput, dresidual, dweight, dbias). dresidual is empty unless there is a residual and dropout (without
  // dropout it equals dinput); dweight and dbias are float32 (N,) sums, empty unless compute_affine_grads.
  m.def("layer_norm_bwd(Tensor grad_output, Tensor input, Tensor? residual, Tensor? weight, Tensor mean,"
        " Tensor rstd, bool compute_affine_grads, float dropout_p, Tensor? seed)"
        " -> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");
  // fastgpt/ops/linear_gelu.py: out = dropout(act(input weight^T + bias)) over contiguous (M, K) input and (N, K)
  // weight; activation is none, gelu, gelu_tanh or relu; seed an int64 CPU scalar (read when dropout_p > 0).
  // pre (M, N) = input weight^T + bias when store_pre, else empty. Gradients of the bias: float32 (N,) or empty.
  m.def("linear_gelu_fwd(Tensor input, Tensor weight, Tensor? bias, str activation, bool store_pre,"
        " float dropout_p, Tensor seed) -> (Tensor output, Tensor pre)");
  // grad_pre = grad * dropout mask / (1 - dropout_p) * act'(pre); pre may be None when activation is none.
  m.def("linear_gelu_bwd(Tensor grad, Tensor? pre, str activation, float dropout_p, Tensor seed, bool bias_grad)"
        " -> (Tensor grad_pre, Tensor grad_bias)");
  // The same with pre recomputed as input weight^T + bias (not stored in the forward pass), no dropout.
  m.def("linear_gelu_bwd_recompute(Tensor grad, Tensor input, Tensor weight, Tensor? bias, str activation,"
        " bool bias_grad) -> (Tensor grad_pre, Tensor grad_bias)");
  // grad_pre (M, K) = (grad (M, N) weight (N, K)) * act'(pre (M, K)): the backward through a following linear layer.
  m.def("linear_gelu_dact(Tensor grad, Tensor weight, Tensor pre, str activation, bool bias_grad)"
        " -> (Tensor grad_pre, Tensor grad_bias)");
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
