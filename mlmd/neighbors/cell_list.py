"""O(N) Numba cell list: full or half neighbour lists with integer cell shifts.

Pair convention (see :mod:`mlmd.keys`): ``edge_index[0]`` is the centre i, ``edge_index[1]``
the neighbour j, and ``d_ij = positions[j] - positions[i] + cell_shifts[e] @ cell``, with
``|d_ij| < cutoff`` (strict, as ASE).  Shifts refer to the positions *as given*: positions
may lie outside the cell (unwrapped MD coordinates) and are never wrapped in the output.

Method.  Fractional coordinates ``s = x @ inv(cell_eff)``, where ``cell_eff`` is the cell
with every non-periodic vector replaced by a unit vector orthogonal to the periodic ones
(so open directions need no cell at all).  Along periodic axes ``s`` is wrapped into [0, 1)
and the integer wrap is remembered.  Axis k is cut into ``n_k`` bins whose perpendicular
width ``w_k`` is at least ``cutoff / BINS_PER_CUTOFF`` (the total number of bins is capped
for sparse open systems); a centre in bin b looks at bins ``b + o`` for ``|o| <= r_k = ceil(cutoff / w_k)``,
which on a periodic axis map to the wrapped bin ``(b + o) mod n_k`` and the image
``floor((b + o) / n_k)``.  A periodic axis with fewer bins than ``2 r_k + 1`` (a cell smaller
than the cutoff) therefore visits several images of the same bins, including an atom's own
images.  Atoms are counting-sorted by bin into contiguous coordinate arrays, so the bins
``b_z - r_z .. b_z + r_z`` of one (x, y) column are one run of memory, shared by all centres
of the bin; the distance loops over a run are vectorised (a count, or a 64-bit mask of hits
so that only hits branch).  Two passes (count, then fill at prefix-sum offsets) make the
output sorted by centre i and independent of the number of Numba threads.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import numba
import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

from ..errors import InputError

# Bins per cutoff along each axis.  1 (bins >= cutoff, 27 searched) measured fastest: its
# runs of ~3 bins are long enough for the vectorised distance loops, while 2 (125 bins of
# 1/8 the volume, 40% fewer candidates) loses more to the bookkeeping of short runs.
BINS_PER_CUTOFF = 1
# Total bins at most this many per atom (plus a floor): sparse open systems would
# otherwise allocate a grid as large as their bounding box.
MAX_BINS_PER_ATOM = 8
MIN_MAX_BINS = 64
# Work is split into this many chunks of bins per Numba thread, for load balance.
CHUNKS_PER_THREAD = 8
# Smaller systems are done on one thread.
PARALLEL_MIN_ATOMS = 1024
# Refuse cells so thin that every atom would see more periodic images than this.
MAX_IMAGES = 1e6

# placeholders for the outputs in the counting pass
_NO_INDEX = np.empty((2, 0), dtype=np.int64)
_NO_SHIFT = np.empty((0, 3), dtype=np.int64)
_NO_VECTOR = np.empty((0, 3))


class _Binned(NamedTuple):
    """Atoms sorted into bins (see :func:`_bin_atoms`) and the geometry the passes need."""

    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray
    wraps: np.ndarray
    order: np.ndarray
    bin_start: np.ndarray
    nb: np.ndarray
    reach: np.ndarray
    periodic: np.ndarray
    cell_eff: np.ndarray
    cell: np.ndarray
    cutoff: float


class NeighborList(NamedTuple):
    """A neighbour list; E pairs, sorted by centre i (each centre's pairs contiguous)."""

    edge_index: np.ndarray   # [2, E] int64: (centre i, neighbour j)
    cell_shifts: np.ndarray  # [E, 3] int64: lattice multiples S
    shifts: np.ndarray       # [E, 3] float64 Å: S @ cell


# ---- input checks ---------------------------------------------------------------------------

def check_positions(positions) -> np.ndarray:
    """positions as a C-contiguous float64 [N, 3] array of finite numbers, else InputError."""
    try:
        positions = np.ascontiguousarray(positions, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"positions: expected an [N, 3] array of numbers (Å), got {exc}") from None
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise InputError(f"positions: expected shape [N, 3] (Å), got {list(positions.shape)}; "
                         "pass one row of x, y, z per atom")
    if not np.isfinite(positions).all():
        bad = np.unique(np.nonzero(~np.isfinite(positions))[0])
        raise InputError(f"positions: NaN or Inf at atom(s) {bad[:10].tolist()}; "
                         "check the structure or the step that produced it")
    return positions


def check_cell_pbc(cell, pbc) -> Tuple[np.ndarray, np.ndarray]:
    """cell as float64 [3, 3] (rows are lattice vectors, Å) and pbc as bool [3], else InputError."""
    try:
        cell = np.array(cell, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"cell: expected a [3, 3] array of lattice vectors (Å), got {exc}") from None
    if cell.shape != (3, 3):
        raise InputError(f"cell: expected shape [3, 3] (rows are lattice vectors, Å), got "
                         f"{list(cell.shape)}; use np.zeros((3, 3)) for an open system")
    if not np.isfinite(cell).all():
        raise InputError("cell: contains NaN or Inf; give finite lattice vectors")
    raw = np.asarray(pbc)
    if raw.shape == ():
        raw = np.broadcast_to(raw, (3,))
    if raw.shape != (3,) or not (raw.dtype == np.bool_ or
                                 (np.issubdtype(raw.dtype, np.integer) and np.isin(raw, (0, 1)).all())):
        raise InputError(f"pbc: expected 3 booleans (periodic along a, b, c), got {pbc!r}")
    return cell, raw.astype(bool)


def check_cutoff(cutoff, name: str = "cutoff") -> float:
    """cutoff as a finite float > 0 (Å), else InputError."""
    try:
        value = float(cutoff)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a number in Å, got {cutoff!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise InputError(f"{name}: must be a finite number > 0 (Å), got {cutoff!r}")
    return value


def effective_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """The cell with each non-periodic vector replaced by a unit vector orthogonal to the periodic ones.

    cell [3, 3] Å, pbc [3] bool -> [3, 3] Å, always invertible.  Raises InputError when a
    periodic vector is zero or the periodic vectors are (nearly) linearly dependent.
    """
    periodic = [k for k in range(3) if pbc[k]]
    free = [k for k in range(3) if not pbc[k]]
    eff = np.zeros((3, 3))
    lengths = np.linalg.norm(cell, axis=1)
    for k in periodic:
        if lengths[k] == 0.0:
            raise InputError(f"cell: periodic along axis {k} but cell vector {k} is zero; "
                             f"set the lattice vector or make pbc[{k}] False")
        eff[k] = cell[k]
    if len(periodic) == 2:
        normal = np.cross(cell[periodic[0]], cell[periodic[1]])
        norm = np.linalg.norm(normal)
        if norm <= 1e-10 * lengths[periodic[0]] * lengths[periodic[1]]:
            raise InputError(f"cell: periodic vectors {periodic} are parallel; give two "
                             "independent lattice vectors or fewer periodic axes")
        eff[free[0]] = normal / norm
    elif len(periodic) == 1:
        axis = cell[periodic[0]] / lengths[periodic[0]]
        # Gram-Schmidt from the Cartesian axis least aligned with the periodic vector
        seed = np.eye(3)[np.argmin(np.abs(axis))]
        first = seed - (seed @ axis) * axis
        first /= np.linalg.norm(first)
        eff[free[0]] = first
        eff[free[1]] = np.cross(axis, first)
    elif not periodic:
        eff = np.eye(3)
    if len(periodic) == 3:
        volume = abs(np.linalg.det(cell))
        if volume <= 1e-10 * lengths.prod():
            raise InputError("cell: the three periodic lattice vectors are (nearly) coplanar; "
                             "give a cell with nonzero volume or fewer periodic axes")
    return eff


# ---- kernels ----------------------------------------------------------------------------------

@njit(cache=True)
def _bin_atoms(positions, cell_eff, inv_eff, periodic, cutoff, bins_per_cutoff, max_bins):
    """Wrap, bin and counting-sort atoms.

    Returns, in sorted (bin) order, wrapped Cartesian coordinates xs, ys, zs [N] (Å) and
    integer wraps [N, 3] (x = x_wrapped + wrap @ cell); then order [N] (sorted slot -> atom),
    bin_start [n_bins + 1], bins per axis [3] and search reach in bins per axis [3].
    """
    n = positions.shape[0]
    frac = np.empty((n, 3))
    wrap = np.zeros((n, 3), dtype=np.int64)
    lo = np.zeros(3)
    hi = np.zeros(3)
    for k in range(3):
        lo[k] = np.inf
        hi[k] = -np.inf
    for a in range(n):
        for k in range(3):
            s = (positions[a, 0] * inv_eff[0, k] + positions[a, 1] * inv_eff[1, k]
                 + positions[a, 2] * inv_eff[2, k])
            if periodic[k]:
                w = math.floor(s)
                s -= w
                if s >= 1.0:  # s a hair below an integer rounds to 1.0 after the subtraction
                    s = 0.0
                    w += 1.0
                wrap[a, k] = np.int64(w)
            frac[a, k] = s
            lo[k] = min(lo[k], s)
            hi[k] = max(hi[k], s)

    # extent along each axis measured perpendicular to the other two (Å)
    extent = np.empty(3)
    for k in range(3):
        height = 1.0 / math.sqrt(inv_eff[0, k] ** 2 + inv_eff[1, k] ** 2 + inv_eff[2, k] ** 2)
        if periodic[k]:
            lo[k] = 0.0
            hi[k] = 1.0
        elif n == 0:
            lo[k] = 0.0
            hi[k] = 0.0
        extent[k] = (hi[k] - lo[k]) * height
    target = cutoff / bins_per_cutoff
    nb = np.ones(3, dtype=np.int64)
    while True:
        total = 1.0
        for k in range(3):
            nb[k] = max(1, np.int64(math.floor(min(extent[k] / target, float(max_bins)))))
            total *= nb[k]
        if total <= max_bins:
            break
        target *= 1.25
    reach = np.zeros(3, dtype=np.int64)
    scale = np.zeros(3)
    for k in range(3):
        # a periodic height is > 0 and an open axis with several bins has width >= target;
        # a single open bin is never searched beyond, however thin
        if periodic[k]:
            reach[k] = np.int64(math.ceil(cutoff * nb[k] / extent[k]))
        elif nb[k] > 1:
            reach[k] = min(np.int64(math.ceil(cutoff * nb[k] / extent[k])), nb[k] - 1)
        if hi[k] > lo[k]:
            scale[k] = nb[k] / (hi[k] - lo[k])

    n_bins = nb[0] * nb[1] * nb[2]
    bin_of = np.empty(n, dtype=np.int64)
    bin_start = np.zeros(n_bins + 1, dtype=np.int64)
    for a in range(n):
        index = 0
        for k in range(3):
            index = index * nb[k] + min(np.int64((frac[a, k] - lo[k]) * scale[k]), nb[k] - 1)
        bin_of[a] = index
        bin_start[index + 1] += 1
    for b in range(n_bins):
        bin_start[b + 1] += bin_start[b]
    fill = bin_start[:-1].copy()
    order = np.empty(n, dtype=np.int64)
    xs = np.empty(n)
    ys = np.empty(n)
    zs = np.empty(n)
    wraps = np.empty((n, 3), dtype=np.int64)
    for a in range(n):
        slot = fill[bin_of[a]]
        fill[bin_of[a]] += 1
        order[slot] = a
        x = positions[a, 0]
        y = positions[a, 1]
        z = positions[a, 2]
        for k in range(3):
            w = wrap[a, k]
            x -= w * cell_eff[k, 0]
            y -= w * cell_eff[k, 1]
            z -= w * cell_eff[k, 2]
            wraps[slot, k] = w
        xs[slot] = x
        ys[slot] = y
        zs[slot] = z
    return xs, ys, zs, wraps, order, bin_start, nb, reach


@njit(cache=True)
def _lex_positive(sx, sy, sz):
    """Whether the first nonzero component of the shift (sx, sy, sz) is positive."""
    return sx > 0 or (sx == 0 and (sy > 0 or (sy == 0 and sz > 0)))


@njit(cache=True)
def _image(g, nb, periodic):
    """Unwrapped bin g -> (bin inside the grid, lattice image), bin -1 beyond an open edge."""
    if periodic:
        image = g // nb
        return g - image * nb, image
    if g < 0 or g >= nb:
        return -1, 0
    return g, 0


@njit(cache=True)
def _bin_runs(cell_bin, bin_start, nb, reach, periodic, cell_eff, run_bounds, run_image, run_shift):
    """The neighbour bins of one bin as runs of sorted slots; returns the number of runs.

    Run r covers slots ``run_bounds[r, 0] .. run_bounds[r, 1] - 1``, all in lattice image
    ``run_image[r]`` (integers [3]) displaced by ``run_shift[r]`` (Å, = image @ cell_eff).
    Bins consecutive along the third axis with the same image are contiguous in the
    sorted arrays, so one (x, y) column of neighbour bins is one run (or a few when the
    column wraps around a periodic boundary).
    """
    nx, ny, nz = nb[0], nb[1], nb[2]
    bx = cell_bin // (ny * nz)
    by = (cell_bin // nz) % ny
    bz = cell_bin % nz
    z_first = bz - reach[2]
    z_last = bz + reach[2]
    if not periodic[2]:
        z_first = max(z_first, 0)
        z_last = min(z_last, nz - 1)
    n_runs = 0
    for ox in range(-reach[0], reach[0] + 1):
        gx, ix = _image(bx + ox, nx, periodic[0])
        if gx < 0:
            continue
        for oy in range(-reach[1], reach[1] + 1):
            gy, iy = _image(by + oy, ny, periodic[1])
            if gy < 0:
                continue
            column = (gx * ny + gy) * nz
            z = z_first
            while z <= z_last:
                gz, iz = _image(z, nz, periodic[2])
                length = min(nz - gz, z_last - z + 1)
                z += length
                lo = bin_start[column + gz]
                hi = bin_start[column + gz + length]
                if lo == hi:
                    continue
                run_bounds[n_runs, 0] = lo
                run_bounds[n_runs, 1] = hi
                run_image[n_runs, 0] = ix
                run_image[n_runs, 1] = iy
                run_image[n_runs, 2] = iz
                for k in range(3):
                    run_shift[n_runs, k] = (ix * cell_eff[0, k] + iy * cell_eff[1, k]
                                            + iz * cell_eff[2, k])
                n_runs += 1
    return n_runs


@njit(cache=True)
def _bin_pairs(cell_bin, fill, full, run_bounds, run_image, run_shift, xs, ys, zs, wraps, order,
               bin_start, nb, reach, periodic, cell_eff, cell, cutoff, offsets, edge_index,
               cell_shifts, shifts):
    """All pairs whose centre lies in one bin.

    Count mode (fill False) stores each centre's number of pairs in ``offsets[i + 1]``; fill
    mode writes them to slots ``offsets[i] .. offsets[i + 1] - 1``.  ``run_*`` are work space
    for :func:`_bin_runs`: every centre of the bin meets the same runs of neighbour bins.
    Each centre is done in one go, so that its output is written as one sequential stream.
    Returns the number of centres whose fill did not match their count (0: the passes
    do the same floating-point operations; never writes outside a centre's slots).
    """
    first = bin_start[cell_bin]
    last = bin_start[cell_bin + 1]
    if first == last:
        return 0
    n_runs = _bin_runs(cell_bin, bin_start, nb, reach, periodic, cell_eff, run_bounds, run_image,
                       run_shift)
    cutoff2 = cutoff * cutoff
    mismatches = 0
    for a in range(first, last):
        i = order[a]
        slot = np.uint64(a)
        e = offsets[i] if fill else 0
        stop = offsets[i + 1] if fill else 0
        for r in range(n_runs):
            # unsigned indices: Numba then skips negative-index wrapping and LLVM vectorises
            lo = np.uint64(run_bounds[r, 0])
            hi = np.uint64(run_bounds[r, 1])
            qx = xs[a] - run_shift[r, 0]
            qy = ys[a] - run_shift[r, 1]
            qz = zs[a] - run_shift[r, 2]
            if full and not fill:
                hits = 0
                for b in range(lo, hi):
                    dx = xs[b] - qx
                    dy = ys[b] - qy
                    dz = zs[b] - qz
                    hits += dx * dx + dy * dy + dz * dz < cutoff2
                e += hits
                continue
            ix, iy, iz = run_image[r, 0], run_image[r, 1], run_image[r, 2]
            own_image = ix == 0 and iy == 0 and iz == 0
            # hits as bits of 64-candidate words: a branch per hit, not per candidate
            base = lo
            while base < hi:
                end = min(base + np.uint64(64), hi)
                mask = np.uint64(0)
                for b in range(base, end):
                    dx = xs[b] - qx
                    dy = ys[b] - qy
                    dz = zs[b] - qz
                    mask |= np.uint64(dx * dx + dy * dy + dz * dz < cutoff2) << (b - base)
                while mask:
                    b = base + np.uint64(trailing_zeros(mask))
                    mask &= mask - np.uint64(1)
                    j = order[b]
                    if full:
                        if b == slot and own_image:
                            continue
                    elif j < i or (j == i and not _lex_positive(ix, iy, iz)):
                        continue
                    if fill and e < stop:
                        # x_j - x_i + S @ cell, with x = x_wrapped + wrap @ cell
                        sx = ix - wraps[b, 0] + wraps[a, 0]
                        sy = iy - wraps[b, 1] + wraps[a, 1]
                        sz = iz - wraps[b, 2] + wraps[a, 2]
                        edge_index[0, e] = i
                        edge_index[1, e] = j
                        cell_shifts[e, 0] = sx
                        cell_shifts[e, 1] = sy
                        cell_shifts[e, 2] = sz
                        shifts[e, 0] = sx * cell[0, 0] + sy * cell[1, 0] + sz * cell[2, 0]
                        shifts[e, 1] = sx * cell[0, 1] + sy * cell[1, 1] + sz * cell[2, 1]
                        shifts[e, 2] = sx * cell[0, 2] + sy * cell[1, 2] + sz * cell[2, 2]
                    e += 1
                base = end
        if not fill:
            # a full count includes the centre itself, met at distance 0 in its own bin
            offsets[i + 1] = e - 1 if full else e
        elif e != stop:
            mismatches += 1
    return mismatches


@njit(cache=True)
def _bins_pairs(bins_first, bins_last, fill, full, xs, ys, zs, wraps, order, bin_start, nb,
                reach, periodic, cell_eff, cell, cutoff, offsets, edge_index, cell_shifts, shifts):
    """:func:`_bin_pairs` for bins ``bins_first .. bins_last - 1``; returns the fill mismatches."""
    # each neighbour (x, y) column gives at most one run per image along the third axis
    max_runs = (2 * reach[0] + 1) * (2 * reach[1] + 1) * (2 * reach[2] // nb[2] + 2)
    run_bounds = np.empty((max_runs, 2), dtype=np.int64)
    run_image = np.empty((max_runs, 3), dtype=np.int64)
    run_shift = np.empty((max_runs, 3))
    mismatches = 0
    for cell_bin in range(bins_first, bins_last):
        mismatches += _bin_pairs(cell_bin, fill, full, run_bounds, run_image, run_shift, xs, ys,
                                 zs, wraps, order, bin_start, nb, reach, periodic, cell_eff, cell,
                                 cutoff, offsets, edge_index, cell_shifts, shifts)
    return mismatches


@njit(cache=True, parallel=True)
def _pairs_pass_parallel(n_chunks, fill, full, xs, ys, zs, wraps, order, bin_start, nb, reach,
                         periodic, cell_eff, cell, cutoff, offsets, edge_index, cell_shifts,
                         shifts):
    """One pass over all bins, in ``n_chunks`` chunks of bins shared among Numba's threads.

    The result does not depend on the chunking or the number of threads: every centre
    writes only its own count or its own slice of the output.  Returns the number of
    centres whose fill did not match their count.
    """
    n_bins = bin_start.shape[0] - 1
    n_chunks = min(n_bins, n_chunks)
    mismatches = np.zeros(n_chunks, dtype=np.int64)
    for chunk in prange(n_chunks):
        mismatches[chunk] = _bins_pairs(chunk * n_bins // n_chunks,
                                        (chunk + 1) * n_bins // n_chunks, fill, full, xs, ys, zs,
                                        wraps, order, bin_start, nb, reach, periodic, cell_eff,
                                        cell, cutoff, offsets, edge_index, cell_shifts, shifts)
    return mismatches.sum()


def _pairs_pass(fill: bool, full: bool, binned: _Binned, offsets: np.ndarray,
                outputs: tuple) -> int:
    """One counting or filling pass: serial for small systems, where waking threads costs more
    than it saves (and can stall for milliseconds when another process holds a core)."""
    n_threads = numba.get_num_threads()
    if n_threads == 1 or len(offsets) - 1 < PARALLEL_MIN_ATOMS:
        return _bins_pairs(0, len(binned.bin_start) - 1, fill, full, *binned, offsets, *outputs)
    return _pairs_pass_parallel(CHUNKS_PER_THREAD * n_threads, fill, full, *binned, offsets,
                                *outputs)


# ---- public API -------------------------------------------------------------------------------

def neighbor_list(positions, cell, pbc, cutoff: float, full: bool = True) -> NeighborList:
    """All pairs with ``|x_j - x_i + S @ cell| < cutoff``, each periodic image separately.

    positions [N, 3] Å (may lie outside the cell); cell [3, 3] Å, rows are lattice vectors
    (ignored along non-periodic axes, may be zero there); pbc [3] bool; cutoff Å > 0.

    ``full=True``: both (i, j, S) and (j, i, -S).  ``full=False``: each unordered pair or
    image once, kept as i < j, or i == j with S lexicographically positive (first nonzero
    component > 0); the pair (i, i) with S = 0 is never returned.

    Returns a :class:`NeighborList`, sorted by centre i.  Raises InputError on bad input.
    """
    positions = check_positions(positions)
    cell, pbc = check_cell_pbc(cell, pbc)
    cutoff = check_cutoff(cutoff)
    cell_eff = effective_cell(cell, pbc)
    inv_eff = np.linalg.inv(cell_eff)
    heights = 1.0 / np.linalg.norm(inv_eff, axis=0)
    images = np.prod(np.where(pbc, 2 * np.ceil(cutoff / heights) + 1, 1.0))
    if images > MAX_IMAGES:
        raise InputError(f"cutoff: {cutoff} Å reaches {images:.3g} periodic images of each atom "
                         f"(cell heights {np.round(heights, 4).tolist()} Å); use a larger cell "
                         "(a supercell) or a smaller cutoff")
    max_bins = max(MIN_MAX_BINS, MAX_BINS_PER_ATOM * len(positions))
    binned = _Binned(*_bin_atoms(positions, cell_eff, inv_eff, pbc, cutoff, BINS_PER_CUTOFF,
                                 max_bins), pbc, cell_eff, cell, cutoff)
    full = bool(full)
    offsets = np.zeros(len(positions) + 1, dtype=np.int64)
    _pairs_pass(False, full, binned, offsets, (_NO_INDEX, _NO_SHIFT, _NO_VECTOR))
    np.cumsum(offsets, out=offsets)
    # allocated by NumPy, which asks for huge pages: faulting in the output is a large
    # part of the cost (Numba's own allocations get 4 KiB pages)
    n_pairs = int(offsets[-1])
    edge_index = np.empty((2, n_pairs), dtype=np.int64)
    cell_shifts = np.empty((n_pairs, 3), dtype=np.int64)
    shifts = np.empty((n_pairs, 3))
    if _pairs_pass(True, full, binned, offsets, (edge_index, cell_shifts, shifts)):
        raise RuntimeError("neighbor_list: the count and fill passes disagree (a bug in "
                           "mlmd.neighbors.cell_list; please report it with the structure)")
    return NeighborList(edge_index, cell_shifts, shifts)

