"""The compiled form of a model file (mlmd.compiled) gives the TorchScript module's numbers in
every host, and falls back to TorchScript, saying why, wherever it cannot be built."""
import os
import warnings

import numpy as np
import pytest
import torch

from mlmd import units

from conftest import ETHANOL_DATA, ROOT, SHIPPED_MODEL


@pytest.fixture(scope="module")
def forms():
    """(TorchScript, compiled) Potentials of the shipped ethanol committee (float32): one compile."""
    import mlmd

    scripted = mlmd.load(SHIPPED_MODEL)
    compiled = mlmd.load(SHIPPED_MODEL, compiled=True)
    assert compiled.is_compiled, "the compiled form fell back to TorchScript on a machine with g++"
    return scripted, compiled


@pytest.fixture(scope="module")
def frames():
    import ase.io

    return ase.io.read(ETHANOL_DATA, ":6")


def test_compiled_forces_equal_torchscript_float32(forms, frames):
    """1e-5 eV/Å over data frames the compile did not see, committee σ included."""
    scripted, compiled = forms
    for atoms in frames:
        want = scripted.compute_atoms(atoms, stress=False)
        got = compiled.compute_atoms(atoms, stress=False)
        np.testing.assert_allclose(got["forces"], want["forces"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["member_forces"], want["member_forces"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(got["energy"], want["energy"], rtol=2e-7, atol=0)
        np.testing.assert_allclose(got["uncertainty"], want["uncertainty"], rtol=1e-4, atol=1e-6)


def test_compiled_form_handles_other_sizes(forms, frames):
    """One graph for every atom and pair count (fragments, a periodic copy, two molecules), no recompile
    that changes numbers."""
    scripted, compiled = forms
    atoms = frames[0]
    periodic = atoms.copy()
    periodic.cell = np.eye(3) * 6.0
    periodic.pbc = True
    periodic.center()
    apart = atoms.copy()
    apart.positions += np.array([7.0, 0.0, 0.0])
    for case in (atoms[:5], atoms[[0, 1, 3]], periodic, atoms + apart):      # the last: two molecules 7 Å apart
        want = scripted.compute_atoms(case)
        got = compiled.compute_atoms(case)
        np.testing.assert_allclose(got["forces"], want["forces"], rtol=0, atol=1e-5)


def test_engine_runs_the_compiled_form(forms, frames):
    """The engine's trajectory with the compiled module follows the TorchScript one (20 NVE steps)."""
    from mlmd.md.simulation import Simulation

    scripted, compiled = forms
    runs = []
    for potential in (scripted, compiled):
        sim = Simulation(frames[1].copy(), potential, integrator="verlet", timestep=0.5, temperature=None)
        sim.state.velocities[...] = 0.0
        sim.run(20)
        runs.append((sim.state.positions.copy(), sim.state.potential_energy))
    assert np.abs(runs[0][0] - runs[1][0]).max() < 1e-5
    assert abs(runs[0][1] - runs[1][1]) < 1e-3


def test_ase_calculator_runs_the_compiled_form(forms, frames):
    from mlmd.plugins.ase import MLMDCalculator

    scripted, compiled = forms
    atoms = frames[2].copy()
    forces = []
    for potential in (scripted, compiled):
        atoms.calc = MLMDCalculator(potential)
        forces.append(atoms.get_forces())
    np.testing.assert_allclose(forces[1], forces[0], rtol=0, atol=1e-5)


def test_openmm_python_force_runs_the_compiled_form(forms, frames):
    pytest.importorskip("torch")
    openmm = pytest.importorskip("openmm")
    from mlmd.plugins.openmm import create_python_force

    scripted, compiled = forms
    atoms = frames[3]
    results = []
    for potential in (scripted, compiled):
        system = openmm.System()
        for mass in atoms.get_masses():
            system.addParticle(float(mass))
        system.addForce(create_python_force(potential, atoms.get_atomic_numbers(), periodic=False))
        context = openmm.Context(system, openmm.VerletIntegrator(0.0005), openmm.Platform.getPlatformByName("CPU"))
        context.setPositions(atoms.positions * units.ANGSTROM_TO_NM)
        state = context.getState(getForces=True)
        results.append(state.getForces(asNumpy=True)._value * units.KJ_PER_MOL_NM_TO_EV_PER_ANGSTROM)
    assert compiled.is_compiled
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("system,model", [
    ("ethanol", "ethanol_committee.pt"), ("alanine_dipeptide", "alanine_dipeptide_committee.pt"),
    ("water", "water_committee.pt"), ("copper", "copper_committee.pt"), ("copper", "copper_mace.pt")])
def test_compiled_float64_agrees_to_1e_10(system, model):
    """In float64 the two forms agree to 1e-10 eV/Å on each shipped system's data frames."""
    import ase.io

    import mlmd

    path = os.path.join(ROOT, "systems", system, model)
    scripted = mlmd.load(path).with_dtype("float64")
    compiled = mlmd.load(path, compiled=True).with_dtype("float64")
    assert compiled.is_compiled
    for atoms in ase.io.read(os.path.join(ROOT, "systems", system, "data.extxyz"), ":3"):
        np.testing.assert_allclose(compiled.compute_atoms(atoms)["forces"], scripted.compute_atoms(atoms)["forces"],
                                   rtol=0, atol=1e-10)


def test_family_without_eager_builder_falls_back_with_a_reason(tmp_path):
    """A Morse file (as a MACE import) has no eager builder: TorchScript, and a warning that says so."""
    import mlmd
    from mlmd.models.pair import MorsePotential
    from mlmd.potential import export

    path = tmp_path / "morse.pt"
    export(MorsePotential([29], committee_size=2, spread=0.05), path, {"model_family": "morse"}, dtype="float64")
    with pytest.warns(RuntimeWarning, match="running the TorchScript form.*'morse' has no eager builder"):
        potential = mlmd.load(path, compiled=True)
    assert not potential.is_compiled and isinstance(potential.module, torch.jit.ScriptModule)
    assert potential.compiled      # asked for: a swap or reload asks again


def test_missing_compiler_falls_back_with_a_reason(monkeypatch):
    import mlmd
    from mlmd import compiled

    monkeypatch.setattr(compiled, "compiler_problem", lambda: "no C++ compiler for TorchInductor (test)")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        potential = mlmd.load(SHIPPED_MODEL, compiled=True)
    assert not potential.is_compiled


@pytest.mark.slow
def test_two_models_compiled_in_one_process_keep_their_own_graphs(forms, model_file):
    """Every model shares the code of energy_in_slots: a second model (other channels, float64)
    must get its own graph, not run the first one's. (Slow: a second compile, 90 s cold; were
    it broken, the load-time check would fall back to TorchScript with a warning, not run wrong.)
    Run after the float64 tests above it is also the ninth compiled entry of energy_in_slots,
    one past Dynamo's default limit (red before mlmd.compiled raised it)."""
    import mlmd

    scripted = mlmd.load(model_file)
    compiled = mlmd.load(model_file, compiled=True)
    assert compiled.is_compiled
    import ase.io

    atoms = ase.io.read(ETHANOL_DATA, "0")
    np.testing.assert_allclose(compiled.compute_atoms(atoms)["forces"], scripted.compute_atoms(atoms)["forces"],
                               rtol=0, atol=1e-10)
    # and the first model still runs its own
    first_scripted, first_compiled = forms
    np.testing.assert_allclose(first_compiled.compute_atoms(atoms)["forces"],
                               first_scripted.compute_atoms(atoms)["forces"], rtol=0, atol=1e-5)



def test_compiled_form_follows_new_pairs_of_the_same_count(forms, frames):
    """The slot layout is reused only for pairs equal to the last call's: the same number of pairs
    in another order (as after a neighbour-list rebuild) gives TorchScript's forces again."""
    from mlmd.neighbors import neighbor_pairs

    scripted, compiled = forms
    atoms = frames[4]
    edge_index, shifts = neighbor_pairs(atoms.positions, np.zeros((3, 3)), np.zeros(3, bool), scripted.cutoff)
    order = np.random.default_rng(1).permutation(edge_index.shape[1])
    for pairs, pair_shifts in ((edge_index, shifts), (edge_index[:, order], shifts[order]), (edge_index, shifts)):
        args = (atoms.positions, atoms.numbers, None, None, pairs, pair_shifts)
        want = scripted.compute(*args)["forces"]
        got = compiled.compute(*args)["forces"]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        # and the compiled call really saw these pairs: the per-atom energies follow the order of atoms
        np.testing.assert_allclose(compiled.compute(*args)["energies"], scripted.compute(*args)["energies"],
                                   rtol=0, atol=1e-5)
