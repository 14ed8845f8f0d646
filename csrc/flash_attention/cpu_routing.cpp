// _C._cpu_attention_route(q, k, v, scale, causal, bhld, bottom_right, avx512, amx) -> int
//
// The rule of genext.ops.flash_attention.cpu_forward_prefers_torch (whose docstring gives the
// measurements behind each shape), read from the tensors' metadata without a Python frame per
// test. A plain METH_FASTCALL function, not a pybind11 one: pybind11's dispatcher costs more
// than the rule itself when the caches are cold.
//
// Arguments: q, k, v as the caller has them; scale (None: 1/sqrt(D); else a number, or an object
// with __float__ or __index__, such as a 0-dim tensor); causal (None: not told, which counts as
// causal for calls that need gradients on some machines and as not causal without gradients,
// else its truth value); bhld (true: (B, H, L, D) tensors, false: (B, L, H, D)); bottom_right
// (genext's causal mask, which equals SDPA's top-left one only when Lq == Lk); avx512, amx
// (genext.ops.flash_attention.CPU_ROUTING).
//
// Returns 0 where genext's kernel runs (also for anything not a CPU tensor call this rule
// covers: the kernel's own checks then report bad arguments), 1 where PyTorch's SDPA is the
// faster kernel, 2 for that with CPU autocast on (the caller turns it off, to keep the inputs'
// dtype as genext's kernel does). Never while tracing: the caller tests that first.
#include "flash_attention/cpu_routing.h"

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <exception>

namespace genext::attention {
namespace {

constexpr long kGenext = 0, kTorch = 1, kTorchWithoutAutocast = 2;

// PyObject_IsTrue with the error dropped: 1, 0, or -1 where the truth test raised (a user's
// causal flag, say; the call then goes to genext's kernel, which takes the flag again and raises)
int truth(PyObject* o) {
  if (o == Py_True) return 1;
  if (o == Py_False || o == Py_None) return 0;
  const int t = PyObject_IsTrue(o);
  if (t < 0) PyErr_Clear();
  return t;
}

// a torch.Tensor by type (subclasses too), without THPVariable_Check's isinstance, which can run
// Python code that raises
bool is_tensor(PyObject* o) {
  return PyObject_TypeCheck(o, reinterpret_cast<PyTypeObject*>(THPVariableClass));
}

bool symbolic(const at::Tensor& t) { return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides(); }

long decide(PyObject* const* args) {
  PyObject *qo = args[0], *ko = args[1], *vo = args[2];
  if (THPVariableClass == nullptr || !is_tensor(qo) || !is_tensor(ko) || !is_tensor(vo)) {
    return kGenext;
  }
  const at::Tensor& q = THPVariable_Unpack(qo);
  const at::Tensor& k = THPVariable_Unpack(ko);
  const at::Tensor& v = THPVariable_Unpack(vo);
  if (!q.defined() || !k.defined() || !v.defined() || !q.is_cpu()) return kGenext;
  const bool avx512 = truth(args[7]) > 0, amx = truth(args[8]) > 0;
  const auto dtype = q.scalar_type();
  if (dtype != at::kFloat && !(amx && (dtype == at::kBFloat16 || dtype == at::kHalf))) {
    return kGenext;
  }
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || symbolic(q) || symbolic(k) || symbolic(v)) {
    return kGenext;
  }
  const bool needs_grad =
      c10::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  const int causal = args[4] == Py_None ? 2 : truth(args[4]);  // 2: not told
  if (causal < 0) return kGenext;
  const bool bhld = truth(args[5]) > 0;
  const int heads_dim = bhld ? 1 : 2, len_dim = bhld ? 2 : 1;
  const int64_t d = q.size(3), lk = k.size(len_dim);
  if (causal == 1 && truth(args[6]) > 0 && q.size(len_dim) != lk) return kGenext;
  bool ragged_test = false;
  if (avx512 && amx && dtype == at::kFloat) {
    // causal only over few keys; with gradients a causality not told stays with genext
    if ((causal == 1 && lk >= 128) || (needs_grad && causal == 2)) return kGenext;
    ragged_test = causal != 1 && d <= 128;
  } else if (needs_grad && causal != 0) {
    return kGenext;
  } else if (dtype == at::kBFloat16) {
    if (needs_grad && (d < 32 || lk < 512)) return kGenext;
  } else if (dtype == at::kHalf) {
    if (needs_grad || (causal == 1 && lk >= 128)) return kGenext;
  } else if (needs_grad) {
    if (!(d >= 160 || (d >= 128 && lk >= 512) || (d >= 64 && lk >= 2048))) return kGenext;
  } else if (!(d >= 64 || (d >= 32 && lk >= 256))) {
    return kGenext;
  }
  if (ragged_test) {
    // a ragged key count: PyTorch's kernel takes the exponentials of a score row 16 lanes at a
    // time (AVX-512) and the last lk % 16 one at a time, slow where that tail is at least a
    // sixteenth of the row; without gradients from 8 keys at head dims up to 64 (where a row
    // is all tail), else from 17 (and from 33 with gradients)
    const int64_t tail = lk % 16, fewest = needs_grad ? 33 : d <= 64 ? 8 : 17;
    if (tail != 0 && 16 * tail >= lk && lk >= fewest) return kGenext;
  }
  if (args[3] != Py_None) {
    // PyTorch's CPU flash kernel gives NaN rows for a negative scale with a causal mask; a
    // scale float() refuses goes to genext's kernel, whose check names the problem
    const double s =
        PyFloat_CheckExact(args[3]) ? PyFloat_AS_DOUBLE(args[3]) : PyFloat_AsDouble(args[3]);
    if (s == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return kGenext;
    }
    if (!(s > 0.0 && s < INFINITY)) return kGenext;
  }
  if (!at::globalContext().userEnabledFlashSDP()) return kGenext;  // covers the CPU kernel too
  if (!k.is_cpu() || !v.is_cpu() || k.scalar_type() != dtype || v.scalar_type() != dtype) {
    return kGenext;
  }
  if (v.sizes() != k.sizes() || k.size(0) != q.size(0) || k.size(3) != d) return kGenext;
  const int64_t hk = k.size(heads_dim);
  if (hk == 0 || q.size(heads_dim) % hk != 0 || q.numel() == 0 || k.numel() == 0) return kGenext;
  return at::autocast::is_autocast_enabled(at::kCPU) ? kTorchWithoutAutocast : kTorch;
}

PyObject* route(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 9) {
    PyErr_Format(PyExc_TypeError, "_cpu_attention_route takes 9 positional arguments, got %zd",
                 nargs);
    return nullptr;
  }
  long result = kGenext;
  try {
    result = decide(args);
  } catch (const std::exception&) {
    // metadata no plain tensor raises for (a nested tensor's sizes); such a call goes to
    // genext's kernel, whose checks report it; no Python error may stay set past this return
    PyErr_Clear();
    result = kGenext;
  }
  return PyLong_FromLong(result);
}

PyMethodDef route_def = {
    "_cpu_attention_route", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(route)),
    METH_FASTCALL,
    "_cpu_attention_route(q, k, v, scale, causal, bhld, bottom_right, avx512, amx) -> int: 0 "
    "genext's CPU kernel, 1 PyTorch's SDPA, 2 PyTorch's SDPA with CPU autocast turned off"};

}  // namespace

void add_cpu_routing(PyObject* module) {
  PyObject* fn = PyCFunction_NewEx(&route_def, nullptr, nullptr);
  if (fn == nullptr || PyModule_AddObject(module, route_def.ml_name, fn) != 0) {
    Py_XDECREF(fn);
    throw pybind11::error_already_set();
  }
}

}  // namespace genext::attention
