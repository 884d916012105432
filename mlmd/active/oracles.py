"""Reference methods ("oracles") that label frames with energy and forces.

Every oracle is an ASE calculator; nothing is downloaded at run time.

- ``gfn2-xtb`` / ``gfn1-xtb``: GFN2-/GFN1-xTB through tblite (molecules)
- ``emt``: ASE's effective-medium theory (Cu, Ag, Au, Ni, Pd, Pt, Al)
- ``{"openmm": {"topology": "water.pdb", "forcefield": ["amber14/tip3pfb.xml"], ...}}``: an
  OpenMM force field (:class:`OpenMMForceField`); a plain dict, so it travels through YAML
  configs and Dask tasks
- any ``ase.calculators.calculator.Calculator`` instance passed by the user
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .. import units
from ..errors import InputError, missing_dependency

ORACLES = ("gfn2-xtb", "gfn1-xtb", "emt", "openmm")
_NONBONDED = ("PME", "Ewald", "CutoffPeriodic", "CutoffNonPeriodic", "NoCutoff")


class OpenMMForceField(Calculator):
    """An OpenMM force field as an ASE calculator (energy in eV, forces in eV/Å).

    topology    PDB or PDBx/mmCIF file that defines residues, bonds and box; its atoms are in
                the order of the frames to label (element by element checked on every call)
    forcefield  OpenMM force-field XML files (``app.ForceField`` names)
    nonbonded   one of PME, Ewald, CutoffPeriodic, CutoffNonPeriodic, NoCutoff; default PME
                for a periodic topology, NoCutoff otherwise
    cutoff      nonbonded cutoff in Å; default min(9, 0.49 × the shortest box width)
    rigid_water False: flexible water (bonds and angles from the force field), the reference an
                ML model of flexible molecules must reproduce
    ewald_tolerance  PME/Ewald error tolerance (1e-5: label noise well below model errors)
    platform    OpenMM platform name; ``Reference`` gives double-precision labels
    """

    implemented_properties = ["energy", "forces"]

    def __init__(self, topology: str, forcefield: Sequence[str] = ("amber14/tip3pfb.xml",),
                 nonbonded: Optional[str] = None, cutoff: Optional[float] = None, rigid_water: bool = False,
                 ewald_tolerance: float = 1e-5, platform: str = "Reference", **kwargs):
        super().__init__(**kwargs)
        if not os.path.isfile(topology):
            raise InputError(f"oracle.openmm.topology: file {topology!r} does not exist; give a PDB or "
                             "PDBx file whose atoms are in the order of the frames")
        if isinstance(forcefield, str):
            forcefield = [forcefield]
        if nonbonded is not None and nonbonded not in _NONBONDED:
            raise InputError(f"oracle.openmm.nonbonded: expected one of {_NONBONDED}, got {nonbonded!r}")
        if cutoff is not None and not cutoff > 0:
            raise InputError(f"oracle.openmm.cutoff: must be > 0 Å, got {cutoff!r}")
        self.topology_path = os.path.abspath(topology)
        self.forcefield_files = list(forcefield)
        self.nonbonded = nonbonded
        self.cutoff = cutoff
        self.rigid_water = bool(rigid_water)
        self.ewald_tolerance = float(ewald_tolerance)
        self.platform_name = platform
        self._context = None
        self._numbers = None
        self._build()          # fail now, at the entry point, on a bad file or force field

    def __getstate__(self):        # an OpenMM Context does not pickle: rebuilt where it lands
        state = dict(self.__dict__)
        state["_context"] = None
        return state

    def _build(self) -> None:
        import openmm
        from openmm import app, unit

        reader = app.PDBxFile if self.topology_path.lower().endswith((".cif", ".pdbx")) else app.PDBFile
        structure = reader(self.topology_path)
        topology = structure.topology
        try:
            forcefield = app.ForceField(*self.forcefield_files)
        except Exception as exc:
            raise InputError(f"oracle.openmm.forcefield: OpenMM cannot load {self.forcefield_files} "
                             f"({exc})") from None
        box = topology.getPeriodicBoxVectors()
        periodic = box is not None
        nonbonded = self.nonbonded or ("PME" if periodic else "NoCutoff")
        kwargs = {"nonbondedMethod": getattr(app, nonbonded), "constraints": None,
                  "rigidWater": self.rigid_water, "removeCMMotion": False}
        if nonbonded != "NoCutoff":
            cutoff = self.cutoff
            if cutoff is None:
                widths = np.diag(np.asarray(box.value_in_unit(unit.nanometer))) * units.NM_TO_ANGSTROM \
                    if periodic else [np.inf]
                cutoff = min(9.0, 0.49 * float(min(widths)))
            kwargs["nonbondedCutoff"] = cutoff * units.ANGSTROM_TO_NM * unit.nanometer
            if nonbonded in ("PME", "Ewald"):
                kwargs["ewaldErrorTolerance"] = self.ewald_tolerance
        try:
            system = forcefield.createSystem(topology, **kwargs)
        except Exception as exc:
            raise InputError(f"oracle.openmm: the force field {self.forcefield_files} does not cover "
                             f"{self.topology_path} ({exc})") from None
        if periodic:
            # bonded terms use the minimum image too, so a molecule split by wrapping is whole
            for force in system.getForces():
                if isinstance(force, openmm.NonbondedForce):
                    force.setExceptionsUsePeriodicBoundaryConditions(True)
                elif hasattr(force, "setUsesPeriodicBoundaryConditions"):
                    force.setUsesPeriodicBoundaryConditions(True)
        platform = openmm.Platform.getPlatformByName(self.platform_name)
        self._context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform)
        self._numbers = np.array([a.element.atomic_number for a in topology.atoms()])
        self._periodic = periodic

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if self._context is None:
            self._build()
        numbers = self.atoms.get_atomic_numbers()
        if len(numbers) != len(self._numbers) or (numbers != self._numbers).any():
            raise InputError(f"atoms: the frame's {len(numbers)} atoms do not match the "
                             f"{len(self._numbers)} atoms of oracle.openmm.topology {self.topology_path} "
                             "element by element; the topology must list the atoms in the frames' order")
        if self._periodic:
            if not self.atoms.pbc.all():
                raise InputError("atoms: the oracle's topology is periodic but the frame is not; set the cell "
                                 "and pbc=True")
            cell = self.atoms.cell.array
            if abs(cell[0, 1]) + abs(cell[0, 2]) + abs(cell[1, 2]) > 1e-8:
                raise InputError("atoms: OpenMM needs a cell in reduced form (a along x, b in the xy plane); "
                                 "use ase.geometry.cell_to_cellpar / cellpar_to_cell to rotate it")
            self._context.setPeriodicBoxVectors(*(cell * units.ANGSTROM_TO_NM))
        self._context.setPositions(self.atoms.positions * units.ANGSTROM_TO_NM)
        state = self._context.getState(getEnergy=True, getForces=True)
        self.results["energy"] = state.getPotentialEnergy()._value * units.KJ_PER_MOL_TO_EV
        self.results["forces"] = (np.asarray(state.getForces(asNumpy=True)._value)
                                  * units.KJ_PER_MOL_NM_TO_EV_PER_ANGSTROM)
        self.results["free_energy"] = self.results["energy"]


OPENMM_KEYS = ("topology", "forcefield", "nonbonded", "cutoff", "rigid_water", "ewald_tolerance", "platform")

_CACHE: Dict[str, Calculator] = {}        # one OpenMM oracle per spec and process (make_oracle's)
_SPARES: Dict[str, List[Calculator]] = {}  # more, made while that one was busy in another thread
_IN_USE: set = set()                       # id() of calculators a thread is computing with now
_LOCK = threading.Lock()


def oracle_name(oracle) -> str:
    """A short description of ``oracle`` for provenance (``info['oracle']`` of each label)."""
    if isinstance(oracle, str):
        return oracle
    if isinstance(oracle, dict) and "openmm" in oracle:
        spec = oracle["openmm"]
        files = spec.get("forcefield", ["amber14/tip3pfb.xml"])
        return "openmm:" + "+".join([files] if isinstance(files, str) else files)
    return type(oracle).__name__


class OracleBusy(RuntimeError):
    """The calculator instance is still computing a timed-out frame and cannot be copied."""


@contextlib.contextmanager
def checked_out(oracle):
    """A calculator for ``oracle`` that no other thread computes with while it is held.

    A timed-out label keeps running in its thread on the calculator it was given; a calculator
    keeps state between calls (ASE's results, tblite's geometry, an OpenMM Context), so the
    next frame computed on the same object may be handed the timed-out frame's numbers.  Names
    give a fresh calculator anyway; an ``{"openmm": ...}`` spec gets its cached one when free,
    else another; a calculator instance is used when free, else a deep copy of it.
    """
    if isinstance(oracle, str):
        yield make_oracle(oracle)
        return
    primary = make_oracle(oracle)
    key = json.dumps(oracle, sort_keys=True) if isinstance(oracle, dict) else None
    with _LOCK:
        candidates = [primary] + (_SPARES.get(key, []) if key else [])
        calculator = next((c for c in candidates if id(c) not in _IN_USE), None)
        if calculator is not None:
            _IN_USE.add(id(calculator))
    if calculator is None:
        if key is not None:
            calculator = OpenMMForceField(**oracle["openmm"])
            with _LOCK:
                _SPARES.setdefault(key, []).append(calculator)
                _IN_USE.add(id(calculator))
        else:
            try:
                calculator = copy.deepcopy(oracle)
            except Exception as exc:
                raise OracleBusy(f"the oracle {type(oracle).__name__} is still computing a timed-out frame "
                                 f"and cannot be copied ({type(exc).__name__}: {exc}); pass an oracle name "
                                 "or a copyable calculator") from None
            if hasattr(calculator, "reset"):
                calculator.reset()
    try:
        yield calculator
    finally:
        with _LOCK:
            _IN_USE.discard(id(calculator))


def make_oracle(oracle: Union[str, dict, object]):
    """An ASE calculator for ``oracle``: a name from :data:`ORACLES`, an ``{"openmm": {...}}``
    dict (the keyword arguments of :class:`OpenMMForceField`), or a calculator instance."""
    if isinstance(oracle, dict):
        if set(oracle) != {"openmm"} or not isinstance(oracle["openmm"], dict):
            raise InputError(f"oracle: a dict oracle must be {{'openmm': {{'topology': ..., 'forcefield': [...]}}}}, "
                             f"got {oracle!r}")
        # a typo'd key would otherwise reach ASE's Calculator, which files it and uses the default
        unknown = sorted(set(oracle["openmm"]) - set(OPENMM_KEYS))
        if unknown:
            raise InputError(f"oracle.openmm: unknown key(s) {unknown}; the keys are {list(OPENMM_KEYS)}")
        if "topology" not in oracle["openmm"]:
            raise InputError("oracle.openmm.topology: missing; give the PDB or PDBx file whose atoms are in "
                             "the order of the frames")
        key = json.dumps(oracle, sort_keys=True)
        if key not in _CACHE:        # one Context per process, reused for every frame
            _CACHE[key] = OpenMMForceField(**oracle["openmm"])
        return _CACHE[key]
    if not isinstance(oracle, str):
        if not hasattr(oracle, "get_potential_energy") and not hasattr(oracle, "calculate"):
            raise InputError(f"oracle: expected a name in {ORACLES}, an {{'openmm': ...}} dict or an ASE "
                             f"calculator, got {type(oracle).__name__}")
        return oracle
    name = oracle.lower()
    if name in ("gfn2-xtb", "gfn1-xtb"):
        try:
            from tblite.ase import TBLite
        except ImportError:
            raise missing_dependency("tblite", "xtb", f"the {oracle} oracle") from None
        method = "GFN2-xTB" if name == "gfn2-xtb" else "GFN1-xTB"
        return TBLite(method=method, verbosity=0)
    if name == "emt":
        from ase.calculators.emt import EMT
        return EMT()
    if name == "openmm":
        raise InputError("oracle: 'openmm' needs its force field and topology: "
                         "{'openmm': {'topology': 'water.pdb', 'forcefield': ['amber14/tip3pfb.xml']}}")
    raise InputError(f"oracle: unknown name {oracle!r}; choose one of {ORACLES} or pass an ASE calculator")
