// Argument checks and dtype handling shared by the CPU and CUDA implementations of the op.
#include "lstm.h"

#include <c10/util/Exception.h>

namespace fused_lstm {
namespace {

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "fused_lstm: expected ", name, " of shape ", expected,
              ", got ", t.sizes());
}

void check_like(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fused_lstm: expected ", name,
              " of dtype ", input.scalar_type(), " (the input's), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "fused_lstm: expected ", name, " on ",
              input.device(), " (the input's device), got ", t.device());
}

void check_optional(const std::optional<at::Tensor>& t, const at::Tensor& input,
                    at::IntArrayRef expected, const char* name) {
  if (t.has_value() && t->defined()) {
    check_like(*t, input, name);
    check_shape(*t, expected, name);
  }
}

}  // namespace

at::ScalarType accumulate_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

Dims check_forward_args(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& w_hr,
                        const std::optional<at::Tensor>& batch_sizes) {
  TORCH_CHECK(input.dim() == 3, "fused_lstm: expected a 3-D input [T, B, I], got ",
              input.dim(), "-D");
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "fused_lstm: supports float32, float64, bfloat16 and float16 inputs, got ",
              dtype);
  TORCH_CHECK(w_ih.dim() == 2 && w_hh.dim() == 2,
              "fused_lstm: expected 2-D weights, got w_ih ", w_ih.sizes(), " and w_hh ",
              w_hh.sizes());
  TORCH_CHECK(w_hh.size(0) % 4 == 0 && w_hh.size(0) > 0,
              "fused_lstm: w_hh must have 4*hidden_size rows, got ", w_hh.size(0));
  Dims d;
  d.seq_len = input.size(0);
  d.batch = input.size(1);
  d.input_size = input.size(2);
  d.hidden_size = w_hh.size(0) / 4;
  d.output_size = w_hh.size(1);
  TORCH_CHECK(d.seq_len > 0, "fused_lstm: expected sequence length to be larger than 0");
  const bool projected = w_hr.has_value() && w_hr->defined();
  TORCH_CHECK(projected || d.output_size == d.hidden_size, "fused_lstm: w_hh is ",
              w_hh.sizes(), ", so without w_hr it must be [4H, H] with H = ", d.hidden_size);
  check_like(h0, input, "h0");
  check_like(c0, input, "c0");
  check_like(w_ih, input, "w_ih");
  check_like(w_hh, input, "w_hh");
  check_shape(w_ih, {4 * d.hidden_size, d.input_size}, "w_ih");
  check_shape(h0, {d.batch, d.output_size}, "h0");
  check_shape(c0, {d.batch, d.hidden_size}, "c0");
  check_optional(bias, input, {4 * d.hidden_size}, "bias");
  check_optional(w_hr, input, {d.output_size, d.hidden_size}, "w_hr");
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    const auto& bs = *batch_sizes;
    TORCH_CHECK(bs.device().is_cpu() && bs.scalar_type() == at::kLong && bs.dim() == 1,
                "fused_lstm: batch_sizes must be a 1-D int64 CPU tensor, got ",
                bs.scalar_type(), " ", bs.sizes(), " on ", bs.device());
    TORCH_CHECK(bs.size(0) == d.seq_len, "fused_lstm: batch_sizes has ", bs.size(0),
                " entries for ", d.seq_len, " steps");
    const auto b = bs.contiguous();
    const int64_t* p = b.data_ptr<int64_t>();
    TORCH_CHECK(p[0] == d.batch, "fused_lstm: batch_sizes[0] must equal the batch size ",
                d.batch, ", got ", p[0]);
    for (int64_t t = 0; t < d.seq_len; ++t) {
      TORCH_CHECK(p[t] >= 1 && (t == 0 || p[t] <= p[t - 1]),
                  "fused_lstm: batch_sizes must be positive and non-increasing, got ",
                  p[t], " at step ", t, (t > 0 ? " after " : ""),
                  (t > 0 ? std::to_string(p[t - 1]) : std::string()));
    }
  }
  return d;
}

Dims check_backward_args(const std::optional<at::Tensor>& grad_output,
                         const std::optional<at::Tensor>& grad_h_n,
                         const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                         const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                         const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                         const std::optional<at::Tensor>& batch_sizes,
                         const at::Tensor& output, const at::Tensor& gates,
                         const at::Tensor& cells) {
  const Dims d = check_forward_args(input, h0, c0, w_ih, w_hh, std::nullopt, w_hr, batch_sizes);
  check_optional(grad_output, input, {d.seq_len, d.batch, d.output_size}, "grad_output");
  check_optional(grad_h_n, input, {d.batch, d.output_size}, "grad_h_n");
  check_optional(grad_c_n, input, {d.batch, d.hidden_size}, "grad_c_n");
  check_like(output, input, "output");
  check_shape(output, {d.seq_len, d.batch, d.output_size}, "output");
  const auto acc = accumulate_type(input.scalar_type());
  for (const auto& [t, name, width] :
       {std::tuple<const at::Tensor&, const char*, int64_t>{gates, "gates", 4 * d.hidden_size},
        {cells, "cells", d.hidden_size}}) {
    TORCH_CHECK(t.scalar_type() == acc && t.device() == input.device(), "fused_lstm: expected ",
                name, " of dtype ", acc, " on ", input.device(), ", got ", t.scalar_type(),
                " on ", t.device());
    check_shape(t, {d.seq_len, d.batch, width}, name);
  }
  return d;
}

namespace {

// Each of `results`, in accumulate_type(dtype), rounded to `dtype`.
template <typename... Tensors>
void round_to(at::ScalarType dtype, Tensors&... results) {
  if (accumulate_type(dtype) != dtype) ((results = results.to(dtype)), ...);
}

}  // namespace

ForwardResult to_input_dtype(ForwardResult result, at::ScalarType dtype) {
  round_to(dtype, std::get<0>(result), std::get<1>(result), std::get<2>(result));
  return result;
}

BackwardResult to_input_dtype(BackwardResult result, at::ScalarType dtype) {
  std::apply([&](auto&... grads) { round_to(dtype, grads...); }, result);
  return result;
}

at::Tensor prepare(const at::Tensor& t, at::ScalarType acc) {
  return t.defined() ? t.to(acc).contiguous() : t;
}

at::Tensor prepare(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? prepare(*t, acc) : at::Tensor();
}

std::vector<int64_t> live_rows(const std::optional<at::Tensor>& batch_sizes, const Dims& d) {
  if (!batch_sizes.has_value() || !batch_sizes->defined()) {
    return std::vector<int64_t>(d.seq_len, d.batch);
  }
  const auto b = batch_sizes->contiguous();
  const int64_t* p = b.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + d.seq_len);
}

}  // namespace fused_lstm
