"""How many CPU threads torch uses for a model call (one setting for the engine, ASE and OpenMM).

torch's default is one thread per core. For the small systems mlmd mostly runs (tens to a few
hundred atoms) the work per call is too small to share: on the 2-core machine under load a
22-atom call took 100-1,650 ms with the default and 45-70 ms with one thread. The default here
is therefore one thread per 256 atoms, at most the cores this process may use; ``threads=N``
asks for N; when nothing is asked, OMP_NUM_THREADS or MKL_NUM_THREADS in the environment rule
(a script that calls ``torch.set_num_threads`` itself should pass ``threads=`` too).
``torch.set_num_threads`` is process-wide: the last host made sets it for all.
"""
from __future__ import annotations

import os
from typing import Optional

from .errors import InputError

ATOMS_PER_THREAD = 256


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, else os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_threads(n_atoms: int) -> int:
    """One thread per :data:`ATOMS_PER_THREAD` atoms (at least 1, at most the cores)."""
    return max(1, min(available_cores(), 1 + int(n_atoms) // ATOMS_PER_THREAD))


def check_threads(threads) -> Optional[int]:
    """``threads`` validated: None or a whole number >= 1 (InputError naming it otherwise)."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise InputError(f"threads: must be a whole number >= 1 (or None for the default), got {threads!r}")
    return threads


def apply_threads(threads: Optional[int], n_atoms: int) -> int:
    """Set torch's intra-op threads for a host evaluating ``n_atoms`` atoms; returns the number used.

    ``threads`` None: :func:`default_threads`, unless OMP_NUM_THREADS/MKL_NUM_THREADS is set.
    """
    import torch

    threads = check_threads(threads)
    if threads is None:
        if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
            return torch.get_num_threads()
        threads = default_threads(n_atoms)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


_ALLOCATOR_TUNED = False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    A training step allocates and frees tensors of tens of MB (copper: [4,320,4,42,32] float32 per
    layer, several times over in the double backward). By default glibc serves each from a fresh
    mmap and unmaps it on free, so every step pays page faults on first touch: 25 % of a copper
    training's CPU time was system time. Blocks up to 32 MB from the heap and no trimming: 1.61 ->
    1.33 s per copper step (one thread); a committee call on 96 water atoms 220 -> 170 ms. Called by
    ``load_module`` and ``mlmd train``; it is process-wide (freed memory stays with the process).
    Returns False where it does not apply (not glibc).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not os.uname().sysname == "Linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3      # malloc.h
    ok = (mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
          and mallopt(m_trim_threshold, 2 ** 31 - 1) == 1
          and mallopt(m_top_pad, 256 * 1024 * 1024) == 1)
    _ALLOCATOR_TUNED = ok
    return ok
