"""Benchmarks (``mlmd bench NAME``): side-by-side timings measured in one run, ratios printed.

Timings here are never asserted by tests; BENCHMARKS.md records the latest figures and
the commands that made them.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time_call(fn, repeats: int, warmup: int = 10) -> float:
    """Median seconds per call over ``repeats`` calls (after ``warmup``: TorchScript profiles first calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def bench_committee(model: str, sizes: List[int], repeats: int = 200, threads: int = 0) -> Dict[int, float]:
    """One energy+forces step of a committee of M members vs one member, same pairs.

    Models with the hyper-parameters and dtype of ``model`` (a model file) are built for
    each M (weights do not change the cost); the frame is the file's example frame.
    """
    from rich.console import Console
    from rich.table import Table

    from . import keys
    from .models.ponita import PonitaPotential
    from .neighbors import neighbor_pairs
    from .potential import export, load
    from .testing import example_atoms

    if threads:
        torch.set_num_threads(threads)
    ref = load(model)
    atoms = example_atoms(ref)
    meta = ref.metadata
    hp = meta[keys.META_HYPER]
    dtype = ref.dtype
    edge_index, shifts = neighbor_pairs(atoms.positions, np.asarray(atoms.cell), atoms.pbc, ref.cutoff)
    # the module's inputs, built once: the pairs are the caller's, as in the contract
    args = (torch.tensor(atoms.positions, dtype=dtype), torch.tensor(atoms.numbers),
            torch.tensor(np.asarray(atoms.cell), dtype=dtype), torch.tensor(atoms.pbc),
            torch.tensor(edge_index), torch.tensor(shifts, dtype=dtype), False)
    results: Dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in sizes:
            path = os.path.join(tmp, f"m{m}.pt")
            export(PonitaPotential(ref.species, committee_size=m, hyperparameters=hp), path, {},
                   dtype=meta[keys.META_DTYPE])
            module = load(path).module
            results[m] = _time_call(lambda: module(*args), repeats)
    shipped = None
    if ref.committee_size in results:
        shipped = _time_call(lambda: ref.module(*args), repeats)
    table = Table(title=f"committee cost: {len(atoms)} atoms, {edge_index.shape[1]} pairs, "
                        f"{meta[keys.META_DTYPE]}, {torch.get_num_threads()} threads")
    table.add_column("members M")
    table.add_column("ms / step (energy + forces)")
    table.add_column("x one member")
    base = results[min(results)]
    for m, seconds in results.items():
        table.add_row(str(m), f"{seconds * 1e3:.2f}", f"{seconds / base:.2f}")
    if shipped is not None:
        table.add_row(f"{ref.committee_size} (the file)", f"{shipped * 1e3:.2f}", f"{shipped / base:.2f}")
    Console().print(table)
    return results


def _copper(n_cells: int, seed: int = 0):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(n_cells)
    atoms.rattle(0.05, seed=seed)
    return atoms


def _module_args(potential, atoms):
    """The model's inputs for ``atoms`` with its pairs, built once (a bare call's inputs)."""
    from .neighbors import neighbor_pairs

    dtype = potential.dtype
    edge_index, shifts = neighbor_pairs(atoms.positions, np.asarray(atoms.cell), atoms.pbc, potential.cutoff)
    return (torch.tensor(atoms.positions, dtype=dtype), torch.tensor(atoms.numbers),
            torch.tensor(np.asarray(atoms.cell), dtype=dtype), torch.tensor(atoms.pbc),
            torch.tensor(edge_index), torch.tensor(shifts, dtype=dtype), False)


def _per_step(run_steps, steps: int, warmup: int) -> float:
    """Seconds per MD step: ``run_steps(n)`` advances n steps."""
    run_steps(warmup)
    t0 = time.perf_counter()
    run_steps(steps)
    return (time.perf_counter() - t0) / steps


def md_drivers(potential, atoms, timestep: float, steps: int, warmup: int = 10,
               drivers=("mlmd", "ase", "openmm")) -> Dict[str, float]:
    """Seconds per step of NVE MD of ``atoms`` with ``potential`` in each driver, and of a bare call.

    bare    one module call (energy + autograd forces) on fixed, precomputed pairs
    mlmd    mlmd.Simulation, velocity Verlet, Verlet list with a 1 Å skin
    ase     ase.md.VelocityVerlet with mlmd.plugins.ase.MLMDCalculator
    openmm  OpenMM CPU platform, VerletIntegrator, mlmd.plugins.openmm.create_python_force
    """
    from .md.integrators import maxwell_boltzmann

    atoms = atoms.copy()
    velocities = maxwell_boltzmann(atoms.get_masses(), 300.0, np.random.default_rng(0))
    from . import units
    atoms.set_momenta(velocities * atoms.get_masses()[:, None] / units.FS)
    args = _module_args(potential, atoms)

    def bare_calls(n):
        for _ in range(n):
            potential.module(*args)

    times = {"bare": _per_step(bare_calls, steps, warmup)}
    if "mlmd" in drivers:
        from .md.simulation import Simulation
        sim = Simulation(atoms, potential, integrator="verlet", timestep=timestep, skin=1.0)
        times["mlmd"] = _per_step(sim.run, steps, warmup)
    if "ase" in drivers:
        from ase.md.verlet import VelocityVerlet

        from .plugins.ase import MLMDCalculator
        ase_atoms = atoms.copy()
        ase_atoms.calc = MLMDCalculator(potential)
        dyn = VelocityVerlet(ase_atoms, timestep=timestep * units.FS)
        times["ase"] = _per_step(dyn.run, steps, warmup)
    if "openmm" in drivers:
        times["openmm"] = _per_step(_openmm_stepper(potential, atoms, timestep), steps, warmup)
    return times


def _openmm_stepper(potential, atoms, timestep: float):
    import openmm
    from openmm import unit

    from . import units
    from .plugins.openmm import create_python_force

    system = openmm.System()
    for mass in atoms.get_masses():
        system.addParticle(float(mass))
    if atoms.pbc.all():
        a, b, c = (openmm.Vec3(*row) * units.ANGSTROM_TO_NM for row in np.asarray(atoms.cell))
        system.setDefaultPeriodicBoxVectors(a, b, c)
    system.addForce(create_python_force(potential, atoms.get_atomic_numbers()))
    integrator = openmm.VerletIntegrator(timestep * 1e-3)   # ps
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(atoms.positions * units.ANGSTROM_TO_NM * unit.nanometer)
    context.setVelocities(atoms.get_velocities() / units.FS * 1e3 * units.ANGSTROM_TO_NM
                          * unit.nanometer / unit.picosecond)
    return integrator.step


def bench_md(sizes=(3, 7, 14), ethanol_model: str = "", steps_budget_s: float = 3.0) -> List[Dict]:
    """Driver overhead per step (step time minus one bare model call), side by side.

    A Morse copper model (float64 TorchScript, energy + autograd forces) at ~100, 1k and 10k
    atoms (cubic fcc supercells of ``sizes`` cells a side), then the ethanol committee.
    """
    from rich.console import Console
    from rich.table import Table

    from .models.pair import export_morse
    from .potential import load

    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        morse = load(export_morse(os.path.join(tmp, "cu_morse.pt"), cutoff=5.0))
        systems = [("Cu Morse", morse, _copper(n), 2.0) for n in sizes]
        if ethanol_model:
            import ase.io
            ethanol = ase.io.read(os.path.join(_ROOT, "systems", "ethanol", "ethanol.xyz"))
            systems.append(("ethanol committee", load(ethanol_model), ethanol, 0.5))
        for name, potential, atoms, timestep in systems:
            args = _module_args(potential, atoms)
            bare = _time_call(lambda: potential.module(*args), 3, 2)
            steps = int(min(max(steps_budget_s / (3 * bare), 10), 2000))
            times = md_drivers(potential, atoms, timestep, steps)
            row = {"system": name, "atoms": len(atoms), "steps": steps, **times}
            for driver in ("mlmd", "ase", "openmm"):
                row[f"{driver}_overhead"] = times[driver] - times["bare"]
            rows.append(row)
            print(f"{name} {len(atoms)} atoms: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()),
                  flush=True)
    table = Table(title=f"MD step cost (NVE), torch threads {torch.get_num_threads()}; "
                        "overhead = step - bare model call")
    for column in ("system", "atoms", "bare call ms", "mlmd ms", "ASE ms", "OpenMM ms",
                   "mlmd overhead µs (% of bare)", "ASE overhead µs", "OpenMM overhead µs",
                   "ASE/mlmd overhead", "OpenMM/mlmd overhead", "ASE/mlmd step"):
        table.add_column(column)
    for row in rows:
        ours = max(row["mlmd_overhead"], 1e-7)
        table.add_row(row["system"], str(row["atoms"]), f"{row['bare'] * 1e3:.3f}", f"{row['mlmd'] * 1e3:.3f}",
                      f"{row['ase'] * 1e3:.3f}", f"{row['openmm'] * 1e3:.3f}",
                      f"{row['mlmd_overhead'] * 1e6:.0f} ({100 * row['mlmd_overhead'] / row['bare']:.0f}%)",
                      f"{row['ase_overhead'] * 1e6:.0f}", f"{row['openmm_overhead'] * 1e6:.0f}",
                      f"{row['ase_overhead'] / ours:.1f}", f"{row['openmm_overhead'] / ours:.1f}",
                      f"{row['ase'] / row['mlmd']:.2f}")
    Console().print(table)
    return rows


def bench_skin(n_cells: int = 8, steps: int = 1000, skin: float = 1.0, temperature: float = 300.0) -> Dict:
    """Verlet-list statistics of a Langevin run of Morse copper: rebuild interval and amortized cost.

    Times every ``VerletList.update`` call of the run (rebuilds and the per-step filtering)
    and compares the amortized cost per step with building the list from scratch every step.
    """
    from .models.pair import export_morse
    from .md.simulation import Simulation
    from .neighbors import neighbor_list

    atoms = _copper(n_cells)
    with tempfile.TemporaryDirectory() as tmp:
        sim = Simulation(atoms, export_morse(os.path.join(tmp, "cu.pt"), cutoff=5.0), integrator="langevin",
                         timestep=2.0, temperature=temperature, seed=0, skin=skin)
        verlet = sim.forces.neighbors
        spent = []
        update = verlet.update

        def timed_update(positions, cell, pbc):
            t0 = time.perf_counter()
            result = update(positions, cell, pbc)
            spent.append(time.perf_counter() - t0)
            return result

        verlet.update = timed_update
        builds0 = verlet.builds
        sim.run(steps)
        builds = verlet.builds - builds0
    from_scratch = _time_call(lambda: neighbor_list(sim.state.positions, sim.state.cell, sim.state.pbc, 5.0), 10, 2)
    result = {"atoms": len(atoms), "steps": steps, "skin": skin, "builds": builds,
              "rebuild_interval": steps / max(builds, 1), "amortized_ms": 1e3 * float(np.mean(spent)),
              "scratch_ms": 1e3 * from_scratch}
    print(f"Verlet list, {len(atoms)} atoms Cu at {temperature:.0f} K, 2 fs, skin {skin} Å: "
          f"{builds} builds in {steps} steps (one every {result['rebuild_interval']:.1f} steps); "
          f"amortized {result['amortized_ms']:.3f} ms/step vs {result['scratch_ms']:.3f} ms for a list "
          f"from scratch every step ({result['scratch_ms'] / result['amortized_ms']:.1f}x)")
    return result
