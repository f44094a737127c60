// A GOAT layer's inference forward on the CPU as one call from Python (goat_hf/cpu_kernel.py explains why).
//
// For fp32 inputs x [..., n] (T tokens): y = W0 x + b + (g ⊙ low) up, low = x down, g the renormalised top-k of
// softmax(x router) spread over each expert's d = expert_columns / E columns of low (a residual's columns after them
// are not gated).
// The matmuls are the ATen calls the Python path makes (decode.fused_base_forward); the gating, a handful of numbers
// per token, is a loop here instead of five ATen ops.
#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <vector>

namespace {

void check_fp32_cpu(const at::Tensor& t, const char* name, bool matrix = true) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && (!matrix || t.dim() == 2),
              "goat_hf decode kernel: ", name, " must be ", matrix ? "a 2-D " : "an ", "fp32 CPU tensor, got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

// Scale each token's expert columns of `low` [T, >= expert_columns] by their expert's top-k gate (0 off the top-k);
// ties go to the lower index, as in decode.fusable_top_k_gates. Both may be column slices of one matrix (row strides).
void gate_experts(const at::Tensor& logits, const at::Tensor& low, int64_t top_k, int64_t expert_columns) {
  TORCH_CHECK(logits.stride(1) == 1 && low.stride(1) == 1,
              "goat_hf decode kernel: logits and activations must have unit column stride");
  const int64_t T = logits.size(0), E = logits.size(1), d = expert_columns / E;
  const int64_t logits_stride = logits.stride(0), low_stride = low.stride(0);
  const float* all_logits = logits.data_ptr<float>();
  float* all_low = low.data_ptr<float>();
  std::vector<float> gate(E);
  std::vector<char> picked(E);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = all_logits + t * logits_stride;
    std::fill(gate.begin(), gate.end(), 0.f);
    std::fill(picked.begin(), picked.end(), 0);
    float top = 0.f, total = 0.f;
    for (int64_t round = 0; round < top_k; ++round) {
      int64_t best = -1;
      for (int64_t j = 0; j < E; ++j) {
        // NaN counts as the largest, as in torch.topk: a NaN router then makes the output NaN, never silently finite
        if (!picked[j] && (best < 0 || l[j] > l[best] || (std::isnan(l[j]) && !std::isnan(l[best])))) best = j;
      }
      picked[best] = 1;
      if (round == 0) top = l[best];  // the largest logit: softmax's shift
      gate[best] = std::exp(l[best] - top);
      total += gate[best];
    }
    float* row = all_low + t * low_stride;
    for (int64_t c = 0; c < expert_columns; ++c) row[c] *= gate[c / d] / total;
  }
}

// From the folded weights the eager path caches (decode.InferenceWeights): router_down_t = [W_rᵀ | A'ᵀ] [n, E + cols]
// with A' = [A; -c·s·A0], one matmul for the logits and the activations, and up_t = [s·B | B0]ᵀ [cols, m]; E is
// what router_down_t has beyond up_t's rows.
at::Tensor decode_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          const at::Tensor& router_down_t, const at::Tensor& up_t, int64_t top_k,
                          int64_t expert_columns) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "goat_hf decode kernel: x must be [..., ", weight.size(1),
              "], got ", x.sizes());
  check_fp32_cpu(x, "x", false);
  check_fp32_cpu(weight, "weight");
  check_fp32_cpu(router_down_t, "router_down_t");
  check_fp32_cpu(up_t, "up_t");
  const int64_t columns = up_t.size(0), E = router_down_t.size(1) - columns;
  TORCH_CHECK(E >= 1, "goat_hf decode kernel: router_down_t needs the E router columns before up_t's ", columns,
              ", got ", router_down_t.size(1), " columns");
  TORCH_CHECK(top_k >= 1 && top_k <= E, "goat_hf decode kernel: top_k must be in [1, ", E, "], got ", top_k);
  TORCH_CHECK(expert_columns >= E && expert_columns % E == 0 && expert_columns <= columns,
              "goat_hf decode kernel: expert_columns (", expert_columns, ") must be a multiple of E (", E,
              ") and at most the ", columns, " columns of activations");
  const at::Tensor tokens = x.reshape({-1, x.size(-1)});  // [T, n]
  at::Tensor out = at::linear(tokens, weight, bias);  // [T, m]
  at::Tensor both = at::mm(tokens, router_down_t);  // [T, E + cols]: logits | activations
  at::Tensor low = both.narrow(1, E, columns);
  gate_experts(both.narrow(1, 0, E), low, top_k, expert_columns);
  out.addmm_(low, up_t);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out.size(1);
  return out.view(shape);  // [..., m]
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // without the GIL, as PyTorch's own bindings run their matmuls: other Python threads (a server's) go on meanwhile
  m.def("decode_forward", &decode_forward, py::call_guard<py::gil_scoped_release>(),
        "W0 x + b plus a GOAT adapter's inference output, for fp32 CPU inputs [..., n]");
}
