// The op of one LSTM layer in one direction: declarations shared by every device.
//
// forward(input[T,B,I], h0[B,P], c0[B,H], w_ih[4H,I], w_hh[4H,P], bias[4H]?, w_hr[P,H]?,
//         batch_sizes[T]?, reverse, save_for_backward = true)
//   -> output[T,B,P], h_n[B,P], c_n[B,H], gates[T,B,4H], cells[T,B,H]
//   (gates and cells empty, [0], with save_for_backward = false)
//
// Gate rows are nn.LSTM's [i | f | g | o]. P is the projection size when w_hr is given,
// else H. `gates` holds the activated gates and `cells` the cell state c_t of every step:
// what the backward needs. Both are kept in float32 for bfloat16/float16 inputs.
// With batch_sizes (a PackedSequence's, on the CPU, non-increasing), row b is live at
// step t only while b < batch_sizes[t]; a row that is not live keeps its state, and its
// output, gates and cells at that step are zero. With reverse, steps run from T-1 down
// to 0, each sequence starting at its own last step.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fused_lstm {

struct Dims {
  int64_t seq_len;      // T
  int64_t batch;        // B
  int64_t input_size;   // I
  int64_t hidden_size;  // H
  int64_t output_size;  // P: the projection size, or H without a projection
};

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor>;

// Checks the op's arguments (shapes, dtypes, devices, batch_sizes) and reads the sizes.
Dims check_forward_args(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& w_hr,
                        const std::optional<at::Tensor>& batch_sizes);

// The same, plus the gradients and the tensors the forward saved.
Dims check_backward_args(const std::optional<at::Tensor>& grad_output,
                         const std::optional<at::Tensor>& grad_h_n,
                         const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                         const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                         const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                         const std::optional<at::Tensor>& batch_sizes,
                         const at::Tensor& output, const at::Tensor& gates,
                         const at::Tensor& cells);

// The number of live rows at each step t (all B without batch_sizes).
std::vector<int64_t> live_rows(const std::optional<at::Tensor>& batch_sizes, const Dims& d);

// The dtype the kernels compute and keep state in: float32 for bfloat16/float16.
at::ScalarType accumulate_type(at::ScalarType t);

// The op's results in the input's dtype `dtype`, from the accumulate type the kernels
// compute in: output, h_n, c_n of a forward (its gates and cells stay in the accumulate
// type), every gradient of a backward. Rounded once, the last thing every device does.
ForwardResult to_input_dtype(ForwardResult result, at::ScalarType dtype);
BackwardResult to_input_dtype(BackwardResult result, at::ScalarType dtype);

// Contiguous, in dtype `acc`; undefined (or absent) stays undefined.
at::Tensor prepare(const at::Tensor& t, at::ScalarType acc);
at::Tensor prepare(const std::optional<at::Tensor>& t, at::ScalarType acc);

// grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr
using InputAndWeightGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The gradients that follow from grad_gates [T,B,4H], the gradient of every step's
// pre-activations (zero where a row is not live), as a few GEMMs over all steps at once.
// grad_h_steps [T,B,P] is the gradient of every step's output (zero where not live),
// used only with w_hr. grad_input is empty unless input_grad. All tensors contiguous in
// the accumulate type; any device.
InputAndWeightGrads input_and_weight_grads(const Dims& d, const std::vector<int64_t>& live,
                                           bool reverse, const at::Tensor& grad_gates,
                                           const at::Tensor& x, const at::Tensor& h0,
                                           const at::Tensor& w_ih, const at::Tensor& output,
                                           const at::Tensor& gates, const at::Tensor& cells,
                                           const at::Tensor& grad_h_steps, bool input_grad);

}  // namespace fused_lstm
