"""Neighbour-list benchmark: mlmd's cell list against vesin, matscipy and ASE, side by side.

All libraries build the same full list with integer cell shifts ("ijS") on rattled fcc
copper, in one run; each time is the best of ``repeats`` calls after a warm-up call.
Timings are never asserted by tests; the pair counts are asserted to agree.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import InputError, missing_dependency
from . import cell_list
from .cell_list import neighbor_list

LATTICE_CU = 3.61        # Å, fcc copper
RATTLE_STDEV = 0.05      # Å
SEED = 0
ASE_SLOW_ATOMS = 7000    # above this many atoms ASE is timed only if one call takes <= ASE_SLOW_S
ASE_SLOW_S = 3.0


def _best_ms(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Fastest of ``repeats`` calls of fn, in ms (after one untimed call when ``warmup``)."""
    if warmup:
        fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def copper(n_atoms: int):
    """Rattled fcc Cu, a cubic n x n x n supercell of the 4-atom cell (``n_atoms = 4 n^3``)."""
    from ase.build import bulk

    n = round((n_atoms / 4) ** (1 / 3))
    if n < 1 or 4 * n ** 3 != n_atoms:
        raise InputError(f"sizes: {n_atoms} is not 4 n^3 atoms (cubic fcc supercells: 4, 32, "
                         "108, 256, 500, ..., 16384); choose sizes of that form")
    atoms = bulk("Cu", "fcc", a=LATTICE_CU, cubic=True).repeat((n, n, n))
    atoms.rattle(RATTLE_STDEV, seed=SEED)
    return atoms


def bench_neighbors(sizes: Sequence[int] = (256, 2048, 6912, 16384), cutoff: float = 5.0,
                    repeats: int = 5, threads: Optional[int] = None) -> List[Dict]:
    """Time full neighbour lists with integer shifts on rattled fcc Cu of each size.

    sizes: atom counts, each 4 n^3; cutoff in Å; threads: Numba threads for the second
    timing of ours (default: all; the first is always 1 thread, as vesin is serial).
    Returns one dict per size: atoms, pairs, threads, ``ours_1t_ms``, ``ours_ms`` (with
    ``threads``), ``vesin_ms``, ``matscipy_ms``, ``ase_ms`` (None when skipped), ratios
    ``ours_1t/<lib>`` and ``ours/<lib>``, and ``note``.
    """
    import numba

    try:
        import vesin
    except ImportError:
        raise missing_dependency("vesin", "bench", "the neighbour-list benchmark") from None
    try:
        from matscipy.neighbours import neighbour_list as matscipy_neighbour_list
    except ImportError:
        raise missing_dependency("matscipy", "bench", "the neighbour-list benchmark") from None
    from ase.neighborlist import neighbor_list as ase_neighbor_list

    if repeats < 1:
        raise InputError(f"repeats: must be >= 1, got {repeats}")
    available = numba.config.NUMBA_NUM_THREADS
    threads = available if threads is None else int(threads)
    if not 1 <= threads <= available:
        raise InputError(f"threads: must be in 1..{available} (NUMBA_NUM_THREADS), got {threads}")
    atoms_list = [copper(int(n)) for n in sizes]
    previous_threads = numba.get_num_threads()
    rows = []
    try:
        for atoms in atoms_list:
            positions = atoms.positions
            cell = np.asarray(atoms.cell)
            pbc = atoms.pbc
            counts = {}

            def ours():
                result = neighbor_list(positions, cell, pbc, cutoff)
                counts["ours"] = result.edge_index.shape[1]

            numba.set_num_threads(1)
            ours_1t = _best_ms(ours, repeats)
            numba.set_num_threads(threads)
            ours_nt = _best_ms(ours, repeats)

            calculator = vesin.NeighborList(cutoff=cutoff, full_list=True)

            def run_vesin():
                i, _, _ = calculator.compute(positions, cell, periodic=True, quantities="ijS")
                counts["vesin"] = len(i)

            def run_matscipy():
                counts["matscipy"] = len(matscipy_neighbour_list("ijS", atoms, cutoff)[0])

            def run_ase():
                counts["ASE"] = len(ase_neighbor_list("ijS", atoms, cutoff)[0])

            vesin_ms = _best_ms(run_vesin, repeats)
            matscipy_ms = _best_ms(run_matscipy, repeats)
            notes = []
            if threads > 1 and len(atoms) < cell_list.PARALLEL_MIN_ATOMS:
                notes.append(f"ours on 1 thread below {cell_list.PARALLEL_MIN_ATOMS} atoms")
            if len(atoms) > ASE_SLOW_ATOMS:
                first_ms = _best_ms(run_ase, 1, warmup=False)
                if first_ms > ASE_SLOW_S * 1e3:
                    ase_ms = None
                    notes.append(f"ASE skipped: one call took {first_ms / 1e3:.1f} s")
                else:
                    ase_ms = min(first_ms, _best_ms(run_ase, repeats - 1, warmup=False)
                                 if repeats > 1 else first_ms)
            else:
                ase_ms = _best_ms(run_ase, repeats)
            if len(set(counts.values())) != 1:
                raise AssertionError(f"{len(atoms)} atoms: libraries disagree on the number of "
                                     f"pairs: {counts}")
            row = {"atoms": len(atoms), "pairs": counts["ours"], "threads": threads,
                   "ours_1t_ms": ours_1t, "ours_ms": ours_nt, "vesin_ms": vesin_ms,
                   "matscipy_ms": matscipy_ms, "ase_ms": ase_ms, "note": "; ".join(notes)}
            for lib, ms in (("vesin", vesin_ms), ("matscipy", matscipy_ms), ("ase", ase_ms)):
                row[f"ours_1t/{lib}"] = ours_1t / ms if ms else None
                row[f"ours/{lib}"] = ours_nt / ms if ms else None
            rows.append(row)
    finally:
        numba.set_num_threads(previous_threads)
    return rows


def format_neighbor_table(rows: List[Dict]) -> str:
    """A markdown table of :func:`bench_neighbors` rows (ratios: ours at 1 thread / all threads)."""
    if not rows:
        return ""
    threads = rows[0]["threads"]

    def ms(value):
        return "—" if value is None else f"{value:.2f}"

    def ratio(row, lib):
        if row[f"ours/{lib}"] is None:
            return "—"
        return f"{row[f'ours_1t/{lib}']:.3g} / {row[f'ours/{lib}']:.3g}"

    lines = [
        f"| atoms | pairs | ours 1 thread (ms) | ours {threads} threads (ms) | vesin (ms) | "
        f"matscipy (ms) | ASE (ms) | ours/vesin (1 / {threads} thr) | ours/matscipy | ours/ASE | note |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['atoms']} | {row['pairs']} | {ms(row['ours_1t_ms'])} | {ms(row['ours_ms'])} | "
            f"{ms(row['vesin_ms'])} | {ms(row['matscipy_ms'])} | {ms(row['ase_ms'])} | "
            f"{ratio(row, 'vesin')} | {ratio(row, 'matscipy')} | {ratio(row, 'ase')} | "
            f"{row['note']} |")
    return "\n".join(lines)
