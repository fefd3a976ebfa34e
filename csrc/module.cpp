// A bare Python module so `import sft_kernels._C` loads this library and runs
// its static TORCH_LIBRARY registrations. No pybind11: it builds against the
// limited Python API.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "sft_kernels compiled ops; use torch.ops.sft.* or sft_kernels.ops",
      -1,  // size
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
