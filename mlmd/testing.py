"""Contract checks that any mlmd model file (ours or a plugin's) can run.

Each check takes a :class:`mlmd.Potential` and an ``ase.Atoms``, returns the measured
number(s), and raises ``AssertionError`` with the numbers when a tolerance is given and
exceeded.  Run the finite-difference and invariance checks in float64
(``potential.with_dtype("float64")``).  :func:`audit` runs them all on a file and prints
a verdict (``mlmd audit MODEL``).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from . import keys

__all__ = ["check_output_shapes", "check_forces_finite_difference", "check_translation_invariance",
           "check_permutation_invariance", "rotation_invariance_error", "rotation_tolerance",
           "check_rotation_invariance", "check_cutoff_continuity",
           "check_cutoff_force_continuity", "check_isolated_atoms", "check_committee_consistency", "check_periodic_images", "check_nve_drift",
           "random_rotation", "audit"]


def _compute(potential, atoms, positions=None, stress=False):
    pos = atoms.positions if positions is None else positions
    return potential.compute(pos, atoms.numbers, np.asarray(atoms.cell), atoms.pbc, stress=stress)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed proper rotation matrix [3,3] (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def check_output_shapes(potential, atoms) -> Dict[str, tuple]:
    """Keys, shapes, finiteness; per-atom energies sum to the energy."""
    out = _compute(potential, atoms)
    n = len(atoms)
    expected = {keys.ENERGY: (), keys.FORCES: (n, 3), keys.ENERGIES: (n,)}
    m = potential.committee_size
    if m > 1:
        expected.update({keys.MEMBER_ENERGIES: (m,), keys.MEMBER_FORCES: (m, n, 3), keys.ENERGY_STD: (),
                         keys.FORCES_STD: (n,), keys.UNCERTAINTY: ()})
    for key, shape in expected.items():
        assert key in out, f"output {key!r} missing (got {sorted(out)})"
        assert out[key].shape == shape, f"output {key!r} has shape {out[key].shape}, expected {shape}"
        assert np.isfinite(out[key]).all(), f"output {key!r} is not finite"
    tol = 1e-8 if potential.dtype.itemsize == 8 else 1e-3
    total = float(out[keys.ENERGIES].sum())
    assert abs(total - float(out[keys.ENERGY])) <= tol * max(1.0, abs(total)), \
        f"per-atom energies sum to {total}, energy is {float(out[keys.ENERGY])}"
    return {k: v.shape for k, v in out.items()}


def check_forces_finite_difference(potential, atoms, delta: float = 1e-4, rtol: Optional[float] = 1e-6,
                                   max_atoms: int = 20) -> float:
    """max |F_fd - F| / max |F| over the Cartesian components of up to ``max_atoms`` atoms.

    F_fd = -(E(x + δ) - E(x - δ)) / 2δ, δ in Å.  Needs a float64 module for rtol 1e-6.
    """
    forces = _compute(potential, atoms)[keys.FORCES]
    numeric = np.zeros_like(forces)
    atoms_checked = range(min(len(atoms), max_atoms))
    for i in atoms_checked:
        for k in range(3):
            pos = atoms.positions.copy()
            pos[i, k] += delta
            e_plus = float(_compute(potential, atoms, pos)[keys.ENERGY])
            pos[i, k] -= 2 * delta
            e_minus = float(_compute(potential, atoms, pos)[keys.ENERGY])
            numeric[i, k] = -(e_plus - e_minus) / (2 * delta)
    idx = list(atoms_checked)
    scale = max(np.abs(forces[idx]).max(), 1e-12)
    error = float(np.abs(numeric[idx] - forces[idx]).max() / scale)
    if rtol is not None:
        assert error <= rtol, f"finite-difference forces differ from forces by relative {error:.3e} > {rtol:.1e}"
    return error


def check_translation_invariance(potential, atoms, atol: Optional[float] = 1e-10, seed: int = 0) -> float:
    """|E(x + t) - E(x)| for a random translation t (cell kept, positions not wrapped)."""
    rng = np.random.default_rng(seed)
    e0 = float(_compute(potential, atoms)[keys.ENERGY])
    shift = rng.normal(scale=3.0, size=3)
    e1 = float(_compute(potential, atoms, atoms.positions + shift)[keys.ENERGY])
    error = abs(e1 - e0)
    if atol is not None:
        assert error <= atol, f"translation changed the energy by {error:.3e} eV > {atol:.1e}"
    return error


def check_permutation_invariance(potential, atoms, atol: Optional[float] = 1e-10, seed: int = 0) -> Dict[str, float]:
    """|ΔE| and max |F_perm - F[perm]| for a random relabelling of the atoms."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(atoms))
    ref = _compute(potential, atoms)
    permuted = atoms[perm]
    out = _compute(potential, permuted)
    de = abs(float(out[keys.ENERGY]) - float(ref[keys.ENERGY]))
    df = float(np.abs(out[keys.FORCES] - ref[keys.FORCES][perm]).max())
    if atol is not None:
        assert de <= atol, f"permutation changed the energy by {de:.3e} eV > {atol:.1e}"
        assert df <= max(atol * 1e3, 1e-7), f"permutation changed the forces by {df:.3e} eV/Å"
    return {"energy": de, "forces": df}


def rotation_invariance_error(potential, atoms, n_rotations: int = 100, seed: int = 0) -> Dict[str, float]:
    """Energy invariance and force equivariance errors over random rotations.

    Returns max and mean |E(Rx) - E(x)| (eV) and max |F(Rx) - R F(x)| (eV/Å).  Exact
    (float round-off) for exactly equivariant models; for grid-based ones it measures the
    discretisation of S^2.
    """
    rng = np.random.default_rng(seed)
    ref = _compute(potential, atoms)
    e0 = float(ref[keys.ENERGY])
    f0 = ref[keys.FORCES]
    centre = atoms.positions.mean(axis=0)
    de, df = [], []
    for _ in range(n_rotations):
        rot = random_rotation(rng)
        rotated = atoms.copy()
        rotated.positions = (atoms.positions - centre) @ rot.T + centre
        rotated.cell = np.asarray(atoms.cell) @ rot.T
        out = _compute(potential, rotated)
        de.append(abs(float(out[keys.ENERGY]) - e0))
        df.append(float(np.abs(out[keys.FORCES] - f0 @ rot.T).max()))
    return {"energy_max": float(np.max(de)), "energy_mean": float(np.mean(de)),
            "forces_max": float(np.max(df)), "forces_mean": float(np.mean(df)),
            "energy_scale": float(np.abs(ref[keys.ENERGIES]).mean())}


def rotation_tolerance(potential) -> Dict[str, float]:
    """What `mlmd audit` allows a model under rotation: 1 % of its own test errors (force MAE,
    eV/Å; energy MAE per atom, eV) as its metadata records them, else 1e-4 eV/Å and 1e-5 eV/atom."""
    training = potential.metadata.get(keys.META_TRAINING, {}) or {}
    force_mae = training.get("force_mae_eV_per_A")
    energy_mae = training.get("energy_mae_meV_per_atom")
    return {"forces": 0.01 * float(force_mae) if force_mae else 1e-4,
            "energy_per_atom": 0.01 * float(energy_mae) * 1e-3 if energy_mae else 1e-5,
            "source": "1% of the file's test MAE" if force_mae else "no test metrics in the file: fixed"}


def check_rotation_invariance(potential, atoms, n_rotations: int = 100, tolerance: Optional[Dict] = None,
                              seed: int = 0) -> Dict[str, float]:
    """Rotation errors (:func:`rotation_invariance_error`) and what follows from them for one
    frame: the net torque |sum_i (x_i - c) x F_i| (eV) of an open frame and the largest element of
    the antisymmetric part of the virial (eV) of a periodic one.  Both vanish for an exactly
    invariant model; a lab-fixed orientation grid spins an isolated molecule and gives a bulk an
    antisymmetric stress.

    With ``tolerance`` ({"forces": eV/Å, "energy_per_atom": eV}, see :func:`rotation_tolerance`)
    it asserts max |ΔF| and max |ΔE|/N within it, and the torque (virial) within the force
    tolerance times sum_i |x_i - c|.
    """
    errors = rotation_invariance_error(potential, atoms, n_rotations, seed)
    n = len(atoms)
    centre = atoms.positions.mean(axis=0)
    lever = float(np.linalg.norm(atoms.positions - centre, axis=1).sum())
    periodic = bool(np.asarray(atoms.pbc).any())
    if periodic:
        if potential.metadata.get(keys.META_STRESS, False) and np.asarray(atoms.pbc).all():
            stress = _compute(potential, atoms, stress=True)[keys.STRESS]
            virial = -stress * atoms.get_volume()
            errors["virial_antisymmetric"] = float(np.abs(0.5 * (virial - virial.T)).max())
        else:
            errors["virial_antisymmetric"] = float("nan")
    else:
        forces = _compute(potential, atoms)[keys.FORCES]
        errors["torque"] = float(np.linalg.norm(np.cross(atoms.positions - centre, forces).sum(axis=0)))
    errors["energy_max_per_atom"] = errors["energy_max"] / n
    if tolerance is not None:
        tol_f = float(tolerance["forces"])
        tol_e = float(tolerance["energy_per_atom"])
        assert errors["forces_max"] <= tol_f and errors["energy_max_per_atom"] <= tol_e, \
            (f"rotation changed forces by up to {errors['forces_max']:.2e} eV/Å (allowed {tol_f:.1e}) and "
             f"energy by {errors['energy_max_per_atom']:.2e} eV/atom (allowed {tol_e:.1e}): not invariant")
        spin = errors.get("torque", errors.get("virial_antisymmetric", 0.0))
        assert not spin > tol_f * lever, \
            (f"net torque / antisymmetric virial {spin:.2e} eV (allowed {tol_f * lever:.1e}): "
             "the forces are not equivariant")
    return errors


def check_cutoff_continuity(potential, step: float = 1e-5, atol: Optional[float] = 1e-6) -> float:
    """max |E(rc - step/2) - E(rc + step/2)| over dimers of the model's species (eV)."""
    from ase import Atoms

    rc = potential.cutoff
    worst = 0.0
    species = potential.species
    for a in species:
        for b in species:
            if b < a:
                continue
            energies = []
            for r in (rc - step / 2, rc + step / 2):
                dimer = Atoms(numbers=[a, b], positions=[[0, 0, 0], [r, 0, 0]])
                energies.append(float(_compute(potential, dimer)[keys.ENERGY]))
            worst = max(worst, abs(energies[0] - energies[1]))
    if atol is not None:
        assert worst <= atol, f"energy jumps by {worst:.3e} eV across the cutoff (> {atol:.1e})"
    return worst


def check_cutoff_force_continuity(potential, step: float = 1e-5, atol: Optional[float] = None) -> float:
    """max |F(rc - step/2) - F(rc + step/2)| over dimers of the model's species (eV/Å).

    Beyond the cutoff a dimer feels no force; a model whose energy is continuous at rc but whose
    slope is not (an envelope that goes to zero with a kink) gives a force jump that breaks
    energy conservation each time a pair crosses rc, which the energy check cannot see.
    """
    from ase import Atoms

    rc = potential.cutoff
    tol = atol if atol is not None else (1e-6 if potential.dtype.itemsize == 8 else 1e-4)
    worst = 0.0
    species = potential.species
    for a in species:
        for b in species:
            if b < a:
                continue
            forces = []
            for r in (rc - step / 2, rc + step / 2):
                dimer = Atoms(numbers=[a, b], positions=[[0, 0, 0], [r, 0, 0]])
                forces.append(_compute(potential, dimer)[keys.FORCES])
            worst = max(worst, float(np.abs(forces[0] - forces[1]).max()))
    if tol is not None:
        assert worst <= tol, f"forces jump by {worst:.3e} eV/Å across the cutoff (> {tol:.1e})"
    return worst


def check_isolated_atoms(potential, atol: Optional[float] = None) -> Dict[str, float]:
    """Isolated atoms feel no force; two atoms beyond the cutoff have the sum of their energies."""
    from ase import Atoms

    tol = atol if atol is not None else (1e-10 if potential.dtype.itemsize == 8 else 1e-4)
    single = {}
    max_force = 0.0
    for z in potential.species:
        out = _compute(potential, Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]]))
        single[z] = float(out[keys.ENERGY])
        max_force = max(max_force, float(np.abs(out[keys.FORCES]).max()))
        assert np.isfinite(single[z]), f"isolated atom Z={z} has a non-finite energy"
    worst = 0.0
    far = 2.0 * potential.cutoff + 1.0
    for a in potential.species:
        for b in potential.species:
            pair = Atoms(numbers=[a, b], positions=[[0, 0, 0], [far, 0, 0]])
            e = float(_compute(potential, pair)[keys.ENERGY])
            worst = max(worst, abs(e - single[a] - single[b]))
    assert max_force == 0.0, f"an isolated atom feels a force of {max_force:.3e} eV/Å"
    assert worst <= tol * max(1.0, max(abs(v) for v in single.values())), \
        f"two atoms beyond the cutoff differ from the sum of isolated energies by {worst:.3e} eV"
    return {"max_force": max_force, "separated_pair_error": worst}


def check_committee_consistency(potential, atoms) -> Dict[str, float]:
    """Committee outputs agree with their definitions from the member outputs."""
    out = _compute(potential, atoms)
    if potential.committee_size == 1:
        assert keys.ENERGY_STD not in out, "a single model must not report committee statistics"
        return {"energy_std": 0.0, "uncertainty": 0.0}
    e_m = out[keys.MEMBER_ENERGIES]
    f_m = out[keys.MEMBER_FORCES]
    tol = 1e-9 if potential.dtype.itemsize == 8 else 1e-4
    scale = max(1.0, float(np.abs(e_m).max()))
    assert abs(e_m.mean() - out[keys.ENERGY]) <= tol * scale, "energy is not the member mean"
    assert np.allclose(f_m.mean(0), out[keys.FORCES], atol=tol * 10), "forces are not the member mean"
    assert abs(e_m.std() - out[keys.ENERGY_STD]) <= tol * scale, "energy_std is not the members' std"
    sigma = np.sqrt(((f_m - f_m.mean(0)) ** 2).sum(-1).mean(0))
    assert np.allclose(sigma, out[keys.FORCES_STD], atol=tol * 10), "forces_std is not the members' std"
    calib = float(potential.metadata.get(keys.META_CALIBRATION, 1.0))
    assert abs(sigma.max() * calib - out[keys.UNCERTAINTY]) <= tol * 10, "uncertainty != max forces_std x calibration"
    assert out[keys.ENERGY_STD] > 0.0, "committee members are identical (energy_std = 0)"
    # the members' own forces, from central differences of their own energies (not from the
    # module's member_forces): the committee statistics must follow from these
    delta = 1e-4 if potential.dtype.itemsize == 8 else 1e-2
    atoms_checked = sorted(set(np.linspace(0, len(atoms) - 1, min(3, len(atoms))).round().astype(int)))
    fd_forces = np.zeros((potential.committee_size, len(atoms_checked), 3))
    for row, i in enumerate(atoms_checked):
        for k in range(3):
            energies = []
            for sign in (+1.0, -1.0):
                positions = atoms.positions.copy()
                positions[i, k] += sign * delta
                energies.append(_compute(potential, atoms, positions)[keys.MEMBER_ENERGIES])
            fd_forces[:, row, k] = -(energies[0] - energies[1]) / (2 * delta)
    fd_sigma = np.sqrt(((fd_forces - fd_forces.mean(0)) ** 2).sum(-1).mean(0))
    fd_tol = 1e-5 if potential.dtype.itemsize == 8 else 5e-2
    force_scale = max(1.0, float(np.abs(fd_forces).max()))
    member_error = float(np.abs(fd_forces - f_m[:, atoms_checked]).max())
    assert member_error <= fd_tol * force_scale, \
        f"member forces differ from the members' own energy gradients by {member_error:.3e} eV/Å"
    assert np.allclose(fd_forces.mean(0), out[keys.FORCES][atoms_checked], atol=fd_tol * force_scale), \
        "forces are not the mean of the members' own forces"
    assert np.allclose(fd_sigma, out[keys.FORCES_STD][atoms_checked], atol=fd_tol * force_scale), \
        "forces_std is not the spread of the members' own forces"
    return {"energy_std": float(out[keys.ENERGY_STD]), "uncertainty": float(out[keys.UNCERTAINTY]),
            "member_force_error": member_error}


def check_periodic_images(potential, atoms, atol: Optional[float] = None, seed: int = 0) -> Dict[str, float]:
    """A periodic frame is the same frame whatever image each atom is given: moving atoms by whole
    lattice vectors (unwrapped positions) leaves energy and forces unchanged, and a 2x supercell
    along a periodic direction has twice the energy and the same forces, repeated.

    Returns |ΔE| (eV) and max |ΔF| (eV/Å) of both; an open frame returns zeros (nothing to check).
    """
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if not pbc.any():
        return {"unwrapped_energy": 0.0, "unwrapped_forces": 0.0, "supercell_energy": 0.0,
                "supercell_forces": 0.0, "periodic": False}
    rng = np.random.default_rng(seed)
    ref = _compute(potential, atoms)
    e0, f0 = float(ref[keys.ENERGY]), ref[keys.FORCES]
    images = rng.integers(-2, 3, size=(len(atoms), 3)) * pbc
    moved = _compute(potential, atoms, atoms.positions + images @ np.asarray(atoms.cell))
    repeat = [1, 1, 1]
    repeat[int(np.flatnonzero(pbc)[0])] = 2
    double = _compute(potential, atoms.repeat(repeat))
    result = {"unwrapped_energy": abs(float(moved[keys.ENERGY]) - e0),
              "unwrapped_forces": float(np.abs(moved[keys.FORCES] - f0).max()),
              "supercell_energy": abs(float(double[keys.ENERGY]) - 2.0 * e0),
              "supercell_forces": float(np.abs(double[keys.FORCES] - np.tile(f0, (2, 1))).max()),
              "periodic": True}
    tol = atol if atol is not None else (1e-8 if potential.dtype.itemsize == 8 else 1e-4)
    energy_tol = tol * max(1.0, abs(e0))
    assert result["unwrapped_energy"] <= energy_tol and result["unwrapped_forces"] <= tol * 100, \
        (f"moving atoms by lattice vectors changed the energy by {result['unwrapped_energy']:.3e} eV and the "
         f"forces by {result['unwrapped_forces']:.3e} eV/Å: the model does not use the periodic images")
    assert result["supercell_energy"] <= 2 * energy_tol and result["supercell_forces"] <= tol * 100, \
        (f"a 2x supercell's energy differs from twice the cell's by {result['supercell_energy']:.3e} eV "
         f"(forces by {result['supercell_forces']:.3e} eV/Å): the model does not use the periodic images")
    return result


def check_nve_drift(potential, atoms, steps: int = 200, timestep: float = 0.25, temperature: float = 300.0,
                    tolerance: Optional[float] = 1e-3, seed: int = 0) -> Dict[str, float]:
    """Velocity-Verlet NVE in mlmd's engine from ``atoms`` with velocities at ``temperature`` K:
    the largest |E_total(t) - E_total(0)| per atom (eV) over ``steps`` steps of ``timestep`` fs.

    Energy is conserved only when the forces are the gradient of the energy the integrator sees,
    smooth and continuous as atoms cross the cutoff and the neighbour list changes.
    """
    from .md.simulation import Simulation

    sim = Simulation(atoms.copy(), potential, integrator="verlet", timestep=timestep, temperature=temperature,
                     seed=seed)
    totals = []
    sim.attach(lambda s: totals.append(s.state.potential_energy + s.state.kinetic_energy), 1)
    sim.run(steps)
    totals = np.array(totals)
    drift = float(np.abs(totals - totals[0]).max() / len(atoms))
    if tolerance is not None:
        assert np.isfinite(drift) and drift <= tolerance, \
            f"NVE total energy moved by {drift:.3e} eV/atom in {steps * timestep:g} fs (> {tolerance:.1e})"
    return {"max_deviation_per_atom": drift, "time_fs": steps * timestep}


def example_atoms(potential):
    """The example frame stored in the model file (a training frame), as ase.Atoms."""
    from ase import Atoms

    frame = potential.metadata.get(keys.META_EXAMPLE)
    if frame is None:
        raise ValueError("the model file has no example frame in its metadata; pass atoms explicitly")
    return Atoms(numbers=frame["numbers"], positions=frame["positions"], cell=frame["cell"], pbc=frame["pbc"])


def audit(model, atoms=None, dtype: str = "float64", n_rotations: int = 100, print_report: bool = True) -> Dict:
    """Run every contract check on a model file and print a verdict table."""
    from .potential import Potential, load

    potential = model if isinstance(model, Potential) else load(model)
    potential = potential.with_dtype(dtype)
    if atoms is None:
        atoms = example_atoms(potential)
    fd_tol = 1e-6 if dtype == "float64" else 1e-2
    tolerance = rotation_tolerance(potential)
    if dtype != "float64":      # float32 round-off alone is ~1e-6 relative
        tolerance = {**tolerance, "forces": max(tolerance["forces"], 1e-3),
                     "energy_per_atom": max(tolerance["energy_per_atom"], 1e-4)}
    inv_tol = 1e-10 if dtype == "float64" else 1e-4
    checks = [
        ("output shapes", lambda: check_output_shapes(potential, atoms), lambda v: "ok"),
        ("forces = -dE/dx (finite differences, rel.)",
         lambda: check_forces_finite_difference(potential, atoms, rtol=fd_tol), lambda v: f"{v:.2e}"),
        ("translation |ΔE| eV", lambda: check_translation_invariance(potential, atoms, atol=inv_tol),
         lambda v: f"{v:.2e}"),
        ("permutation |ΔE| eV", lambda: check_permutation_invariance(potential, atoms, atol=inv_tol),
         lambda v: f"{v['energy']:.2e}"),
        (f"rotation, {n_rotations} random ({tolerance['source']})",
         lambda: check_rotation_invariance(potential, atoms, n_rotations, tolerance),
         lambda v: (f"max |ΔE| {v['energy_max_per_atom']:.2e} eV/atom, max |ΔF| {v['forces_max']:.2e} eV/Å "
                    f"(≤ {tolerance['forces']:.1e}); " + (f"antisymmetric virial {v['virial_antisymmetric']:.2e} eV"
                                                         if "virial_antisymmetric" in v
                                                         else f"net torque {v['torque']:.2e} eV"))),
        ("periodic images: unwrapped, 2x supercell", lambda: check_periodic_images(potential, atoms),
         lambda v: (f"|ΔE| {max(v['unwrapped_energy'], v['supercell_energy']):.2e} eV, |ΔF| "
                    f"{max(v['unwrapped_forces'], v['supercell_forces']):.2e} eV/Å") if v["periodic"]
         else "n/a (open frame)"),
        ("NVE, 200 x 0.25 fs at 300 K", lambda: check_nve_drift(potential, atoms),
         lambda v: f"max |ΔE_total| {v['max_deviation_per_atom']:.2e} eV/atom"),
        ("continuity at the cutoff |ΔE| eV", lambda: check_cutoff_continuity(potential, atol=1e-6 if dtype == "float64" else 1e-4),
         lambda v: f"{v:.2e}"),
        ("continuity at the cutoff |ΔF| eV/Å", lambda: check_cutoff_force_continuity(potential),
         lambda v: f"{v:.2e}"),
        ("isolated atoms", lambda: check_isolated_atoms(potential),
         lambda v: f"force {v['max_force']:.1e}, separated pair {v['separated_pair_error']:.1e} eV"),
        ("committee consistency", lambda: check_committee_consistency(potential, atoms),
         lambda v: f"σ_E {v['energy_std']:.2e} eV, σ_F max {v['uncertainty']:.2e} eV/Å"),
    ]
    rows = []
    verdict = "pass"
    for name, run, fmt in checks:
        try:
            value = run()
            rows.append((name, "pass", fmt(value)))
        except AssertionError as exc:
            rows.append((name, "FAIL", str(exc)))
            verdict = "fail"
        except (ValueError, RuntimeError) as exc:    # the model raised (e.g. NaN positions in MD)
            rows.append((name, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
            verdict = "fail"
    if print_report:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"mlmd audit ({dtype}): {getattr(potential, 'path', '')}")
        table.add_column("check")
        table.add_column("result")
        table.add_column("measured")
        for name, status, text in rows:
            table.add_row(name, f"[green]{status}[/]" if status == "pass" else f"[red]{status}[/]", text)
        console = Console()
        console.print(table)
        console.print(f"verdict: [bold]{verdict.upper()}[/]")
    return {"verdict": verdict, "checks": rows}
