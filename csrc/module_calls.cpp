// FusedLSTM's and FusedLSTMCell's forward as one native call, where nothing needs the
// Python path: the module is called in eager mode, nothing is to be differentiated, and
// every argument is a plain tensor of the shapes, dtype and device nn.LSTM accepts. A
// streaming model calls a module once per frame; there the Python forward (checks,
// the layer loop, stacking h_n and c_n, the op's Python entry) costs several times the
// step itself.
//
// These functions compute nothing the Python path does not: the same op through the
// dispatcher for every layer and direction, the same bias sums, stacks and views. Where
// anything differs from that happy path (a bad argument, autograd, tracing, a tensor
// subclass or mode, a size that the memory check should see) they return None and
// the module runs its Python forward, which raises nn.LSTM's errors itself.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <vector>

#include "lstm.h"

namespace fused_lstm {
namespace {

// Larger calls go through the Python path and its memory check.
constexpr int64_t kMaxBytes = int64_t(1) << 30;

const at::Tensor* plain_tensor(PyObject* obj) {
  return obj != nullptr && THPVariable_CheckExact(obj) ? &THPVariable_Unpack(obj) : nullptr;
}

// Nothing that the dispatcher or autograd would treat apart from a plain call.
bool plain_call() {
  return !torch::jit::tracer::isTracing() && !at::impl::torch_function_mode_enabled() &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0;
}

// A dense CPU or CUDA tensor of a dtype the op takes, that autograd would not follow.
bool usable(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return t.layout() == at::kStrided && (t.is_cpu() || t.is_cuda()) &&
         (dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
          dtype == at::kHalf) &&
         !(t.requires_grad() && at::GradMode::is_enabled());
}

bool like(const at::Tensor& t, const at::Tensor& input) {
  return t.scalar_type() == input.scalar_type() && t.device() == input.device() && usable(t);
}

// (h0, c0) from hx: None, or a tuple of two plain tensors like the input of these sizes.
bool read_state(PyObject* hx, const at::Tensor& input, at::IntArrayRef h_size,
                at::IntArrayRef c_size, at::Tensor& h0, at::Tensor& c0) {
  if (hx == Py_None) return true;
  if (!PyTuple_CheckExact(hx) || PyTuple_GET_SIZE(hx) != 2) return false;
  const at::Tensor* h = plain_tensor(PyTuple_GET_ITEM(hx, 0));
  const at::Tensor* c = plain_tensor(PyTuple_GET_ITEM(hx, 1));
  if (h == nullptr || c == nullptr || h->sizes() != h_size || c->sizes() != c_size ||
      !like(*h, input) || !like(*c, input)) {
    return false;
  }
  h0 = *h;
  c0 = *c;
  return true;
}

// The module's parameters called `names` (a list or tuple of str) from its _parameters dict:
// None stays undefined; a name not there (a parametrized weight) refuses the call.
bool read_parameters(PyObject* parameters, PyObject* names, const at::Tensor& input,
                     std::vector<at::Tensor>& out) {
  if (!PyDict_Check(parameters) || !(PyTuple_CheckExact(names) || PyList_CheckExact(names))) {
    return false;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(names);
  out.reserve(n);
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* value = PyDict_GetItemWithError(parameters, PySequence_Fast_GET_ITEM(names, k));
    if (value == nullptr) {
      if (PyErr_Occurred()) throw python_error();
      return false;
    }
    if (value == Py_None) {
      out.emplace_back();
      continue;
    }
    const at::Tensor* p = plain_tensor(value);
    if (p == nullptr || !like(*p, input)) return false;
    out.push_back(*p);
  }
  return true;
}

std::optional<at::Tensor> combined_bias(const at::Tensor& b_ih, const at::Tensor& b_hh) {
  if (!b_ih.defined()) return b_hh.defined() ? std::optional<at::Tensor>(b_hh) : std::nullopt;
  return b_hh.defined() ? b_ih + b_hh : b_ih;
}

// torch.ops.fused_lstm.forward with save_for_backward=False: output, h_n, c_n.
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_layer(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh,
    const at::Tensor& w_hr, bool reverse) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fused_lstm::forward", "")
          .typed<ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>&, bool, bool)>();
  const std::optional<at::Tensor> projection =
      w_hr.defined() ? std::optional<at::Tensor>(w_hr) : std::nullopt;
  auto [output, h_n, c_n, gates, cells] =
      op.call(x, h0, c0, w_ih, w_hh, combined_bias(b_ih, b_hh), projection, std::nullopt,
              reverse, /*save_for_backward=*/false);
  return {output, h_n, c_n};
}

PyObject* wrap(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }

// lstm_forward(input, hx, parameters, names, num_layers, bidirectional, batch_first,
//              input_size, hidden_size, proj_size)
//   -> (output, (h_n, c_n)) or None
// FusedLSTM.forward on a tensor input without dropout between layers; `names` are its
// _flat_weights_names, `parameters` its _parameters.
PyObject* lstm_forward(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *input_obj, *hx, *parameters, *names;
  long long num_layers, input_size, hidden_size, proj_size;
  int bidirectional, batch_first;
  if (!PyArg_ParseTuple(args, "OOOOLppLLL", &input_obj, &hx, &parameters, &names, &num_layers,
                        &bidirectional, &batch_first, &input_size, &hidden_size, &proj_size)) {
    return nullptr;
  }
  const at::Tensor* input_ptr = plain_tensor(input_obj);
  if (input_ptr == nullptr || !plain_call() || !usable(*input_ptr)) Py_RETURN_NONE;
  const at::Tensor& input = *input_ptr;
  const int64_t dim = input.dim();
  if ((dim != 2 && dim != 3) || input.size(-1) != input_size) Py_RETURN_NONE;
  const bool batched = dim == 3;
  const int64_t batch_dim = batch_first ? 0 : 1;
  const int64_t batch = batched ? input.size(batch_dim) : 1;
  const int64_t steps = input.size(batched ? 1 - batch_dim : 0);
  const int64_t directions = bidirectional ? 2 : 1;
  const int64_t out_size = proj_size > 0 ? proj_size : hidden_size;
  const int64_t states = num_layers * directions;
  if (batch == 0 || steps == 0 ||
      states * steps * batch * (out_size + 5 * hidden_size) * 8 > kMaxBytes) {
    Py_RETURN_NONE;
  }
  std::vector<int64_t> h_size{states, batch, out_size}, c_size{states, batch, hidden_size};
  if (!batched) {
    h_size.erase(h_size.begin() + 1);
    c_size.erase(c_size.begin() + 1);
  }
  at::Tensor h0, c0;
  std::vector<at::Tensor> weights;
  if (!read_state(hx, input, h_size, c_size, h0, c0) ||
      !read_parameters(parameters, names, input, weights) ||
      weights.size() % static_cast<size_t>(states) != 0) {
    Py_RETURN_NONE;
  }
  at::Tensor output, h_n, c_n;
  {
    pybind11::gil_scoped_release no_gil;
    // Nothing here requires a gradient: no autograd bookkeeping, and views that need none
    // (each view and op through the autograd and ADInplaceOrView kernels costs a few
    // thousand instructions: a tenth of a small step).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor x = batched ? input : input.unsqueeze(batch_dim);
    if (batch_first) x = x.transpose(0, 1);
    if (h0.defined()) {
      if (!batched) {
        h0 = h0.unsqueeze(1);
        c0 = c0.unsqueeze(1);
      }
    } else {
      h0 = at::zeros({states, batch, out_size}, input.options());
      c0 = at::zeros({states, batch, hidden_size}, input.options());
    }
    // Per layer and direction: w_ih, w_hh, then b_ih and b_hh (bias), then w_hr (proj).
    const int64_t per_layer = static_cast<int64_t>(weights.size()) / states;
    std::vector<at::Tensor> h_last, c_last, outputs;
    for (int64_t layer = 0; layer < num_layers; ++layer) {
      outputs.clear();
      for (int64_t k = layer * directions; k < (layer + 1) * directions; ++k) {
        const at::Tensor* w = weights.data() + k * per_layer;
        const at::Tensor none;
        auto [out, h, c] = run_layer(x, h0[k], c0[k], w[0], w[1],
                                     per_layer >= 4 ? w[2] : none,
                                     per_layer >= 4 ? w[3] : none,
                                     per_layer % 2 == 1 ? w[per_layer - 1] : none,
                                     k % directions == 1);
        outputs.push_back(std::move(out));
        h_last.push_back(std::move(h));
        c_last.push_back(std::move(c));
      }
      x = directions == 1 ? outputs[0] : at::cat(outputs, 2);
    }
    output = batch_first ? x.transpose(0, 1) : x;
    // One state needs no copy: a new dimension on the op's own tensors.
    h_n = states == 1 ? h_last[0].unsqueeze(0) : at::stack(h_last);
    c_n = states == 1 ? c_last[0].unsqueeze(0) : at::stack(c_last);
    if (!batched) {
      output = output.squeeze(batch_dim);
      h_n = h_n.squeeze(1);
      c_n = c_n.squeeze(1);
    }
  }
  return Py_BuildValue("(N(NN))", wrap(std::move(output)), wrap(std::move(h_n)),
                       wrap(std::move(c_n)));
  END_HANDLE_TH_ERRORS
}

// cell_forward(input, hx, parameters, input_size, hidden_size) -> (h_1, c_1) or None
// FusedLSTMCell.forward: one step of the layer's op.
PyObject* cell_forward(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *input_obj, *hx, *parameters;
  long long input_size, hidden_size;
  if (!PyArg_ParseTuple(args, "OOOLL", &input_obj, &hx, &parameters, &input_size,
                        &hidden_size)) {
    return nullptr;
  }
  const at::Tensor* input_ptr = plain_tensor(input_obj);
  if (input_ptr == nullptr || !plain_call() || !usable(*input_ptr)) Py_RETURN_NONE;
  const at::Tensor& input = *input_ptr;
  const int64_t dim = input.dim();
  if ((dim != 1 && dim != 2) || input.size(-1) != input_size) Py_RETURN_NONE;
  const bool batched = dim == 2;
  const int64_t batch = batched ? input.size(0) : 1;
  if (batch == 0) Py_RETURN_NONE;
  std::vector<int64_t> state_size{batch, hidden_size};
  if (!batched) state_size.erase(state_size.begin());
  at::Tensor h0, c0;
  static PyObject* const names =
      Py_BuildValue("(ssss)", "weight_ih", "weight_hh", "bias_ih", "bias_hh");
  std::vector<at::Tensor> w;
  if (!read_state(hx, input, state_size, state_size, h0, c0) ||
      !read_parameters(parameters, names, input, w) || !w[0].defined() || !w[1].defined()) {
    Py_RETURN_NONE;
  }
  at::Tensor h_1, c_1;
  {
    pybind11::gil_scoped_release no_gil;
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in lstm_forward
    const at::Tensor x = (batched ? input : input.unsqueeze(0)).unsqueeze(0);
    if (h0.defined()) {
      if (!batched) {
        h0 = h0.unsqueeze(0);
        c0 = c0.unsqueeze(0);
      }
    } else {
      h0 = c0 = at::zeros({batch, hidden_size}, input.options());  // the op writes neither
    }
    std::tie(std::ignore, h_1, c_1) =
        run_layer(x, h0, c0, w[0], w[1], w[2], w[3], at::Tensor(), false);
    if (!batched) {
      h_1 = h_1.squeeze(0);
      c_1 = c_1.squeeze(0);
    }
  }
  return Py_BuildValue("(NN)", wrap(std::move(h_1)), wrap(std::move(c_1)));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"lstm_forward", lstm_forward, METH_VARARGS, "FusedLSTM.forward's native call, or None"},
    {"cell_forward", cell_forward, METH_VARARGS,
     "FusedLSTMCell.forward's native call, or None"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace fused_lstm

// Importing fused_lstm._C loads the library, which registers the ops (ops.cpp and each
// device's TORCH_LIBRARY_IMPL), and gives the modules their native calls.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          fused_lstm::methods};
  return PyModule_Create(&module_def);
}
