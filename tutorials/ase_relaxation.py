"""ASE with an mlmd model: relax a molecule, relax a crystal's cell, watch σ during ASE dynamics.

mlmd's calculator is an ordinary ASE calculator (``mlmd.plugins.ase.MLMDCalculator``), so the
lines that matter are the ones marked "mlmd:"; the rest is plain ASE.

1. ethanol (GFN2-xTB committee): BFGS and FIRE from a rattled structure.
2. fcc copper (EMT committee): FrechetCellFilter + BFGS relax positions and cell; the lattice
   constant is compared with EMT's own, relaxed the same way.
3. ASE Langevin of the copper crystal at 600 K; the committee's force uncertainty σ, which the
   calculator leaves in ``calc.results``, is printed and written to CSV as the run goes.

    python tutorials/ase_relaxation.py --steps 400 --out runs/ase
"""
import argparse
import csv
import os

import numpy as np
import ase.io
from ase import units
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.optimize import BFGS, FIRE

from mlmd.plugins.ase import MLMDCalculator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETHANOL = os.path.join(ROOT, "systems", "ethanol")
COPPER = os.path.join(ROOT, "systems", "copper")


def lattice_constant(atoms) -> float:
    """Cubic lattice constant (Å) of an fcc crystal from its volume per atom."""
    return float(np.cbrt(4.0 * atoms.get_volume() / len(atoms)))


def relax_cell(calculator, a_start: float = 3.65, fmax: float = 1e-4) -> float:
    atoms = bulk("Cu", "fcc", a=a_start, cubic=True)
    atoms.calc = calculator
    BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=fmax, steps=300)
    return lattice_constant(atoms)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="Langevin steps of part 3")
    parser.add_argument("--out", default=os.path.join("runs", "ase"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    result = {}

    # 1. ethanol: two optimisers from the same rattled start
    minima = {}
    for name, optimizer in (("BFGS", BFGS), ("FIRE", FIRE)):
        atoms = ase.io.read(os.path.join(ETHANOL, "ethanol.xyz"))
        atoms.rattle(0.1, seed=1)
        atoms.calc = MLMDCalculator(os.path.join(ETHANOL, "ethanol_committee.pt"))   # mlmd:
        opt = optimizer(atoms, logfile=None)
        opt.run(fmax=0.01, steps=1000)
        minima[name] = atoms
        fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
        print(f"ethanol {name}: E = {atoms.get_potential_energy():.4f} eV after {opt.nsteps} steps, "
              f"max |F| {fmax:.4f} eV/Å")
        result[f"ethanol_{name.lower()}_fmax"] = fmax
        result[f"ethanol_{name.lower()}_energy"] = float(atoms.get_potential_energy())

    # 2. copper: cell and positions with the committee, and with EMT for reference
    copper_model = os.path.join(COPPER, "copper_committee.pt")
    a_model = relax_cell(MLMDCalculator(copper_model))                                # mlmd:
    a_emt = relax_cell(EMT())
    error = (a_model - a_emt) / a_emt
    print(f"Cu lattice constant: mlmd {a_model:.4f} Å, EMT {a_emt:.4f} Å ({100 * error:+.3f} %)")
    result.update(a_model=a_model, a_emt=a_emt, a_relative_error=error)

    # 3. ASE Langevin of a 108-atom crystal at 600 K, σ from calc.results every 20 steps
    atoms = bulk("Cu", "fcc", a=a_model, cubic=True).repeat((3, 3, 3))
    atoms.calc = MLMDCalculator(copper_model)                                           # mlmd:
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    dyn = Langevin(atoms, 2.0 * units.fs, temperature_K=600, friction=0.02 / units.fs,
                   rng=np.random.default_rng(1))
    path = os.path.join(args.out, "uncertainty.csv")
    rows = []

    def report():
        results = atoms.calc.results                                                    # mlmd:
        rows.append({"step": dyn.nsteps, "temperature_K": atoms.get_temperature(),
                     "energy_eV": results["energy"], "energy_std_eV": results["energy_std"],
                     "sigma_F_max_eV_per_A": results["uncertainty"]})
        if dyn.nsteps % 100 == 0:
            print(f"step {dyn.nsteps:5d}  T {rows[-1]['temperature_K']:6.1f} K  "
                  f"σ_F max {rows[-1]['sigma_F_max_eV_per_A']:.4f} eV/Å")

    dyn.attach(report, interval=20)
    dyn.run(args.steps)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sigmas = np.array([row["sigma_F_max_eV_per_A"] for row in rows])
    print(f"σ_F max over the run: mean {sigmas.mean():.4f}, max {sigmas.max():.4f} eV/Å -> {path}")
    result.update(sigmas=sigmas, temperatures=np.array([row["temperature_K"] for row in rows]),
                  uncertainty_csv=path)
    return result


if __name__ == "__main__":
    main()
