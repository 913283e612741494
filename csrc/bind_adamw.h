// pybind11 definition of `adamw_step` for pytrain._C and pytrain._C_cuda (raw data pointers as ints; Python
// owns every buffer, the table included). `stream` and `device` are ignored on the CPU.
#pragma once
#include "adamw.h"
#include "bindings.h"

namespace pytrain {

inline void def_adamw(py::module_& m, void (*step)(const AdamWArgs&)) {
  m.def(
      "adamw_step",
      [step](uintptr_t table, int64_t tensors, int64_t total, float grad_scale, float param_scale, float one_minus_beta1,
             float beta2, float one_minus_beta2, float neg_step_size, float bias_correction2_sqrt, float eps,
             int parallelism, uintptr_t stream, int device) {
        AdamWArgs a;
        a.table = ptr<const int64_t>(table), a.tensors = tensors, a.total = total;
        a.grad_scale = grad_scale, a.param_scale = param_scale, a.one_minus_beta1 = one_minus_beta1;
        a.beta2 = beta2, a.one_minus_beta2 = one_minus_beta2, a.neg_step_size = neg_step_size;
        a.bias_correction2_sqrt = bias_correction2_sqrt, a.eps = eps;
        a.parallelism = parallelism, a.stream = ptr(stream), a.device = device;
        py::gil_scoped_release release;
        step(a);
      },
      py::arg("table"), py::arg("tensors"), py::arg("total"), py::arg("grad_scale"), py::arg("param_scale"),
      py::arg("one_minus_beta1"), py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("neg_step_size"),
      py::arg("bias_correction2_sqrt"), py::arg("eps"), py::arg("parallelism"), py::arg("stream"), py::arg("device"));
}

}  // namespace pytrain
