"""Neighbour pairs in the contract's format (see :mod:`mlmd.keys`).

:func:`neighbor_list` is an O(N) Numba cell list (open, mixed and triclinic periodic
boundaries, cells smaller than the cutoff, unwrapped positions); :class:`VerletList` adds a
skin for MD, rebuilding its candidates only when an atom has moved more than skin/2.
:mod:`mlmd.neighbors.bench` times them against vesin, matscipy and ASE.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .cell_list import NeighborList, neighbor_list
from .verlet import VerletList

__all__ = ["NeighborList", "VerletList", "neighbor_list", "neighbor_pairs"]


def neighbor_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Full neighbour list within ``cutoff``.

    positions [N,3] Å; cell [3,3] Å (rows are lattice vectors; ignored along open
    directions); pbc [3] bool; cutoff Å.
    Returns edge_index [2,E] int64 (centre i, neighbour j), sorted by i, and shifts [E,3] Å
    such that d_ij = positions[j] - positions[i] + shifts.
    """
    result = neighbor_list(positions, cell, pbc, cutoff, full=True)
    return result.edge_index, result.shifts
