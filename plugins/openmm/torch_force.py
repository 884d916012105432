"""An mlmd model as an openmm-torch ``TorchForce``: the model runs inside OpenMM's own loop.

openmm-torch calls a TorchScript module with OpenMM's inputs only: positions [P, 3] nm of every
particle and, for periodic systems, the box vectors [3, 3] nm.  :class:`TorchForceModule` is
generated here from a model file (never written by users): it selects the ML particles,
converts nm -> Å, builds the neighbour pairs inside TorchScript (periodic images of a
triclinic box, boxes smaller than twice the cutoff included), calls the same scripted
module as every other host, and returns the energy in kJ/mol with the forces in kJ/mol/nm
(``setOutputsForces(True)``: the model's own autograd forces, no second backward pass).

Pairs: an O(N) cell list (27 bins around each atom's) for larger systems; a direct search
over atom pairs and periodic images (in row blocks, to bound memory) below 256 atoms and for
boxes less than three cutoffs across.
"""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from mlmd import units
from mlmd.errors import missing_dependency
from mlmd.potential import as_potential

__all__ = ["TorchForceModule", "create_torch_force", "image_pairs", "cell_list_pairs",
           "neighbor_pairs_torch", "torch_force_available"]


@torch.jit.script
def cell_heights(cell: Tensor) -> Tensor:
    """[3] Å: the distance between opposite faces of the cell along each lattice vector."""
    volume = torch.abs(torch.linalg.det(cell))
    areas = torch.linalg.norm(torch.linalg.cross(cell[torch.tensor([1, 2, 0])], cell[torch.tensor([2, 0, 1])]),
                              dim=1)
    return volume / areas


@torch.jit.script
def image_pairs(positions: Tensor, cell: Tensor, periodic: bool, cutoff: float,
                block_elements: int = 4194304) -> Tuple[Tensor, Tensor]:
    """Full neighbour list by direct search over atom pairs and periodic images.

    positions [N, 3] Å (any, unwrapped allowed), cell [3, 3] Å (rows; used when periodic).
    Returns edge_index [2, E] int64 (centre i, neighbour j) and shifts [E, 3] Å with
    d_ij = positions[j] - positions[i] + shifts, |d_ij| < cutoff, as mlmd.neighbors does.
    ``block_elements`` bounds the [rows, N] distance block computed at once (memory).
    """
    n_atoms = positions.shape[0]
    dtype = positions.dtype
    device = positions.device
    if periodic:
        wrap = torch.floor(positions @ torch.linalg.inv(cell))
        wrapped = positions - wrap @ cell                     # inside the cell: |Δfrac| < 1
        reach = torch.ceil(cutoff / cell_heights(cell)).to(torch.long)   # images needed per axis
        ranges = [torch.arange(-int(reach[k]), int(reach[k]) + 1, device=device) for k in range(3)]
        images = torch.cartesian_prod(ranges[0], ranges[1], ranges[2]).to(dtype)   # [K, 3]
    else:
        wrap = torch.zeros_like(positions)
        wrapped = positions
        images = torch.zeros((1, 3), dtype=dtype, device=device)
    translations = images @ cell if periodic else images
    rows = max(1, block_elements // max(n_atoms, 1))
    centres: list[Tensor] = []
    neighbours: list[Tensor] = []
    image_index: list[Tensor] = []
    cutoff2 = cutoff * cutoff
    for k in range(images.shape[0]):
        zero_image = bool((images[k] == 0).all())
        for start in range(0, n_atoms, rows):
            stop = min(start + rows, n_atoms)
            d = wrapped.unsqueeze(0) - wrapped[start:stop].unsqueeze(1) + translations[k]   # [B, N, 3]
            inside = (d * d).sum(-1) < cutoff2
            if zero_image:
                own = torch.arange(start, stop, device=device)
                inside[own - start, own] = False
            hits = inside.nonzero()
            centres.append(hits[:, 0] + start)
            neighbours.append(hits[:, 1])
            image_index.append(torch.full((hits.shape[0],), k, dtype=torch.long, device=device))
    i = torch.cat(centres)
    j = torch.cat(neighbours)
    order = torch.argsort(i * n_atoms + j, stable=True)      # grouped by centre, as mlmd's lists
    i, j = i[order], j[order]
    cell_shifts = images[torch.cat(image_index)[order]] + wrap[i] - wrap[j]
    shifts = cell_shifts @ cell if periodic else torch.zeros((i.shape[0], 3), dtype=dtype, device=device)
    return torch.stack([i, j]), shifts


@torch.jit.script
def cell_list_pairs(positions: Tensor, cell: Tensor, periodic: bool, cutoff: float) -> Tuple[Tensor, Tensor]:
    """Full neighbour list by an O(N) cell list (same contract as :func:`image_pairs`).

    Bins at least ``cutoff`` wide along each cell axis (each Cartesian axis of the bounding
    box when open); every atom looks at the 27 bins around its own.  Periodic axes need at
    least 3 bins (a box at least 3 cutoffs across): :func:`neighbor_pairs_torch` falls back to
    :func:`image_pairs` otherwise.
    """
    n_atoms = positions.shape[0]
    dtype = positions.dtype
    device = positions.device
    if periodic:
        frac = positions @ torch.linalg.inv(cell)
        wrap = torch.floor(frac)
        frac = frac - wrap
        wrapped = positions - wrap @ cell
        n_bins = torch.clamp(torch.floor(cell_heights(cell) / cutoff), min=1.0).to(torch.long)
    else:
        low = positions.min(dim=0).values
        span = positions.max(dim=0).values - low
        frac = (positions - low) / (span + 1e-9)
        wrap = torch.zeros_like(positions)
        wrapped = positions
        n_bins = torch.clamp(torch.floor(span / cutoff), min=1.0).to(torch.long)
        limit = 8 * n_atoms + 64           # sparse systems: wider bins, never a huge empty grid
        total = int(n_bins.prod())
        if total > limit:
            shrink = (float(total) / float(limit)) ** (1.0 / 3.0)
            n_bins = torch.clamp(torch.floor(n_bins.to(dtype) / shrink), min=1.0).to(torch.long)
    bins = torch.minimum(torch.floor(frac * n_bins.to(dtype)).to(torch.long), n_bins - 1).clamp(min=0)
    strides = torch.stack([n_bins[1] * n_bins[2], n_bins[2], torch.ones_like(n_bins[2])])
    bin_id = (bins * strides).sum(dim=1)
    order = torch.argsort(bin_id)
    counts = torch.bincount(bin_id, minlength=int(n_bins.prod()))
    starts = torch.cumsum(counts, 0) - counts
    atom = torch.arange(n_atoms, device=device)
    centres: list[Tensor] = []
    neighbours: list[Tensor] = []
    images: list[Tensor] = []
    cutoff2 = cutoff * cutoff
    offsets = torch.cartesian_prod(torch.arange(-1, 2, device=device), torch.arange(-1, 2, device=device),
                                   torch.arange(-1, 2, device=device))
    for k in range(offsets.shape[0]):
        target = bins + offsets[k]
        if periodic:
            image = torch.div(target, n_bins, rounding_mode="floor")
            target = target - image * n_bins
            valid = torch.ones(n_atoms, dtype=torch.bool, device=device)
        else:
            image = torch.zeros_like(target)
            valid = ((target >= 0) & (target < n_bins)).all(dim=1)
            target = torch.minimum(target.clamp(min=0), n_bins - 1)
        target_id = (target * strides).sum(dim=1)
        count = torch.where(valid, counts[target_id], torch.zeros_like(target_id))
        i = torch.repeat_interleave(atom, count)
        first = torch.repeat_interleave(starts[target_id], count)
        local = torch.arange(i.shape[0], device=device) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        j = order[first + local]
        shift = image[i].to(dtype)
        d = wrapped[j] - wrapped[i] + (shift @ cell if periodic else shift)
        keep = (d * d).sum(dim=1) < cutoff2
        keep = keep & ~((i == j) & (shift == 0).all(dim=1))
        centres.append(i[keep])
        neighbours.append(j[keep])
        images.append(shift[keep])
    i = torch.cat(centres)
    j = torch.cat(neighbours)
    order = torch.argsort(i * n_atoms + j, stable=True)
    i, j = i[order], j[order]
    cell_shifts = torch.cat(images)[order] + wrap[i] - wrap[j]
    shifts = cell_shifts @ cell if periodic else torch.zeros((i.shape[0], 3), dtype=dtype, device=device)
    return torch.stack([i, j]), shifts


@torch.jit.script
def neighbor_pairs_torch(positions: Tensor, cell: Tensor, periodic: bool, cutoff: float,
                         direct_below: int = 256) -> Tuple[Tensor, Tensor]:
    """The TorchForce module's pairs: direct search for small systems and for boxes under three
    cutoffs across (several images per atom), the O(N) cell list otherwise."""
    if positions.shape[0] < direct_below:
        return image_pairs(positions, cell, periodic, cutoff)
    if periodic:
        if bool((cell_heights(cell) < 3.0 * cutoff).any()):
            return image_pairs(positions, cell, periodic, cutoff)
    return cell_list_pairs(positions, cell, periodic, cutoff)


@torch.jit.script
def _decimals(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals (TorchScript's str() of a float prints 17 digits)."""
    scale = 1
    for _ in range(digits):               # int ** int is a float in TorchScript
        scale = scale * 10
    whole = int(round(abs(value) * float(scale)))
    fraction = str(whole % scale)
    while len(fraction) < digits:
        fraction = "0" + fraction
    return ("-" if value < 0 else "") + str(whole // scale) + "." + fraction


class TorchForceModule(nn.Module):
    """forward(positions [P,3] nm, box [3,3] nm or None) -> (energy kJ/mol, forces [P,3] kJ/mol/nm).

    Checks each call as the other hosts do (:mod:`mlmd.guard`): a System whose particle count is
    not the one the force was made for and a non-finite energy or force raise (OpenMM stops the
    step with the message); two ML atoms closer than ``min_distance`` and ML atoms without a
    neighbour within the cutoff are warned about once per new occurrence (OpenMM's minimiser
    may probe overlapping geometries).  OpenMM passes no step number, so messages count force
    evaluations.
    """

    def __init__(self, core, numbers: Sequence[int], n_particles: int, atoms: Optional[Sequence[int]],
                 periodic: bool, cutoff: float, min_distance: Optional[float] = None):
        super().__init__()
        self.core = core
        self.register_buffer("numbers", torch.as_tensor(np.asarray(numbers, dtype=np.int64)))
        index = np.arange(n_particles) if atoms is None else np.asarray(atoms, dtype=np.int64)
        self.register_buffer("atoms", torch.as_tensor(index))
        self.n_particles = int(n_particles)
        self.periodic = bool(periodic)
        self.cutoff = float(cutoff)
        self.energy_scale = float(units.EV_TO_KJ_PER_MOL)
        self.force_scale = float(units.EV_PER_ANGSTROM_TO_KJ_PER_MOL_NM)
        self.to_angstrom = float(units.NM_TO_ANGSTROM)
        # < 0: each pair's limit is the sum of half_limits (mlmd.guard's covalent-radius rule)
        self.min_distance = -1.0 if min_distance is None else float(min_distance)
        from mlmd.guard import half_limits
        self.register_buffer("half_limits", torch.as_tensor(half_limits(numbers), dtype=torch.float64))
        self.register_buffer("evaluations", torch.zeros((), dtype=torch.long))
        self.register_buffer("warned_isolated", torch.zeros(len(numbers), dtype=torch.bool))
        self.register_buffer("warned_overlap", torch.zeros((), dtype=torch.bool))

    def forward(self, positions: Tensor, box: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if positions.shape[0] != self.n_particles:
            # the message in a variable: libtorch prints the raising line in its traceback
            message = ("topology_or_numbers: describes {} particles but OpenMM passed {} particles to the force; "
                       "give one atomic number per System particle, or the ML region with atoms=[...]".format(
                           self.n_particles, positions.shape[0]))
            raise ValueError(message)
        self.evaluations += 1
        ml = positions.index_select(0, self.atoms).to(torch.float64) * self.to_angstrom
        if self.periodic:
            if box is None:
                raise ValueError("box: the force is periodic but OpenMM passed no box vectors")
            cell = box.to(torch.float64) * self.to_angstrom
        else:
            cell = torch.zeros((3, 3), dtype=torch.float64, device=positions.device)
        pbc = torch.full((3,), self.periodic, dtype=torch.bool, device=positions.device)
        # near the origin before the pairs are found (see mlmd.potential.local_frame): model
        # files that cast positions to float32 first keep exact edge vectors
        if self.periodic and ml.shape[0] > 0:
            ml = ml - torch.floor(ml @ torch.linalg.inv(cell)) @ cell
        if ml.shape[0] > 0:
            ml = ml - ml.mean(dim=0)
        with torch.no_grad():
            edge_index, shifts = neighbor_pairs_torch(ml, cell, self.periodic, self.cutoff)
            self._check_geometry(ml, edge_index, shifts)
        out = self.core(ml, self.numbers, cell, pbc, edge_index, shifts, False)
        if not bool(torch.isfinite(out["energy"]).all()) or not bool(torch.isfinite(out["forces"]).all()):
            bad = self.atoms.index_select(0, torch.nonzero(~torch.isfinite(out["forces"]).all(dim=1)).flatten())
            bad_ids: List[int] = bad[:20].tolist()
            message = ("OpenMM TorchForce evaluation {}: the model returned a non-finite energy or forces (particles "
                       "{}); the state is broken (an explosion, overlapping atoms, a model outside its data)".format(
                           int(self.evaluations), bad_ids))
            raise ValueError(message)
        energy = out["energy"].to(torch.float64) * self.energy_scale
        forces = torch.zeros((self.n_particles, 3), dtype=torch.float64, device=positions.device)
        forces = forces.index_copy(0, self.atoms, out["forces"].to(torch.float64) * self.force_scale)
        return energy.to(positions.dtype), forces.to(positions.dtype)


    def _check_geometry(self, ml: Tensor, edge_index: Tensor, shifts: Tensor):
        n_atoms = ml.shape[0]
        if edge_index.shape[1] > 0 and self.min_distance != 0.0:
            d = ml.index_select(0, edge_index[1]) - ml.index_select(0, edge_index[0]) + shifts
            d2 = (d * d).sum(dim=1)
            if self.min_distance > 0.0:
                limit = torch.full_like(d2, self.min_distance)
            else:
                limit = self.half_limits[edge_index[0]] + self.half_limits[edge_index[1]]
            ratio = d2 / (limit * limit)
            worst = int(torch.argmin(ratio))
            overlapping = bool(ratio[worst] < 1.0)
            if overlapping and not bool(self.warned_overlap):
                message = ("OpenMM TorchForce evaluation {}: particles {} and {} are {} A apart, closer than {} A "
                           "(min_distance; default half the sum of their covalent radii): overlapping atoms give "
                           "the model no meaningful energy; check the structure, or the timestep and temperature "
                           "that led here".format(
                               int(self.evaluations), int(self.atoms[edge_index[0, worst]]),
                               int(self.atoms[edge_index[1, worst]]),
                               _decimals(float(d2[worst].sqrt()), 3), _decimals(float(limit[worst]), 2)))
                warnings.warn(message)
            self.warned_overlap.fill_(overlapping)
        if n_atoms > 1:
            counts = torch.bincount(edge_index[0], minlength=n_atoms)
            isolated = counts == 0
            if bool((isolated & ~self.warned_isolated).any()):
                atoms = self.atoms.index_select(0, torch.nonzero(isolated).flatten())
                ids: List[int] = atoms[:20].tolist()
                warnings.warn("OpenMM TorchForce evaluation {}: {} particle(s) {} have no neighbour within the cutoff "
                              "({} A): the model gives them a constant energy and a committee sigma of 0; the "
                              "system may have blown apart".format(int(self.evaluations), int(atoms.shape[0]),
                                                                   ids, _decimals(self.cutoff, 2)))
            self.warned_isolated.copy_(isolated)


def _import_openmmtorch():
    try:
        import torch  # noqa: F401  (openmmtorch's library needs torch's loaded first)
        import openmmtorch
    except ImportError:
        raise missing_dependency("openmmtorch", "openmm", "mlmd's TorchForce path") from None
    except OSError as exc:   # built against another torch/CUDA: libnvrtc.so.12, undefined symbols
        raise missing_dependency("openmmtorch", "openmm",
                                 f"mlmd's TorchForce path (openmmtorch failed to load: {exc}; it needs "
                                 f"the torch it was built with, torch {torch.__version__} is installed)") from None
    _reload_torch_kernels()
    return openmmtorch


_KERNELS_RELOADED = False
# plugin library path -> OpenMM's message, for those that still failed to load (diagnostics)
KERNEL_LOAD_FAILURES: dict = {}


def _reload_torch_kernels() -> None:
    """Load openmm-torch's kernel plugins that failed because openmm was imported before torch.

    OpenMM loads its plugins when ``openmm`` is first imported; libOpenMMTorchReference/CPU
    need libtorch's libraries (libnvrtc.so.12 for the PyPI build), which are only present once
    ``torch`` is imported.  Loading those plugin files again now gives TorchForce its kernels.
    """
    global _KERNELS_RELOADED
    if _KERNELS_RELOADED:
        return
    import openmm

    prefix = "Error loading library "
    for failure in openmm.Platform.getPluginLoadFailures():
        if failure.startswith(prefix) and "libOpenMMTorch" in failure:
            path = failure[len(prefix):].split(": ", 1)[0]
            try:
                openmm.Platform.loadPluginLibrary(path)
            except Exception as exc:   # OpenMMException: the library's own dlopen message
                KERNEL_LOAD_FAILURES[path] = str(exc)
                # CUDA/OpenCL kernels fail on machines without those runtimes, as expected; the
                # CPU ones are what TorchForce runs on here, so their failure is said aloud
                if "CUDA" not in os.path.basename(path) and "OpenCL" not in os.path.basename(path):
                    warnings.warn(f"openmm-torch: could not load {path}: {exc}; a TorchForce will "
                                  "have no kernel on the Reference/CPU platforms", RuntimeWarning,
                                  stacklevel=3)
    _KERNELS_RELOADED = True


def torch_force_available() -> bool:
    """True when openmmtorch imports and loads with the installed torch."""
    try:
        _import_openmmtorch()
    except ImportError:
        return False
    return True


def create_torch_force(model, topology_or_numbers, atoms=None, periodic=None, *, device=None, dtype=None,
                       threads=None, min_distance=None):
    """An openmm-torch ``TorchForce`` evaluating an mlmd model inside OpenMM.

    Arguments as :func:`~mlmd.plugins.openmm.create_python_force`.  The scripted module is
    built here from the model file; energies in kJ/mol, forces in kJ/mol/nm.
    """
    from mlmd.guard import check_min_distance

    check_min_distance(min_distance)
    from mlmd.threads import apply_threads, check_threads
    from .python_force import _ml_region, remember_settings

    check_threads(threads)
    openmmtorch = _import_openmmtorch()
    potential = as_potential(model, device, dtype)
    numbers, ml_atoms, periodic = _ml_region(potential, topology_or_numbers, atoms, periodic)
    # libtorch inside OpenMM's loop shares this process's intra-op thread pool
    apply_threads(threads, len(numbers) if ml_atoms is None else len(ml_atoms))
    module = TorchForceModule(potential.module, numbers[ml_atoms] if ml_atoms is not None else numbers,
                              len(numbers), ml_atoms, periodic, potential.cutoff, min_distance)
    force = openmmtorch.TorchForce(torch.jit.script(module))
    force.setOutputsForces(True)
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setName("MLMD")
    remember_settings(force, potential)
    return force
