"""Print facts about the installed torch as CMake `set()` lines (read by CMakeLists.txt)."""

import os
import sys

import torch

site = os.path.dirname(os.path.dirname(torch.__file__))
nv = os.path.join(site, "nvidia", "cu13")
if not os.path.isdir(nv):  # cu12 wheels keep the libraries one folder per package
    nv = ""
cap = ""
try:
    if torch.cuda.is_available():
        cap = "{}.{}".format(*torch.cuda.get_device_capability())
except Exception:  # a broken driver must not break a CPU build
    cap = ""
facts = {
    "GENEXT_TORCH_PREFIX": torch.utils.cmake_prefix_path,
    "GENEXT_TORCH_VERSION": torch.__version__.split("+")[0],
    "GENEXT_TORCH_CUDA": torch.version.cuda or "",
    "GENEXT_TORCH_NVIDIA_DIR": nv,
    "GENEXT_VISIBLE_GPU_CAP": cap,
}
for key, value in facts.items():
    sys.stdout.write('set({} "{}")\n'.format(key, value.replace("\\", "/")))
