"""MACE (mace-torch) models imported into the contract: MACE's own numbers, contract checks, three hosts."""
import numpy as np
import pytest

pytest.importorskip("mace")

SPECIES = [1, 6, 8]


def small_mace(seed: int, species=SPECIES, cutoff: float = 4.0):
    """An untrained ScaleShiftMACE (2 layers, L=1 messages, correlation 3) in float64."""
    import torch
    from mace import modules          # before e3nn: mace lets torch.load read e3nn's constants
    from e3nn import o3

    torch.manual_seed(seed)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    model = modules.ScaleShiftMACE(
        r_max=cutoff, num_bessel=8, num_polynomial_cutoff=5, max_ell=2, interaction_cls=block,
        interaction_cls_first=block, num_interactions=2, num_elements=len(species),
        hidden_irreps=o3.Irreps("8x0e+8x1o"), MLP_irreps=o3.Irreps("16x0e"), gate=torch.nn.functional.silu,
        atomic_energies=np.array([-13.6, -1029.0, -2041.0])[: len(species)], avg_num_neighbors=8.0,
        atomic_numbers=list(species), correlation=3, radial_type="bessel", atomic_inter_scale=0.5,
        atomic_inter_shift=0.0)
    return model.double()


@pytest.fixture(scope="module")
def mace_members():
    return [small_mace(0), small_mace(1)]


@pytest.fixture(scope="module")
def mace_file(mace_members, tmp_path_factory):
    from mlmd.plugins.mace import import_mace

    path = tmp_path_factory.mktemp("mace") / "mace_committee.pt"
    return import_mace(mace_members, path, dtype="float64")


def mace_reference(model, atoms):
    """Energy, forces and stress as MACE computes them itself (its own neighbour list and graph)."""
    import torch
    from mace.data import AtomicData, config_from_atoms
    from mace.tools import torch_geometric, utils

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
        data = AtomicData.from_config(config_from_atoms(atoms), z_table=table, cutoff=float(model.r_max))
        batch = next(iter(torch_geometric.dataloader.DataLoader([data], batch_size=1)))
        out = model(batch.to_dict(), compute_force=True, compute_stress=bool(atoms.pbc.all()))
    finally:
        torch.set_default_dtype(previous)
    stress = out["stress"][0].detach().numpy() if atoms.pbc.all() else None
    return float(out["energy"]), out["forces"].detach().numpy(), stress


@pytest.mark.parametrize("system", ["ethanol", "periodic_triclinic"])
def test_import_reproduces_mace_and_committee_statistics(mace_file, mace_members, system, request):
    """The file gives MACE's own energy, forces and stress per member; the committee's σ is their spread."""
    import mlmd

    atoms = request.getfixturevalue(system)
    out = mlmd.load(mace_file).compute_atoms(atoms, stress=bool(atoms.pbc.all()))
    references = [mace_reference(m, atoms) for m in mace_members]
    for member, (energy, forces, _) in enumerate(references):
        assert abs(out["member_energies"][member] - energy) < 1e-9
        np.testing.assert_allclose(out["member_forces"][member], forces, atol=1e-9)
    assert abs(out["energy"] - np.mean([r[0] for r in references])) < 1e-9
    spread = np.sqrt(((references[0][1] - references[1][1]) ** 2).sum(axis=1) / 4.0)
    np.testing.assert_allclose(out["forces_std"], spread, atol=1e-9)
    assert out["forces_std"].max() > 1e-3                # two different models do disagree
    if atoms.pbc.all():
        np.testing.assert_allclose(out["stress"], np.mean([r[2] for r in references], axis=0), atol=1e-9)


def test_mace_import_passes_the_contract_audit(mace_file, periodic_triclinic):
    from mlmd.testing import audit

    report = audit(mace_file, atoms=periodic_triclinic, n_rotations=20, print_report=False)
    failed = [row for row in report["checks"] if row[1] != "pass"]
    assert report["verdict"] == "pass", failed
    rotation = dict((row[0].split(",")[0], row[2]) for row in report["checks"])["rotation"]
    print("MACE import, rotation:", rotation)


def test_mace_import_gives_the_same_numbers_in_the_three_hosts(mace_file, periodic_triclinic):
    """mlmd's engine, ASE's calculator and OpenMM (TorchForce and PythonForce) on one frame."""
    import torch  # noqa: F401  (before openmmtorch)
    import openmm
    from openmm import unit

    import mlmd
    from mlmd.plugins.ase import MLMDCalculator
    from mlmd.plugins.openmm import create_python_force
    from mlmd.plugins.openmm.torch_force import create_torch_force, torch_force_available
    from mlmd.units import EV_TO_KJ_PER_MOL

    atoms = periodic_triclinic.copy()
    atoms.calc = MLMDCalculator(mace_file)
    ase_energy, ase_forces = atoms.get_potential_energy(), atoms.get_forces()
    sim = mlmd.Simulation(atoms.copy(), mace_file, integrator="verlet", timestep=0.5)
    results = {"engine": (sim.state.potential_energy, np.asarray(sim.state.forces))}

    factories = {"openmm PythonForce": create_python_force}
    if torch_force_available():
        factories["openmm TorchForce"] = create_torch_force
    for name, factory in factories.items():
        system = openmm.System()
        for mass in atoms.get_masses():
            system.addParticle(mass)
        system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) * 0.1 for row in np.asarray(atoms.cell)))
        system.addForce(factory(mace_file, atoms.numbers, periodic=True))
        context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(atoms.positions * 0.1)
        state = context.getState(getEnergy=True, getForces=True)
        energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / EV_TO_KJ_PER_MOL
        forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
        results[name] = (energy, np.asarray(forces) / EV_TO_KJ_PER_MOL / 10.0)
    assert len(results) == 3 or not torch_force_available()
    for name, (energy, forces) in results.items():
        print(f"{name}: |ΔE| vs ASE {abs(energy - ase_energy):.1e} eV, max |ΔF| {np.abs(forces - ase_forces).max():.1e}")
        assert abs(energy - ase_energy) < 1e-8
        np.testing.assert_allclose(forces, ase_forces, atol=1e-8)


def test_import_rejects_mismatched_members():
    from mlmd.plugins.mace import MaceCommittee

    with pytest.raises(ValueError, match="members: the models have different cutoffs"):
        MaceCommittee([small_mace(0, cutoff=4.0), small_mace(1, cutoff=5.0)])
    with pytest.raises(ValueError, match="members: the models know different elements"):
        MaceCommittee([small_mace(0), small_mace(1, species=[1, 6])])


def test_import_mace_command_calibrates_sigma_on_held_out_frames(mace_members, tmp_path):
    """`mlmd import-mace A.model B.model --calibrate DATA` sets the factor fitted on DATA."""
    import ase.io
    import torch

    import mlmd
    from mlmd import keys
    from mlmd.cli import main
    from mlmd.models.data import read_dataset
    from mlmd.uncertainty import calibrate

    from conftest import ETHANOL_DATA

    paths = []
    for index, member in enumerate(mace_members):
        paths.append(str(tmp_path / f"member{index}.model"))
        torch.save(member, paths[-1])
    held_out = str(tmp_path / "val.extxyz")
    ase.io.write(held_out, read_dataset(ETHANOL_DATA)[:6])
    out = str(tmp_path / "mace.pt")
    assert main(["import-mace", *paths, "--out", out, "--calibrate", held_out]) == 0
    potential = mlmd.load(out)
    factor = calibrate(potential, read_dataset(held_out)).factor
    assert factor != 1.0
    assert potential.metadata[keys.META_CALIBRATION] == pytest.approx(factor, rel=1e-6)


def test_import_keeps_what_rebuilds_the_members_eagerly(mace_file, ethanol, periodic_triclinic):
    """The file's mace_configs rebuild plain (compilable) members that give the scripted file's numbers."""
    import torch

    import mlmd
    from mlmd.compiled import eager_module
    from mlmd.potential import load_module

    scripted, meta = load_module(mace_file)
    eager = eager_module(scripted, meta)
    assert not any(isinstance(member, torch.jit.ScriptModule) for member in eager.model.members)
    potential = mlmd.load(mace_file)
    for atoms in (ethanol, periodic_triclinic):
        want = potential.compute_atoms(atoms, stress=bool(atoms.pbc.all()))
        got = mlmd.Potential(module=eager, metadata=meta).compute_atoms(atoms, stress=bool(atoms.pbc.all()))
        np.testing.assert_allclose(got["member_forces"], want["member_forces"], rtol=0, atol=1e-10)
        np.testing.assert_allclose(got["member_energies"], want["member_energies"], rtol=0, atol=1e-10)
        if atoms.pbc.all():
            np.testing.assert_allclose(got["stress"], want["stress"], rtol=0, atol=1e-10)


def test_mace_configs_name_nothing_outside_mace_and_torch():
    """A config is data: a name outside mace.modules / torch is refused, not imported."""
    from mlmd.plugins.mace import config_from_json

    with pytest.raises(ValueError, match="'os:system' is outside"):
        config_from_json({"model_class": "ScaleShiftMACE", "arguments": {"gate": {"name": "os:system"}}})
    with pytest.raises(ValueError, match="model class 'Popen'"):
        config_from_json({"model_class": "Popen", "arguments": {}})


def test_an_import_without_configs_runs_as_torchscript_and_says_why(mace_file, tmp_path):
    """A file imported before import_mace kept mace_configs: no compiled form, a warning with the fix."""
    import json

    import torch

    import mlmd
    from mlmd import keys
    from mlmd.potential import load_module

    module, meta = load_module(mace_file)
    del meta[keys.META_HYPER]["mace_configs"]
    old = str(tmp_path / "old_import.pt")
    torch.jit.save(module, old, _extra_files={keys.METADATA_FILE: json.dumps(meta)})
    with pytest.warns(RuntimeWarning, match="running the TorchScript form.*import the .model files again"):
        potential = mlmd.load(old, compiled=True)
    assert not potential.is_compiled


@pytest.mark.slow
def test_compiled_mace_import_equals_torchscript_in_the_engine(mace_file, ethanol, periodic_triclinic):
    """The compiled MACE members (torch.compile of the rebuilt members) give TorchScript's numbers
    to 1e-10 eV/Å in float64, on frames and sizes the load-time check did not see, and the engine
    runs them. (Slow: the compile takes ~2 min cold on 2 cores.)"""
    import mlmd

    scripted = mlmd.load(mace_file)
    compiled = mlmd.load(mace_file, compiled=True)
    assert compiled.is_compiled
    for atoms in (ethanol, periodic_triclinic, ethanol[:4]):
        np.testing.assert_allclose(compiled.compute_atoms(atoms)["member_forces"],
                                   scripted.compute_atoms(atoms)["member_forces"], rtol=0, atol=1e-10)
    sim = mlmd.Simulation(periodic_triclinic.copy(), mace_file, integrator="verlet", timestep=0.5, compiled=True)
    assert sim.potential.is_compiled
    want = mlmd.Simulation(periodic_triclinic.copy(), mace_file, integrator="verlet", timestep=0.5)
    sim.run(20)
    want.run(20)
    np.testing.assert_allclose(np.asarray(sim.state.positions), np.asarray(want.state.positions), rtol=0, atol=1e-9)
