// The host side of the CUDA op: the input projection as one GEMM, the recurrence, and the
// weight gradients as GEMMs after it. The recurrence runs on one of two kernels:
// - persistent (persistent_program.cuh): one launch for all time steps, when `run`
//   chooses it (run.persistent(sequence, live) returns whether it ran);
// - step by step (lstm_kernels.cuh): one launch per time step (Run::run<Tile>), always
//   with a projection, where the projection and the recurrent gradient through it are
//   ATen GEMMs per step.
// `Run` launches on the GPU (lstm_cuda.cu), or runs every block and thread on the host
// (tests/emulator, for the tests), so that everything but the launch itself is the same
// code on both.
//
// Every tensor the kernels touch is contiguous and in acc_t (float32 for bfloat16 and
// float16), except w_hh, which they read in the input's dtype. Dead rows (not live at a
// step) are zeroed by the kernels themselves, and h_n, c_n are written by the step at
// which each row ends.
// No host synchronisation: batch_sizes is a CPU tensor, read before anything is launched.
#pragma once

#include "../lstm.h"
#include "lstm_kernels.cuh"
#include "persistent_program.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <string>

namespace fused_lstm::cuda {

// A fresh contiguous copy in dtype `acc` (the buffer of a carried gradient), zeros if undefined.
inline at::Tensor fresh_copy(const std::optional<at::Tensor>& t, at::IntArrayRef shape,
                             const at::TensorOptions& opts) {
  if (!t.has_value() || !t->defined()) return at::zeros(shape, opts);
  return t->to(opts.dtype().toScalarType(), /*non_blocking=*/false, /*copy=*/true,
               at::MemoryFormat::Contiguous);
}

// The error for a persistent kernel that was asked for but does not fit.
[[noreturn]] inline void persistent_does_not_fit(const PersistentProblem& p,
                                                 const std::string& device,
                                                 int64_t multiprocessors,
                                                 int64_t max_shared_bytes) {
  TORCH_CHECK(false, "fused_lstm: FUSED_LSTM_CUDA_PATH=persistent, but the persistent kernel ",
              "does not fit a layer with hidden_size ", p.hidden_size, " and batch ", p.batch,
              " (", p.element_size, "-byte weights, recurrent depth ", p.depth, ") on ", device,
              ": each block's slice of w_hh must fit in its shared memory (at most ",
              max_shared_bytes, " bytes) with all blocks co-resident on ", multiprocessors,
              " SMs. Unset FUSED_LSTM_CUDA_PATH, or set it to stepwise.");
}

template <typename Run, typename scalar_t>
ForwardResult forward_layer(const Run& run, const Dims& d, const std::vector<int64_t>& live,
                            const at::Tensor& input, const at::Tensor& h0_in,
                            const at::Tensor& c0_in, const at::Tensor& w_ih,
                            const at::Tensor& w_hh_in, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& w_hr_in, bool reverse) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden_size, P = d.output_size;
  const at::Tensor w_hr = prepare(w_hr_in, acc);
  const bool projected = w_hr.defined();
  const auto opts = input.options().dtype(acc);
  at::Tensor gates = at::empty({T, B, 4 * H}, opts);
  at::Tensor cells = at::empty({T, B, H}, opts);
  // With w_hr the GEMM writes only the live rows of each step's output.
  at::Tensor output = projected ? at::zeros({T, B, P}, opts) : at::empty({T, B, P}, opts);
  at::Tensor h_n = at::empty({B, P}, opts);
  at::Tensor c_n = at::empty({B, H}, opts);

  at::Tensor gates2d = gates.view({T * B, 4 * H});
  const at::Tensor x2d = prepare(input, acc).view({T * B, d.input_size});
  const at::Tensor w_ih_t = w_ih.to(acc).t();
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(gates2d, bias->to(acc), x2d, w_ih_t);
  } else {
    at::mm_out(gates2d, x2d, w_ih_t);
  }

  const at::Tensor w_hh = w_hh_in.contiguous();
  const at::Tensor h0 = prepare(h0_in, acc), c0 = prepare(c0_in, acc);
  const ForwardSequence<scalar_t, acc_t> seq{
      w_hh.data_ptr<scalar_t>(), output.data_ptr<acc_t>(), h0.data_ptr<acc_t>(),
      cells.data_ptr<acc_t>(), c0.data_ptr<acc_t>(), gates.data_ptr<acc_t>(),
      h_n.data_ptr<acc_t>(), c_n.data_ptr<acc_t>(), T, B, H, P, reverse, live.data()};
  if (!projected) {
    // Without rows there is nothing to launch (run_step launches nothing either).
    if (B == 0 || !run.persistent(seq, live)) {
      for (int64_t s = 0; s < T; ++s) run_step<Run>(seq.step(s));
    }
  } else {
    // The cell writes o·tanh(c_t) into `hidden`; the output is hidden·w_hrᵀ, per step.
    at::Tensor hidden = at::empty({B, H}, opts);
    const at::Tensor w_hr_t = w_hr.t();
    for (int64_t s = 0; s < T; ++s) {
      const StepRows r = step_rows(s, T, reverse, live.data(), B);
      auto step = seq.step(s);
      step.hidden = hidden.data_ptr<acc_t>();
      step.h_n = nullptr;
      run_step<Run>(step);
      at::Tensor out_live = output[r.t].narrow(0, 0, r.rows);
      at::mm_out(out_live, hidden.narrow(0, 0, r.rows), w_hr_t);
      if (const int64_t ending = ending_rows(r); ending > 0) {
        h_n.narrow(0, r.rows_next, ending).copy_(output[r.t].narrow(0, r.rows_next, ending));
      }
    }
  }
  return to_input_dtype({output, h_n, c_n, gates, cells}, input.scalar_type());
}

template <typename Run, typename scalar_t>
BackwardResult backward_layer(const Run& run, const Dims& d,
                              const std::vector<int64_t>& live,
                              const std::optional<at::Tensor>& grad_output_in,
                              const std::optional<at::Tensor>& grad_h_n,
                              const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                              const at::Tensor& h0_in, const at::Tensor& c0_in,
                              const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                              const std::optional<at::Tensor>& w_hr_in, bool reverse,
                              const at::Tensor& output_in, const at::Tensor& gates_in,
                              const at::Tensor& cells_in, bool input_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = d.seq_len, B = d.batch, H = d.hidden_size, P = d.output_size;
  const at::Tensor w_hr = prepare(w_hr_in, acc);
  const bool projected = w_hr.defined();
  const auto opts = input.options().dtype(acc);
  const at::Tensor grad_output = prepare(grad_output_in, acc);
  const at::Tensor gates = gates_in.contiguous(), cells = cells_in.contiguous();
  const at::Tensor c0 = prepare(c0_in, acc);
  const at::Tensor w_hh = w_hh_in.contiguous();
  at::Tensor grad_gates = at::empty({T, B, 4 * H}, opts);
  // The gradients of the state carried between steps: grad_h_n, grad_c_n in; grad_h0,
  // grad_c0 out.
  at::Tensor grad_h = fresh_copy(grad_h_n, {B, P}, opts);
  at::Tensor grad_c = fresh_copy(grad_c_n, {B, H}, opts);
  // With w_hr: the gradient of every step's output (for grad_w_hr).
  at::Tensor grad_h_steps = projected ? at::zeros({T, B, P}, opts) : at::Tensor();

  const BackwardSequence<scalar_t, acc_t> seq{
      w_hh.data_ptr<scalar_t>(), grad_output.defined() ? grad_output.data_ptr<acc_t>() : nullptr,
      gates.data_ptr<acc_t>(), cells.data_ptr<acc_t>(), c0.data_ptr<acc_t>(),
      grad_h.data_ptr<acc_t>(), grad_c.data_ptr<acc_t>(), grad_gates.data_ptr<acc_t>(), T, B, H,
      reverse, live.data()};
  if (!projected) {
    if (B == 0 || !run.persistent(seq, live)) {
      for (int64_t i = 0; i < seq.steps(); ++i) run_step<Run>(seq.step(i));
    }
  } else {
    // The gradient of h reaches the cell through w_hr (grad_hidden), and leaves it through
    // w_hh by a GEMM per step, so no step multiplies by w_hh itself.
    at::Tensor grad_hidden = at::empty({B, H}, opts);
    const at::Tensor w_hh_acc = w_hh.to(acc);
    for (int64_t s = T - 1; s >= 0; --s) {
      const StepRows r = step_rows(s, T, reverse, live.data(), B);
      at::Tensor grad_h_live = grad_h.narrow(0, 0, r.rows);
      if (grad_output.defined()) grad_h_live.add_(grad_output[r.t].narrow(0, 0, r.rows));
      grad_h_steps[r.t].narrow(0, 0, r.rows).copy_(grad_h_live);
      at::Tensor grad_hidden_live = grad_hidden.narrow(0, 0, r.rows);
      at::mm_out(grad_hidden_live, grad_h_live, w_hr);
      auto step = seq.step(T - 1 - s);
      step.grad_gates_next = nullptr;
      step.grad_output = nullptr;
      step.grad_h = grad_hidden.data_ptr<acc_t>();
      step.rows_next = 0;
      run_step<Run>(step);
      at::mm_out(grad_h_live, grad_gates[r.t].narrow(0, 0, r.rows), w_hh_acc);
    }
  }

  auto [grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] = input_and_weight_grads(
      d, live, reverse, grad_gates, prepare(input, acc), prepare(h0_in, acc), prepare(w_ih_in, acc),
      prepare(output_in, acc), gates, cells, grad_h_steps, input_grad);
  return to_input_dtype({grad_input, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr},
                        input.scalar_type());
}

// The op's entry points for a given Run: checks, then the layer in the input's dtype.
template <typename Run>
ForwardResult forward(const Run& run, const at::Tensor& input, const at::Tensor& h0,
                      const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& w_hr,
                      const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const Dims d = check_forward_args(input, h0, c0, w_ih, w_hh, bias, w_hr, batch_sizes);
  const auto live = live_rows(batch_sizes, d);
  ForwardResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_lstm_forward_cuda", [&] {
    result = forward_layer<Run, scalar_t>(run, d, live, input, h0, c0, w_ih, w_hh, bias, w_hr,
                                          reverse);
  });
  return result;
}

template <typename Run>
BackwardResult backward(const Run& run, const std::optional<at::Tensor>& grad_output,
                        const std::optional<at::Tensor>& grad_h_n,
                        const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                        const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                        const std::optional<at::Tensor>& batch_sizes, bool reverse,
                        const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                        bool input_grad = true) {
  const Dims d = check_backward_args(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh,
                                     w_hr, batch_sizes, output, gates, cells);
  const auto live = live_rows(batch_sizes, d);
  BackwardResult result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fused_lstm_backward_cuda", [&] {
    result = backward_layer<Run, scalar_t>(run, d, live, grad_output, grad_h_n, grad_c_n, input,
                                           h0, c0, w_ih, w_hh, w_hr, reverse, output, gates, cells,
                                           input_grad);
  });
  return result;
}

}  // namespace fused_lstm::cuda
