// pybind11 definitions of the SwiGLU kernels for pytrain._C and pytrain._C_cuda (raw data pointers as ints;
// Python owns every buffer). `stream` and `device` are ignored on the CPU.
#pragma once
#include "bindings.h"
#include "swiglu.h"

namespace pytrain {

inline void def_swiglu(py::module_& m, void (*forward)(const SwiGLUArgs&), void (*backward)(const SwiGLUArgs&)) {
  m.def(
      "swiglu_forward",
      [forward](uintptr_t gate, uintptr_t up, uintptr_t out, int64_t numel, int dtype, int parallelism, uintptr_t stream,
                int device) {
        SwiGLUArgs a;
        a.gate = ptr(gate), a.up = ptr(up), a.out = ptr(out);
        a.numel = numel, a.dtype = dtype, a.parallelism = parallelism, a.stream = ptr(stream), a.device = device;
        py::gil_scoped_release release;
        forward(a);
      },
      py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("numel"), py::arg("dtype"), py::arg("parallelism"),
      py::arg("stream"), py::arg("device"));
  m.def(
      "swiglu_backward",
      [backward](uintptr_t gate, uintptr_t up, uintptr_t dout, uintptr_t dgate, uintptr_t dup, int64_t numel, int dtype,
                 int parallelism, uintptr_t stream, int device) {
        SwiGLUArgs a;
        a.gate = ptr(gate), a.up = ptr(up), a.dout = ptr(dout), a.dgate = ptr(dgate), a.dup = ptr(dup);
        a.numel = numel, a.dtype = dtype, a.parallelism = parallelism, a.stream = ptr(stream), a.device = device;
        py::gil_scoped_release release;
        backward(a);
      },
      py::arg("gate"), py::arg("up"), py::arg("dout"), py::arg("dgate"), py::arg("dup"), py::arg("numel"),
      py::arg("dtype"), py::arg("parallelism"), py::arg("stream"), py::arg("device"));
}

}  // namespace pytrain
