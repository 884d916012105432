"""MD observables with committee credible intervals (mlmd.observables): the reweighting recovers
known distributions, the normalisations are the textbook ones, unreliable reweighting is said,
and `mlmd run` writes the table and the plot."""
import os

import numpy as np
import pytest

from mlmd import units
from mlmd.errors import InputError

from conftest import SHIPPED_MODEL


def bond_frames(distances):
    from ase import Atoms

    return [Atoms("H2", positions=[[0, 0, 0], [d, 0, 0]]) for d in distances]


def test_reweighting_recovers_each_members_distribution():
    """Harmonic bonds: frames sampled with the committee mean U_0 = k̄ x²/2 reweighted to member
    U_m = k_m x²/2 give member m's Boltzmann distribution, variance k_B T / k_m (red if β's sign
    or the weights' normalisation is wrong)."""
    from mlmd.observables import evaluate

    temperature = 300.0
    kt = units.BOLTZMANN_EV_PER_K * temperature
    springs = np.array([20.0, 30.0, 45.0])              # eV/Å²
    r0 = 1.0
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, np.sqrt(kt / springs.mean()), 60000)
    energies = 0.5 * springs[None, :] * x[:, None] ** 2                       # [T,M]
    spec = [{"kind": "distance", "atoms": [0, 1], "range": [r0 - 0.15, r0 + 0.15], "bins": 30}]
    report = evaluate(bond_frames(r0 + x), None, spec, temperature, member_energies=energies)
    result = report.results[0]
    for m, k in enumerate(springs):
        density = np.exp(-0.5 * k * (result.x - r0) ** 2 / kt) / np.sqrt(2 * np.pi * kt / k)
        assert np.abs(result.members[m] - density).max() < 0.06 * density.max(), m
    # the stiffest member's distribution is the narrowest: the interval is wide at the tails
    assert result.members[2][15] > result.members[0][15]
    # Kish's effective sample size: < 1 for members away from the mean, and reliable here
    assert 0.5 < report.ess_fraction.min() < 1.0 and report.reliable
    # mean potential energy of member m in its own ensemble is k_B T / 2 (equipartition, 1 dof)
    energy = evaluate(bond_frames(r0 + x), None, [{"kind": "energy"}], temperature,
                      member_energies=energies).results[0]
    np.testing.assert_allclose(energy.members[:, 0], 0.5 * kt, rtol=0.03)


def test_interval_is_the_t_predictive_interval_for_few_members():
    from scipy import stats

    from mlmd.observables import credible_interval

    estimates = np.array([[1.0], [2.0], [4.0], [5.0]])
    centre, lower, upper, method = credible_interval(estimates, 0.9)
    half = stats.t.ppf(0.95, 3) * np.std(estimates, ddof=1) * np.sqrt(1.25)
    assert centre[0] == 3.0 and upper[0] - 3.0 == pytest.approx(half) and 3.0 - lower[0] == pytest.approx(half)
    assert "t(0.95, 3)" in method
    many = np.random.default_rng(1).normal(size=(4000, 1))
    _, lower, upper, method = credible_interval(many, 0.9)
    assert lower[0] == pytest.approx(-1.645, abs=0.1) and upper[0] == pytest.approx(1.645, abs=0.1)
    assert "quantiles" in method


def test_periodic_rdf_of_an_ideal_gas_is_one():
    """Uniform random points in a periodic box: g(r) = 1 (red if the shell volume or pair count is off)."""
    from ase import Atoms

    from mlmd.observables import _histogram, frame_samples, parse_observables

    rng = np.random.default_rng(2)
    box = 12.0
    spec, = parse_observables([{"kind": "rdf", "elements": ["Ar", "Ar"], "r_max": 5.0, "bins": 10}])
    total = np.zeros(10)
    for _ in range(20):
        atoms = Atoms(f"Ar{300}", positions=rng.uniform(0, box, (300, 3)), cell=np.eye(3) * box, pbc=True)
        x, g = _histogram(spec, atoms, frame_samples(spec, atoms))
        total += g / 20
    np.testing.assert_allclose(total[2:], 1.0, atol=0.05)


def test_unreliable_reweighting_is_said():
    """Members whose energies differ by many k_B T between frames: one frame carries the weight."""
    from mlmd.observables import evaluate

    rng = np.random.default_rng(3)
    energies = rng.normal(0.0, 1.0, (50, 4))               # eV: 40 k_B T spreads
    spec = [{"kind": "distance", "atoms": [0, 1], "range": [0.9, 1.1], "bins": 4}]
    with pytest.warns(RuntimeWarning, match="reweighting to committee member .* not reliable.*member=m"):
        report = evaluate(bond_frames(rng.uniform(0.95, 1.05, 50)), None, spec, 300.0, member_energies=energies)
    assert not report.reliable and report.ess_fraction.min() < 0.1


def test_observables_are_checked_with_names():
    from ase import Atoms

    from mlmd.observables import parse_observables

    atoms = Atoms("CH4", positions=np.random.default_rng(0).normal(size=(5, 3)))
    for bad, match in [([{"kind": "rfd"}], r"observables\[0\]\.kind"),
                       ([{"kind": "angle", "atoms": [0, 1]}], r"observables\[0\]\.atoms: a angle needs 3"),
                       ([{"kind": "distance", "atoms": [0, 9]}], r"outside the structure's 0..4"),
                       ([{"kind": "rdf", "elements": ["C", "O"]}], r"elements: the structure has no O"),
                       ([{"kind": "energy", "bins": 0}], r"bins: give a positive"),
                       ([{"kind": "energy", "colour": 1}], r"unknown key")]:
        with pytest.raises(InputError, match=match):
            parse_observables(bad, atoms)


def test_simulation_can_follow_one_member(ethanol):
    """member=m: the dynamics feel member m's forces and energy, not the committee mean."""
    import mlmd

    potential = mlmd.load(SHIPPED_MODEL)
    out = potential.compute_atoms(ethanol)
    sim = mlmd.Simulation(ethanol.copy(), potential, member=2)
    np.testing.assert_allclose(sim.state.forces, out["member_forces"][2], atol=1e-5)
    assert sim.state.potential_energy == pytest.approx(out["member_energies"][2], abs=1e-4)
    assert np.abs(sim.state.forces - out["forces"]).max() > 1e-3
    with pytest.raises(InputError, match="member: give a committee member index in 0..3"):
        mlmd.Simulation(ethanol.copy(), potential, member=4)


def test_run_writes_observables_with_intervals(tmp_path, capsys):
    """`mlmd run` with observables: observables.csv (a row per bin, intervals around the estimate)
    and observables.png; a run without a thermostat is refused before anything is written."""
    import yaml

    from mlmd.cli import main

    config = {"structure": os.path.join(os.path.dirname(SHIPPED_MODEL), "ethanol.xyz"), "model": SHIPPED_MODEL,
              "integrator": "langevin", "temperature": 300.0, "friction": 5.0, "steps": 300, "seed": 2,
              "trajectory_interval": 5, "threads": 1, "output": str(tmp_path / "out"),
              "observables": [{"kind": "distance", "atoms": [0, 1], "range": [1.3, 1.8], "bins": 10},
                              {"kind": "energy"}]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    rows = np.genfromtxt(tmp_path / "out" / "observables.csv", delimiter=",", names=True, dtype=None,
                         encoding="utf-8")
    assert len(rows) == 11 and set(rows["observable"]) == {"distance_0-1", "potential_energy"}
    assert np.all(rows["lower"] <= rows["centre"] + 1e-12) and np.all(rows["centre"] <= rows["upper"] + 1e-12)
    assert np.all(rows["lower_total"] <= rows["lower"] + 1e-12)
    distance = rows[rows["observable"] == "distance_0-1"]
    assert abs(np.sum(distance["mean"]) * 0.05 - 1.0) < 1e-6       # a density over the range (C–C stays in it)
    assert os.path.getsize(tmp_path / "out" / "observables.png") > 10000

    config.update(integrator="verlet", output=str(tmp_path / "nve"))
    config.pop("temperature")
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 2
    assert "observables: reweighting to each committee member needs a canonical run" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "nve" / "log.csv")


def test_run_config_member_drives_one_member(tmp_path, capsys):
    """`member: m` in run.yaml runs member m alone; an index past the committee is refused by name."""
    import yaml

    from mlmd.cli import main
    from mlmd.md.run import read_log

    config = {"structure": os.path.join(os.path.dirname(SHIPPED_MODEL), "ethanol.xyz"), "model": SHIPPED_MODEL,
              "integrator": "verlet", "steps": 20, "member": 1, "threads": 1, "output": str(tmp_path / "m1")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--no-progress"]) == 0
    import ase.io

    import mlmd

    first = mlmd.load(SHIPPED_MODEL).compute_atoms(ase.io.read(config["structure"]))
    log = read_log(str(tmp_path / "m1" / "log.csv"))
    assert log["potential_eV"][0] == pytest.approx(first["member_energies"][1], abs=1e-4)
    assert abs(log["potential_eV"][0] - first["energy"]) > 1e-4
    config.update(member=4, output=str(tmp_path / "m4"))
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--no-progress"]) == 2
    assert "member: give a committee member index in 0..3" in capsys.readouterr().err


@pytest.mark.parametrize("elements", [["C", "H"], ["H", "H"]])
def test_rdf_pairs_equal_ase_neighbour_list(elements):
    """The A–B distances an rdf bins, against ASE's neighbour list, in a periodic box smaller than
    twice r_max (an atom meets its own images) and in a molecule."""
    from ase import Atoms
    from ase.data import atomic_numbers
    from ase.neighborlist import neighbor_list

    from mlmd.observables import frame_samples, parse_observables

    rng = np.random.default_rng(4)
    spec, = parse_observables([{"kind": "rdf", "elements": elements, "r_max": 4.0}])
    for atoms in (Atoms("C4H8", positions=rng.uniform(0, 3.8, (12, 3)), cell=np.eye(3) * 3.8, pbc=True),
                  Atoms("C4H8", positions=rng.normal(size=(12, 3)) * 1.5)):
        i, j, d = neighbor_list("ijd", atoms, 4.0)
        z_a, z_b = atomic_numbers[elements[0]], atomic_numbers[elements[1]]
        want = np.sort(d[(atoms.numbers[i] == z_a) & (atoms.numbers[j] == z_b)])
        if z_a == z_b:
            want = want[::2]            # ASE lists each pair both ways
        np.testing.assert_allclose(np.sort(frame_samples(spec, atoms)), want, atol=1e-12)


def test_density_bands_stay_non_negative():
    """Sparse bins with a wide sampling error: the band of a density is cut at 0, never below."""
    from mlmd.observables import evaluate

    rng = np.random.default_rng(5)
    spec = [{"kind": "distance", "atoms": [0, 1], "range": [0.9, 1.1], "bins": 20}]
    energies = rng.normal(0.0, 0.01, (30, 4))
    report = evaluate(bond_frames(rng.uniform(0.9, 1.1, 30)), None, spec, 300.0, member_energies=energies)
    result = report.results[0]
    assert (result.lower >= 0).all() and (result.lower_total >= 0).all()
    assert (result.lower_total <= result.centre + 1e-12).all() and (result.upper_total >= result.centre).all()
