"""Verlet neighbour list with a skin, for MD.

Candidates are built with the cell list at ``cutoff + skin`` and, on every call, filtered
to ``|d| < cutoff`` with the current positions.  While no atom has moved more than
``skin / 2`` since the build, no pair can have crossed from beyond ``cutoff + skin`` to
within ``cutoff``, so the filtered candidates are exactly the pairs a fresh list would find.
The integer cell shifts stay valid because MD positions are not wrapped between builds
(wrapping an atom moves it by a lattice vector, far more than skin / 2, and so rebuilds).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import numba
import numpy as np
from numba import njit, prange

from ..errors import InputError
from .cell_list import check_cell_pbc, check_cutoff, check_positions, neighbor_list

_OK, _REBUILD, _NOT_FINITE = 0, 1, 2
# Candidate lists at least this long are filtered by all Numba threads.
PARALLEL_MIN_CANDIDATES = 1 << 17

_STATE_KEYS = ("cutoff", "skin", "full", "builds", "calls", "built", "reference_positions",
               "cell", "pbc", "edge_index", "shifts")


@njit(cache=True)
def _check_moves(positions, reference, cell, reference_cell, pbc, reference_pbc, max_move2):
    """_OK, _REBUILD (an atom moved more than sqrt(max_move2) Å, or cell or pbc changed) or _NOT_FINITE."""
    for k in range(3):
        if pbc[k] != reference_pbc[k]:
            return _REBUILD
        for m in range(3):
            if cell[k, m] != reference_cell[k, m]:
                return _REBUILD
    for a in range(positions.shape[0]):
        dx = positions[a, 0] - reference[a, 0]
        dy = positions[a, 1] - reference[a, 1]
        dz = positions[a, 2] - reference[a, 2]
        if not dx * dx + dy * dy + dz * dz <= max_move2:  # also true for NaN
            if not (np.isfinite(positions[a, 0]) and np.isfinite(positions[a, 1])
                    and np.isfinite(positions[a, 2])):
                return _NOT_FINITE
            return _REBUILD
    return _OK


@njit(cache=True)
def _mark(positions, edge_index, shifts, cutoff2, keep, start, stop):
    """keep[e] = |x_j - x_i + shifts[e]|^2 < cutoff2 for candidates start..stop-1; returns the count."""
    count = 0
    for e in range(start, stop):
        i = edge_index[0, e]
        j = edge_index[1, e]
        dx = positions[j, 0] - positions[i, 0] + shifts[e, 0]
        dy = positions[j, 1] - positions[i, 1] + shifts[e, 1]
        dz = positions[j, 2] - positions[i, 2] + shifts[e, 2]
        inside = dx * dx + dy * dy + dz * dz < cutoff2
        keep[e] = inside
        count += inside
    return count


@njit(cache=True)
def _gather(keep, edge_index, shifts, start, stop, out_index, out_shifts, k):
    """Copy the kept candidates of start..stop-1, in order, to the outputs from slot k on."""
    for e in range(start, stop):
        if keep[e]:
            out_index[0, k] = edge_index[0, e]
            out_index[1, k] = edge_index[1, e]
            out_shifts[k, 0] = shifts[e, 0]
            out_shifts[k, 1] = shifts[e, 1]
            out_shifts[k, 2] = shifts[e, 2]
            k += 1


@njit(cache=True)
def _filter(positions, reference, cell, reference_cell, pbc, reference_pbc, max_move2,
            edge_index, shifts, cutoff2):
    """(status, edge_index [2, E], shifts [E, 3]): the candidates within the cutoff if status is _OK.

    One call per MD step, so that the hot path crosses from Python to Numba once.
    """
    status = _check_moves(positions, reference, cell, reference_cell, pbc, reference_pbc,
                          max_move2)
    n_candidates = edge_index.shape[1] if status == _OK else 0
    keep = np.empty(n_candidates, dtype=np.bool_)
    count = _mark(positions, edge_index, shifts, cutoff2, keep, 0, n_candidates)
    out_index = np.empty((2, count), dtype=np.int64)
    out_shifts = np.empty((count, 3))
    _gather(keep, edge_index, shifts, 0, n_candidates, out_index, out_shifts, 0)
    return status, out_index, out_shifts


@njit(cache=True)
def _filter_into(positions, reference, cell, reference_cell, pbc, reference_pbc, max_move2,
                 edge_index, shifts, cutoff2, keep, flat_index, out_shifts):
    """:func:`_filter` into preallocated buffers: (status, count).

    The kept pairs land in ``flat_index[:2 count]`` (row i then row j, so that a [2, count]
    view of it is contiguous) and ``out_shifts[:count]``.  Reusing the buffers spares the
    page faults of fresh allocations every MD step.
    """
    status = _check_moves(positions, reference, cell, reference_cell, pbc, reference_pbc,
                          max_move2)
    if status != _OK:
        return status, 0
    n_candidates = edge_index.shape[1]
    count = _mark(positions, edge_index, shifts, cutoff2, keep, 0, n_candidates)
    k = 0
    for e in range(n_candidates):
        if keep[e]:
            flat_index[k] = edge_index[0, e]
            flat_index[count + k] = edge_index[1, e]
            out_shifts[k, 0] = shifts[e, 0]
            out_shifts[k, 1] = shifts[e, 1]
            out_shifts[k, 2] = shifts[e, 2]
            k += 1
    return status, count


@njit(cache=True, parallel=True)
def _filter_parallel(positions, reference, cell, reference_cell, pbc, reference_pbc, max_move2,
                     edge_index, shifts, cutoff2, n_chunks):
    """:func:`_filter` over ``n_chunks`` chunks of candidates in parallel (same result)."""
    status = _check_moves(positions, reference, cell, reference_cell, pbc, reference_pbc,
                          max_move2)
    n_candidates = edge_index.shape[1] if status == _OK else 0
    keep = np.empty(n_candidates, dtype=np.bool_)
    bounds = np.empty(n_chunks + 1, dtype=np.int64)
    for chunk in range(n_chunks + 1):
        bounds[chunk] = chunk * n_candidates // n_chunks
    first_slot = np.zeros(n_chunks + 1, dtype=np.int64)
    for chunk in prange(n_chunks):
        first_slot[chunk + 1] = _mark(positions, edge_index, shifts, cutoff2, keep,
                                      bounds[chunk], bounds[chunk + 1])
    for chunk in range(n_chunks):
        first_slot[chunk + 1] += first_slot[chunk]
    out_index = np.empty((2, first_slot[n_chunks]), dtype=np.int64)
    out_shifts = np.empty((first_slot[n_chunks], 3))
    for chunk in prange(n_chunks):
        _gather(keep, edge_index, shifts, bounds[chunk], bounds[chunk + 1], out_index, out_shifts,
                first_slot[chunk])
    return status, out_index, out_shifts


class VerletList:
    """Neighbour pairs within ``cutoff`` from candidates built at ``cutoff + skin``.

    cutoff, skin in Å (skin 0: rebuild on every call); full: both directions of each pair
    (else each pair once, as in :func:`~mlmd.neighbors.neighbor_list`).
    Counters: ``builds`` (candidate builds) and ``calls`` (:meth:`update` calls).
    """

    def __init__(self, cutoff: float, skin: float = 0.5, full: bool = True):
        self.cutoff = check_cutoff(cutoff)
        try:
            skin = float(skin)
        except (TypeError, ValueError):
            raise InputError(f"skin: expected a number in Å, got {skin!r}") from None
        if not math.isfinite(skin) or skin < 0.0:
            raise InputError(f"skin: must be a finite number >= 0 (Å), got {skin!r}; "
                             "0 rebuilds on every call, 0.3-1 Å is usual")
        self.skin = skin
        self.full = bool(full)
        self.builds = 0
        self.calls = 0
        self._cutoff2 = self.cutoff * self.cutoff
        self._max_move2 = (0.5 * skin) ** 2
        self._positions = None             # [N, 3] Å at the last build
        self._cell = np.zeros((3, 3))
        self._pbc = np.zeros(3, dtype=bool)
        self._edge_index = np.zeros((2, 0), dtype=np.int64)  # candidates [2, C]
        self._shifts = np.zeros((0, 3))                      # [C, 3] Å
        # output buffers of the serial filter, reused between calls (see update)
        self._keep = np.empty(0, dtype=np.bool_)
        self._flat_index = np.empty(0, dtype=np.int64)
        self._out_shifts = np.empty((0, 3))

    @property
    def n_candidates(self) -> int:
        """Number of candidate pairs (within cutoff + skin at the last build)."""
        return self._edge_index.shape[1]

    def update(self, positions, cell, pbc) -> Tuple[np.ndarray, np.ndarray]:
        """Pairs within the cutoff for these positions.

        positions [N, 3] Å (unwrapped MD coordinates), cell [3, 3] Å, pbc [3] bool.
        Returns edge_index [2, E] int64 (sorted by centre i) and shifts [E, 3] Å with
        d_ij = positions[j] - positions[i] + shifts.  Rebuilds the candidates when an atom
        has moved more than skin / 2, or the cell, pbc or number of atoms changed.
        NumPy arrays (float64 C-contiguous positions and cell, bool pbc) are used as they
        are; anything else is converted and checked first.  The returned arrays may be
        buffers that the next call overwrites: copy them to keep them.
        """
        self.calls += 1
        if not (type(positions) is np.ndarray and positions.dtype == np.float64
                and positions.ndim == 2 and positions.shape[1] == 3
                and positions.flags.c_contiguous):
            positions = check_positions(positions)
        if not (type(cell) is np.ndarray and cell.dtype == np.float64 and cell.shape == (3, 3)
                and type(pbc) is np.ndarray and pbc.dtype == np.bool_ and pbc.shape == (3,)):
            cell, pbc = check_cell_pbc(cell, pbc)
        reference = self._positions
        if reference is None or reference.shape[0] != positions.shape[0] or self.skin == 0.0:
            self._build(positions, cell, pbc)
        status, edge_index, shifts = self._filter(positions, cell, pbc)
        if status == _OK:
            return edge_index, shifts
        if status == _NOT_FINITE:
            check_positions(positions)  # raises, naming the atoms
        self._build(positions, cell, pbc)
        return self._filter(positions, cell, pbc)[1:]

    def _filter(self, positions, cell, pbc):
        if (self._edge_index.shape[1] < PARALLEL_MIN_CANDIDATES
                or (n_threads := numba.get_num_threads()) == 1):
            n_candidates = self._edge_index.shape[1]
            if self._keep.shape[0] != n_candidates:
                self._keep = np.empty(n_candidates, dtype=np.bool_)
                self._flat_index = np.empty(2 * n_candidates, dtype=np.int64)
                self._out_shifts = np.empty((n_candidates, 3))
            status, count = _filter_into(positions, self._positions, cell, self._cell, pbc, self._pbc,
                                         self._max_move2, self._edge_index, self._shifts, self._cutoff2,
                                         self._keep, self._flat_index, self._out_shifts)
            return status, self._flat_index[:2 * count].reshape(2, count), self._out_shifts[:count]
        return _filter_parallel(positions, self._positions, cell, self._cell, pbc, self._pbc,
                                self._max_move2, self._edge_index, self._shifts, self._cutoff2,
                                4 * n_threads)

    def _build(self, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray) -> None:
        candidates = neighbor_list(positions, cell, pbc, self.cutoff + self.skin, full=self.full)
        self._edge_index, self._shifts = candidates.edge_index, candidates.shifts
        self._positions = positions.copy()
        self._cell = np.array(cell, dtype=np.float64)
        self._pbc = np.array(pbc, dtype=bool)
        self.builds += 1

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Everything needed to continue with the same candidates: numpy arrays and scalars."""
        built = self._positions is not None
        return {
            "cutoff": np.float64(self.cutoff),
            "skin": np.float64(self.skin),
            "full": np.bool_(self.full),
            "builds": np.int64(self.builds),
            "calls": np.int64(self.calls),
            "built": np.bool_(built),
            "reference_positions": self._positions.copy() if built else np.zeros((0, 3)),
            "cell": self._cell.copy(),
            "pbc": self._pbc.copy(),
            "edge_index": self._edge_index.copy(),
            "shifts": self._shifts.copy(),
        }

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`'s output (e.g. from ``np.load`` of an ``.npz``).

        The list must have the same cutoff, skin and full flag as the one that saved it.
        """
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise InputError(f"state: missing {missing}; pass the dict from VerletList.state_dict()")
        saved = (float(state["cutoff"]), float(state["skin"]), bool(state["full"]))
        if saved != (self.cutoff, self.skin, self.full):
            raise InputError(f"state: saved with cutoff, skin, full = {saved}, this list has "
                             f"{(self.cutoff, self.skin, self.full)}; create the VerletList "
                             "with the saved settings")
        edge_index = np.array(state["edge_index"], dtype=np.int64).reshape(2, -1)
        n_candidates = edge_index.shape[1]
        self._edge_index = edge_index
        self._shifts = np.array(state["shifts"], dtype=np.float64).reshape(n_candidates, 3)
        self._cell = np.array(state["cell"], dtype=np.float64).reshape(3, 3)
        self._pbc = np.array(state["pbc"], dtype=bool).reshape(3)
        self._positions = (np.array(state["reference_positions"], dtype=np.float64).reshape(-1, 3)
                           if bool(state["built"]) else None)
        self.builds = int(state["builds"])
        self.calls = int(state["calls"])
