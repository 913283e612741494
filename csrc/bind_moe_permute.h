// pybind11 definitions of the mixture-of-experts permutation kernels for pytrain._C (raw pointers as ints;
// Python owns every buffer; a null pointer is 0). CUDA runs the Triton kernels instead (kernels/moe_permute_triton.py).
#pragma once
#include "bindings.h"
#include "moe_permute.h"

namespace pytrain {

inline void def_moe_permute(py::module_& m, void (*route)(const MoERouteArgs&), void (*scatter)(const MoERowsArgs&),
                            void (*gather)(const MoERowsArgs&)) {
  m.def(
      "moe_route",
      [route](uintptr_t expert_ids, int id_bytes, int64_t assignments, int64_t num_experts, uintptr_t row_of,
              uintptr_t tokens_per_expert, uintptr_t workspace, int parallelism) {
        MoERouteArgs a;
        a.expert_ids = ptr(expert_ids), a.id_bytes = id_bytes, a.assignments = assignments;
        a.num_experts = num_experts, a.row_of = ptr<int64_t>(row_of);
        a.tokens_per_expert = ptr<int64_t>(tokens_per_expert), a.workspace = ptr<int64_t>(workspace);
        a.parallelism = parallelism;
        py::gil_scoped_release release;
        route(a);
      },
      py::arg("expert_ids"), py::arg("id_bytes"), py::arg("assignments"), py::arg("num_experts"), py::arg("row_of"),
      py::arg("tokens_per_expert"), py::arg("workspace"), py::arg("parallelism"));
  for (auto [name, fn] : {std::pair{"moe_scatter", scatter}, std::pair{"moe_gather", gather}}) {
    m.def(
        name,
        [fn = fn](uintptr_t tokens_in, uintptr_t rows_in, uintptr_t tokens_out, uintptr_t rows_out, uintptr_t row_of,
                  uintptr_t weights, uintptr_t grad_weights, int64_t tokens, int64_t top_k, int64_t hidden, int dtype,
                  int parallelism) {
          MoERowsArgs a;
          a.tokens_in = ptr(tokens_in), a.rows_in = ptr(rows_in), a.tokens_out = ptr(tokens_out);
          a.rows_out = ptr(rows_out), a.row_of = ptr<const int64_t>(row_of), a.weights = ptr<const float>(weights);
          a.grad_weights = ptr<float>(grad_weights);
          a.tokens = tokens, a.top_k = top_k, a.hidden = hidden, a.dtype = dtype, a.parallelism = parallelism;
          py::gil_scoped_release release;
          fn(a);
        },
        py::arg("tokens_in"), py::arg("rows_in"), py::arg("tokens_out"), py::arg("rows_out"), py::arg("row_of"),
        py::arg("weights"), py::arg("grad_weights"), py::arg("tokens"), py::arg("top_k"), py::arg("hidden"),
        py::arg("dtype"), py::arg("parallelism"));
  }
}

}  // namespace pytrain
