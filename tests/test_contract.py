"""Physics of the built-in model through the contract checks of mlmd.testing."""
import numpy as np
import pytest

from mlmd import testing

from conftest import make_model


@pytest.mark.parametrize("system", ["ethanol", "periodic_triclinic"])
def test_forces_are_negative_gradient_float64(potential, system, request):
    atoms = request.getfixturevalue(system)
    error = testing.check_forces_finite_difference(potential, atoms, delta=1e-4, rtol=1e-6)
    print(f"{system}: finite-difference vs autograd forces, relative error {error:.2e}")


@pytest.mark.parametrize("system", ["ethanol", "periodic_triclinic"])
def test_translation_and_permutation_invariance(potential, system, request):
    atoms = request.getfixturevalue(system)
    assert testing.check_translation_invariance(potential, atoms, atol=1e-10) < 1e-10
    errors = testing.check_permutation_invariance(potential, atoms, atol=1e-10)
    assert errors["energy"] < 1e-10


def test_periodic_images_and_unwrapped_coordinates(potential, periodic_triclinic):
    """Moving an atom by a lattice vector changes nothing; a supercell has N x the energy."""
    atoms = periodic_triclinic
    ref = potential.compute_atoms(atoms)
    moved = atoms.copy()
    moved.positions[2] += 2 * atoms.cell[0] - atoms.cell[2]
    out = potential.compute_atoms(moved)
    assert abs(out["energy"] - ref["energy"]) < 1e-9
    np.testing.assert_allclose(out["forces"], ref["forces"], atol=1e-9)
    supercell = atoms.repeat((2, 1, 1))
    big = potential.compute_atoms(supercell)
    assert abs(big["energy"] - 2 * ref["energy"]) < 1e-8 * abs(ref["energy"])
    np.testing.assert_allclose(big["forces"][: len(atoms)], ref["forces"], atol=1e-9)


def test_rotation_error_measured_and_shrinks_with_grid(ethanol, tmp_path):
    """The S^2 grid makes invariance approximate: measure it and check it converges."""
    import mlmd
    from mlmd.potential import export

    base = make_model(committee=1, seed=5, hyperparameters={"grid": 16})
    errors = {}
    for grid in (8, 16, 64, 256):
        model = make_model(committee=1, seed=5, hyperparameters={"grid": grid})
        model.load_state_dict({k: v for k, v in base.state_dict().items() if k != "grid"}, strict=False)
        path = tmp_path / f"grid{grid}.pt"
        export(model, path, {"model_family": "ponita"}, dtype="float64")
        errors[grid] = testing.rotation_invariance_error(mlmd.load(path), ethanol, n_rotations=100)
        print(f"grid {grid:4d}: max |ΔE| {errors[grid]['energy_max']:.3e} eV, "
              f"max |ΔF - RF| {errors[grid]['forces_max']:.3e} eV/Å over 100 rotations")
    assert errors[256]["energy_max"] < errors[16]["energy_max"] < errors[8]["energy_max"]
    assert errors[256]["forces_max"] < errors[16]["forces_max"]
    assert errors[256]["energy_max"] < 0.2 * errors[16]["energy_max"]


def test_energy_continuous_across_cutoff(potential, ethanol):
    assert testing.check_cutoff_continuity(potential, step=1e-5, atol=1e-6) < 1e-6
    # one atom of a molecule moving out of another atom's cutoff sphere
    from ase import Atoms

    rc = potential.cutoff
    h_far = ethanol.positions[:, 0].max()
    energies = []
    for x in (rc - 0.5e-5, rc + 0.5e-5):
        atoms = ethanol + Atoms("H", positions=[[h_far + x, ethanol.positions[ethanol.positions[:, 0].argmax(), 1],
                                                 ethanol.positions[ethanol.positions[:, 0].argmax(), 2]]])
        energies.append(float(potential.compute_atoms(atoms)["energy"]))
    assert abs(energies[0] - energies[1]) < 1e-6, energies


def test_isolated_atoms_and_locality(potential):
    result = testing.check_isolated_atoms(potential)
    assert result["max_force"] == 0.0


def test_committee_outputs_and_consistency(potential, ethanol):
    shapes = testing.check_output_shapes(potential, ethanol)
    assert shapes["member_forces"] == (2, 9, 3)
    stats = testing.check_committee_consistency(potential, ethanol)
    assert stats["uncertainty"] > 0.0


def test_committee_members_equal_separately_built_models(ethanol, tmp_path):
    """Member m of a batched committee is the same function as a single model with its weights."""
    import mlmd
    from mlmd.potential import export

    committee = make_model(committee=3, seed=2)
    export(committee, tmp_path / "c.pt", {}, dtype="float64")
    out = mlmd.load(tmp_path / "c.pt").compute_atoms(ethanol)
    for m in range(3):
        single = make_model(committee=1, seed=2)
        single.load_state_dict({k: (v[m:m + 1] if k in dict(single.named_parameters()) else v)
                                for k, v in committee.state_dict().items()})
        export(single, tmp_path / f"s{m}.pt", {}, dtype="float64")
        one = mlmd.load(tmp_path / f"s{m}.pt").compute_atoms(ethanol)
        assert abs(one["energy"] - out["member_energies"][m]) < 1e-10
        np.testing.assert_allclose(one["forces"], out["member_forces"][m], atol=1e-10)


def test_stress_matches_strain_derivative(potential, periodic_triclinic):
    """σ = (1/V) dE/dε, checked against finite differences of a symmetric strain."""
    atoms = periodic_triclinic
    out = potential.compute_atoms(atoms, stress=True)
    volume = atoms.get_volume()
    eps = 1e-5
    numeric = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            energies = []
            for sign in (+1, -1):
                strain = np.eye(3)
                strain[a, b] += sign * eps / 2
                strain[b, a] += sign * eps / 2
                strained = atoms.copy()
                strained.set_cell(np.asarray(atoms.cell) @ strain, scale_atoms=True)
                energies.append(float(potential.compute_atoms(strained)["energy"]))
            numeric[a, b] = (energies[0] - energies[1]) / (2 * eps) / volume
    sym = 0.5 * (out["stress"] + out["stress"].T)
    np.testing.assert_allclose(sym, numeric, atol=1e-7 * max(1.0, np.abs(numeric).max()), rtol=1e-5)
