"""The internal engine: integrators, thermostats, restarts, the run driver.

Physics runs use a Morse copper crystal (a cheap real potential in the contract) so that
thousands of steps take seconds; the ethanol committee runs in the NVE tests."""
import os

import numpy as np
import pytest

import mlmd
from mlmd import units
from mlmd.errors import InputError
from mlmd.md.integrators import degrees_of_freedom

from conftest import ETHANOL_DIR, ROOT, SHIPPED_MODEL


@pytest.fixture(scope="session")
def morse_file(tmp_path_factory):
    from mlmd.models.pair import export_morse

    return export_morse(tmp_path_factory.mktemp("morse") / "cu_morse.pt", cutoff=5.0)


@pytest.fixture(scope="session")
def morse_committee_file(tmp_path_factory):
    from mlmd.models.pair import export_morse

    return export_morse(tmp_path_factory.mktemp("morse") / "cu_morse_committee.pt", cutoff=5.0,
                        committee_size=3, spread=0.03)


def copper(repeat=3, rattle=0.05, seed=0):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(rattle, seed=seed)
    return atoms


def conserved_series(sim, steps, interval=10):
    values = []
    sim.attach(lambda s: values.append(s.conserved_energy), interval)
    sim.run(steps)
    return np.array(values)


def test_nve_energy_conservation_is_second_order(morse_file):
    """Halving dt cuts the total-energy fluctuation ~4x; no drift."""
    fluctuation = {}
    for dt in (4.0, 2.0):
        sim = mlmd.Simulation(copper(), morse_file, integrator="verlet", timestep=dt, temperature=600, seed=3)
        interval = max(1, int(round(10 / dt)))
        energy = conserved_series(sim, int(round(2000 / dt)), interval=interval)
        fluctuation[dt] = energy.std()
        time_ps = np.arange(len(energy)) * interval * dt * 1e-3      # samples every interval·dt fs
        drift = np.polyfit(time_ps, energy, 1)[0] / len(sim.state.positions)
        print(f"dt {dt} fs: conserved std {energy.std():.3e} eV, drift {drift:.2e} eV/atom/ps")
        assert abs(drift) < 1e-4
    ratio = fluctuation[4.0] / fluctuation[2.0]
    print(f"fluctuation ratio dt 4 fs / 2 fs: {ratio:.2f} (second order: 4)")
    assert 3.0 < ratio < 5.0


def test_nve_conserves_momentum_and_keeps_fixed_atoms(morse_file):
    atoms = copper()
    sim = mlmd.Simulation(atoms, morse_file, integrator="verlet", timestep=2.0, temperature=300, seed=1)
    momentum = (sim.state.masses[:, None] * sim.state.velocities).sum(0)
    assert np.abs(momentum).max() < 1e-12
    sim.run(200)
    momentum = (sim.state.masses[:, None] * sim.state.velocities).sum(0)
    assert np.abs(momentum).max() < 1e-9

    fixed = [0, 5, 17]
    sim = mlmd.Simulation(atoms, morse_file, integrator="langevin", timestep=2.0, temperature=300,
                          seed=1, fixed=fixed)
    start = sim.state.positions.copy()
    sim.run(100)
    assert np.array_equal(sim.state.positions[fixed], start[fixed])
    assert np.abs(sim.state.positions - start).max() > 0.01
    assert sim.dof == 3 * (len(atoms) - len(fixed))


def test_maxwell_boltzmann_temperature(morse_file):
    temperatures = [mlmd.Simulation(copper(4), morse_file, temperature=300, seed=s).temperature
                    for s in range(5)]
    # 256 atoms: the instantaneous T has a relative std of sqrt(2/765) = 5%
    assert abs(np.mean(temperatures) - 300) < 20
    a = mlmd.Simulation(copper(), morse_file, temperature=300, seed=7).state.velocities
    b = mlmd.Simulation(copper(), morse_file, temperature=300, seed=7).state.velocities
    assert np.array_equal(a, b)


@pytest.mark.parametrize("integrator", ["langevin", "bussi"])
def test_thermostat_canonical_few_atoms(morse_file, integrator):
    """The canonical kinetic-energy distribution where it is easy to tell apart: 4 atoms, N_f = 9,
    so std(K)/<K> = sqrt(2/N_f) = 0.47. Mean, relative std and a KS test against Gamma(N_f/2, kT)
    on 600 samples 80 fs apart (torch-sim's physical-validation idea, cheap enough for CI).
    Without Bussi's cross term 2 R_1 sqrt(c(1-c) K K_0/N_f) <T> stays right but std(K) does not."""
    from scipy import stats

    sim = mlmd.Simulation(copper(repeat=1), morse_file, integrator=integrator, timestep=4.0,
                          temperature=300, friction=20.0, tau=50.0, seed=5)
    sim.run(500)
    kinetic = []
    sim.attach(lambda s: kinetic.append(s.kinetic_energy), 20)
    sim.run(12000)
    kinetic = np.array(kinetic[1:])
    kt = units.BOLTZMANN_EV_PER_K * 300
    shape = sim.dof / 2
    rel_std = kinetic.std() / kinetic.mean()
    ks = stats.kstest(kinetic, stats.gamma(a=shape, scale=kt).cdf)
    print(f"{integrator}: N_f {sim.dof}, <K>/(N_f kT/2) {kinetic.mean() / (shape * kt):.3f}, "
          f"std(K)/<K> {rel_std:.3f} vs {np.sqrt(1 / shape):.3f}, KS p {ks.pvalue:.3g}, {len(kinetic)} samples")
    assert sim.dof == 9
    assert abs(kinetic.mean() / (shape * kt) - 1) < 0.1
    assert abs(rel_std / np.sqrt(1 / shape) - 1) < 0.12
    assert ks.pvalue > 1e-3


@pytest.mark.parametrize("integrator", ["langevin", "bussi"])
def test_thermostat_short(morse_file, integrator):
    """Mean T of a 108-atom crystal and the booked thermostat energy; the distribution is checked
    on few atoms above and at length in test_thermostat_canonical (slow)."""
    sim = mlmd.Simulation(copper(), morse_file, integrator=integrator, timestep=4.0, temperature=300,
                          friction=20.0, tau=50.0, seed=2)
    temps, conserved = [], []
    sim.attach(lambda s: (temps.append(s.temperature), conserved.append(s.conserved_energy)), 5)
    sim.run(1500)
    mean = np.mean(temps[len(temps) // 3:])
    print(f"{integrator}: mean T {mean:.1f} K, conserved std {np.std(conserved):.2e} eV")
    assert abs(mean - 300) < 30
    # the thermostat's energy is booked: the conserved quantity does not wander like E_total
    assert np.std(conserved) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("integrator", ["langevin", "bussi"])
def test_thermostat_canonical(morse_file, integrator):
    """Mean T within 2% of the target and a canonical kinetic-energy distribution."""
    from scipy import stats

    sim = mlmd.Simulation(copper(), morse_file, integrator=integrator, timestep=4.0, temperature=300,
                          friction=10.0, tau=100.0, seed=11)
    sim.run(2000)   # equilibrate
    kinetic, temps = [], []
    sim.attach(lambda s: (kinetic.append(s.kinetic_energy), temps.append(s.temperature)), 50)
    sim.run(60000)
    kinetic = np.array(kinetic)
    kt = units.BOLTZMANN_EV_PER_K * 300
    shape = sim.dof / 2
    ks = stats.kstest(kinetic, stats.gamma(a=shape, scale=kt).cdf)
    rel_std = kinetic.std() / kinetic.mean()
    print(f"{integrator}: mean T {np.mean(temps):.1f} K over {len(temps)} samples; "
          f"std(K)/<K> {rel_std:.4f} vs canonical {np.sqrt(1 / shape):.4f}; KS p = {ks.pvalue:.3f}")
    assert abs(np.mean(temps) - 300) < 6
    assert abs(rel_std / np.sqrt(1 / shape) - 1) < 0.1
    assert ks.pvalue > 1e-3


@pytest.mark.parametrize("integrator", ["verlet", "langevin", "bussi"])
def test_restart_is_exact(morse_file, tmp_path, integrator):
    """N steps + checkpoint + restart + N steps == 2N steps, bitwise."""
    def make():
        return mlmd.Simulation(copper(), morse_file, integrator=integrator, timestep=4.0,
                               temperature=500, seed=5, skin=0.5)

    full = make()
    full.run(300)
    first = make()
    first.run(150)
    first.save_checkpoint(tmp_path / "cp.npz")
    second = make()
    second.load_checkpoint(tmp_path / "cp.npz")
    second.run(150)
    assert second.state.step == full.state.step == 300
    assert np.array_equal(second.state.positions, full.state.positions)
    assert np.array_equal(second.state.velocities, full.state.velocities)
    assert second.conserved_energy == full.conserved_energy
    assert full.neighbor_builds > 1   # the skin list was rebuilt along the way


def test_checkpoint_rejects_other_system(morse_file, tmp_path):
    sim = mlmd.Simulation(copper(), morse_file, timestep=2.0)
    sim.save_checkpoint(tmp_path / "cp.npz")
    other = mlmd.Simulation(copper(2), morse_file, timestep=2.0)
    with pytest.raises(InputError, match="checkpoint"):
        other.load_checkpoint(tmp_path / "cp.npz")
    langevin = mlmd.Simulation(copper(), morse_file, integrator="langevin", temperature=300, timestep=2.0)
    with pytest.raises(InputError, match="integrator"):
        langevin.load_checkpoint(tmp_path / "cp.npz")


def test_observers_and_swap(morse_file, morse_committee_file):
    sim = mlmd.Simulation(copper(), morse_file, integrator="langevin", timestep=2.0, temperature=300, seed=0)
    seen = []
    sim.attach(lambda s: seen.append(s.state.step), 7)
    sim.run(30)
    assert seen == [0, 7, 14, 21, 28]
    assert np.isnan(sim.uncertainty)
    positions, velocities, step = sim.state.positions.copy(), sim.state.velocities.copy(), sim.state.step
    sim.swap_model(morse_committee_file)
    assert sim.state.step == step
    assert np.array_equal(sim.state.positions, positions)
    assert np.array_equal(sim.state.velocities, velocities)
    direct = mlmd.load(morse_committee_file).compute_atoms(sim.get_atoms())
    assert np.isclose(sim.potential_energy, direct["energy"], rtol=1e-12)
    assert np.allclose(sim.state.forces, direct["forces"], atol=1e-10)
    assert sim.uncertainty > 0
    with pytest.raises(InputError, match="interval"):
        sim.attach(print, 0)


def test_engine_matches_direct_evaluation(potential, periodic_triclinic):
    """Energies and forces the engine uses equal Potential.compute on the same frame."""
    atoms = periodic_triclinic
    atoms.positions += atoms.cell[0] * 2 - atoms.cell[2]    # unwrapped coordinates
    sim = mlmd.Simulation(atoms, potential, timestep=0.5)
    direct = potential.compute_atoms(atoms)
    assert np.isclose(sim.potential_energy, direct["energy"], rtol=1e-12)
    assert np.allclose(sim.state.forces, direct["forces"], atol=1e-10)


def test_ethanol_nve_short():
    """The shipped committee (float64) conserves energy: the quick version of the 10 ps run."""
    import ase.io

    atoms = ase.io.read(os.path.join(ETHANOL_DIR, "ethanol.xyz"))
    sim = mlmd.Simulation(atoms, SHIPPED_MODEL, integrator="verlet", timestep=0.5, temperature=300,
                          seed=1, dtype="float64")
    energy = conserved_series(sim, 400, interval=5)
    drift = np.polyfit(np.arange(len(energy)) * 2.5e-3, energy, 1)[0] / len(atoms)
    print(f"ethanol NVE 0.2 ps: conserved std {energy.std():.2e} eV, drift {drift:.2e} eV/atom/ps")
    assert energy.std() < 2e-3
    assert abs(drift) < 1e-3


@pytest.mark.slow
def test_ethanol_nve_10ps():
    """Acceptance: 0.5 fs, 10 ps NVE drift < 1e-4 eV/atom/ps; 0.25 fs cuts the fluctuation ~4x."""
    import ase.io

    atoms = ase.io.read(os.path.join(ETHANOL_DIR, "ethanol.xyz"))
    results = {}
    for dt, ps in ((0.5, 10.0), (0.25, 1.0)):
        sim = mlmd.Simulation(atoms, SHIPPED_MODEL, integrator="verlet", timestep=dt, temperature=300,
                              seed=1, dtype="float64")
        energy = conserved_series(sim, int(round(ps * 1000 / dt)), interval=int(round(2.5 / dt)))
        time_ps = np.arange(len(energy)) * 2.5e-3
        drift = np.polyfit(time_ps, energy, 1)[0] / len(atoms)
        first_ps = energy[time_ps <= 1.0]
        results[dt] = first_ps.std()
        print(f"ethanol NVE dt {dt} fs, {ps} ps: conserved std {energy.std():.3e} eV "
              f"(first ps {first_ps.std():.3e}), drift {drift:.2e} eV/atom/ps")
        if ps == 10.0:
            assert abs(drift) < 1e-4
    ratio = results[0.5] / results[0.25]
    print(f"fluctuation ratio 0.5 fs / 0.25 fs over the first ps: {ratio:.2f}")
    assert 3.0 < ratio < 5.0


def test_copper_committee_nve_with_pairs_crossing_the_cutoff():
    """The shipped copper committee (float64) in NVE at 600 K: its third shell (4.42 Å) sits at the
    4.5 Å cutoff, so pairs enter and leave the cutoff sphere all the time; the total energy still
    holds (a force jump at rc would show as a drift or steps in it)."""
    import ase.io

    from mlmd.neighbors import neighbor_pairs

    folder = os.path.join(ROOT, "systems", "copper")
    atoms = ase.io.read(os.path.join(folder, "data.extxyz"), 0)
    sim = mlmd.Simulation(atoms, os.path.join(folder, "copper_committee.pt"), integrator="verlet",
                          timestep=2.0, temperature=600, seed=2, dtype="float64")
    cutoff = sim.potential.cutoff
    pair_sets, energy = [], []

    def sample(s):
        energy.append(s.conserved_energy)
        edge_index, shifts = neighbor_pairs(s.state.positions, s.state.cell, s.state.pbc, cutoff)
        # a pair is (i, j, image): in a 7.2 Å box every (i, j) has some image inside 4.5 Å
        image = np.rint(shifts @ np.linalg.inv(s.state.cell)).astype(int)
        pair_sets.append(set(map(tuple, np.column_stack([edge_index.T, image]).tolist())))

    sim.attach(sample, 5)
    sim.run(300)
    crossings = sum(len(a ^ b) for a, b in zip(pair_sets, pair_sets[1:])) // 2
    energy = np.array(energy)
    time_ps = np.arange(len(energy)) * 5 * 2.0e-3
    drift = np.polyfit(time_ps, energy, 1)[0] / len(atoms)
    print(f"copper NVE 0.6 ps at 600 K: {crossings} pair crossings of rc = {cutoff} Å, conserved std "
          f"{energy.std():.2e} eV, drift {drift:.2e} eV/atom/ps")
    assert crossings > 10
    assert energy.std() < 2e-3 and abs(drift) < 2e-4


def test_degrees_of_freedom():
    assert degrees_of_freedom(np.zeros(10, bool), True) == 27
    assert degrees_of_freedom(np.zeros(10, bool), False) == 30
    assert degrees_of_freedom(np.array([True] + [False] * 9), True) == 27


def test_bad_input(morse_file):
    with pytest.raises(InputError, match="integrator"):
        mlmd.Simulation(copper(), morse_file, integrator="leapfrog")
    with pytest.raises(InputError, match="temperature"):
        mlmd.Simulation(copper(), morse_file, integrator="langevin")
    with pytest.raises(InputError, match="timestep"):
        mlmd.Simulation(copper(), morse_file, timestep=-1)
    with pytest.raises(InputError, match="fixed"):
        mlmd.Simulation(copper(), morse_file, fixed=[1000])
    broken = copper()
    broken.positions[3, 1] = np.nan
    with pytest.raises(InputError, match="positions"):
        mlmd.Simulation(broken, morse_file)
    from ase import Atoms
    with pytest.raises(InputError, match="numbers"):
        mlmd.Simulation(Atoms("H2O", positions=np.eye(3)), morse_file)
