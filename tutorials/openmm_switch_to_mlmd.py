"""An ordinary OpenMM script, switched from a force field to an mlmd model.

The script below is what an OpenMM user already has: alanine dipeptide in vacuum, amber14,
Langevin dynamics, the usual reporters.  Switching it to the shipped mlmd committee (trained on
GFN2-xTB) changes the lines marked "mlmd:" and nothing else: the System comes from openmm-ml's
``MLPotential("mlmd", modelPath=...)`` instead of ``ForceField.createSystem``; the topology,
integrator, Simulation, minimizer and reporters are untouched.  One more reporter writes the
committee's force uncertainty σ, which a force field cannot give.

Both runs start from the same structure and seed; printed side by side: the potential energy
reported by OpenMM, the temperature, and the largest bond-length change.  The mlmd energy that
OpenMM reports is checked against mlmd's own evaluation of the same positions.

    python tutorials/openmm_switch_to_mlmd.py --steps 2000 --out runs/openmm_switch
"""
import argparse
import csv
import os

import numpy as np
import torch  # noqa: F401  (import torch before openmmtorch, which openmm-ml may load)
import openmm
from openmm import app, unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = os.path.join(ROOT, "systems", "alanine_dipeptide")


def simulate(topology, positions, system, steps: int, out: str, platform: str, extra_reporters=()):
    """The unchanged part of the script: Langevin at 300 K, 1 fs, minimise, run, report."""
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1.0 / unit.picosecond, 1.0 * unit.femtosecond)
    integrator.setRandomNumberSeed(1)
    simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName(platform))
    simulation.context.setPositions(positions)
    simulation.minimizeEnergy(maxIterations=200)
    simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)
    interval = max(1, min(100, steps // 10))
    simulation.reporters.append(app.StateDataReporter(os.path.join(out, "state.csv"), interval, step=True,
                                                      potentialEnergy=True, temperature=True, speed=True))
    simulation.reporters.append(app.DCDReporter(os.path.join(out, "trajectory.dcd"), interval))
    simulation.reporters.extend(reporter(interval) for reporter in extra_reporters)
    start = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
    simulation.step(steps)
    end = simulation.context.getState(getPositions=True, getEnergy=True)
    for reporter in simulation.reporters:
        if hasattr(reporter, "close"):
            reporter.close()
    bonds = [(a.index, b.index) for a, b in topology.bonds()]

    def lengths(pos):
        pos = np.asarray(pos.value_in_unit(unit.angstrom))
        return np.linalg.norm(pos[[i for i, _ in bonds]] - pos[[j for _, j in bonds]], axis=1)

    with open(os.path.join(out, "state.csv")) as handle:
        rows = list(csv.DictReader(handle))
    return {"energy_kj_mol": end.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            "temperature_K": float(np.mean([float(r["Temperature (K)"]) for r in rows[len(rows) // 2:]])),
            "max_bond_change_A": float(np.abs(lengths(end.getPositions(asNumpy=True)) - lengths(start)).max()),
            "positions_nm": np.asarray(end.getPositions(asNumpy=True).value_in_unit(unit.nanometer))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(SYSTEM, "alanine_dipeptide_committee.pt"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default=os.path.join("runs", "openmm_switch"))
    parser.add_argument("--platform", default="CPU")
    args = parser.parse_args(argv)

    pdb = app.PDBFile(os.path.join(SYSTEM, "alanine_dipeptide.pdb"))

    # before: the force field
    forcefield = app.ForceField("amber14-all.xml")
    mm_system = forcefield.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    os.makedirs(os.path.join(args.out, "amber14"), exist_ok=True)
    mm = simulate(pdb.topology, pdb.positions, mm_system, args.steps, os.path.join(args.out, "amber14"),
                  args.platform)

    # mlmd: after: the same topology, the System from the mlmd committee through openmm-ml
    from openmmml import MLPotential
    ml_system = MLPotential("mlmd", modelPath=args.model).createSystem(pdb.topology)

    # mlmd: an optional reporter of the committee's force uncertainty σ (eV/Å)
    from mlmd.plugins.openmm import UncertaintyReporter
    sigma_csv = os.path.join(args.out, "mlmd", "uncertainty.csv")
    os.makedirs(os.path.dirname(sigma_csv), exist_ok=True)
    ml = simulate(pdb.topology, pdb.positions, ml_system, args.steps, os.path.join(args.out, "mlmd"),
                  args.platform, extra_reporters=[lambda n: UncertaintyReporter(sigma_csv, n, args.model,
                                                                                pdb.topology)])

    # the energy OpenMM reported is the model's: evaluate the final positions with mlmd directly
    import mlmd
    from ase import Atoms
    from mlmd.units import EV_TO_KJ_PER_MOL
    numbers = [atom.element.atomic_number for atom in pdb.topology.atoms()]
    direct = mlmd.load(args.model).compute_atoms(Atoms(numbers=numbers, positions=ml["positions_nm"] * 10.0))
    direct_kj_mol = float(direct["energy"]) * EV_TO_KJ_PER_MOL
    with open(sigma_csv) as handle:
        sigmas = [float(row["uncertainty_eV_per_A"]) for row in csv.DictReader(handle)]

    print(f"alanine dipeptide in vacuum, {args.steps} steps of Langevin at 300 K, 1 fs")
    print(f"{'':<10}{'energy (kJ/mol)':>17}{'<T> (K)':>10}{'max bond change (Å)':>22}")
    for name, run in (("amber14", mm), ("mlmd", ml)):
        print(f"{name:<10}{run['energy_kj_mol']:>17.1f}{run['temperature_K']:>10.1f}{run['max_bond_change_A']:>22.3f}")
    print(f"mlmd energy evaluated directly: {direct_kj_mol:.1f} kJ/mol; committee σ_F over the run "
          f"{min(sigmas):.3f} – {max(sigmas):.3f} eV/Å")
    return {"amber14": mm, "mlmd": ml, "mlmd_direct_kj_mol": direct_kj_mol, "sigmas": np.array(sigmas)}


if __name__ == "__main__":
    main()
