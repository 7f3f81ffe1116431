#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int8_linear", &int8_linear, "x @ (int8 weight * per-row scale).T + bias, fp32 accumulation",
        py::arg("x"), py::arg("qweight"), py::arg("scale"), py::arg("bias") = py::none());
  m.def("dense_linear", &dense_linear, "x @ weight.T + bias for a few rows, float32 weights",
        py::arg("x"), py::arg("weight"), py::arg("bias") = py::none());
  m.def("rms_norm", &rms_norm, "w * (x * rsqrt(mean(x^2) + eps)) per row", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("norm_rope_qk_", &norm_rope_qk_, "per-head q/k RMSNorm (optional) and rotary embedding, in place on q|k|v",
        py::arg("qkv"), py::arg("cos"), py::arg("sin"), py::arg("q_norm"), py::arg("k_norm"), py::arg("heads"),
        py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"));
  m.def("attend_decode", &attend_decode, "one decode token's cache write and attention over positions 0..pos",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cache_k"), py::arg("cache_v"), py::arg("layer"), py::arg("pos"));
}
