// fastdni._C: registers the CPU kernels (and, when built with CUDA, the CUDA ones register in their own
// files). The schemas are declared once, in fastdni/ops/schema.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/ops.h"

extern "C" {
// `import fastdni._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_IMPL(fastdni, CPU, m) {
  m.impl("dni_forward", &fastdni::cpu::dni_forward);
  m.impl("sg_predict", &fastdni::cpu::sg_predict);
  m.impl("dni_update_", &fastdni::cpu::dni_update_);
  m.impl("sg_regression_", &fastdni::cpu::sg_regression_);
  m.impl("batch_norm_act", &fastdni::cpu::batch_norm_act);
  m.impl("batch_norm_act_update_", &fastdni::cpu::batch_norm_act_update_);
}
