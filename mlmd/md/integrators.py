"""Integrators as plain step functions over an :class:`MDState` (jax-md's ``simulate`` style).

Every integrator has ``step(state, compute)`` where ``compute(state)`` writes the forces
(eV/Å) and potential energy (eV) of ``state.positions`` into the state.  Positions and
velocities are float64 whatever the model's dtype.  Units: Å, fs, eV, amu, K.

``state.bath_energy`` accumulates the energy the thermostat (and centre-of-mass removal)
put into the system, so ``E_pot + E_kin - bath_energy`` is conserved by every integrator
up to discretisation error: the quantity the log reports as ``conserved``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np

from .. import units
from ..errors import InputError
from . import kernels


@dataclass
class MDState:
    """One MD configuration.  Arrays are float64 and updated in place by the kernels.

    positions [N,3] Å (never wrapped: neighbour shifts stay valid), velocities [N,3] Å/fs,
    forces [N,3] eV/Å, masses [N] amu, numbers [N], cell [3,3] Å (rows), pbc [3] bool,
    fixed [N] bool (atoms that never move), potential_energy eV, time fs.
    """

    positions: np.ndarray
    velocities: np.ndarray
    masses: np.ndarray
    numbers: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    fixed: np.ndarray
    forces: Optional[np.ndarray] = None
    potential_energy: float = float("nan")
    step: int = 0
    time: float = 0.0
    bath_energy: float = 0.0
    accel: np.ndarray = field(init=False, repr=False)      # [N] (Å/fs^2)/(eV/Å), 0 if fixed
    kin_mass: np.ndarray = field(init=False, repr=False)   # [N] eV/(Å/fs)^2, 0 if fixed

    def __post_init__(self):
        self.positions = np.ascontiguousarray(self.positions, dtype=np.float64)
        self.velocities = np.ascontiguousarray(self.velocities, dtype=np.float64)
        self.masses = np.ascontiguousarray(self.masses, dtype=np.float64)
        self.fixed = np.ascontiguousarray(self.fixed, dtype=bool)
        if self.forces is None:
            self.forces = np.zeros_like(self.positions)
        movable = ~self.fixed
        self.accel = np.where(movable, units.FORCE_OVER_MASS_TO_ANGSTROM_PER_FS2 / self.masses, 0.0)
        self.kin_mass = np.where(movable, 0.5 * self.masses * units.AMU_ANGSTROM2_PER_FS2_TO_EV, 0.0)
        self.velocities[self.fixed] = 0.0

    @property
    def kinetic_energy(self) -> float:
        """eV."""
        return float(kernels.kinetic_energy(self.velocities, self.kin_mass))


def degrees_of_freedom(fixed: np.ndarray, remove_com: bool) -> int:
    """3 per movable atom, minus 3 when the centre-of-mass momentum is held at zero."""
    movable = int(np.count_nonzero(~np.asarray(fixed)))
    dof = 3 * movable - (3 if remove_com and movable == len(fixed) and movable > 1 else 0)
    return max(dof, 1)


def temperature(kinetic_energy: float, dof: int) -> float:
    """T = 2 K / (N_f k_B) in K."""
    return 2.0 * kinetic_energy / (dof * units.BOLTZMANN_EV_PER_K)


def maxwell_boltzmann(masses: np.ndarray, temperature_K: float, rng: np.random.Generator,
                      fixed: Optional[np.ndarray] = None) -> np.ndarray:
    """Velocities [N,3] Å/fs drawn from the Maxwell-Boltzmann distribution at ``temperature_K``."""
    masses = np.asarray(masses, dtype=np.float64)
    scale = np.sqrt(units.BOLTZMANN_EV_PER_K * temperature_K * units.FORCE_OVER_MASS_TO_ANGSTROM_PER_FS2
                    / masses)
    velocities = rng.standard_normal((len(masses), 3)) * scale[:, None]
    if fixed is not None:
        velocities[np.asarray(fixed, dtype=bool)] = 0.0
    return velocities


def remove_com_motion(state: MDState) -> None:
    """Zero the centre-of-mass velocity of the movable atoms, booking the removed energy."""
    removed = kernels.remove_com_velocity(state.velocities, state.masses, ~state.fixed)
    state.bath_energy -= removed * units.AMU_ANGSTROM2_PER_FS2_TO_EV


class Integrator:
    """Base: a timestep (fs) and, for stochastic ones, a seeded NumPy generator."""

    name = "integrator"
    stochastic = False

    def __init__(self, timestep: float, seed: Optional[int] = None):
        if not (isinstance(timestep, (int, float)) and math.isfinite(timestep) and timestep > 0):
            raise InputError(f"timestep: must be a positive number of fs, got {timestep!r}")
        self.timestep = float(timestep)
        self.rng = np.random.default_rng(seed)

    def setup(self, state: MDState, dof: int) -> None:
        """Precompute what depends on the masses and degrees of freedom."""

    def step(self, state: MDState, compute: Callable[[MDState], None]) -> None:
        raise NotImplementedError

    def rng_state(self) -> Dict:
        return self.rng.bit_generator.state

    def set_rng_state(self, rng_state: Dict) -> None:
        self.rng.bit_generator.state = rng_state

    def describe(self) -> Dict:
        return {"integrator": self.name, "timestep": self.timestep}


class VelocityVerlet(Integrator):
    """NVE velocity Verlet (symplectic, time reversible, second order):

        v(t + dt/2) = v(t) + dt/2 F(x(t))/m
        x(t + dt)   = x(t) + dt v(t + dt/2)
        v(t + dt)   = v(t + dt/2) + dt/2 F(x(t + dt))/m
    """

    name = "verlet"

    def step(self, state, compute):
        dt = self.timestep
        kernels.kick_drift(state.positions, state.velocities, state.forces, state.accel, dt)
        compute(state)
        kernels.kick(state.velocities, state.forces, state.accel, 0.5 * dt)
        state.step += 1
        state.time += dt


class LangevinBAOAB(Integrator):
    """NVT Langevin dynamics, BAOAB splitting (Leimkuhler & Matthews 2013):

        B: v += dt/2 F/m     A: x += dt/2 v     O: v = c1 v + sqrt((1 - c1^2) kT/m) xi
        A: x += dt/2 v       (force)            B: v += dt/2 F/m
    with c1 = exp(-gamma dt), xi ~ N(0, 1).  Configurational sampling is exact to O(dt^2)
    and very accurate at large dt.  ``friction`` gamma in 1/ps (OpenMM's convention).
    """

    name = "langevin"
    stochastic = True

    def __init__(self, timestep: float, temperature: float, friction: float = 1.0,
                 seed: Optional[int] = None):
        super().__init__(timestep, seed)
        self.temperature = _positive("temperature", temperature, "K")
        self.friction = _positive("friction", friction, "1/ps")
        self.c1 = math.exp(-self.friction * 1e-3 * self.timestep)

    def setup(self, state, dof):
        kt = units.BOLTZMANN_EV_PER_K * self.temperature
        self.sigma = np.sqrt((1.0 - self.c1 ** 2) * kt * state.accel)   # accel is 0 for fixed atoms
        self.noise = np.empty_like(state.positions)

    def step(self, state, compute):
        dt = self.timestep
        self.rng.standard_normal(out=self.noise)
        heat = kernels.kick_drift_ou_drift(state.positions, state.velocities, state.forces, state.accel,
                                           state.kin_mass, dt, self.c1, self.sigma, self.noise)
        state.bath_energy += heat
        compute(state)
        kernels.kick(state.velocities, state.forces, state.accel, 0.5 * dt)
        state.step += 1
        state.time += dt

    def describe(self):
        return {**super().describe(), "temperature": self.temperature, "friction": self.friction}


class Bussi(VelocityVerlet):
    """NVT by stochastic velocity rescaling (Bussi, Donadio & Parrinello, JCP 126, 014101 (2007)).

    A thermostat half step of length dt/2 around each velocity-Verlet step rescales all
    velocities by alpha = sqrt(K'/K), where K' is drawn from the exact solution of

        dK = (K_0 - K) dt/tau + 2 sqrt(K K_0 / N_f) dW / sqrt(tau),   K_0 = N_f kT / 2:
        K' = c K + (1 - c) K_0 / N_f (R_1^2 + sum_{i=2}^{N_f} R_i^2) + 2 R_1 sqrt(c (1-c) K K_0 / N_f)
    with c = exp(-dt / (2 tau)).  It samples the canonical ensemble and keeps the dynamics
    nearly Newtonian.  ``tau`` in fs.
    """

    name = "bussi"
    stochastic = True

    def __init__(self, timestep: float, temperature: float, tau: float = 100.0,
                 seed: Optional[int] = None):
        super().__init__(timestep, seed)
        self.temperature = _positive("temperature", temperature, "K")
        self.tau = _positive("tau", tau, "fs")
        self.c = math.exp(-0.5 * self.timestep / self.tau)

    def setup(self, state, dof):
        self.dof = int(dof)
        self.target = 0.5 * dof * units.BOLTZMANN_EV_PER_K * self.temperature

    def _thermostat(self, state):
        kinetic = kernels.kinetic_energy(state.velocities, state.kin_mass)
        if kinetic <= 0.0:
            return
        r1 = self.rng.standard_normal()
        rest = self.rng.chisquare(self.dof - 1) if self.dof > 1 else 0.0
        c, per_dof = self.c, self.target / self.dof
        new = (c * kinetic + (1.0 - c) * per_dof * (r1 * r1 + rest)
               + 2.0 * r1 * math.sqrt(c * (1.0 - c) * kinetic * per_dof))
        kernels.scale_velocities(state.velocities, math.sqrt(max(new, 0.0) / kinetic))
        state.bath_energy += new - kinetic

    def step(self, state, compute):
        self._thermostat(state)
        super().step(state, compute)
        self._thermostat(state)

    def describe(self):
        return {**super().describe(), "temperature": self.temperature, "tau": self.tau}


INTEGRATORS = {"verlet": VelocityVerlet, "langevin": LangevinBAOAB, "bussi": Bussi}


def make_integrator(name: str, timestep: float, temperature: Optional[float] = None,
                    friction: float = 1.0, tau: float = 100.0, seed: Optional[int] = None) -> Integrator:
    """Build an integrator by name: verlet (NVE), langevin (BAOAB, NVT), bussi (NVT)."""
    if name not in INTEGRATORS:
        raise InputError(f"integrator: expected one of {sorted(INTEGRATORS)}, got {name!r}")
    if name == "verlet":
        return VelocityVerlet(timestep, seed)
    if temperature is None:
        raise InputError(f"temperature: the {name} integrator needs a temperature in K")
    if name == "langevin":
        return LangevinBAOAB(timestep, temperature, friction, seed)
    return Bussi(timestep, temperature, tau, seed)


def _positive(name: str, value, unit: str) -> float:
    """``value`` as a float, or InputError naming ``name`` unless it is a finite number > 0."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0):
        raise InputError(f"{name}: must be a positive number ({unit}), got {value!r}")
    return float(value)
