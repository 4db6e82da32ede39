// The schemas of the fused_lstm ops: each device registers its kernels in its own file
// (cpu/lstm_cpu.cpp, cuda/lstm_cuda.cu). A small diagnostic op is defined beside what it
// reports on (cpu_capability in cpu/lstm_cpu.cpp); the CUDA emulation is test code, its
// own extension (tests/emulator). Importing the extension module fused_lstm._C runs these
// registrations (module_calls.cpp defines the module and its two functions); the ops are
// called as torch.ops.fused_lstm.*.
#include <torch/library.h>

TORCH_LIBRARY(fused_lstm, m) {
  // See lstm.h for the meaning of every argument and output. save_for_backward=False
  // (inference) returns gates and cells empty, and the CPU kernel never holds them for
  // more than a chunk of steps.
  m.def(
      "forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias, "
      "Tensor? w_hr, Tensor? batch_sizes, bool reverse, bool save_for_backward=True) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  // Undefined grad_output/grad_h_n/grad_c_n count as zeros. grad_bias is always
  // computed; grad_w_hr is empty without w_hr; grad_input is empty with input_grad=False
  // (its GEMM skipped: the input of a first layer often needs no gradient).
  m.def(
      "backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, Tensor output, Tensor gates, Tensor cells, bool input_grad=True) "
      "-> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, "
      "Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr)");
}
