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
  // (row, col) iff Philox(seed; col, row, 0, 1) >= dropout_p (csrc/philox.h); seed: int64 CPU scalar tensor.
  m.def("layer_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, float dropout_p,"
        " Tensor? seed) -> (Tensor output, Tensor mean, Tensor rstd)");
  // Returns (dinput, dresidual, dweight, dbias). dresidual is empty unless there is a residual and dropout (without
  // dropout it equals dinput); dweight and dbias are float32 (N,) sums, empty unless compute_affine_grads.
  m.def("layer_norm_bwd(Tensor grad_output, Tensor input, Tensor? residual, Tensor? weight, Tensor mean,"
        " Tensor rstd, bool compute_affine_grads, float dropout_p, Tensor? seed)"
        " -> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");
}
