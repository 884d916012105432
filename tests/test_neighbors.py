"""Neighbour lists (mlmd.neighbors) against a brute-force reference and ASE.

Pairs are compared as sets of (i, j, Sx, Sy, Sz): centre, neighbour and integer cell shift
with d_ij = x_j - x_i + S @ cell.
"""
import itertools

import numba
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.neighborlist import neighbor_list as ase_neighbor_list

from mlmd.errors import InputError
from mlmd.neighbors import VerletList, neighbor_list, neighbor_pairs
from mlmd.neighbors import cell_list as cell_list_module
from mlmd.neighbors import verlet as verlet_module


# ---- references ---------------------------------------------------------------------------------

def _height(vector, others):
    """Distance between the lattice planes of ``vector`` across the span of ``others`` (Å)."""
    if not others:
        return np.linalg.norm(vector)
    if len(others) == 1:
        return np.linalg.norm(np.cross(vector, others[0])) / np.linalg.norm(others[0])
    normal = np.cross(others[0], others[1])
    return abs(vector @ normal) / np.linalg.norm(normal)


def brute_force(positions, cell, pbc, cutoff):
    """Every (i, j, S) with |x_j - x_i + S @ cell| < cutoff, by trying all shifts in range.

    An image S can only be within the cutoff if |S_k| h_k < cutoff + (largest distance
    between two atoms), h_k the spacing of the lattice planes along periodic axis k.
    """
    positions = np.asarray(positions, dtype=float)
    cell = np.asarray(cell, dtype=float)
    pbc = np.asarray(pbc, dtype=bool)
    if len(positions) == 0:
        return set()
    diameter = np.linalg.norm(np.ptp(positions, axis=0))
    periodic = [k for k in range(3) if pbc[k]]
    ranges = []
    for k in range(3):
        if pbc[k]:
            h = _height(cell[k], [cell[m] for m in periodic if m != k])
            reach = int(np.ceil((cutoff + diameter) / h)) + 1
            ranges.append(range(-reach, reach + 1))
        else:
            ranges.append([0])
    shifts = np.array(list(itertools.product(*ranges)), dtype=np.int64)
    delta = positions[None, :, :] - positions[:, None, :]          # [i, j] = x_j - x_i
    pairs = set()
    for chunk in np.array_split(shifts, max(1, len(shifts) // 200)):
        d = delta[None] + (chunk @ cell)[:, None, None, :]           # [S, i, j, 3]
        s_index, i, j = np.nonzero(np.einsum("sijk,sijk->sij", d, d) < cutoff ** 2)
        for s, a, b in zip(s_index, i, j):
            shift = tuple(int(v) for v in chunk[s])
            if a != b or any(shift):
                pairs.add((int(a), int(b)) + shift)
    return pairs


def as_set(edge_index, cell_shifts):
    return set(zip(edge_index[0].tolist(), edge_index[1].tolist(),
                   *np.asarray(cell_shifts).T.tolist()))


def ase_set(positions, cell, pbc, cutoff):
    atoms = Atoms(numbers=np.ones(len(positions), dtype=int), positions=positions, cell=cell,
                  pbc=pbc)
    i, j, S = ase_neighbor_list("ijS", atoms, cutoff)
    return as_set(np.stack([i, j]), S.reshape(-1, 3))


# ---- systems ------------------------------------------------------------------------------------

def _gas():
    rng = np.random.default_rng(1)
    cell = np.diag([9.0, 10.0, 11.0])
    return rng.random((60, 3)) @ cell, cell, [True, True, True], 3.5


def _fcc():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 3))
    atoms.rattle(0.05, seed=2)
    return atoms.positions, atoms.cell[:], [True, True, True], 4.0


def _triclinic():
    rng = np.random.default_rng(3)
    cell = np.array([[6.0, 0.0, 0.0], [2.0, 7.0, 0.0], [1.5, -2.0, 8.0]])
    return rng.random((40, 3)) @ cell, cell, [True, True, True], 4.5


def _small_cell():
    """2 atoms in a 3 Å triclinic cell with cutoff 5: many images, including self-images."""
    rng = np.random.default_rng(4)
    cell = np.array([[3.0, 0.0, 0.0], [1.0, 2.8, 0.0], [0.5, 0.7, 3.1]])
    return rng.random((2, 3)) @ cell, cell, [True, True, True], 5.0


def _open():
    rng = np.random.default_rng(5)
    return rng.random((50, 3)) * 12.0, np.zeros((3, 3)), [False, False, False], 4.0


def _slab_zero_c():
    rng = np.random.default_rng(6)
    cell = np.array([[7.0, 0.0, 0.0], [0.0, 6.5, 0.0], [0.0, 0.0, 0.0]])
    positions = rng.random((40, 3)) * [7.0, 6.5, 9.0] + [0.0, 0.0, 20.0]
    return positions, cell, [True, True, False], 4.0


def _slab_hexagonal_tilted_c():
    """Non-orthogonal in-plane cell and an arbitrary (ignored) third vector."""
    rng = np.random.default_rng(7)
    cell = np.array([[5.0, 0.0, 0.0], [2.5, 4.33, 0.0], [1.0, 2.0, 30.0]])
    positions = rng.random((30, 3)) @ np.array([[5.0, 0, 0], [2.5, 4.33, 0], [0, 0, 8.0]])
    return positions, cell, [True, True, False], 4.0


def _wire():
    rng = np.random.default_rng(8)
    cell = np.array([[0.0, 0.0, 0.0], [1.0, 4.0, 0.5], [0.0, 0.0, 0.0]])
    return rng.random((20, 3)) * [6.0, 4.0, 6.0], cell, [False, True, False], 4.5


def _unwrapped():
    """Positions several cells away from the box they belong to."""
    positions, cell, pbc, cutoff = _triclinic()
    rng = np.random.default_rng(9)
    positions = positions[:25] + rng.integers(-4, 5, size=(25, 3)) @ cell
    return positions, cell, pbc, cutoff


def _one_atom_small_cell():
    return np.array([[0.3, 0.2, -0.1]]), np.diag([2.5, 2.7, 3.0]), [True, True, True], 4.0


def _one_atom_open():
    return np.array([[0.3, 0.2, -0.1]]), np.zeros((3, 3)), [False, False, False], 4.0


def _empty():
    return np.zeros((0, 3)), np.eye(3) * 5.0, [True, True, True], 3.0


SYSTEMS = {
    "gas": _gas, "fcc": _fcc, "triclinic": _triclinic, "small_cell": _small_cell,
    "open": _open, "slab_zero_c": _slab_zero_c, "slab_hexagonal": _slab_hexagonal_tilted_c,
    "wire": _wire, "unwrapped": _unwrapped, "one_atom_small_cell": _one_atom_small_cell,
    "one_atom_open": _one_atom_open, "empty": _empty,
}


# ---- cell list ----------------------------------------------------------------------------------

@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("name", SYSTEMS)
def test_full_list_matches_brute_force_and_ase(name, parallel, monkeypatch):
    if parallel:  # small systems are otherwise done on one thread
        monkeypatch.setattr(cell_list_module, "PARALLEL_MIN_ATOMS", 0)
    positions, cell, pbc, cutoff = SYSTEMS[name]()
    result = neighbor_list(positions, cell, pbc, cutoff)
    ours = as_set(result.edge_index, result.cell_shifts)
    assert len(ours) == result.edge_index.shape[1], "a pair was returned twice"
    assert ours == brute_force(positions, cell, pbc, cutoff)
    assert ours == ase_set(positions, cell, pbc, cutoff)

    assert result.edge_index.dtype == np.int64 and result.cell_shifts.dtype == np.int64
    assert result.edge_index.shape == (2, len(ours)) and result.shifts.shape == (len(ours), 3)
    np.testing.assert_array_equal(result.shifts, result.cell_shifts @ np.asarray(cell))
    d = positions[result.edge_index[1]] - positions[result.edge_index[0]] + result.shifts
    assert np.all(np.linalg.norm(d, axis=1) < cutoff)
    assert np.all(np.diff(result.edge_index[0]) >= 0), "pairs not sorted by centre"


def test_cell_smaller_than_cutoff_sees_its_own_images():
    positions, cell, pbc, cutoff = _small_cell()
    result = neighbor_list(positions, cell, pbc, cutoff)
    i, j = result.edge_index
    self_images = result.cell_shifts[i == j]
    assert len(self_images) > 0
    assert np.all(np.abs(self_images).sum(axis=1) > 0), "pair (i, i) with zero shift"
    assert np.abs(result.cell_shifts).max() >= 2, "cutoff 5 > 3 Å cell needs second images"


@pytest.mark.parametrize("name", ["gas", "triclinic", "small_cell", "slab_zero_c", "unwrapped"])
def test_half_list_is_full_list_halved(name, monkeypatch):
    monkeypatch.setattr(cell_list_module, "PARALLEL_MIN_ATOMS", 0)
    positions, cell, pbc, cutoff = SYSTEMS[name]()
    full = as_set(*neighbor_list(positions, cell, pbc, cutoff)[:2])
    half_result = neighbor_list(positions, cell, pbc, cutoff, full=False)
    half = as_set(half_result.edge_index, half_result.cell_shifts)
    assert len(half) == half_result.edge_index.shape[1] == len(full) // 2
    mirrored = {(j, i, -sx, -sy, -sz) for i, j, sx, sy, sz in half}
    assert half | mirrored == full and not half & mirrored
    for i, j, *shift in half:
        assert i < j or (i == j and tuple(shift) > (0, 0, 0)), (i, j, shift)
    assert np.all(np.diff(half_result.edge_index[0]) >= 0)


def test_unwrapped_shifts_follow_the_lattice_translation():
    """Moving atoms by lattice vectors changes their shifts by exactly those vectors."""
    positions, cell, pbc, cutoff = _triclinic()
    wrapped = neighbor_list(positions, cell, pbc, cutoff)
    moves = np.random.default_rng(10).integers(-6, 7, size=(len(positions), 3))
    moved = neighbor_list(positions + moves @ cell, cell, pbc, cutoff)
    i, j = wrapped.edge_index
    expected = as_set(wrapped.edge_index, wrapped.cell_shifts + moves[i] - moves[j])
    assert as_set(moved.edge_index, moved.cell_shifts) == expected


def test_same_result_with_one_and_all_threads_and_on_repeat(monkeypatch):
    monkeypatch.setattr(cell_list_module, "PARALLEL_MIN_ATOMS", 0)
    positions, cell, pbc, cutoff = _fcc()
    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = neighbor_list(positions, cell, pbc, cutoff)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = neighbor_list(positions, cell, pbc, cutoff)
        again = neighbor_list(positions, cell, pbc, cutoff)
    finally:
        numba.set_num_threads(previous)
    for a, b, c in zip(one, many, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, c)


def test_sparse_open_system_far_apart():
    """Two clusters 10^6 Å apart: the grid is capped, the pairs are still all found."""
    rng = np.random.default_rng(11)
    positions = np.concatenate([rng.random((20, 3)) * 6.0, rng.random((20, 3)) * 6.0 + 1e6])
    result = neighbor_list(positions, np.zeros((3, 3)), False, 3.0)
    assert as_set(result.edge_index, result.cell_shifts) == brute_force(
        positions, np.zeros((3, 3)), [False] * 3, 3.0)


def test_neighbor_pairs_is_the_full_list():
    positions, cell, pbc, cutoff = _triclinic()
    edge_index, shifts = neighbor_pairs(positions, cell, pbc, cutoff)
    result = neighbor_list(positions, cell, pbc, cutoff)
    np.testing.assert_array_equal(edge_index, result.edge_index)
    np.testing.assert_array_equal(shifts, result.shifts)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(positions=np.zeros((4, 2))), "positions"),
    (dict(positions=[[0.0, 0.0, np.nan]]), "positions"),
    (dict(positions="abc"), "positions"),
    (dict(cell=np.eye(2)), "cell"),
    (dict(cell=np.full((3, 3), np.inf)), "cell"),
    (dict(pbc=[True, False]), "pbc"),
    (dict(pbc=["yes", "no", "maybe"]), "pbc"),
    (dict(cutoff=-1.0), "cutoff"),
    (dict(cutoff=0.0), "cutoff"),
    (dict(cutoff=np.nan), "cutoff"),
    (dict(cutoff="five"), "cutoff"),
    (dict(cell=np.diag([5.0, 5.0, 0.0])), "cell"),                       # periodic, zero vector
    (dict(cell=[[5.0, 0, 0], [0, 5.0, 0], [5.0, 5.0, 0]]), "cell"),       # coplanar
    (dict(cell=[[5.0, 0, 0], [10.0, 0, 0], [0, 0, 0]], pbc=[True, True, False]), "cell"),
    (dict(cell=np.eye(3) * 1e-3), "cutoff"),                               # 10^12 images
])
def test_bad_input_names_the_argument(kwargs, argument):
    args = dict(positions=np.zeros((2, 3)), cell=np.eye(3) * 5.0, pbc=[True, True, True],
                cutoff=3.0)
    args.update(kwargs)
    with pytest.raises(InputError, match=rf"^{argument}:"):
        neighbor_list(**args)


# ---- Verlet list --------------------------------------------------------------------------------

def _md_like_trajectory(steps, seed):
    """A triclinic gas whose atoms diffuse by small random steps, never wrapped."""
    positions, cell, pbc, _ = _triclinic()
    rng = np.random.default_rng(seed)
    frames = [positions]
    for _ in range(steps):
        frames.append(frames[-1] + rng.normal(scale=0.04, size=positions.shape))
    return frames, cell, np.array(pbc)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial_filter", "parallel_filter"])
def test_verlet_list_equals_fresh_list_and_rebuilds_only_when_needed(parallel, monkeypatch):
    if parallel:
        monkeypatch.setattr(verlet_module, "PARALLEL_MIN_CANDIDATES", 0)
    cutoff, skin = 4.0, 0.6
    frames, cell, pbc = _md_like_trajectory(40, seed=12)
    verlet = VerletList(cutoff, skin)
    expected_builds = 0
    reference = None
    for positions in frames:
        if reference is None or np.linalg.norm(positions - reference, axis=1).max() > skin / 2:
            expected_builds += 1
            reference = positions
        edge_index, shifts = verlet.update(positions, cell, pbc)
        fresh = neighbor_list(positions, cell, pbc, cutoff)
        assert as_set(edge_index, np.rint(np.linalg.solve(cell.T, shifts.T).T).astype(int)) == \
            as_set(fresh.edge_index, fresh.cell_shifts)
        assert np.all(np.diff(edge_index[0]) >= 0)
        d = positions[edge_index[1]] - positions[edge_index[0]] + shifts
        assert np.all(np.linalg.norm(d, axis=1) < cutoff)
    assert verlet.calls == len(frames)
    assert verlet.builds == expected_builds
    assert 1 < verlet.builds < len(frames) // 2, verlet.builds


def test_verlet_rebuilds_on_cell_pbc_and_size_change_and_with_zero_skin():
    positions, cell, pbc, cutoff = _gas()
    pbc = np.array(pbc)
    verlet = VerletList(cutoff, 0.5)
    verlet.update(positions, cell, pbc)
    verlet.update(positions, cell, pbc)
    assert verlet.builds == 1
    verlet.update(positions, cell * 1.01, pbc)
    assert verlet.builds == 2
    verlet.update(positions, cell * 1.01, np.array([True, True, False]))
    assert verlet.builds == 3
    verlet.update(positions[:-1], cell * 1.01, np.array([True, True, False]))
    assert verlet.builds == 4

    always = VerletList(cutoff, skin=0.0)
    for _ in range(3):
        always.update(positions, cell, pbc)
    assert always.builds == always.calls == 3


def test_verlet_half_list():
    frames, cell, pbc = _md_like_trajectory(5, seed=13)
    verlet = VerletList(4.0, 0.5, full=False)
    for positions in frames:
        edge_index, _ = verlet.update(positions, cell, pbc)
        fresh = neighbor_list(positions, cell, pbc, 4.0, full=False)
        np.testing.assert_array_equal(np.unique(edge_index, axis=1),
                                      np.unique(fresh.edge_index, axis=1))
        assert edge_index.shape == fresh.edge_index.shape


def test_verlet_state_dict_round_trip_continues_identically(tmp_path):
    frames, cell, pbc = _md_like_trajectory(30, seed=14)
    original = VerletList(4.0, 0.6)
    for positions in frames[:12]:
        original.update(positions, cell, pbc)
    np.savez(tmp_path / "verlet.npz", **original.state_dict())
    restored = VerletList(4.0, 0.6)
    restored.load_state_dict(dict(np.load(tmp_path / "verlet.npz")))
    assert (restored.builds, restored.calls) == (original.builds, original.calls)
    for positions in frames[12:]:
        a = original.update(positions, cell, pbc)
        b = restored.update(positions, cell, pbc)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    assert (restored.builds, restored.calls) == (original.builds, original.calls)
    state_a, state_b = original.state_dict(), restored.state_dict()
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key])


def test_verlet_bad_input():
    with pytest.raises(InputError, match="^skin:"):
        VerletList(4.0, skin=-0.1)
    with pytest.raises(InputError, match="^cutoff:"):
        VerletList(0.0)
    verlet = VerletList(4.0, 0.5)
    with pytest.raises(InputError, match="^state:"):
        verlet.load_state_dict(VerletList(4.0, 0.3).state_dict())
    with pytest.raises(InputError, match="^state:"):
        verlet.load_state_dict({"cutoff": 4.0})
    positions, cell, pbc, _ = _gas()
    verlet.update(positions, cell, np.array(pbc))
    bad = positions.copy()
    bad[3, 1] = np.nan
    with pytest.raises(InputError, match=r"^positions: .*\[3\]"):
        verlet.update(bad, cell, np.array(pbc))
