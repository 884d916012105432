"""``mlmd.Simulation``: the internal engine's Python API (the ``mlmd run`` driver is built on it).

    sim = mlmd.Simulation(atoms, "systems/ethanol/ethanol_committee.pt",
                          integrator="langevin", timestep=0.5, temperature=300, seed=1)
    sim.attach(lambda s: print(s.state.step, s.temperature, s.uncertainty), interval=100)
    sim.run(10_000, progress=True)
    sim.save_checkpoint("run/checkpoint.npz")

Units: Å, fs, eV, amu, K; friction in 1/ps (OpenMM's convention), tau in fs.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .. import keys
from ..errors import InputError
from ..guard import MIN_DISTANCE, Guard
from ..potential import Potential, as_potential, local_frame
from .integrators import (Integrator, MDState, degrees_of_freedom, make_integrator,
                          maxwell_boltzmann, remove_com_motion, temperature)

CHECKPOINT_VERSION = 1


class ModelForces:
    """``compute(state)``: a :class:`Potential` on the state's positions, pairs from a Verlet list.

    Validation happens once here, so the per-step path is: Verlet-list update, numpy ->
    torch views, one module call, forces copied back into the float64 state.
    """

    def __init__(self, potential: Potential, numbers: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
                 skin: float = 1.0, min_distance: Optional[float] = MIN_DISTANCE, member: Optional[int] = None):
        from ..neighbors import VerletList

        potential.check_numbers(numbers)
        if member is not None and not (isinstance(member, (int, np.integer)) and
                                       0 <= int(member) < potential.committee_size and potential.committee_size > 1):
            raise InputError(f"member: give a committee member index in 0..{potential.committee_size - 1} "
                             f"(the model has {potential.committee_size}), got {member!r}")
        #: None: the committee mean drives the dynamics; m: member m alone (per-member segments)
        self.member = None if member is None else int(member)
        self.guard = Guard(numbers, min_distance, potential.cutoff, "engine")
        #: 1 while the integrator steps: compute() then sees the positions of state.step + 1
        self.step_offset = 0
        self.potential = potential
        self.module = potential.module
        self.dtype = potential.dtype
        self.device = torch.device(potential.device)
        self.neighbors = VerletList(potential.cutoff, skin)
        self.numbers = torch.as_tensor(np.asarray(numbers, dtype=np.int64), device=self.device)
        self.cell = torch.as_tensor(np.asarray(cell, dtype=np.float64), dtype=self.dtype, device=self.device)
        self.pbc = torch.as_tensor(np.asarray(pbc, dtype=bool), device=self.device)
        self.committee = potential.committee_size > 1
        self.output: Dict[str, torch.Tensor] = {}

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        # float64 stays float64: the module takes the edge differences before its own cast
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def __call__(self, state: MDState) -> None:
        edge_index, shifts = self.neighbors.update(state.positions, state.cell, state.pbc)
        where = lambda: f"step {state.step + self.step_offset}"   # noqa: E731 (formatted only when needed)
        self.guard.geometry(state.positions, edge_index, shifts, where)
        positions = state.positions
        if self.dtype != torch.float64:
            # the engine never wraps: float32 files that cast positions first need them near 0
            positions, shifts = local_frame(positions, state.cell, state.pbc, edge_index, shifts)
        out = self.module(self._tensor(positions), self.numbers, self.cell, self.pbc,
                          self._tensor(edge_index), self._tensor(shifts), False)
        if self.member is None:
            state.forces[...] = out[keys.FORCES].detach().cpu().numpy()
            state.potential_energy = float(out[keys.ENERGY].detach())
        else:
            state.forces[...] = out[keys.MEMBER_FORCES][self.member].detach().cpu().numpy()
            state.potential_energy = float(out[keys.MEMBER_ENERGIES][self.member].detach())
        self.output = out
        self.guard.outputs(state.potential_energy, state.forces, where)

    @property
    def isolated(self) -> np.ndarray:
        """Atoms without a neighbour within the cutoff in the last frame computed."""
        return self.guard.isolated

    @property
    def uncertainty(self) -> float:
        """The frame's calibrated committee uncertainty (eV/Å); NaN for a single model."""
        value = self.output.get(keys.UNCERTAINTY)
        return float("nan") if value is None else float(value.detach())


@dataclass
class Observer:
    callback: Callable[["Simulation"], Any]
    interval: int


class Simulation:
    """MD of one system with an mlmd model in the internal engine.

    atoms        ase.Atoms (or a structure file ASE/mdtraj reads); its masses are used,
                 its momenta too when non-zero and ``temperature`` is None, FixAtoms honoured
    model        model file path or :class:`mlmd.Potential`
    integrator   "verlet" (NVE), "langevin" (BAOAB, NVT) or "bussi" (NVT)
    timestep     fs;  temperature K (thermostat target and initial Maxwell-Boltzmann velocities)
    friction     Langevin gamma, 1/ps;  tau: Bussi relaxation time, fs
    seed         for the initial velocities and the thermostat noise
    skin         Verlet-list skin, Å (0: rebuild the list every step)
    fixed        indices (or a bool mask) of atoms that never move
    remove_com   hold the centre-of-mass momentum at zero (Langevin: every step)
    dtype        compute the model in "float32"/"float64" (default: the file's dtype)
    threads      torch CPU threads (default: one per 256 atoms, see :mod:`mlmd.threads`)
    min_distance two atoms closer than this stop the run: None, half the sum of their covalent
                 radii (H–H 0.31 Å, C–H 0.54 Å); a length in Å for every pair; 0, no check.
                 Non-finite energies or forces always stop it, atoms without a neighbour are
                 warned about (:mod:`mlmd.guard`)
    compiled     run the compiled form of a model file path (:mod:`mlmd.compiled`: compiles at
                 start, then faster steps; TorchScript with a warning where it cannot be built)
    member       drive the dynamics with one committee member's energy and forces (index from 0)
                 instead of the committee mean: per-member runs for observables' intervals when
                 reweighting one trajectory is not enough (:mod:`mlmd.observables`); σ is still
                 the whole committee's
    """

    def __init__(self, atoms, model: Union[str, os.PathLike, Potential], integrator: str = "verlet",
                 timestep: float = 0.5, temperature: Optional[float] = None, friction: float = 1.0,
                 tau: float = 100.0, seed: Optional[int] = None, skin: float = 1.0,
                 fixed: Optional[Sequence] = None, remove_com: bool = True, dtype: Optional[str] = None,
                 device: Optional[str] = None, threads: Optional[int] = None,
                 min_distance: Optional[float] = MIN_DISTANCE, compiled: bool = False,
                 member: Optional[int] = None):
        if isinstance(atoms, (str, os.PathLike)):
            from .io import read_structure
            atoms = read_structure(atoms)
        if not hasattr(atoms, "get_positions"):
            raise InputError(f"atoms: expected an ase.Atoms or a structure file, got {type(atoms).__name__}")
        if len(atoms) == 0:
            raise InputError("atoms: the structure has no atoms")
        from ..threads import apply_threads, check_threads

        check_threads(threads)
        potential = as_potential(model, device, dtype, compiled=compiled)
        if not isinstance(skin, (int, float)) or skin < 0:
            raise InputError(f"skin: must be a length >= 0 Å, got {skin!r}")
        self.atoms = atoms.copy()
        self.potential = potential
        self.integrator: Integrator = make_integrator(integrator, timestep, temperature, friction, tau, seed)
        fixed_mask = _fixed_mask(atoms, fixed)
        positions = atoms.get_positions()
        if not np.isfinite(positions).all():
            raise InputError("atoms: positions contain NaN or Inf")
        cell = np.asarray(atoms.get_cell(), dtype=np.float64)
        pbc = np.asarray(atoms.get_pbc(), dtype=bool)
        if pbc.any():
            from ..neighbors.cell_list import effective_cell
            effective_cell(cell, pbc)   # raises on zero or linearly dependent periodic vectors
        masses = atoms.get_masses()
        momenta = atoms.get_momenta()
        init_rng = np.random.default_rng(None if seed is None else [int(seed), 1])
        if temperature is not None:
            velocities = maxwell_boltzmann(masses, temperature, init_rng, fixed_mask)
        else:
            from .. import units
            velocities = momenta / masses[:, None] * units.FS   # ASE velocity unit -> Å/fs
        self.state = MDState(positions=positions, velocities=velocities, masses=masses,
                             numbers=atoms.get_atomic_numbers().astype(np.int64), cell=cell, pbc=pbc,
                             fixed=fixed_mask)
        self.remove_com = bool(remove_com)
        self.dof = degrees_of_freedom(fixed_mask, self.remove_com)
        self._com_every_step = self.remove_com and self.integrator.name == "langevin" and not fixed_mask.any()
        if self.remove_com and not fixed_mask.any():
            remove_com_motion(self.state)
            self.state.bath_energy = 0.0
        self.integrator.setup(self.state, self.dof)
        self.threads = apply_threads(threads, len(atoms))
        self.forces = ModelForces(potential, self.state.numbers, cell, pbc, skin, min_distance, member)
        self.forces(self.state)
        self.observers: List[Observer] = []
        self._initial_reported = False
        self.wall_time = 0.0   # seconds spent in run(), for ns/day
        self.steps_run = 0     # steps taken by this object (not counting a checkpoint's)

    # ---- observables ---------------------------------------------------------------------
    @property
    def kinetic_energy(self) -> float:
        return self.state.kinetic_energy

    @property
    def potential_energy(self) -> float:
        return self.state.potential_energy

    @property
    def total_energy(self) -> float:
        return self.state.potential_energy + self.state.kinetic_energy

    @property
    def conserved_energy(self) -> float:
        """E_pot + E_kin minus the energy the thermostat put in: constant up to integration error."""
        return self.total_energy - self.state.bath_energy

    @property
    def temperature(self) -> float:
        return temperature(self.state.kinetic_energy, self.dof)

    @property
    def uncertainty(self) -> float:
        return self.forces.uncertainty

    @property
    def neighbor_builds(self) -> int:
        return self.forces.neighbors.builds

    def get_atoms(self):
        """The current frame as ase.Atoms (positions, momenta, cell), a copy."""
        from .. import units
        atoms = self.atoms.copy()
        atoms.set_positions(self.state.positions)
        atoms.set_momenta(self.state.velocities * self.state.masses[:, None] / units.FS, apply_constraint=False)
        return atoms

    # ---- running -------------------------------------------------------------------------
    def attach(self, callback: Callable[["Simulation"], Any], interval: int = 1) -> None:
        """Call ``callback(simulation)`` every ``interval`` steps (and at step 0 of a fresh run)."""
        if not callable(callback):
            raise InputError("callback: must be callable as callback(simulation)")
        if not isinstance(interval, int) or interval < 1:
            raise InputError(f"interval: must be a positive number of steps, got {interval!r}")
        self.observers.append(Observer(callback, interval))

    def swap_model(self, model: Union[str, os.PathLike, Potential], dtype: Optional[str] = None) -> None:
        """Replace the model between steps (state, RNG and step count kept); forces recomputed.

        The new model computes in ``dtype``, by default the one this Simulation was asked for
        (a float64 run stays float64 when a float32 file is swapped in), else the file's own.
        """
        potential = as_potential(model, self.potential.device, dtype or self.potential.dtype_override,
                                 compiled=self.potential.compiled)
        previous = self.forces.neighbors
        min_distance = self.forces.guard.min_distance
        self.potential = potential
        self.forces = ModelForces(potential, self.state.numbers, self.state.cell, self.state.pbc, previous.skin,
                                  min_distance, self.forces.member)
        self.forces(self.state)
        self.forces.neighbors.builds += previous.builds   # the log's count goes on across swaps

    def run(self, steps: int, progress: bool = False) -> None:
        """Advance ``steps`` steps, calling the observers; ``progress`` shows a bar with ns/day."""
        if not isinstance(steps, (int, np.integer)) or steps < 0:
            raise InputError(f"steps: must be an integer >= 0, got {steps!r}")
        if not self._initial_reported and self.state.step == 0:
            for observer in self.observers:
                observer.callback(self)
        self._initial_reported = True
        bar = _progress_bar(steps) if progress else None
        # self.forces is looked up every step: an observer may swap the model
        state, integrator, observers = self.state, self.integrator, self.observers
        first_step = state.step - self.steps_run
        start = last = time.perf_counter()
        done_since = 0
        try:
            for _ in range(int(steps)):
                forces = self.forces
                forces.step_offset = 1
                integrator.step(state, forces)
                forces.step_offset = 0
                if self._com_every_step:
                    remove_com_motion(state)
                for observer in observers:
                    if state.step % observer.interval == 0:
                        observer.callback(self)
                if bar is not None:
                    done_since += 1
                    now = time.perf_counter()
                    if now - last > 0.5:
                        bar.update(done_since)
                        bar.set_postfix_str(_ns_per_day(now - start, bar.n, integrator.timestep))
                        done_since, last = 0, now
        finally:
            self.wall_time += time.perf_counter() - start
            self.steps_run = state.step - first_step
            if bar is not None:
                bar.update(done_since)
                bar.close()

    # ---- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, path: Union[str, os.PathLike], extra: Optional[Dict] = None) -> str:
        """Write everything an exact restart needs (atomic: a crash never leaves a torn file)."""
        s = self.state
        arrays = {"positions": s.positions, "velocities": s.velocities, "forces": s.forces,
                  "masses": s.masses, "numbers": s.numbers, "cell": s.cell, "pbc": s.pbc, "fixed": s.fixed}
        for name, value in self.forces.neighbors.state_dict().items():
            arrays["neighbors." + name] = np.asarray(value)
        meta = {"version": CHECKPOINT_VERSION, "step": s.step, "time": s.time,
                "potential_energy": s.potential_energy, "bath_energy": s.bath_energy,
                "integrator": self.integrator.describe(), "rng": self.integrator.rng_state(),
                "model": self.potential.path, "model_sha256": model_sha256(self.potential),
                "dof": self.dof, "neighbor_builds": self.neighbor_builds, "extra": extra or {}}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            # a full disk or a kill mid-write: the previous checkpoint stays, the torn copy goes
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: Union[str, os.PathLike], allow_model_change: bool = False) -> Dict:
        """Restore state, thermostat RNG and neighbour list from ``path``; returns its ``extra``.

        A checkpoint written with another model file (by SHA-256) is refused: the energy would
        jump at the restart.  ``allow_model_change`` continues with this Simulation's model.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"checkpoint: file {path!r} does not exist; run without restart first")
        with np.load(path) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            arrays = {name: data[name] for name in data.files if name != "meta"}
        s = self.state
        if not np.array_equal(arrays["numbers"], s.numbers):
            raise InputError(f"checkpoint: {path!r} holds a different system ({len(arrays['numbers'])} atoms) "
                             "than the structure given; use the structure the run started from")
        theirs_sha, ours_sha = meta.get("model_sha256"), model_sha256(self.potential)
        if theirs_sha and ours_sha and theirs_sha != ours_sha and not allow_model_change:
            raise InputError(f"checkpoint: {path!r} was written with the model file {meta.get('model')!r} "
                             f"(SHA-256 {theirs_sha[:12]}...), this run uses {self.potential.path!r} "
                             f"(SHA-256 {ours_sha[:12]}...): the energy would jump at the restart. Restart "
                             "with the same model file, or allow the change (mlmd run --allow-model-change, "
                             "Simulation.load_checkpoint(..., allow_model_change=True))")
        theirs = meta["integrator"]
        if theirs != self.integrator.describe():
            raise InputError(f"checkpoint: {path!r} was written by {theirs}, this run uses "
                             f"{self.integrator.describe()}; restart with the same integrator settings")
        for name in ("positions", "velocities", "forces", "cell", "pbc"):
            setattr(s, name, np.ascontiguousarray(arrays[name]))
        s.step, s.time = int(meta["step"]), float(meta["time"])
        s.potential_energy, s.bath_energy = float(meta["potential_energy"]), float(meta["bath_energy"])
        self.integrator.set_rng_state(meta["rng"])
        self.forces.neighbors.load_state_dict(
            {name[len("neighbors."):]: value for name, value in arrays.items() if name.startswith("neighbors.")})
        self.forces.neighbors.builds = int(meta["neighbor_builds"])
        self._initial_reported = True
        return meta.get("extra", {})


_SHA_CACHE: Dict[tuple, str] = {}


def model_sha256(potential: Union[Potential, str]) -> str:
    """SHA-256 of a model file or of a potential's file ("" for an in-memory Potential or a
    missing file), cached by path, size and modification time."""
    path = potential if isinstance(potential, str) else getattr(potential, "path", "")
    if not path or not os.path.isfile(path):
        return ""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        import hashlib
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _fixed_mask(atoms, fixed) -> np.ndarray:
    mask = np.zeros(len(atoms), dtype=bool)
    for constraint in getattr(atoms, "constraints", []):
        if type(constraint).__name__ == "FixAtoms":
            mask[constraint.index] = True
    if fixed is not None:
        fixed = np.asarray(fixed)
        if fixed.dtype == bool:
            if fixed.shape != (len(atoms),):
                raise InputError(f"fixed: a bool mask needs {len(atoms)} entries, got {fixed.shape}")
            mask |= fixed
        else:
            if fixed.size and (fixed.min() < 0 or fixed.max() >= len(atoms)):
                raise InputError(f"fixed: atom indices must be in 0..{len(atoms) - 1}")
            mask[fixed.astype(int)] = True
    return mask


def _ns_per_day(seconds: float, steps: int, timestep_fs: float) -> str:
    if seconds <= 0 or steps == 0:
        return ""
    return f"{steps * timestep_fs * 1e-6 / seconds * 86400:.3g} ns/day"


def _progress_bar(total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.5)
