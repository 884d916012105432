"""Oracles: the OpenMM force-field oracle against finite differences and OpenMM itself."""
import numpy as np
import pytest

from mlmd.errors import InputError


@pytest.fixture(scope="module")
def water_pdb(tmp_path_factory):
    pytest.importorskip("openmm")
    from openmm import app, unit, Vec3

    path = tmp_path_factory.mktemp("water") / "water.pdb"
    forcefield = app.ForceField("amber14/tip3pfb.xml")
    modeller = app.Modeller(app.Topology(), [])
    modeller.addSolvent(forcefield, model="tip3p", boxSize=Vec3(1.2, 1.2, 1.2) * unit.nanometer)
    with open(path, "w") as handle:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, handle)
    return str(path)


def _atoms(pdb):
    import ase.io
    atoms = ase.io.read(pdb)
    atoms.pbc = True
    return atoms


def test_openmm_oracle_forces_are_the_energy_gradient(water_pdb):
    from mlmd.active.oracles import make_oracle

    spec = {"openmm": {"topology": water_pdb, "forcefield": ["amber14/tip3pfb.xml"]}}
    oracle = make_oracle(spec)
    assert make_oracle(spec) is oracle                       # one Context per process
    atoms = _atoms(water_pdb)
    rng = np.random.default_rng(0)
    atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)   # off the minimum: flexible bonds act
    atoms.calc = oracle
    forces = atoms.get_forces()
    assert np.abs(forces).max() > 1.0
    h = 1e-4
    for index in rng.choice(len(atoms), 4, replace=False):
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                moved = atoms.copy()
                moved.positions[index, axis] += sign * h
                moved.calc = oracle
                energies.append(moved.get_potential_energy())
            assert (energies[1] - energies[0]) / (2 * h) == pytest.approx(forces[index, axis], abs=2e-3)


def test_openmm_oracle_matches_openmm_and_rejects_a_wrong_frame(water_pdb):
    openmm = pytest.importorskip("openmm")
    from openmm import app, unit

    from mlmd import units
    from mlmd.active.labeling import label_frames
    from mlmd.active.oracles import OpenMMForceField

    pdb = app.PDBFile(water_pdb)
    system = app.ForceField("amber14/tip3pfb.xml").createSystem(
        pdb.topology, nonbondedMethod=app.PME, nonbondedCutoff=0.588 * unit.nanometer, constraints=None,
        rigidWater=False, ewaldErrorTolerance=1e-5)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    direct = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    oracle = OpenMMForceField(water_pdb, cutoff=5.88)
    atoms = _atoms(water_pdb)
    atoms.calc = oracle
    assert atoms.get_potential_energy() == pytest.approx(direct * units.KJ_PER_MOL_TO_EV, rel=1e-9)

    shifted = atoms.copy()                                  # molecules split across the box edge
    shifted.positions += [4.0, 3.0, 2.0]
    shifted.wrap()
    shifted.calc = oracle
    # equal up to the PME grid's alignment (error tolerance 1e-5); a split molecule would be off by eV
    assert shifted.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-4)
    np.testing.assert_allclose(shifted.get_forces(), atoms.get_forces(), atol=1e-3)

    spec = {"openmm": {"topology": water_pdb}}
    wrong = atoms[:-3]                                      # one water short: skipped, never raised
    labels = label_frames([atoms, wrong], spec)
    assert labels[0].ok and labels[0].frame.info["oracle"] == "openmm:amber14/tip3pfb.xml"
    assert not labels[1].ok and "do not match" in labels[1].error
    with pytest.raises(InputError, match="oracle.openmm.topology"):
        OpenMMForceField("missing.pdb")
    with pytest.raises(InputError, match="forcefield"):
        OpenMMForceField(water_pdb, forcefield=["no-such-forcefield.xml"])


def test_mlmd_label_writes_the_oracles_own_labels_and_keeps_the_centre_of_mass_at_rest(tmp_path):
    """`mlmd label` with EMT: each frame's labels are EMT's energy and forces at that geometry,
    frames carry no MD constraint, the Langevin run (FixCom) keeps the total momentum at zero,
    and an existing output file is refused, not overwritten."""
    import ase.io
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from mlmd.cli import main
    from mlmd.models.data import read_dataset

    start = str(tmp_path / "cu.xyz")
    ase.io.write(start, bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2)))
    out = str(tmp_path / "labels.extxyz")
    args = ["label", start, "--oracle", "emt", "--out", out, "--frames", "4", "--temperature", "800",
            "--timestep", "2", "--interval", "10", "--equilibration", "20", "--friction", "0.05", "--no-relax"]
    assert main(args) == 0
    frames = read_dataset(out)
    assert len(frames) == 4
    for frame in frames:
        assert not frame.constraints
        fresh = frame.copy()
        fresh.calc = EMT()
        # extxyz stores positions to 1e-8 Å
        assert abs(fresh.get_potential_energy() - frame.get_potential_energy()) < 1e-6
        np.testing.assert_allclose(fresh.get_forces(), frame.get_forces(), atol=1e-6)
        momentum = np.abs(frame.get_momenta().sum(axis=0)).max()
        assert momentum < 1e-8 * np.abs(frame.get_momenta()).max()
    assert frames[-1].positions.std() > 0 and not np.allclose(frames[0].positions, frames[-1].positions)
    before = open(out).read()
    assert main(args) != 0
    assert open(out).read() == before
