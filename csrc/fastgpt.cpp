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
}
