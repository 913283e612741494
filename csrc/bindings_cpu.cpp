// pytrain._C: the CPU kernels. Use them through pytrain.kernels, which validates and allocates.
#include "bind_rotary.h"
#include "bind_cross_entropy.h"
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pytrain CPU kernels (raw-pointer interface; use pytrain.kernels)";
  pytrain::def_rms_norm(m, pytrain::cpu::rms_norm_forward, pytrain::cpu::rms_norm_backward);
  pytrain::def_cross_entropy(m, pytrain::cpu::cross_entropy_forward, pytrain::cpu::cross_entropy_gradient);
  pytrain::def_rotary(m, pytrain::cpu::rotary);
}
