"""An mlmd model as an ``openmm.PythonForce``: OpenMM calls back into Python every step.

This path needs only ``openmm`` (no openmm-torch) and evaluates exactly the same TorchScript
module as ASE and the internal engine, on the caller's neighbour list.  OpenMM's units are
converted here, once per step, with :mod:`mlmd.units`: positions and box vectors nm -> Å on
the way in, energy eV -> kJ/mol and forces eV/Å -> kJ/mol/nm on the way out.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from mlmd import keys, units
from mlmd.errors import InputError, ModelFileError, missing_dependency
from mlmd.guard import MIN_DISTANCE, Guard
from mlmd.potential import Potential, as_potential, local_frame

__all__ = ["create_python_force", "MLMDComputation"]


def _import_openmm():
    try:
        import openmm
    except ImportError:
        raise missing_dependency("openmm", "openmm", "mlmd's OpenMM force") from None
    return openmm


class MLMDComputation:
    """The callback of the PythonForce: ``computation(state) -> (energy kJ/mol, forces [n,3] kJ/mol/nm)``.

    ``n`` is the number of particles OpenMM passes: the ML particles when the force's
    ``setParticles`` subset is used (OpenMM >= 8.6), else the whole system; then ``particles``
    (ML indices [n_ml]) selects the ML atoms here and the other rows of the forces stay zero.
    After each call, :attr:`last` holds the model's raw outputs (torch tensors in
    eV, eV/Å; committee statistics included) for reporters that watch the uncertainty.

    Picklable when the potential came from a file, so that ``XmlSerializer`` can save a
    System holding this force; unpickling reloads the model file.
    """

    def __init__(self, potential: Potential, numbers: np.ndarray, periodic: bool, skin: float = 0.0,
                 particles: Optional[np.ndarray] = None, n_particles: Optional[int] = None,
                 min_distance: Optional[float] = MIN_DISTANCE):
        self.min_distance = min_distance
        self.potential = potential
        self.numbers = np.ascontiguousarray(numbers, dtype=np.int64)
        self.periodic = bool(periodic)
        self.skin = float(skin)
        self.particles = None if particles is None else np.ascontiguousarray(particles, dtype=np.int64)
        self.n_particles = len(self.numbers) if particles is None else int(n_particles)
        self.last = None
        self._setup()

    def _setup(self):
        openmm = _import_openmm()
        potential = self.potential
        n = len(self.numbers)
        device = torch.device(potential.device)
        self._device = device
        self._module = potential.module
        self._cutoff = potential.cutoff
        self._numbers_t = torch.as_tensor(self.numbers, device=device)
        self._pbc = np.full(3, self.periodic)
        self._pbc_t = torch.as_tensor(self._pbc, device=device)
        self._zero_cell = np.zeros((3, 3))
        self._local_frame = potential.dtype != torch.float64
        self.last_positions = None
        # reused every step: OpenMM copies the returned forces before the next call
        self._positions = np.empty((n, 3))
        self._forces = np.empty((n, 3))
        if self.particles is not None:
            self._all_positions = np.empty((self.n_particles, 3))
            self._all_forces = np.zeros((self.n_particles, 3))
        # State's public getters build unit Quantities and probe dir(self) (about 13 us + 8 us
        # per step at N=100); the SWIG calls underneath fill a numpy buffer in under 1 us.
        self._fast_positions = hasattr(openmm.State, "_getVectorAsNumpy")
        self._positions_enum = getattr(openmm.State, "Positions", None)
        self._box_getter = getattr(getattr(openmm.openmm, "_openmm", None), "State_getPeriodicBoxVectors", None)
        self.guard = Guard(self.numbers, self.min_distance, self._cutoff, "OpenMM PythonForce", overlap="warn")
        self._verlet = None
        if self.skin > 0:
            from mlmd.neighbors import VerletList
            # OpenMM may rewrap periodic positions between steps; the list sees that as a move
            # and rebuilds, which is correct, only slower
            self._verlet = VerletList(self._cutoff, self.skin)
        from mlmd.neighbors import neighbor_pairs
        self._neighbor_pairs = neighbor_pairs

    # ---- the callback ---------------------------------------------------------------------
    def __call__(self, state):
        if getattr(self, "_refused", None) is not None:
            raise self._refused
        # a Verlet list may keep the array it was built from to measure displacements
        positions = self._positions if self._verlet is None else np.empty_like(self._positions)
        passed = positions if self.particles is None else self._all_positions
        if self._fast_positions:
            if state._getNumParticles() != len(passed):
                self._wrong_size(state._getNumParticles())
            state._getVectorAsNumpy(self._positions_enum, passed)
        else:
            from openmm import unit
            nm = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            if len(nm) != len(passed):
                self._wrong_size(len(nm))
            passed[:] = nm
        if self.particles is not None:
            np.take(passed, self.particles, axis=0, out=positions)
        positions *= units.NM_TO_ANGSTROM
        if self.periodic:
            if self._box_getter is not None:
                cell = np.array(self._box_getter(state))
            else:
                from openmm import unit
                cell = np.asarray(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer))
            cell *= units.NM_TO_ANGSTROM
        else:
            cell = self._zero_cell

        if self._verlet is not None:
            edge_index, shifts = self._verlet.update(positions, cell, self._pbc)
        else:
            edge_index, shifts = self._neighbor_pairs(positions, cell, self._pbc, self._cutoff)
        where = lambda: f"OpenMM step {state.getStepCount()}"   # noqa: E731 (formatted only when needed)
        self.guard.geometry(positions, edge_index, shifts, where)
        dev = self._device
        self.last_positions = positions          # Å, [n] of the ML atoms; read by UncertaintyReporter
        if self._local_frame:
            positions, shifts = local_frame(positions, cell, self._pbc, edge_index, shifts)
        # float64 inputs: the module casts to its own dtype, exactly as for Potential.compute
        out = self._module(torch.as_tensor(positions, device=dev), self._numbers_t,
                           torch.as_tensor(cell, device=dev), self._pbc_t,
                           torch.as_tensor(edge_index, device=dev), torch.as_tensor(shifts, device=dev),
                           False)
        self.last = out
        energy_ev = float(out[keys.ENERGY].detach())
        self.guard.outputs(energy_ev, out[keys.FORCES].detach().cpu().numpy(), where)
        energy = energy_ev * units.EV_TO_KJ_PER_MOL
        # out= casts a float32 model's forces to the float64 buffer in the same pass
        np.multiply(out[keys.FORCES].detach().cpu().numpy(), units.EV_PER_ANGSTROM_TO_KJ_PER_MOL_NM,
                    out=self._forces)
        if self.particles is None:
            return energy, self._forces
        self._all_forces[self.particles] = self._forces
        return energy, self._all_forces

    def _wrong_size(self, got: int):
        raise InputError(f"topology_or_numbers: describes {self.n_particles} particles but OpenMM passed "
                         f"{got} particles to the force; give one atomic number per System particle, "
                         "or the ML region with atoms=[...]")

    @property
    def uncertainty(self) -> Optional[float]:
        """Committee uncertainty (eV/Å) of the last evaluation, None for a single model."""
        if self.last is None or keys.UNCERTAINTY not in self.last:
            return None
        return float(self.last[keys.UNCERTAINTY].detach())

    # ---- pickling (XmlSerializer) ---------------------------------------------------------
    def __getstate__(self):
        if not self.potential.path:
            raise TypeError("an MLMDComputation built from an in-memory Potential cannot be pickled; "
                            "create the force from a model file path to serialise the System")
        # the XML references the model file (absolute path and content hash), it does not hold it
        return {"model_file": os.path.abspath(self.potential.path),
                "model_sha256": _sha256(self.potential.path), "device": self.potential.device,
                "dtype": self.potential.metadata[keys.META_DTYPE], "numbers": self.numbers,
                "periodic": self.periodic, "skin": self.skin, "particles": self.particles,
                "n_particles": self.n_particles, "min_distance": self.min_distance,
                "compiled": bool(self.potential.compiled)}

    def __setstate__(self, state):
        path = state.get("model_file", state.get("path"))
        problem = None
        if not os.path.isfile(path):
            problem = (f"this serialised System's mlmd PythonForce references the model file {path!r}, "
                       "which does not exist here; copy the file to that path (the XML holds only its "
                       "path and SHA-256, not the model)")
        elif state.get("model_sha256") is not None and _sha256(path) != state["model_sha256"]:
            problem = (f"the model file {path!r} changed since this System was serialised (SHA-256 "
                       f"{_sha256(path)[:12]}..., the XML expects {state['model_sha256'][:12]}...); "
                       "restore that file or rebuild the System")
        if problem is not None:
            # an exception inside XmlSerializer.deserialize crashes OpenMM 8.5 (segfault): say it
            # now, refuse at the first force evaluation, where OpenMM passes errors on
            import warnings
            warnings.warn(problem, RuntimeWarning, stacklevel=2)
            self._refused = ModelFileError(problem)
            self.last = None
            self.numbers = np.asarray(state["numbers"], dtype=np.int64)
            return
        self._refused = None
        self.potential = as_potential(path, state["device"], state["dtype"], compiled=bool(state.get("compiled")))
        self.numbers = np.asarray(state["numbers"], dtype=np.int64)
        self.periodic = bool(state["periodic"])
        self.skin = float(state.get("skin", 0.0))
        particles = state.get("particles")
        self.particles = None if particles is None else np.asarray(particles, dtype=np.int64)
        self.n_particles = int(state.get("n_particles", len(self.numbers)))
        self.min_distance = state.get("min_distance", MIN_DISTANCE)
        self.last = None
        self._setup()


def _sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _numbers_from(topology_or_numbers):
    """(atomic numbers [N] int64, topology or None)."""
    try:
        from openmm import app
        is_topology = isinstance(topology_or_numbers, app.Topology)
    except ImportError:
        is_topology = False
    if is_topology:
        numbers = []
        for atom in topology_or_numbers.atoms():
            if atom.element is None:
                raise InputError(f"topology_or_numbers: atom {atom.index} ({atom.name!r} in residue "
                                 f"{atom.residue.name!r}) has no element; give the ML atoms with atoms=[...] "
                                 "or pass an array of atomic numbers")
            numbers.append(atom.element.atomic_number)
        return np.asarray(numbers, dtype=np.int64), topology_or_numbers
    try:
        numbers = np.asarray(topology_or_numbers, dtype=np.int64)
    except (TypeError, ValueError):
        raise InputError("topology_or_numbers: expected an openmm.app.Topology or an array of atomic "
                         f"numbers, got {type(topology_or_numbers).__name__}") from None
    if numbers.ndim != 1:
        raise InputError(f"topology_or_numbers: expected a 1-D array of atomic numbers, got shape "
                         f"{list(numbers.shape)}")
    return numbers, None


def create_python_force(model, topology_or_numbers, atoms: Optional[Sequence[int]] = None,
                        periodic: Optional[bool] = None, *, device: Optional[str] = None,
                        dtype: Optional[str] = None, skin: float = 0.0, threads: Optional[int] = None,
                        min_distance: Optional[float] = MIN_DISTANCE):
    """An ``openmm.PythonForce`` that evaluates an mlmd model every step.

    Parameters
    ----------
    model : str, os.PathLike or mlmd.Potential
        The model file or a loaded potential.
    topology_or_numbers : openmm.app.Topology or array [N] of int
        The whole System's particles: elements are read from the topology, or given as
        atomic numbers (one per System particle).
    atoms : sequence of int, optional
        Particle indices of the ML region (ML/MM).  Only these particles enter the model and
        receive forces; the others get none from this force.  Default: all particles.
    periodic : bool, optional
        Evaluate with periodic boundaries (all three axes) in the State's box vectors.  Default:
        True when the topology has periodic box vectors, False for an array of numbers.
        OpenMM requires reduced-form box vectors (a along x, b in the xy plane, |b_x| <= a_x/2,
        |c_x| <= a_x/2, |c_y| <= b_y/2).
    device, dtype : optional
        Torch device and precision ("float32"/"float64") of the model; default the
        potential's own device ("cpu" for a path) and the file's dtype.
    skin : float
        Verlet skin in Å, used when :class:`mlmd.neighbors.VerletList` is available.
    threads : int, optional
        torch CPU threads (process-wide); default one per 256 ML atoms (:mod:`mlmd.threads`).
    min_distance : float or None
        Two ML atoms closer than this are warned about with the step (:class:`mlmd.guard.OverlapWarning`;
        OpenMM's minimiser may probe such a geometry and reject it): None, half the sum of their
        covalent radii; a length in Å for every pair; 0, no check.  A non-finite energy or force
        stops the step (:class:`mlmd.guard.BrokenStateError`, naming the atoms); ML atoms without a
        neighbour within the cutoff are warned about (``force.computation.guard.isolated``).

    Returns
    -------
    openmm.PythonForce
        Add it to the System (``system.addForce(force)``).  Energy in kJ/mol, forces in
        kJ/mol/nm.  ``force.computation`` is the :class:`MLMDComputation`, whose ``last``
        outputs and ``uncertainty`` can be read after a step.
    """
    from mlmd.threads import apply_threads, check_threads

    check_threads(threads)
    openmm = _import_openmm()
    potential = as_potential(model, device, dtype)
    numbers, atoms, periodic = _ml_region(potential, topology_or_numbers, atoms, periodic)
    ml_numbers = numbers if atoms is None else numbers[atoms]
    apply_threads(threads, len(ml_numbers))
    # OpenMM >= 8.6 passes only the ML particles to the callback; 8.5 passes all of them
    subset_in_force = atoms is not None and hasattr(openmm.PythonForce, "setParticles")
    particles = None if atoms is None or subset_in_force else atoms
    from mlmd.guard import check_min_distance
    computation = MLMDComputation(potential, ml_numbers, bool(periodic), skin,
                                  particles=particles, n_particles=len(numbers),
                                  min_distance=check_min_distance(min_distance))
    force = openmm.PythonForce(computation)
    if subset_in_force:
        force.setParticles([int(i) for i in atoms])
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    force.setName("MLMD")
    # the SWIG object does not keep a Python reference we can reach; keep one for reporters
    force.computation = computation
    remember_settings(force, potential, computation)
    return force


#: C++ address of each mlmd force made in this process -> the device and dtype override it was
#: made with (System.getForce returns a new proxy of the same object, so the address is the key)
FORCE_SETTINGS: dict = {}


def remember_settings(force, potential, computation=None) -> None:
    """Record ``potential``'s device and dtype override for :func:`swap_model` to keep, and the
    PythonForce's computation (its last outputs) for :class:`UncertaintyReporter` to reuse."""
    FORCE_SETTINGS[int(force.this)] = {"device": potential.device, "dtype": potential.dtype_override,
                                       "compiled": potential.compiled, "computation": computation}


def _ml_region(potential, topology_or_numbers, atoms, periodic):
    """(numbers [P] of all particles, ML particle indices or None for all, periodic: bool), checked."""
    numbers, topology = _numbers_from(topology_or_numbers)
    if atoms is not None:
        try:
            atoms = np.asarray(atoms, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise InputError("atoms: expected a sequence of particle indices") from None
        if atoms.size == 0:
            raise InputError("atoms: the ML region is empty; give at least one particle index")
        if atoms.min() < 0 or atoms.max() >= len(numbers):
            raise InputError(f"atoms: indices must be in 0..{len(numbers) - 1} "
                             f"(topology_or_numbers has {len(numbers)} particles)")
        if len(np.unique(atoms)) != len(atoms):
            raise InputError("atoms: contains repeated particle indices")
        ml_numbers = numbers[atoms]
    else:
        ml_numbers = numbers
    potential.check_numbers(ml_numbers)
    if periodic is None:
        periodic = topology is not None and topology.getPeriodicBoxVectors() is not None
    return numbers, atoms, bool(periodic)
