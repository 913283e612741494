// pybind11 definition of `rotary` for pytrain._C and pytrain._C_cuda (raw data pointers as ints; Python
// owns every buffer). `stream` and `device` are ignored on the CPU.
#pragma once
#include "bindings.h"
#include "rotary.h"

namespace pytrain {

inline void def_rotary(py::module_& m, void (*rotary)(const RotaryArgs&)) {
  m.def(
      "rotary",
      [rotary](uintptr_t q_in, uintptr_t q_out, uintptr_t k_in, uintptr_t k_out, int64_t q_in_stride_batch,
               int64_t q_in_stride_seq, int64_t q_out_stride_batch, int64_t q_out_stride_seq, int64_t k_in_stride_batch,
               int64_t k_in_stride_seq, int64_t k_out_stride_batch, int64_t k_out_stride_seq, uintptr_t positions,
               int64_t positions_stride_batch, uintptr_t cos_sin, int64_t batch, int64_t seq, int64_t q_heads,
               int64_t k_heads, int64_t head_dim, bool interleaved, bool inverse, int dtype, int parallelism,
               uintptr_t stream, int device) {
        RotaryArgs a;
        a.q_in = ptr(q_in), a.q_out = ptr(q_out), a.k_in = ptr(k_in), a.k_out = ptr(k_out);
        a.q_in_stride_batch = q_in_stride_batch, a.q_in_stride_seq = q_in_stride_seq;
        a.q_out_stride_batch = q_out_stride_batch, a.q_out_stride_seq = q_out_stride_seq;
        a.k_in_stride_batch = k_in_stride_batch, a.k_in_stride_seq = k_in_stride_seq;
        a.k_out_stride_batch = k_out_stride_batch, a.k_out_stride_seq = k_out_stride_seq;
        a.positions = ptr<const int64_t>(positions), a.positions_stride_batch = positions_stride_batch;
        a.cos_sin = ptr<const float>(cos_sin);
        a.batch = batch, a.seq = seq, a.q_heads = q_heads, a.k_heads = k_heads, a.head_dim = head_dim;
        a.interleaved = interleaved, a.inverse = inverse, a.dtype = dtype, a.parallelism = parallelism;
        a.stream = ptr(stream), a.device = device;
        py::gil_scoped_release release;
        rotary(a);
      },
      py::arg("q_in"), py::arg("q_out"), py::arg("k_in"), py::arg("k_out"), py::arg("q_in_stride_batch"),
      py::arg("q_in_stride_seq"), py::arg("q_out_stride_batch"), py::arg("q_out_stride_seq"),
      py::arg("k_in_stride_batch"), py::arg("k_in_stride_seq"), py::arg("k_out_stride_batch"),
      py::arg("k_out_stride_seq"), py::arg("positions"), py::arg("positions_stride_batch"), py::arg("cos_sin"),
      py::arg("batch"), py::arg("seq"), py::arg("q_heads"), py::arg("k_heads"), py::arg("head_dim"),
      py::arg("interleaved"), py::arg("inverse"), py::arg("dtype"), py::arg("parallelism"), py::arg("stream"),
      py::arg("device"));
}

}  // namespace pytrain
