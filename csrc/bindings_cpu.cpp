// pytrain._C: the CPU kernels (use them through pytrain.kernels, which validates and allocates) and the
// tokenize command's line formatter (used by pytrain/data/tokenize.py).
#include "bind_adamw.h"
#include "bind_attention.h"
#include "bind_rotary.h"
#include "bind_cross_entropy.h"
#include "bind_moe_permute.h"
#include "bind_swiglu.h"
#include "bindings.h"
#include "cpu/stream_store.h"
#include "cpu/vec_avx2.h"
#include "token_lines.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "pytrain CPU kernels (raw-pointer interface; use pytrain.kernels)";
  pytrain::def_rms_norm(m, pytrain::cpu::rms_norm_forward, pytrain::cpu::rms_norm_backward);
  pytrain::def_cross_entropy(m, pytrain::cpu::cross_entropy_forward, pytrain::cpu::cross_entropy_gradient);
  pytrain::def_rotary(m, pytrain::cpu::rotary);
  pytrain::def_swiglu(m, pytrain::cpu::swiglu_forward, pytrain::cpu::swiglu_backward);
  pytrain::def_adamw(m, pytrain::cpu::adamw_step);
  pytrain::def_attention(m);
  pytrain::def_moe_permute(m, pytrain::cpu::moe_route, pytrain::cpu::moe_scatter, pytrain::cpu::moe_gather);
  m.def(
      "format_token_lines",
      [](uintptr_t ids, int id_bytes, uintptr_t counts, int64_t samples, uintptr_t out, uintptr_t line_bytes) {
        pybind11::gil_scoped_release release;  // tokenize workers are processes, but a caller may use threads
        return pytrain::cpu::format_token_lines(pytrain::ptr(ids), id_bytes, pytrain::ptr<int64_t>(counts), samples,
                                                pytrain::ptr<char>(out), pytrain::ptr<int64_t>(line_bytes));
      },
      pybind11::arg("ids"), pybind11::arg("id_bytes"), pybind11::arg("counts"), pybind11::arg("samples"),
      pybind11::arg("out"), pybind11::arg("line_bytes"));
  m.def(
      "advise_huge_pages", [](uintptr_t address, int64_t bytes) { pytrain::cpu::advise_huge_pages(pytrain::ptr(address), bytes); },
      pybind11::arg("address"), pybind11::arg("bytes"));
  m.def(
      "use_avx2", [](bool on) { return pytrain::cpu::avx2::enable(on); }, pybind11::arg("on"),
      "Whether kernels with AVX2 loops take them (where the CPU has AVX2, FMA and F16C) or their generic ones; "
      "returns the previous setting. For tests and timings.");
  m.def(
      "convert",
      [](uintptr_t src, int src_dtype, uintptr_t dst, int dst_dtype, int64_t n) {
        pytrain::cpu::convert(pytrain::ptr(src), src_dtype, pytrain::ptr(dst), dst_dtype, n);
      },
      pybind11::arg("src"), pybind11::arg("src_dtype"), pybind11::arg("dst"), pybind11::arg("dst_dtype"),
      pybind11::arg("n"),
      "Converts n elements between two of the kernels' dtypes as every CPU kernel does (to fp32, then to the "
      "target, rounding to nearest even). For tests.");
  m.attr("stream_min_bytes") = pytrain::cpu::kStreamMinBytes;
  m.attr("token_line_bytes") = pybind11::make_tuple(pytrain::cpu::kLineOverheadBytes, pytrain::cpu::kMaxIdBytes);
}
