"""ASE calculator for mlmd model files.

Units are ASE's and mlmd's (Å, eV, amu), so nothing is converted at this boundary: energy
eV, forces [N,3] eV/Å, stress Voigt [6] eV/Å^3 (ASE order xx, yy, zz, yz, xz, xy and ASE
sign, positive under tension), per-atom energies [N] eV.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from mlmd import keys
from mlmd.errors import InputError
from mlmd.guard import MIN_DISTANCE, Guard
from mlmd.neighbors.cell_list import effective_cell
from mlmd.potential import as_potential, local_frame

__all__ = ["MLMDCalculator"]

# what ase.calculators.calculator.Calculator.__init__ itself uses
_CALCULATOR_KEYWORDS = ("restart", "ignore_bad_restart_file", "label", "atoms", "directory")


class MLMDCalculator(Calculator):
    """Energy, forces, stress and committee uncertainty of an mlmd model for ASE.

    Parameters
    ----------
    model : str, os.PathLike or mlmd.Potential
        A model file (``mlmd export``) or an already loaded potential.
    device : str, optional
        Torch device of the model ("cpu", "cuda", ...).  Default: the Potential's own device,
        or "cpu" when ``model`` is a path.
    dtype : {"float32", "float64"}, optional
        Precision to evaluate in; default the file's.  Use "float64" for finite-difference checks.
    threads : int, optional
        torch CPU threads for the model calls (process-wide); default one per 256 atoms, set at
        the first calculation (see :mod:`mlmd.threads`).
    skin : float
        Verlet skin in Å.  With ``skin > 0`` a :class:`mlmd.neighbors.VerletList` keeps the
        candidates within ``cutoff + skin`` between calls, rebuilt only when an atom has moved
        more than ``skin / 2``; with 0, pairs are built from scratch every call.
    min_distance : float or None
        Two atoms closer than this are warned about (:class:`mlmd.guard.OverlapWarning`; an
        optimiser may probe such a geometry and reject it): None, half the sum of their covalent
        radii; a length in Å for every pair; 0, no check.
        Non-finite outputs raise :class:`mlmd.guard.BrokenStateError`; atoms without a neighbour
        are warned about, and listed
        in ``calc.isolated``.
    **kwargs
        Passed to :class:`ase.calculators.calculator.Calculator` (``label``, ``directory``...).

    Results (``calc.results`` after a calculation)
    ----------------------------------------------
    energy, free_energy : float, eV
    forces : [N, 3] eV/Å
    energies : [N] eV (per-atom energies, summing to ``energy``)
    stress : [6] eV/Å^3, Voigt order, only for 3D-periodic cells when asked for
    energy_std : float eV, forces_std : [N] eV/Å, uncertainty : float eV/Å (committees only)

    Unchanged atoms are not recomputed (ASE's ``check_state``).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]
    #: what a committee adds (get_property works for these; see register_ase_properties)
    committee_properties = [keys.ENERGY_STD, keys.FORCES_STD, keys.UNCERTAINTY,
                            keys.MEMBER_ENERGIES, keys.MEMBER_FORCES]
    default_parameters: dict = {}

    def __init__(self, model, device: Optional[str] = None, dtype: Optional[str] = None,
                 skin: float = 0.0, threads: Optional[int] = None, min_distance: Optional[float] = MIN_DISTANCE,
                 **kwargs):
        # Calculator.__init__ would file any other keyword under `parameters` and never read it
        unknown = sorted(set(kwargs) - set(_CALCULATOR_KEYWORDS))
        if unknown:
            raise InputError(f"{', '.join(unknown)}: not an option of MLMDCalculator; it takes model, "
                             f"device, dtype, skin, threads, min_distance and ASE's {', '.join(_CALCULATOR_KEYWORDS)}")
        super().__init__(**kwargs)
        if skin < 0:
            raise InputError(f"skin: must be >= 0 Å, got {skin}")
        from mlmd.threads import check_threads

        self.threads = check_threads(threads)
        self._threads_asked = self.threads
        self._threads_applied = False
        self.potential = as_potential(model, device, dtype)
        self.skin = float(skin)
        self.guard = Guard([], min_distance, self.potential.cutoff, "ASE", overlap="warn")
        if self.potential.committee_size > 1:
            register_ase_properties()
            self.implemented_properties = type(self).implemented_properties + self.committee_properties
        self._module = self.potential.module
        self._device = torch.device(self.potential.device)
        self._committee = self.potential.committee_size > 1
        self._supports_stress = bool(self.potential.metadata.get(keys.META_STRESS, False))
        self._verlet = None
        # per-system inputs: validated and turned into tensors again only when they change
        self._numbers = None        # numpy copy of the validated atomic numbers
        self._numbers_t = None
        self._pbc_t = None
        self._cell_ok = None        # (cell, pbc) last validated
        #: number of model evaluations done (check_state caching skips unchanged atoms)
        self.n_evaluations = 0

    # ---- ASE protocol ---------------------------------------------------------------------
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Evaluate ``atoms`` (or the stored copy) and fill ``self.results``."""
        # Calculator.calculate would store a second copy (get_property has just made one) and
        # stat the working directory; we write no files, so keep one copy, made only when the
        # stored atoms differ from the ones given
        if atoms is not None and (self.atoms is None or self.check_state(atoms)):
            self.atoms = atoms.copy()
        atoms = self.atoms
        if atoms is None:
            raise InputError("atoms: no atoms to calculate; pass atoms or attach the calculator "
                             "(atoms.calc = calc) and call atoms.get_forces()")
        positions = atoms.arrays["positions"]
        numbers = atoms.arrays["numbers"]
        cell = atoms.cell.array
        pbc = atoms.pbc

        if self._numbers is None or not np.array_equal(numbers, self._numbers):
            self.potential.check_numbers(numbers)
            self._numbers = numbers.copy()
            self.guard.set_numbers(numbers)
            self._numbers_t = torch.as_tensor(self._numbers, dtype=torch.int64, device=self._device)
            self._verlet = None
        if not np.isfinite(positions).all():
            bad = np.unique(np.nonzero(~np.isfinite(positions))[0])
            raise InputError(f"atoms.positions: NaN or Inf at atom(s) {bad[:10].tolist()}; "
                             "check the structure or the step that produced it")
        if (self._cell_ok is None or not np.array_equal(cell, self._cell_ok[0])
                or not np.array_equal(pbc, self._cell_ok[1])):
            if pbc.any():   # the neighbour list's rule, shared with Potential.compute and the engine
                effective_cell(cell, pbc)
            self._cell_ok = (cell.copy(), pbc.copy())
            self._pbc_t = torch.as_tensor(pbc, dtype=torch.bool, device=self._device)
            # a cell change (NPT, strain) may invalidate the images the Verlet list chose
            self._verlet = None

        want_stress = "stress" in properties
        if want_stress:
            if not pbc.all():
                raise InputError(
                    f"properties: 'stress' needs a 3D-periodic cell but atoms.pbc is {pbc.tolist()}; "
                    "set atoms.pbc = True with a cell (atoms.set_cell), or ask only for energy and forces")
            if not self._supports_stress:
                raise InputError("properties: this model file does not support stress; "
                                 "ask only for energy and forces")

        if not self._threads_applied:
            from mlmd.threads import apply_threads
            self.threads = apply_threads(self.threads, len(positions))
            self._threads_applied = True
        edge_index, shifts = self._pairs(positions, cell, pbc)
        count = self.n_evaluations + 1
        where = lambda: f"ASE calculation {count}"   # noqa: E731 (formatted only when needed)
        self.guard.geometry(positions, edge_index, shifts, where)
        if self.potential.dtype != torch.float64:
            positions, shifts = local_frame(positions, cell, pbc, edge_index, shifts)
        dev = self._device
        # float64 views of the numpy arrays; the module casts to its own dtype, as
        # Potential.compute's inputs would be
        out = self._module(torch.as_tensor(positions, device=dev), self._numbers_t,
                           torch.as_tensor(cell, device=dev), self._pbc_t,
                           torch.as_tensor(edge_index, device=dev), torch.as_tensor(shifts, device=dev),
                           want_stress)
        self.n_evaluations += 1

        energy = float(out[keys.ENERGY].detach())
        self.guard.outputs(energy, out[keys.FORCES].detach().cpu().numpy(), where)
        results = {
            "energy": energy,
            "free_energy": energy,
            "forces": _numpy64(out[keys.FORCES]),
            "energies": _numpy64(out[keys.ENERGIES]),
        }
        if want_stress:
            results["stress"] = full_3x3_to_voigt_6_stress(_numpy64(out[keys.STRESS]))
        if self._committee:
            results[keys.ENERGY_STD] = float(out[keys.ENERGY_STD].detach())
            results[keys.FORCES_STD] = _numpy64(out[keys.FORCES_STD])
            results[keys.UNCERTAINTY] = float(out[keys.UNCERTAINTY].detach())
            results[keys.MEMBER_ENERGIES] = _numpy64(out[keys.MEMBER_ENERGIES])
            results[keys.MEMBER_FORCES] = _numpy64(out[keys.MEMBER_FORCES])
        self.results = results

    @property
    def isolated(self) -> np.ndarray:
        """Atoms without a neighbour within the cutoff in the last calculation."""
        return self.guard.isolated

    # ---- pickling (multiprocessing, Dask): reload from the model file -----------------------
    def __getstate__(self):
        if not self.potential.path:
            raise TypeError("MLMDCalculator: a calculator made from an in-memory Potential cannot be "
                            "pickled; make it from the model file path, MLMDCalculator('model.pt')")
        return {"path": self.potential.path, "device": self.potential.device,
                "dtype": self.potential.dtype_override, "skin": self.skin, "threads": self._threads_asked,
                "min_distance": self.guard.min_distance,
                "directory": self.directory, "atoms": self.atoms, "results": dict(self.results)}

    def __setstate__(self, state):
        self.__init__(state["path"], device=state["device"], dtype=state["dtype"], skin=state["skin"],
                      threads=state["threads"], directory=state["directory"],
                      min_distance=state.get("min_distance", MIN_DISTANCE))
        self.atoms = state["atoms"]
        self.results = state["results"]

    def check_state(self, atoms, tol: float = 1e-15):
        """What changed since the last calculation, among the inputs the model depends on.

        ASE's ``compare_atoms`` walks every per-atom array (about 140 us at N=100, more than a
        small model's step); the model reads only positions, numbers, cell and pbc, so only
        these are compared (same names and absolute tolerance as ASE's).
        """
        old = self.atoms
        if old is None:
            return list(all_changes)
        changes = []
        for name in ("positions", "numbers"):
            if not _equal(old.arrays[name], atoms.arrays[name], tol):
                changes.append(name)
        if not _equal(old.cell.array, atoms.cell.array, tol):
            changes.append("cell")
        if not np.array_equal(old.pbc, atoms.pbc):
            changes.append("pbc")
        return changes

    # ---- helpers --------------------------------------------------------------------------
    def _pairs(self, positions, cell, pbc):
        if self.skin > 0:
            if self._verlet is None:
                from mlmd.neighbors import VerletList
                self._verlet = VerletList(self.potential.cutoff, self.skin)
            return self._verlet.update(positions, cell, pbc)
        from mlmd.neighbors import neighbor_pairs
        return neighbor_pairs(positions, cell, pbc, self.potential.cutoff)

    def __repr__(self) -> str:
        return (f"MLMDCalculator({self.potential.path or '<Potential>'!r}, device={self.potential.device!r}, "
                f"dtype={self.potential.metadata[keys.META_DTYPE]!r}, skin={self.skin})")


_COMMITTEE_OUTPUTS = {keys.ENERGY_STD: (), keys.FORCES_STD: "natoms", keys.UNCERTAINTY: ()}


def register_ase_properties() -> None:
    """Make ASE know energy_std, forces_std and uncertainty as calculator properties, so that
    ase.io.Trajectory and extxyz keep them with energy and forces (ASE writes only the names in
    its ``all_properties``) and SinglePointCalculator accepts them when the file is read back."""
    from ase.calculators import calculator as ase_calculator
    from ase import outputs

    for name, shape in _COMMITTEE_OUTPUTS.items():
        if name not in outputs.all_outputs:
            outputs._defineprop(name, float, shape=shape)
        if name not in ase_calculator.all_properties:
            ase_calculator.all_properties.append(name)
    try:        # extxyz sorts known properties per atom / per frame when it is imported
        from ase.io import extxyz
    except ImportError:
        return
    for name, shape in _COMMITTEE_OUTPUTS.items():
        target = extxyz.per_atom_properties if shape == "natoms" else extxyz.per_config_properties
        if name not in target:
            target.append(name)


def _equal(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    if a.shape != b.shape:
        return False
    return bool(np.array_equal(a, b) or (tol > 0 and np.abs(a - b).max() <= tol))


def _numpy64(tensor: torch.Tensor) -> np.ndarray:
    # float64 outputs come back as views; float32 models are upcast once for ASE's integrators
    return np.asarray(tensor.detach().cpu().numpy(), dtype=np.float64)
