"""Neighbour pairs in the contract's format (see :mod:`mlmd.keys`).

This first version delegates to ASE's ``primitive_neighbor_list`` (a well-tested
O(N) cell list that handles open, mixed and triclinic periodic boundaries and cells
smaller than the cutoff); the Numba cell list and the Verlet skin of the internal
engine plug in behind the same function.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def neighbor_pairs(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Full neighbour list within ``cutoff``.

    positions [N,3] Å; cell [3,3] Å (rows are lattice vectors; ignored along open
    directions); pbc [3] bool; cutoff Å.
    Returns edge_index [2,E] int64 (centre i, neighbour j) and shifts [E,3] Å such that
    d_ij = positions[j] - positions[i] + shifts.
    """
    from ase.neighborlist import primitive_neighbor_list

    positions = np.asarray(positions, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    if len(positions) == 0:
        return np.zeros((2, 0), dtype=np.int64), np.zeros((0, 3))
    i, j, s = primitive_neighbor_list("ijS", pbc, cell, positions, float(cutoff),
                                      self_interaction=False, use_scaled_positions=False)
    edge_index = np.stack([i, j]).astype(np.int64)
    shifts = s.astype(np.float64) @ cell
    return edge_index, shifts
