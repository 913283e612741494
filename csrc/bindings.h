// pybind11 definitions shared by pytrain._C and pytrain._C_cuda: both modules expose the same functions
// over raw data pointers (ints); Python owns every buffer. `stream` and `device`
// are ignored on the CPU.
#pragma once
#include <pybind11/pybind11.h>

#include "rms_norm.h"

namespace pytrain {

namespace py = pybind11;

template <typename T = void>
inline T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

inline void def_rms_norm(py::module_& m, void (*forward)(const RMSNormArgs&), void (*backward)(const RMSNormArgs&)) {
  m.def(
      "rms_norm_forward",
      [forward](uintptr_t x, uintptr_t weight, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t hidden, float eps,
                int x_dtype, int weight_dtype, int parallelism, uintptr_t stream, int device, uintptr_t residual,
                uintptr_t residual_out) {
        RMSNormArgs a;
        a.x = ptr(x), a.weight = ptr(weight), a.y = ptr(y), a.rstd = ptr<float>(rstd);
        a.residual = ptr(residual), a.residual_out = ptr(residual_out);
        a.rows = rows, a.hidden = hidden, a.eps = eps, a.x_dtype = x_dtype, a.weight_dtype = weight_dtype;
        a.parallelism = parallelism, a.stream = ptr(stream), a.device = device;
        py::gil_scoped_release release;
        forward(a);
      },
      py::arg("x"), py::arg("weight"), py::arg("y"), py::arg("rstd"), py::arg("rows"), py::arg("hidden"),
      py::arg("eps"), py::arg("x_dtype"), py::arg("weight_dtype"), py::arg("parallelism"), py::arg("stream"), py::arg("device"),
      py::arg("residual") = 0, py::arg("residual_out") = 0);
  m.def(
      "rms_norm_backward",
      [backward](uintptr_t dy, uintptr_t x, uintptr_t weight, uintptr_t rstd, uintptr_t dx, uintptr_t dweight_partial,
                 int64_t rows, int64_t hidden, int x_dtype, int weight_dtype, int parallelism, uintptr_t stream, int device,
                 uintptr_t dresidual_out) {
        RMSNormArgs a;
        a.dresidual_out = ptr(dresidual_out);
        a.dy = ptr(dy), a.x = ptr(x), a.weight = ptr(weight), a.rstd = ptr<float>(rstd), a.dx = ptr(dx);
        a.dweight_partial = ptr<float>(dweight_partial);
        a.rows = rows, a.hidden = hidden, a.x_dtype = x_dtype, a.weight_dtype = weight_dtype;
        a.parallelism = parallelism, a.stream = ptr(stream), a.device = device;
        py::gil_scoped_release release;
        backward(a);
      },
      py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("rstd"), py::arg("dx"), py::arg("dweight_partial"),
      py::arg("rows"), py::arg("hidden"), py::arg("x_dtype"), py::arg("weight_dtype"), py::arg("parallelism"),
      py::arg("stream"), py::arg("device"), py::arg("dresidual_out") = 0);
}

}  // namespace pytrain
