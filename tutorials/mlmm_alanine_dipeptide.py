"""ML/MM with openmm-ml: alanine dipeptide (ML, an mlmd committee) in TIP3P water (amber14).

The few lines that change in an ordinary OpenMM script are marked "mlmd:". Everything
else is the usual OpenMM app layer: the MM system comes from the force field, and
openmm-ml's createMixedSystem replaces the peptide's internal MM terms with the mlmd model.
While it runs, the committee's force uncertainty on the peptide is written every 50 steps.

    python tutorials/mlmm_alanine_dipeptide.py --steps 1000 --out runs/mlmm
"""
import argparse
import os

import numpy as np
import torch  # noqa: F401  (import torch before openmmtorch, which openmm-ml may load)
import openmm
from openmm import app, unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = os.path.join(ROOT, "systems", "alanine_dipeptide")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(SYSTEM, "alanine_dipeptide_committee.pt"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default=os.path.join("runs", "mlmm"))
    parser.add_argument("--platform", default="CPU")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    pdb = app.PDBFile(os.path.join(SYSTEM, "alanine_dipeptide.pdb"))
    forcefield = app.ForceField("amber14-all.xml", "amber14/tip3p.xml")
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addSolvent(forcefield, padding=1.0 * unit.nanometer, model="tip3p")
    mm_system = forcefield.createSystem(modeller.topology, nonbondedMethod=app.PME,
                                        nonbondedCutoff=0.9 * unit.nanometer, constraints=app.HBonds)
    peptide = [atom.index for atom in modeller.topology.atoms() if atom.residue.name != "HOH"]

    # mlmd: the peptide is computed by the mlmd committee, its MM internal terms removed
    from openmmml import MLPotential
    potential = MLPotential("mlmd", modelPath=args.model)
    system = potential.createMixedSystem(modeller.topology, mm_system, peptide)

    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1.0 / unit.picosecond,
                                                 1.0 * unit.femtosecond)
    simulation = app.Simulation(modeller.topology, system, integrator,
                                openmm.Platform.getPlatformByName(args.platform))
    simulation.context.setPositions(modeller.positions)
    simulation.minimizeEnergy(maxIterations=200)
    simulation.context.setVelocitiesToTemperature(300 * unit.kelvin, 1)

    # mlmd: the committee's disagreement on the peptide, every 50 steps
    from mlmd.plugins.openmm import UncertaintyReporter
    sigma = UncertaintyReporter(os.path.join(args.out, "uncertainty.csv"), min(50, args.steps), args.model,
                                modeller.topology, atoms=peptide)
    simulation.reporters += [
        app.StateDataReporter(os.path.join(args.out, "state.csv"), 50, step=True, potentialEnergy=True,
                              temperature=True, speed=True),
        app.DCDReporter(os.path.join(args.out, "trajectory.dcd"), 100),
        sigma,
    ]
    start = simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
    simulation.step(args.steps)
    sigma.close()

    end = simulation.context.getState(getPositions=True, getEnergy=True)
    bonds = [(a.index, b.index) for a, b in modeller.topology.bonds() if a.index in peptide and b.index in peptide]
    def lengths(pos):
        pos = np.asarray(pos.value_in_unit(unit.angstrom))
        return np.array([np.linalg.norm(pos[i] - pos[j]) for i, j in bonds])
    worst = float(np.abs(lengths(end.getPositions(asNumpy=True)) - lengths(start)).max())
    energy = end.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    print(f"{args.steps} steps of ML/MM ({len(peptide)} ML atoms, {system.getNumParticles()} in all): "
          f"potential energy {energy:.1f} kJ/mol, largest peptide bond-length change {worst:.3f} Å, "
          f"last committee σ_F {sigma.last['uncertainty']:.3f} eV/Å")
    return {"energy": energy, "max_bond_change": worst, "uncertainty": sigma.last["uncertainty"]}


if __name__ == "__main__":
    main()
