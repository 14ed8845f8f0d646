"""Tensors whose last byte sits right before an inaccessible page: a kernel thread under the
emulation that reads or writes past the end of one raises SIGSEGV, which the emulation reports as
an error of the launch (emu/cuda_emu.h)."""

from __future__ import annotations

import ctypes
import mmap

import torch

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor t ending where a PROT_NONE page begins (the tensor holds
    the mapping)."""
    nbytes = t.numel() * t.element_size()
    data_pages = (nbytes + _PAGE - 1) // _PAGE
    m = mmap.mmap(-1, (data_pages + 1) * _PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    if _libc.mprotect(base + data_pages * _PAGE, _PAGE, 0) != 0:  # PROT_NONE
        raise OSError(ctypes.get_errno(), "mprotect failed")
    offset = data_pages * _PAGE - nbytes
    out = torch.frombuffer(m, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape)
    return out.copy_(t)
