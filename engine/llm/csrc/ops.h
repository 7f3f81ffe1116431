// The CPU kernels of engine/llm/cpu_ops.py: one extension module, bound in bindings.cpp.
#pragma once
#include <ATen/ATen.h>

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& bias);
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
void norm_rope_qk_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                   const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                   int64_t heads, int64_t kv_heads, int64_t d, double eps);
at::Tensor attend_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& cache_k,
                         at::Tensor& cache_v, int64_t layer, int64_t pos);
