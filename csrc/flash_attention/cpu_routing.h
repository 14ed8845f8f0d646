// The CPU attention routing rule (which calls PyTorch's SDPA computes faster than genext's CPU
// kernel), made from tensor metadata in C++: it runs before every CPU attention call, and its
// Python form cost 25-35 us a call with the caches cold (between the model's other ops).
#pragma once
#include <Python.h>

namespace genext::attention {

// Adds _C._cpu_attention_route to the module (see cpu_routing.cpp for its arguments).
void add_cpu_routing(PyObject* module);

}  // namespace genext::attention
