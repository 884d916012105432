"""Committee uncertainty during an OpenMM run, and replacing the model of a running Simulation.

``UncertaintyReporter`` is an OpenMM reporter (``simulation.reporters.append(...)``): every
``reportInterval`` steps it evaluates the committee on the current positions (independently of
which path computes the forces, so it works with TorchForce and PythonForce alike), appends a
CSV row, optionally a PDB model with each atom's force σ in the B-factor column, and calls
``callback(simulation, result)`` — where retraining hooks plug in.
"""
from __future__ import annotations

import csv
import os
from typing import Callable, Optional

import numpy as np

from mlmd import keys, units
from mlmd.errors import InputError
from mlmd.potential import as_potential

__all__ = ["UncertaintyReporter", "swap_model"]

# PDB B-factors hold 5.2f numbers in (-10, 100): sigma in units of 0.01 eV/Å keeps 2 digits
BFACTOR_PER_EV_PER_ANGSTROM = 100.0


class UncertaintyReporter:
    """CSV of the committee's disagreement every ``reportInterval`` steps.

    file            CSV path: step, time_ps, energy_eV, energy_std_eV, uncertainty_eV_per_A
                    (max per-atom force σ × calibration), mean_force_std_eV_per_A
    model           the committee (path or mlmd.Potential) — usually the file the force uses
    topology_or_numbers, atoms   the System's particles and the ML region, as for the force
    pdb             optional PDB path: one model per report, σ_F per atom in the B-factor
                    column in units of 0.01 eV/Å (non-ML atoms 0)
    callback        optional callback(simulation, result dict of numpy arrays and floats)
    append          continue an existing log (a restarted job), as OpenMM's own reporters do

    When the System's mlmd force is a PythonForce of the same model file, the σ it computed in
    the step is reused (``reused`` is True after such a report): no second committee call.
    """

    def __init__(self, file, reportInterval: int, model, topology_or_numbers, atoms=None,
                 pdb: Optional[str] = None, callback: Optional[Callable] = None, append: bool = False):
        from .python_force import _numbers_from

        if not isinstance(reportInterval, int) or reportInterval < 1:
            raise InputError(f"reportInterval: must be a positive number of steps, got {reportInterval!r}")
        self.potential = as_potential(model)
        if self.potential.committee_size < 2:
            raise InputError("model: the uncertainty reporter needs a committee (committee_size >= 2); "
                             "train one with `mlmd train --committee 4`")
        numbers, topology = _numbers_from(topology_or_numbers)
        self.atoms = np.arange(len(numbers)) if atoms is None else np.asarray(atoms, dtype=np.int64)
        self.numbers = numbers[self.atoms]
        self.potential.check_numbers(self.numbers)
        self.interval = reportInterval
        self.callback = callback
        self.path = os.fspath(file)
        header = ["step", "time_ps", "energy_eV", "energy_std_eV", "uncertainty_eV_per_A",
                  "mean_force_std_eV_per_A"]
        resume = append and os.path.isfile(self.path) and os.path.getsize(self.path) > 0
        if resume:
            with open(self.path, newline="") as existing:
                first = next(csv.reader(existing), [])
            if first != header:
                raise InputError(f"append: {self.path!r} is not an UncertaintyReporter log (its first "
                                 f"row is {first[:3]}...); give another file or append=False")
        self._handle = open(self.path, "a" if resume else "w", newline="")
        self._csv = csv.writer(self._handle)
        if not resume:
            self._csv.writerow(header)
        self._handle.flush()
        self._pdb = None
        if pdb is not None:
            import mdtraj
            from mdtraj.formats import PDBTrajectoryFile
            if topology is None:
                raise InputError("pdb: writing σ as B-factors needs an openmm.app.Topology, "
                                 "not an array of numbers")
            self._mdtraj_topology = mdtraj.Topology.from_openmm(topology)
            self._pdb = PDBTrajectoryFile(os.fspath(pdb), mode="w")
            self._n_particles = len(numbers)
        self.last = None
        self.reused = False
        self._model_index = 0

    def describeNextReport(self, simulation):
        steps = self.interval - simulation.currentStep % self.interval
        return {"steps": steps, "periodic": None, "include": ["positions"]}

    def report(self, simulation, state):
        from openmm import unit

        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer) * units.NM_TO_ANGSTROM
        periodic = simulation.system.usesPeriodicBoundaryConditions()
        cell = np.zeros((3, 3))
        if periodic:
            cell = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer) * units.NM_TO_ANGSTROM
        out = self._outputs_of_the_force(simulation, positions[self.atoms])
        self.reused = out is not None
        if out is None:
            out = self.potential.compute(positions[self.atoms], self.numbers, cell, np.full(3, periodic))
        result = {"step": simulation.currentStep, "time_ps": state.getTime().value_in_unit(unit.picosecond),
                  "energy": float(out[keys.ENERGY]), "energy_std": float(out[keys.ENERGY_STD]),
                  "uncertainty": float(out[keys.UNCERTAINTY]), "forces_std": out[keys.FORCES_STD]}
        self._csv.writerow([result["step"], f"{result['time_ps']:.6f}", f"{result['energy']:.8f}",
                            f"{result['energy_std']:.6g}", f"{result['uncertainty']:.6g}",
                            f"{float(np.mean(out[keys.FORCES_STD])):.6g}"])
        self._handle.flush()
        if self._pdb is not None:
            bfactors = np.zeros(self._n_particles)
            bfactors[self.atoms] = np.clip(out[keys.FORCES_STD] * BFACTOR_PER_EV_PER_ANGSTROM, 0.0, 99.99)
            self._pdb.write(positions, self._mdtraj_topology, modelIndex=self._model_index, bfactors=bfactors)
            self._model_index += 1
        self.last = result
        if self.callback is not None:
            self.callback(simulation, result)

    def _outputs_of_the_force(self, simulation, ml_positions):
        """The committee outputs the System's mlmd PythonForce computed at these very positions
        with this very model (numpy), or None: then the reporter evaluates the committee itself
        (TorchForce, another model, or positions changed since the force ran)."""
        from .python_force import FORCE_SETTINGS

        system = simulation.system
        for index in range(system.getNumForces()):
            computation = FORCE_SETTINGS.get(int(system.getForce(index).this), {}).get("computation")
            if computation is None or computation.last is None or computation.last_positions is None:
                continue
            same_model = (os.path.abspath(computation.potential.path or "?") == os.path.abspath(self.potential.path or "!")
                          and computation.potential.dtype == self.potential.dtype
                          and np.array_equal(computation.numbers, self.numbers))
            if same_model and computation.last_positions.shape == ml_positions.shape \
                    and np.allclose(computation.last_positions, ml_positions, rtol=0, atol=1e-9):
                return {key: value.detach().cpu().numpy() for key, value in computation.last.items()}
        return None

    def close(self):
        """Close the log (and PDB) files; safe to call twice, or after a failed __init__."""
        handle = getattr(self, "_handle", None)
        if handle is not None and not handle.closed:
            handle.close()
        pdb = getattr(self, "_pdb", None)
        if pdb is not None:
            pdb.close()
            self._pdb = None

    def __del__(self):
        self.close()


def swap_model(simulation, model, topology_or_numbers=None, atoms=None, path: str = "auto",
               name: str = "MLMD", *, device=None, dtype=None) -> None:
    """Replace the mlmd force of a running ``openmm.app.Simulation`` by one for ``model``.

    Positions, velocities, time, step count and every other force stay as they were: the
    force named ``name`` is removed, the new one added in its force group, and the context is
    reinitialized with its state preserved.  ``atoms`` (the ML region) and ``path`` as for
    :func:`~mlmd.plugins.openmm.create_force`; the topology defaults to the simulation's.
    ``device``/``dtype``: those of the force being replaced unless given (a force built with
    ``dtype="float64"`` keeps computing in float64 after a float32 file is swapped in); a force
    built from a compiled Potential gets the compiled form of a new model file too.
    """
    from . import FORCE_SETTINGS, create_force
    from mlmd.potential import as_potential

    system = simulation.system
    indices = [i for i in range(system.getNumForces()) if system.getForce(i).getName() == name]
    if len(indices) != 1:
        raise InputError(f"name: expected exactly one force named {name!r} in the System, found "
                         f"{len(indices)}; pass the name the mlmd force was given")
    old = system.getForce(indices[0])
    group, periodic = old.getForceGroup(), old.usesPeriodicBoundaryConditions()
    previous = FORCE_SETTINGS.get(int(old.this), {})
    potential = as_potential(model, device or previous.get("device"), dtype or previous.get("dtype"),
                             compiled=bool(previous.get("compiled")))
    force = create_force(potential, topology_or_numbers if topology_or_numbers is not None else simulation.topology,
                         atoms=atoms, periodic=periodic, path=path)
    force.setForceGroup(group)
    step = simulation.currentStep
    system.removeForce(indices[0])
    system.addForce(force)
    simulation.context.reinitialize(preserveState=True)
    simulation.currentStep = step
