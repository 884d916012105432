"""Broken states are never silent: every host checks each frame it computes.

- non-finite energy or forces (a NaN from the model, an exploded state): stop, naming the atoms
- two atoms closer than ``min_distance``: by default half the sum of their covalent radii
  (ASE's: H–H 0.31 Å, C–H 0.54 Å, C–C 0.76 Å, Cu–Cu 1.32 Å; bonds are twice that), or one
  length in Å for every pair; two atoms at one position give NaN from the model.  The engine
  stops before the model is called, naming the pair; the ASE calculator and the OpenMM forces
  warn instead (their minimisers probe such geometries on a trial step and reject them), and
  stop at the non-finite output such a geometry gives
- atoms with no neighbour within the model's cutoff (blown apart, evaporated): the model's
  energy for them is a constant and a committee cannot disagree about them (σ = 0), so they
  are warned about with their indices, and the learning loop treats such a frame as untrusted

The engine, the ASE calculator and OpenMM's PythonForce use :class:`Guard`; the TorchForce
module makes the same checks inside TorchScript.
"""
from __future__ import annotations

import math
import warnings
import numpy as np
from numba import njit

from .errors import MLMDError

MIN_DISTANCE = None  # default: COVALENT_FRACTION × (r_i + r_j), ASE's covalent radii
COVALENT_FRACTION = 0.5
MAX_WARNINGS = 10    # isolated-atom warnings per Guard before they are summarised


class BrokenStateError(MLMDError, RuntimeError):
    """A frame that cannot be computed honestly: NaN/Inf outputs or overlapping atoms."""


class OverlapWarning(RuntimeWarning):
    """Two atoms closer than min_distance (hosts whose minimisers may probe such a geometry)."""


class IsolatedAtomsWarning(RuntimeWarning):
    """Atoms left every neighbour: their energy is a constant and their σ is zero."""


@njit(cache=True)
def pair_geometry(positions, edge_index, shifts, half_limits, absolute2, counts):
    """One pass over the pairs.  The limit of pair (i, j) is ``absolute2`` Å² when >= 0, else
    (half_limits[i] + half_limits[j])².  Returns (d²/limit of the worst pair, its i, its j, its
    d² Å², pairs under their limit, atoms without a pair); counts[i] receives atom i's pairs."""
    counts[:] = 0
    worst = np.inf
    worst_i = -1
    worst_j = -1
    worst_d2 = np.inf
    close = 0
    for e in range(edge_index.shape[1]):
        i = edge_index[0, e]
        j = edge_index[1, e]
        dx = positions[j, 0] - positions[i, 0] + shifts[e, 0]
        dy = positions[j, 1] - positions[i, 1] + shifts[e, 1]
        dz = positions[j, 2] - positions[i, 2] + shifts[e, 2]
        d2 = dx * dx + dy * dy + dz * dz
        counts[i] += 1
        if absolute2 >= 0.0:
            limit2 = absolute2
        else:
            limit2 = (half_limits[i] + half_limits[j]) ** 2
        if d2 < limit2:
            close += 1
            ratio = d2 / limit2
            if ratio < worst:
                worst = ratio
                worst_i = i
                worst_j = j
                worst_d2 = d2
    isolated = 0
    for i in range(counts.shape[0]):
        if counts[i] == 0:
            isolated += 1
    return worst, worst_i, worst_j, worst_d2, close, isolated


def check_min_distance(value):
    """None (covalent-radius rule) or a length >= 0 Å (0: no check)."""
    from .errors import InputError

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(f"min_distance: must be a length >= 0 Å (0: no overlap check) or None (half the sum of "
                         f"the two atoms' covalent radii), got {value!r}")
    return float(value)


def half_limits(numbers) -> np.ndarray:
    """[N] Å: COVALENT_FRACTION × each atom's covalent radius (ASE's table)."""
    from ase.data import covalent_radii

    return COVALENT_FRACTION * covalent_radii[np.asarray(numbers, dtype=np.int64)]


def _limit_text(min_distance, numbers, i: int, j: int) -> str:
    if min_distance is not None:
        return f"min_distance = {min_distance} Å"
    from ase.data import chemical_symbols
    limit = float(half_limits([numbers[i]])[0] + half_limits([numbers[j]])[0])
    return (f"{limit:.2f} Å, half the sum of the covalent radii of {chemical_symbols[int(numbers[i])]} and "
            f"{chemical_symbols[int(numbers[j])]} (min_distance)")


class Guard:
    """The checks of one host.  ``numbers`` [N]; ``min_distance`` None (covalent-radius rule),
    Å for every pair, or 0 (off); ``cutoff`` Å, for the messages."""

    def __init__(self, numbers, min_distance=MIN_DISTANCE, cutoff: float = math.nan, host: str = "",
                 overlap: str = "raise"):
        if overlap not in ("raise", "warn"):
            raise ValueError(f"overlap: 'raise' or 'warn', got {overlap!r}")
        self.overlap = overlap
        self._overlaps_warned: set = set()
        self.min_distance = check_min_distance(min_distance)
        self.cutoff = float(cutoff)
        self.host = host
        self.set_numbers(numbers)
        self.isolated = np.zeros(0, dtype=np.int64)   # atoms without a neighbour in the last frame
        self._counts = np.zeros(0, dtype=np.int64)
        self._warned: set = set()
        self._warnings = 0

    def geometry(self, positions: np.ndarray, edge_index: np.ndarray, shifts: np.ndarray, where) -> None:
        """Before the model: raise on overlapping atoms, record (and warn about) isolated ones.
        positions [N,3] Å (float64), edge_index [2,E], shifts [E,3] Å: the pairs the model gets;
        ``where`` (a string, or a callable giving one only when needed): "step 120" and the like."""
        n_atoms = len(positions)
        if len(self._counts) != n_atoms:
            self._counts = np.zeros(n_atoms, dtype=np.int64)
        _, i, j, d2, close, isolated = pair_geometry(
            np.ascontiguousarray(positions, dtype=np.float64), np.ascontiguousarray(edge_index, dtype=np.int64),
            np.ascontiguousarray(shifts, dtype=np.float64), self._half_limits, self._absolute2, self._counts)
        if close and self.min_distance != 0.0:
            pair = (min(int(i), int(j)), max(int(i), int(j)))
            message = (f"{_text(where)}: atoms {pair[0]} and {pair[1]} are {math.sqrt(d2):.3f} Å apart, closer than "
                       f"{_limit_text(self.min_distance, self.numbers, int(i), int(j))}; {close // 2} such pair(s): "
                       "overlapping atoms give the model no meaningful energy; check the structure, or the "
                       "timestep and temperature that led here")
            if self.overlap == "raise":
                raise BrokenStateError(message)
            if pair not in self._overlaps_warned and len(self._overlaps_warned) < MAX_WARNINGS:
                self._overlaps_warned.add(pair)
                warnings.warn(message, OverlapWarning, stacklevel=3)
        elif self._overlaps_warned:
            self._overlaps_warned.clear()
        self.isolated = np.flatnonzero(self._counts == 0) if isolated and n_atoms > 1 else self.isolated[:0]
        if len(self.isolated):
            self._warn_isolated(where)
        elif self._warned:
            self._warned.clear()

    def set_numbers(self, numbers) -> None:
        self.numbers = np.asarray(numbers, dtype=np.int64).copy()
        self._half_limits = half_limits(self.numbers)
        self._absolute2 = -1.0 if self.min_distance is None else self.min_distance ** 2

    def _warn_isolated(self, where) -> None:
        new = set(self.isolated.tolist()) - self._warned
        self._warned = set(self.isolated.tolist())
        if not new or self._warnings >= MAX_WARNINGS:
            return
        self._warnings += 1
        atoms = sorted(self.isolated.tolist())
        more = " (further such warnings suppressed)" if self._warnings == MAX_WARNINGS else ""
        warnings.warn(f"{_text(where)}: {len(atoms)} atom(s) {atoms[:20]}{' ...' if len(atoms) > 20 else ''} have no "
                      f"neighbour within the cutoff ({self.cutoff:g} Å): the model gives them a constant energy "
                      f"and a committee σ of 0; the system may have blown apart{more}",
                      IsolatedAtomsWarning, stacklevel=3)

    @staticmethod
    def outputs(energy: float, forces: np.ndarray, where) -> None:
        """After the model: raise on a non-finite energy or force, naming the atoms."""
        if math.isfinite(energy) and np.isfinite(forces).all():
            return
        bad = np.unique(np.nonzero(~np.isfinite(forces))[0]).tolist()
        raise BrokenStateError(f"{_text(where)}: the model returned a non-finite "
                               + ("energy" if not math.isfinite(energy) else "")
                               + (" and " if bad and not math.isfinite(energy) else "")
                               + (f"forces on atom(s) {bad[:20]}" if bad else "")
                               + "; the state is broken (an explosion, overlapping atoms, a model outside its data)")


def _text(where) -> str:
    return where() if callable(where) else str(where)


def isolated_atoms(positions, cell, pbc, cutoff: float) -> np.ndarray:
    """Indices of atoms with no neighbour within ``cutoff`` Å (none for a single atom)."""
    from .neighbors import neighbor_pairs

    positions = np.asarray(positions, dtype=np.float64)
    if len(positions) < 2:
        return np.zeros(0, dtype=np.int64)
    edge_index, _ = neighbor_pairs(positions, np.asarray(cell, dtype=np.float64), np.asarray(pbc, dtype=bool), cutoff)
    counts = np.bincount(np.asarray(edge_index[0], dtype=np.int64), minlength=len(positions))
    return np.flatnonzero(counts == 0)


__all__ = ["Guard", "BrokenStateError", "IsolatedAtomsWarning", "OverlapWarning", "MIN_DISTANCE", "COVALENT_FRACTION",
           "isolated_atoms", "check_min_distance", "half_limits"]
