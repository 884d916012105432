"""How systems/copper/data.extxyz was made: fcc copper labelled by ASE's EMT.

32 atoms (2x2x2 conventional cells).  Each sample takes the EMT-relaxed lattice, applies a
random symmetric strain (normal strains up to +-4 %, shear up to +-2 %), runs a short Langevin
MD at a temperature drawn from 300-1200 K with EMT, and labels frames along the way with
energy, forces and stress.  A set of unstrained, unrattled lattices scaled from -3 % to +3 %
adds the equation of state itself.  Run: .venv/bin/python systems/copper/make_data.py
"""
import os
import sys

import numpy as np
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.optimize import BFGS
from tqdm.auto import tqdm

from mlmd import keys
from mlmd.models.data import append_frames, label_frame

HERE = os.path.dirname(os.path.abspath(__file__))


def emt_lattice_constant() -> float:
    """EMT's own relaxed fcc lattice constant (Å): FrechetCellFilter + BFGS on the unit cell."""
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = EMT()
    BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-5, steps=200)
    return float(np.cbrt(atoms.get_volume() / len(atoms) * 4))


def main(out: str = os.path.join(HERE, "data.extxyz"), samples: int = 110, frames_per_sample: int = 5,
         seed: int = 0) -> str:
    if os.path.exists(out):
        sys.exit(f"out: {out} already exists; move it away first (labels are never overwritten)")
    rng = np.random.default_rng(seed)
    a0 = emt_lattice_constant()
    reference = bulk("Cu", "fcc", a=a0, cubic=True).repeat((2, 2, 2))
    calc = EMT()
    for scale in np.linspace(-0.03, 0.03, 13):                    # the equation of state
        atoms = reference.copy()
        atoms.set_cell(atoms.cell * (1 + scale), scale_atoms=True)
        atoms.calc = calc
        append_frames(out, [label_frame(atoms, calc, {keys.DATA_ORACLE: "emt", "strain": float(scale)})])
    for _ in tqdm(range(samples), desc="EMT MD of strained Cu", unit="sample"):
        strain = np.diag(rng.uniform(-0.04, 0.04, 3))
        shear = rng.uniform(-0.02, 0.02, 3)
        strain[0, 1] = strain[1, 0] = shear[0]
        strain[0, 2] = strain[2, 0] = shear[1]
        strain[1, 2] = strain[2, 1] = shear[2]
        temperature = float(rng.uniform(300.0, 1200.0))
        atoms = reference.copy()
        atoms.set_cell(atoms.cell @ (np.eye(3) + strain), scale_atoms=True)
        atoms.calc = calc
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        dyn = Langevin(atoms, 2.0 * units.fs, temperature_K=temperature, friction=0.02 / units.fs, rng=rng)
        dyn.run(100)
        for index in range(frames_per_sample):
            dyn.run(25)
            append_frames(out, [label_frame(atoms, calc, {
                keys.DATA_ORACLE: "emt", keys.DATA_TEMPERATURE: temperature,
                keys.DATA_STEP: 100 + 25 * (index + 1)})])
    print(f"EMT lattice constant {a0:.5f} Å; wrote {out}")
    return out


if __name__ == "__main__":
    main()
