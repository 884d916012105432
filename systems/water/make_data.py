"""How systems/water/ was made: a periodic box of flexible TIP3P-FB water, labelled by OpenMM.

1. ``water.pdb``: 1.0 nm cube of water from ``app.Modeller.addSolvent`` (amber14/tip3pfb.xml).
2. ``data.extxyz``: Langevin MD in OpenMM with flexible water (no constraints: the ML model
   learns O–H stretches and H–O–H bends too), PME, 0.5 fs, friction 1/ps, after energy
   minimisation and 10 ps of equilibration at each temperature; one frame every 50 fs, at
   300 K and at 400 K.  Every frame is labelled by mlmd's OpenMM oracle
   (``{"openmm": {"topology": "water.pdb"}}``: PME, cutoff 0.49 × box, Ewald tolerance 1e-5),
   the same one ``mlmd learn`` calls, so data and on-the-fly labels agree by construction.

Run: .venv/bin/python systems/water/make_data.py
"""
import os
import sys

import ase
import numpy as np
import openmm
from openmm import app, unit
from tqdm.auto import tqdm

from mlmd import keys, units
from mlmd.active.oracles import make_oracle, oracle_name
from mlmd.models.data import append_frames, label_frame

HERE = os.path.dirname(os.path.abspath(__file__))
FORCEFIELD = "amber14/tip3pfb.xml"
ORACLE = {"openmm": {"topology": os.path.join(HERE, "water.pdb"), "forcefield": [FORCEFIELD]}}


def write_box(path: str, edge_nm: float = 1.0) -> None:
    forcefield = app.ForceField(FORCEFIELD)
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(forcefield, model="tip3p", boxSize=openmm.Vec3(edge_nm, edge_nm, edge_nm) * unit.nanometer)
    with open(path, "w") as handle:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, handle)


def main(out: str = os.path.join(HERE, "data.extxyz"), frames_per_temperature=(300, 200),
         temperatures=(300.0, 400.0), interval: int = 100, equilibration: int = 20000, seed: int = 0) -> str:
    if os.path.exists(out):
        sys.exit(f"out: {out} already exists; move it away first (labels are never overwritten)")
    pdb_path = ORACLE["openmm"]["topology"]
    if not os.path.exists(pdb_path):
        write_box(pdb_path)
    pdb = app.PDBFile(pdb_path)
    oracle = make_oracle(ORACLE)
    box = np.asarray(pdb.topology.getPeriodicBoxVectors().value_in_unit(unit.nanometer)) * units.NM_TO_ANGSTROM
    numbers = [a.element.atomic_number for a in pdb.topology.atoms()]
    system = app.ForceField(FORCEFIELD).createSystem(
        pdb.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.49 * box[0, 0] * units.ANGSTROM_TO_NM,
        constraints=None, rigidWater=False)
    for temperature, frames in zip(temperatures, frames_per_temperature):
        integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1 / unit.picosecond,
                                                     0.5 * unit.femtosecond)
        integrator.setRandomNumberSeed(seed + int(temperature))
        context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
        context.setPositions(pdb.positions)
        openmm.LocalEnergyMinimizer.minimize(context)
        context.setVelocitiesToTemperature(temperature * unit.kelvin, seed + int(temperature))
        integrator.step(equilibration)
        for index in tqdm(range(frames), desc=f"flexible TIP3P-FB at {temperature:g} K", unit="frame"):
            integrator.step(interval)
            state = context.getState(getPositions=True)
            positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer) * units.NM_TO_ANGSTROM
            atoms = ase.Atoms(numbers=numbers, positions=positions, cell=box, pbc=True)
            atoms.wrap()            # the model is periodic-aware: wrapped and unwrapped give the same numbers
            frame = label_frame(atoms, oracle, {keys.DATA_ORACLE: oracle_name(ORACLE),
                                                keys.DATA_TEMPERATURE: temperature,
                                                keys.DATA_STEP: equilibration + (index + 1) * interval})
            append_frames(out, [frame])
    return out


if __name__ == "__main__":
    main()
