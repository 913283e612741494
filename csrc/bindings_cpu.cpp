// pytrain._C: the CPU kernels. Use them through pytrain.kernels, which validates and allocates.
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pytrain CPU kernels (raw-pointer interface; use pytrain.kernels)";
  pytrain::def_rms_norm(m, pytrain::cpu::rms_norm_forward, pytrain::cpu::rms_norm_backward);
}
