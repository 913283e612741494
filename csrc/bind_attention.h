// pybind11 definitions of the CPU attention kernels for pytrain._C (raw data pointers as ints; Python owns
// every buffer and checks every shape: pytrain/kernels/attention_cpu.py).
#pragma once
#include "attention.h"
#include "bindings.h"

namespace pytrain {

inline void def_attention(py::module_& m) {
  auto fill = [](AttentionArgs& a, uintptr_t q, uintptr_t k, uintptr_t v, py::tuple strides, uintptr_t out,
                 uintptr_t lse, uintptr_t cu_seqlens, int64_t num_seqs, int64_t heads, int64_t kv_heads,
                 int64_t head_dim, bool causal, float scale, int dtype, int parallelism) {
    a.q = ptr(q), a.k = ptr(k), a.v = ptr(v), a.out = ptr(out), a.lse = ptr<float>(lse);
    a.q_token_stride = strides[0].cast<int64_t>(), a.q_head_stride = strides[1].cast<int64_t>();
    a.k_token_stride = strides[2].cast<int64_t>(), a.k_head_stride = strides[3].cast<int64_t>();
    a.v_token_stride = strides[4].cast<int64_t>(), a.v_head_stride = strides[5].cast<int64_t>();
    a.cu_seqlens = ptr<const int64_t>(cu_seqlens), a.num_seqs = num_seqs;
    a.heads = heads, a.kv_heads = kv_heads, a.head_dim = head_dim, a.causal = causal, a.scale = scale;
    a.dtype = dtype, a.parallelism = parallelism;
  };
  m.def(
      "attention_forward",
      [fill](uintptr_t q, uintptr_t k, uintptr_t v, py::tuple strides, uintptr_t out, uintptr_t lse,
             uintptr_t cu_seqlens, int64_t num_seqs, int64_t heads, int64_t kv_heads, int64_t head_dim, bool causal,
             float scale, int dtype, int parallelism) {
        AttentionArgs a;
        fill(a, q, k, v, strides, out, lse, cu_seqlens, num_seqs, heads, kv_heads, head_dim, causal, scale, dtype,
             parallelism);
        py::gil_scoped_release release;
        cpu::attention_forward(a);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("strides"), py::arg("out"), py::arg("lse"),
      py::arg("cu_seqlens"), py::arg("num_seqs"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
      py::arg("causal"), py::arg("scale"), py::arg("dtype"), py::arg("parallelism"));
  m.def(
      "attention_backward",
      [fill](uintptr_t q, uintptr_t k, uintptr_t v, py::tuple strides, uintptr_t out, uintptr_t lse, uintptr_t dout,
             uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t cu_seqlens, int64_t num_seqs, int64_t heads,
             int64_t kv_heads, int64_t head_dim, bool causal, float scale, int dtype, int parallelism) {
        AttentionArgs a;
        fill(a, q, k, v, strides, out, lse, cu_seqlens, num_seqs, heads, kv_heads, head_dim, causal, scale, dtype,
             parallelism);
        a.dout = ptr(dout), a.dq = ptr(dq), a.dk = ptr(dk), a.dv = ptr(dv);
        py::gil_scoped_release release;
        cpu::attention_backward(a);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("strides"), py::arg("out"), py::arg("lse"), py::arg("dout"),
      py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("cu_seqlens"), py::arg("num_seqs"), py::arg("heads"),
      py::arg("kv_heads"), py::arg("head_dim"), py::arg("causal"), py::arg("scale"), py::arg("dtype"),
      py::arg("parallelism"));
  m.def("attention_supported", &cpu::attention_supported);
}

}  // namespace pytrain
