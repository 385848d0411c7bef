// The nchains operator library: every schema, and the Python module stub for nchains._C.
// Kernels are registered per dispatch key in cpu/, cuda/ and autograd/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing nchains._C loads this shared library, which runs the TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(nchains, m) {
  // residual is added after the score, before the activation (a fused residual add); gate_input is
  // what the gate blends with (default: the conv's input, a layer gate; else e.g. a block's input).
  m.def(
      "masked_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor scale, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, str activation, Tensor? gate_logit, float temperature, Tensor? residual=None, "
      "Tensor? gate_input=None) -> Tensor");
  // Same as masked_conv2d, also returning the conv output z that the backward needs.
  m.def(
      "_masked_conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor scale, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, str activation, Tensor? gate_logit, float temperature, Tensor? residual=None, "
      "Tensor? gate_input=None) -> (Tensor, Tensor)");
  // Returns (grad_input, grad_weight, grad_bias, grad_scale, grad_gate_logit, grad_residual,
  // grad_gate_input); conv grads not asked for by conv_mask are returned as empty tensors, as are
  // the grads of absent optional inputs (grad_input gets the gate's direct path without gate_input).
  m.def(
      "_masked_conv2d_backward(Tensor grad_out, Tensor input, Tensor weight, Tensor z, Tensor scale, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, str activation, Tensor? gate_logit, "
      "float temperature, Tensor? residual, Tensor? gate_input, bool[3] conv_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gate(Tensor block_out, Tensor block_in, Tensor gate_logit, float temperature) -> Tensor");
  // Returns (grad_block_out, grad_block_in, grad_gate_logit).
  m.def(
      "_gate_backward(Tensor grad_out, Tensor block_out, Tensor block_in, Tensor gate_logit, float temperature) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("taylor_contributions(Tensor activation, Tensor grad, str reduction, bool absolute) -> Tensor");
  // Returns (grad_activation, grad_grad).
  m.def(
      "_taylor_contributions_backward(Tensor grad_out, Tensor activation, Tensor grad, str reduction, "
      "bool absolute) -> (Tensor, Tensor)");
}
