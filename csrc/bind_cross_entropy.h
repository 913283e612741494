// pybind11 definitions of the cross-entropy kernels for pytrain._C and pytrain._C_cuda (raw pointers as
// ints; Python owns every buffer; a null pointer is 0). `stream` and `device` are ignored on the CPU.
#pragma once
#include "bindings.h"
#include "cross_entropy.h"

namespace pytrain {

inline void def_cross_entropy(py::module_& m, void (*forward)(const CrossEntropyArgs&),
                              void (*gradient)(const CrossEntropyArgs&)) {
  auto make_args = [](uintptr_t logits, uintptr_t labels, uintptr_t loss, uintptr_t lse, uintptr_t partial_stats,
                      uintptr_t grad, uintptr_t row_scale, uintptr_t workspace, float grad_scale, int64_t rows, int64_t vocab,
                      int64_t vocab_start, int64_t total_vocab, int64_t ignore_index, float label_smoothing,
                      float z_loss, int logits_dtype, int parallelism, uintptr_t stream, int device) {
    CrossEntropyArgs a;
    a.logits = ptr(logits), a.labels = ptr<const int64_t>(labels), a.loss = ptr<float>(loss), a.lse = ptr<float>(lse);
    a.partial_stats = ptr<float>(partial_stats), a.grad = ptr(grad), a.row_scale = ptr<const float>(row_scale);
    a.workspace = ptr<float>(workspace);
    a.grad_scale = grad_scale, a.rows = rows, a.vocab = vocab, a.vocab_start = vocab_start;
    a.total_vocab = total_vocab, a.ignore_index = ignore_index, a.label_smoothing = label_smoothing;
    a.z_loss = z_loss, a.logits_dtype = logits_dtype, a.parallelism = parallelism;
    a.stream = ptr(stream), a.device = device;
    return a;
  };
  for (auto [name, fn] : {std::pair{"cross_entropy_forward", forward}, std::pair{"cross_entropy_gradient", gradient}}) {
    m.def(
        name,
        [fn = fn, make_args](uintptr_t logits, uintptr_t labels, uintptr_t loss, uintptr_t lse, uintptr_t partial_stats,
                             uintptr_t grad, uintptr_t row_scale, uintptr_t workspace, float grad_scale, int64_t rows, int64_t vocab,
                             int64_t vocab_start, int64_t total_vocab, int64_t ignore_index, float label_smoothing,
                             float z_loss, int logits_dtype, int parallelism, uintptr_t stream, int device) {
          CrossEntropyArgs a = make_args(logits, labels, loss, lse, partial_stats, grad, row_scale, workspace, grad_scale, rows,
                                         vocab, vocab_start, total_vocab, ignore_index, label_smoothing, z_loss,
                                         logits_dtype, parallelism, stream, device);
          py::gil_scoped_release release;
          fn(a);
        },
        py::arg("logits"), py::arg("labels"), py::arg("loss"), py::arg("lse"), py::arg("partial_stats"),
        py::arg("grad"), py::arg("row_scale"), py::arg("workspace"), py::arg("grad_scale"), py::arg("rows"), py::arg("vocab"),
        py::arg("vocab_start"), py::arg("total_vocab"), py::arg("ignore_index"), py::arg("label_smoothing"),
        py::arg("z_loss"), py::arg("logits_dtype"), py::arg("parallelism"), py::arg("stream"), py::arg("device"));
  }
}

}  // namespace pytrain
