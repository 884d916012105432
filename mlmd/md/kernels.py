"""Numba kernels of the MD engine: arrays and scalars in, arrays updated in place.

Units: positions Å, velocities Å/fs, forces eV/Å, time fs.  ``accel`` [N] is the
per-atom factor turning a force into an acceleration (FORCE_OVER_MASS/m, 0 for fixed
atoms) and ``kin_mass`` [N] the factor turning v^2 into kinetic energy
(m * AMU_ANGSTROM2_PER_FS2_TO_EV / 2, 0 for fixed atoms), so that fixed atoms never move
without any branch in the hot loop.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def kick(velocities, forces, accel, dt):
    """B: v <- v + dt * F / m."""
    for i in range(velocities.shape[0]):
        a = dt * accel[i]
        for k in range(3):
            velocities[i, k] += a * forces[i, k]


@njit(cache=True)
def kick_drift(positions, velocities, forces, accel, dt):
    """Velocity Verlet's first half: v <- v + dt/2 F/m;  x <- x + dt v."""
    half = 0.5 * dt
    for i in range(positions.shape[0]):
        a = half * accel[i]
        for k in range(3):
            v = velocities[i, k] + a * forces[i, k]
            velocities[i, k] = v
            positions[i, k] += dt * v


@njit(cache=True)
def kick_drift_ou_drift(positions, velocities, forces, accel, kin_mass, dt, c1, sigma, noise):
    """BAOAB up to the force call: B(dt/2) A(dt/2) O(dt) A(dt/2).

    O is the exact Ornstein-Uhlenbeck step v <- c1 v + sigma_i xi with c1 = exp(-gamma dt),
    sigma_i = sqrt((1 - c1^2) kT / m_i) (Å/fs) and xi ~ N(0, 1) given in ``noise`` [N,3].
    Returns the kinetic energy the O step added (eV), the heat exchanged with the bath.
    """
    half = 0.5 * dt
    heat = 0.0
    for i in range(positions.shape[0]):
        a = half * accel[i]
        for k in range(3):
            v = velocities[i, k] + a * forces[i, k]
            x = positions[i, k] + half * v
            v_new = c1 * v + sigma[i] * noise[i, k]
            heat += kin_mass[i] * (v_new * v_new - v * v)
            velocities[i, k] = v_new
            positions[i, k] = x + half * v_new
    return heat


@njit(cache=True)
def kinetic_energy(velocities, kin_mass):
    """K = sum_i m_i |v_i|^2 / 2 in eV."""
    total = 0.0
    for i in range(velocities.shape[0]):
        total += kin_mass[i] * (velocities[i, 0] ** 2 + velocities[i, 1] ** 2 + velocities[i, 2] ** 2)
    return total


@njit(cache=True)
def scale_velocities(velocities, factor):
    for i in range(velocities.shape[0]):
        for k in range(3):
            velocities[i, k] *= factor


@njit(cache=True)
def remove_com_velocity(velocities, masses, movable):
    """Subtract the mass-weighted mean velocity of the movable atoms.

    Returns the kinetic energy removed, M |v_cm|^2 / 2, in amu Å^2/fs^2.
    """
    total_mass = 0.0
    p = np.zeros(3)
    for i in range(velocities.shape[0]):
        if movable[i]:
            total_mass += masses[i]
            for k in range(3):
                p[k] += masses[i] * velocities[i, k]
    if total_mass == 0.0:
        return 0.0
    removed = 0.0
    for k in range(3):
        vcm = p[k] / total_mass
        removed += 0.5 * total_mass * vcm * vcm
        for i in range(velocities.shape[0]):
            if movable[i]:
                velocities[i, k] -= vcm
    return removed
