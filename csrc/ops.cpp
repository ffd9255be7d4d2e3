// Registers the CUDA C++ ops with the dispatcher, in namespace VITKERN_OP_NAMESPACE: vitkern_cuda (the nvcc build
// vitkern._C, CUDA key) or vitkern_emu (the emulation build vitkern._emulation, CPU key). Importing the module
// registers them; nothing touches a GPU at load, so it imports on machines without one.
#include <Python.h>
#include <torch/library.h>

#include "attention.h"
#include "depthwise_conv.h"

#ifndef VITKERN_OP_NAMESPACE
#error "VITKERN_OP_NAMESPACE must be defined (vitkern_cuda or vitkern_emu): see setup.py"
#endif

#ifdef VITKERN_EMULATION
#define VITKERN_DISPATCH_KEY CPU
#define VITKERN_MODULE_NAME "_emulation"
#define VITKERN_PYINIT PyInit__emulation
#else
#define VITKERN_DISPATCH_KEY CUDA
#define VITKERN_MODULE_NAME "_C"
#define VITKERN_PYINIT PyInit__C
#endif

TORCH_LIBRARY(VITKERN_OP_NAMESPACE, m) {
  m.def(
      "depthwise_conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, Tensor? residual, "
      "int[2] stride, int[4] padding, int[2] dilation, int activation, bool save_z) -> (Tensor, Tensor)");
  m.def(
      "depthwise_conv2d_bwd(Tensor dy, Tensor x, Tensor weight, Tensor z, Tensor? scale, int[2] stride, "
      "int[4] padding, int[2] dilation, int activation, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // No tensor arguments, so one kernel for every dispatch key: the launches the two ops above would make.
  m.def(
      "depthwise_conv2d_plan(int[] x_shape, bool channels_last, str dtype, int[] kernel, int[] stride, "
      "int[] padding, int[] dilation, int activation, str direction) -> str[]",
      &vitkern::depthwise_conv2d_plan);
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor? mask, int bias_mode, int[] geometry, "
      "float scale) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias, Tensor? mask, "
      "int bias_mode, int[] geometry, float scale, bool bias_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(VITKERN_OP_NAMESPACE, VITKERN_DISPATCH_KEY, m) {
  m.impl("depthwise_conv2d_fwd", &vitkern::depthwise_conv2d_fwd);
  m.impl("depthwise_conv2d_bwd", &vitkern::depthwise_conv2d_bwd);
  m.impl("attention_fwd", &vitkern::attention_fwd);
  m.impl("attention_bwd", &vitkern::attention_bwd);
}

extern "C" PyObject* VITKERN_PYINIT() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "vitkern." VITKERN_MODULE_NAME,
                               "vitkern CUDA C++ ops, registered with torch.ops on import", -1, nullptr};
  return PyModule_Create(&module);
}
