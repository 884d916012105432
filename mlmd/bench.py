"""Benchmarks (``mlmd bench NAME``): side-by-side timings measured in one run, ratios printed.

Timings here are never asserted by tests; BENCHMARKS.md records the latest figures and
the commands that made them.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch


def _time_call(fn, repeats: int, warmup: int = 10) -> float:
    """Median seconds per call over ``repeats`` calls (after ``warmup``: TorchScript profiles first calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def bench_committee(model: str, sizes: List[int], repeats: int = 200, threads: int = 0) -> Dict[int, float]:
    """One energy+forces step of a committee of M members vs one member, same pairs.

    Models with the hyper-parameters and dtype of ``model`` (a model file) are built for
    each M (weights do not change the cost); the frame is the file's example frame.
    """
    from rich.console import Console
    from rich.table import Table

    from . import keys
    from .models.ponita import PonitaPotential
    from .neighbors import neighbor_pairs
    from .potential import export, load
    from .testing import example_atoms

    if threads:
        torch.set_num_threads(threads)
    ref = load(model)
    atoms = example_atoms(ref)
    meta = ref.metadata
    hp = meta[keys.META_HYPER]
    dtype = ref.dtype
    edge_index, shifts = neighbor_pairs(atoms.positions, np.asarray(atoms.cell), atoms.pbc, ref.cutoff)
    # the module's inputs, built once: the pairs are the caller's, as in the contract
    args = (torch.tensor(atoms.positions, dtype=dtype), torch.tensor(atoms.numbers),
            torch.tensor(np.asarray(atoms.cell), dtype=dtype), torch.tensor(atoms.pbc),
            torch.tensor(edge_index), torch.tensor(shifts, dtype=dtype), False)
    results: Dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in sizes:
            path = os.path.join(tmp, f"m{m}.pt")
            export(PonitaPotential(ref.species, committee_size=m, hyperparameters=hp), path, {},
                   dtype=meta[keys.META_DTYPE])
            module = load(path).module
            results[m] = _time_call(lambda: module(*args), repeats)
    shipped = None
    if ref.committee_size in results:
        shipped = _time_call(lambda: ref.module(*args), repeats)
    table = Table(title=f"committee cost: {len(atoms)} atoms, {edge_index.shape[1]} pairs, "
                        f"{meta[keys.META_DTYPE]}, {torch.get_num_threads()} threads")
    table.add_column("members M")
    table.add_column("ms / step (energy + forces)")
    table.add_column("x one member")
    base = results[min(results)]
    for m, seconds in results.items():
        table.add_row(str(m), f"{seconds * 1e3:.2f}", f"{seconds / base:.2f}")
    if shipped is not None:
        table.add_row(f"{ref.committee_size} (the file)", f"{shipped * 1e3:.2f}", f"{shipped / base:.2f}")
    Console().print(table)
    return results
