"""What the learning loop needs from a host, for each of the three hosts.

A host adapter exposes the current frame's committee output, the frame as ase.Atoms,
the step and time, a snapshot/restore pair for rollbacks, and swaps the model between
two steps.  The loop (:class:`mlmd.active.loop.ActiveLearner`) never touches a host directly.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence

import numpy as np

from .. import units
from ..potential import as_potential


class EngineHost:
    """The internal engine (:class:`mlmd.Simulation`): the committee output of the last step
    is already there, so watching costs nothing."""

    name = "engine"

    def __init__(self, simulation):
        self.sim = simulation

    @property
    def potential(self):
        return self.sim.potential

    @property
    def step(self) -> int:
        return int(self.sim.state.step)

    @property
    def time_fs(self) -> float:
        return float(self.sim.state.time)

    def output(self) -> Dict:
        return self.sim.forces.output

    def isolated_atoms(self) -> np.ndarray:
        """Atoms without a neighbour within the cutoff, from the pairs of the last step."""
        return self.sim.forces.isolated

    def frame(self):
        atoms = self.sim.get_atoms()
        atoms.calc = None
        return atoms

    def snapshot(self) -> Dict:
        s = self.sim.state
        return {"positions": s.positions.copy(), "velocities": s.velocities.copy(), "cell": s.cell.copy(),
                "rng": copy.deepcopy(self.sim.integrator.rng_state()), "step": s.step,
                "bath_energy": s.bath_energy}

    def restore(self, snapshot: Dict) -> None:
        """Positions, velocities, cell and thermostat RNG back to ``snapshot``; the step count
        and time go on (trajectory and log stay monotonic), the thermostat's energy account
        is kept consistent, forces recomputed with the current model."""
        s = self.sim.state
        before = s.potential_energy + s.kinetic_energy
        s.positions[...] = snapshot["positions"]
        s.velocities[...] = snapshot["velocities"]
        s.cell[...] = snapshot["cell"]
        self.sim.integrator.set_rng_state(copy.deepcopy(snapshot["rng"]))
        self.sim.forces(s)
        s.bath_energy += s.potential_energy + s.kinetic_energy - before   # the jump is not drift

    def reseed(self, seed: int) -> None:
        self.sim.integrator.rng = np.random.default_rng([int(seed), self.step])

    def swap(self, model) -> None:
        s = self.sim.state
        before = s.potential_energy
        self.sim.swap_model(model)
        s.bath_energy += s.potential_energy - before       # a new model is a new energy zero


class ASEHost:
    """An ASE dynamics object (``dyn.attach(learner.observer(host), interval=n)``) whose atoms
    carry an :class:`mlmd.plugins.ase.MLMDCalculator`."""

    name = "ase"

    def __init__(self, dyn, atoms=None):
        self.dyn = dyn
        self.atoms = atoms if atoms is not None else dyn.atoms

    @property
    def potential(self):
        return self.atoms.calc.potential

    @property
    def step(self) -> int:
        return int(self.dyn.nsteps)

    @property
    def time_fs(self) -> float:
        return float(self.dyn.nsteps * self.dyn.dt / units.FS)

    def output(self) -> Dict:
        calc = self.atoms.calc
        self.atoms.get_forces()             # results of the current positions (cached after a step)
        return calc.results

    def isolated_atoms(self) -> np.ndarray:
        from mlmd.guard import isolated_atoms
        calc = self.atoms.calc
        if hasattr(calc, "isolated"):
            self.atoms.get_forces()
            return calc.isolated
        return isolated_atoms(self.atoms.positions, self.atoms.cell.array, self.atoms.pbc, self.potential.cutoff)

    def frame(self):
        atoms = self.atoms.copy()
        atoms.calc = None
        return atoms

    def _rng(self):
        return getattr(self.dyn, "rng", None)

    def snapshot(self) -> Dict:
        rng = self._rng()
        state = None
        if rng is not None:
            state = copy.deepcopy(rng.bit_generator.state if hasattr(rng, "bit_generator") else rng.get_state())
        return {"positions": self.atoms.get_positions(), "momenta": self.atoms.get_momenta(),
                "cell": np.array(self.atoms.get_cell()), "rng": state, "step": self.step}

    def restore(self, snapshot: Dict) -> None:
        self.atoms.set_cell(snapshot["cell"])
        self.atoms.set_positions(snapshot["positions"], apply_constraint=False)
        self.atoms.set_momenta(snapshot["momenta"], apply_constraint=False)
        rng = self._rng()
        if rng is not None and snapshot["rng"] is not None:
            if hasattr(rng, "bit_generator"):
                rng.bit_generator.state = copy.deepcopy(snapshot["rng"])
            else:
                rng.set_state(copy.deepcopy(snapshot["rng"]))

    def reseed(self, seed: int) -> None:
        if getattr(self.dyn, "rng", None) is not None:
            self.dyn.rng = np.random.default_rng([int(seed), self.step])

    def swap(self, model) -> None:
        from mlmd.plugins.ase import MLMDCalculator
        calc = self.atoms.calc
        self.atoms.calc = MLMDCalculator(as_potential(model), skin=getattr(calc, "skin", 0.0))


class OpenMMHost:
    """An ``openmm.app.Simulation`` whose System holds the mlmd force (either path).

    The committee is evaluated on the ML region's positions (as the UncertaintyReporter does);
    a rollback sets positions, velocities and box back and reseeds the integrator's random
    stream (OpenMM cannot save and restore a stream's position).
    """

    name = "openmm"

    def __init__(self, simulation, model, topology_or_numbers=None, atoms: Optional[Sequence[int]] = None,
                 path: str = "auto"):
        from mlmd.plugins.openmm.python_force import _numbers_from

        self.simulation = simulation
        self._potential = as_potential(model)
        numbers, _ = _numbers_from(topology_or_numbers if topology_or_numbers is not None else simulation.topology)
        self.topology_or_numbers = topology_or_numbers
        self.indices = np.arange(len(numbers)) if atoms is None else np.asarray(atoms, dtype=np.int64)
        self.ml_atoms = None if atoms is None else list(atoms)
        self.numbers = numbers[self.indices]
        self.path = path
        self._state = None
        self._output = None

    @property
    def potential(self):
        return self._potential

    @property
    def step(self) -> int:
        return int(self.simulation.currentStep)

    @property
    def time_fs(self) -> float:
        from openmm import unit
        return float(self.simulation.context.getTime().value_in_unit(unit.femtosecond))

    def _current(self):
        from openmm import unit
        state = self.simulation.context.getState(getPositions=True, getVelocities=True)
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer) * units.NM_TO_ANGSTROM
        periodic = self.simulation.system.usesPeriodicBoundaryConditions()
        cell = np.zeros((3, 3))
        if periodic:
            cell = state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer) * units.NM_TO_ANGSTROM
        return state, positions, cell, periodic

    def output(self) -> Dict:
        _, positions, cell, periodic = self._current()
        self._output = self._potential.compute(positions[self.indices], self.numbers, cell, np.full(3, periodic))
        return self._output

    def isolated_atoms(self) -> np.ndarray:
        """ML-region indices of atoms without a neighbour within the cutoff."""
        from mlmd.guard import isolated_atoms
        _, positions, cell, periodic = self._current()
        return isolated_atoms(positions[self.indices], cell, np.full(3, periodic), self._potential.cutoff)

    def frame(self):
        import ase
        _, positions, cell, periodic = self._current()
        return ase.Atoms(numbers=self.numbers, positions=positions[self.indices], cell=cell,
                         pbc=np.full(3, periodic))

    def snapshot(self) -> Dict:
        state = self.simulation.context.getState(getPositions=True, getVelocities=True)
        return {"positions": state.getPositions(asNumpy=True), "velocities": state.getVelocities(asNumpy=True),
                "box": state.getPeriodicBoxVectors(), "step": self.step}

    def restore(self, snapshot: Dict) -> None:
        context = self.simulation.context
        context.setPeriodicBoxVectors(*snapshot["box"])
        context.setPositions(snapshot["positions"])
        context.setVelocities(snapshot["velocities"])

    def reseed(self, seed: int) -> None:
        integrator = self.simulation.integrator
        if hasattr(integrator, "setRandomNumberSeed"):
            integrator.setRandomNumberSeed(int(seed) + self.step)
            self.simulation.context.reinitialize(preserveState=True)

    def swap(self, model) -> None:
        from mlmd.plugins.openmm import swap_model
        self._potential = as_potential(model)
        swap_model(self.simulation, self._potential, self.topology_or_numbers, atoms=self.ml_atoms, path=self.path)
