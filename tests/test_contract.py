"""Physics of the built-in model through the contract checks of mlmd.testing."""
import os

import numpy as np
import pytest
import torch

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


# the acceptance bound of the built-in model in float64 (issue 17)
ROTATION_TOLERANCE = {"forces": 1e-5, "energy_per_atom": 1e-6}


@pytest.mark.parametrize("hyperparameters", [{}, {"degree": 1, "correlation": 2, "layers": 1},
                                             {"degree": 4, "correlation": 3, "layers": 3}])
@pytest.mark.parametrize("system", ["ethanol", "periodic_triclinic"])
def test_rotation_and_reflection_invariance_exact(hyperparameters, system, request, tmp_path):
    """Fresh (untrained) models, float64: energies invariant and forces equivariant under proper
    rotations and under reflections to round-off; no net torque on a molecule, a symmetric
    virial in a crystal."""
    import mlmd
    from mlmd.potential import export

    atoms = request.getfixturevalue(system)
    path = export(make_model(committee=2, seed=7, hyperparameters=hyperparameters), tmp_path / "m.pt",
                  {"model_family": "ponita"}, dtype="float64")
    potential = mlmd.load(path)
    errors = testing.check_rotation_invariance(potential, atoms, n_rotations=30, tolerance=ROTATION_TOLERANCE)
    mirrored = atoms.copy()
    mirrored.positions = -atoms.positions
    mirrored.cell = -np.asarray(atoms.cell)
    ref, out = potential.compute_atoms(atoms), potential.compute_atoms(mirrored)
    print(f"{system} {hyperparameters}: rotation max |ΔE| {errors['energy_max']:.1e} eV, "
          f"max |ΔF| {errors['forces_max']:.1e} eV/Å, torque/antisymmetric virial "
          f"{errors.get('torque', errors.get('virial_antisymmetric')):.1e}")
    assert abs(out["energy"] - ref["energy"]) < 1e-6 * len(atoms)
    np.testing.assert_allclose(out["forces"], -ref["forces"], atol=1e-5)
    assert errors.get("torque", errors.get("virial_antisymmetric")) < 1e-9


def test_rotation_invariance_needs_an_exact_quadrature(ethanol, tmp_path):
    """The invariance rests on the Lebedev rule integrating the products exactly: the same
    weights with a rule one order too coarse for correlation x degree break it measurably."""
    import mlmd
    import torch

    from mlmd.models.ponita import lebedev_rule, real_spherical_harmonics
    from mlmd.potential import export

    model = make_model(committee=1, seed=3, hyperparameters={"degree": 3, "correlation": 3})
    points, weights = lebedev_rule(7)      # degree 9 needed
    model.grid_harmonics_hi = real_spherical_harmonics(torch.as_tensor(points), 3).float()
    model.grid_harmonics_lo = torch.zeros_like(model.grid_harmonics_hi)
    model.grid_weights_hi = torch.as_tensor(weights).float()
    model.grid_weights_lo = torch.zeros_like(model.grid_weights_hi)
    path = export(model, tmp_path / "coarse.pt", {"model_family": "ponita"}, dtype="float64")
    errors = testing.rotation_invariance_error(mlmd.load(path), ethanol, n_rotations=30)
    print(f"degree-7 rule for degree-9 products: max |ΔE| {errors['energy_max']:.1e} eV, "
          f"max |ΔF| {errors['forces_max']:.1e} eV/Å")
    with pytest.raises(AssertionError, match="not invariant"):
        testing.check_rotation_invariance(mlmd.load(path), ethanol, 30, ROTATION_TOLERANCE)


def test_real_spherical_harmonics_orthonormal_and_addition_theorem():
    """Y_lm orthonormal under the Lebedev rule; sum_m Y_lm(a) Y_lm(b) = (2l+1)/4pi P_l(a.b)."""
    import torch
    from numpy.polynomial import legendre

    from mlmd.models.ponita import lebedev_rule, real_spherical_harmonics

    points, weights = lebedev_rule(12)
    y = real_spherical_harmonics(torch.as_tensor(points), 5).numpy()
    np.testing.assert_allclose((y * weights[:, None]).T @ y, np.eye(36), atol=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3))
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    ya, yb = (real_spherical_harmonics(torch.as_tensor(v), 5).numpy() for v in (a, b))
    for l in range(6):
        block = slice(l * l, (l + 1) ** 2)
        expected = (2 * l + 1) / (4 * np.pi) * legendre.legval(a @ b, [0] * l + [1])
        assert abs(ya[block] @ yb[block] - expected) < 1e-12


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


def test_forces_continuous_across_cutoff(potential):
    """The dimer force goes to zero at rc without a jump (the envelope's slope, not only its value)."""
    assert testing.check_cutoff_force_continuity(potential, step=1e-5, atol=1e-6) < 1e-6


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


@pytest.mark.parametrize("system", ["ethanol", "copper"])
def test_float32_forces_hold_far_from_the_origin(system, tmp_path):
    """A float32 model 10⁴ Å from the origin (and, periodic, with atoms unwrapped by hundreds of
    cells, as the engine leaves them) gives the forces it gives at the origin: the edge vectors
    are differences taken in float64 (it was 4e-2 eV/Å off at 10⁴ Å)."""
    import ase.io

    import mlmd
    from conftest import ROOT
    from mlmd.neighbors import neighbor_pairs

    folder = os.path.join(ROOT, "systems", system)
    pot32 = mlmd.load(os.path.join(folder, f"{system}_committee.pt")).with_dtype("float32")
    atoms = ase.io.read(os.path.join(folder, "data.extxyz"), 0)
    reference = pot32.with_dtype("float64").compute_atoms(atoms)["forces"]
    near = np.abs(pot32.compute_atoms(atoms)["forces"] - reference).max()
    far = atoms.copy()
    far.positions += 1e4
    if atoms.pbc.all():
        rng = np.random.default_rng(0)
        far.positions += rng.integers(-300, 300, size=(len(atoms), 3)) @ atoms.cell.array
    assert np.abs(pot32.compute_atoms(far)["forces"] - reference).max() < max(3 * near, 1e-5)
    # a file exported now takes the float64 differences inside its module, whatever the caller
    edge_index, shifts = neighbor_pairs(far.positions, far.cell.array, far.pbc, pot32.cutoff)
    model = make_model(species=tuple(pot32.species))
    fresh = mlmd.load(mlmd.potential.export(model, tmp_path / "fresh.pt", {}, dtype="float32"))
    args = lambda positions: (torch.as_tensor(positions), torch.as_tensor(far.numbers),
                              torch.as_tensor(far.cell.array), torch.as_tensor(far.pbc),
                              torch.as_tensor(edge_index), torch.as_tensor(shifts), False)
    moved = fresh.module(*args(far.positions - 1e4))["forces"].double().numpy()
    np.testing.assert_allclose(fresh.module(*args(far.positions))["forces"].double().numpy(), moved,
                               atol=max(1e-5, 1e-4 * np.abs(moved).max()))
