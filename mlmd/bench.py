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


class _TimedModule:
    """Wraps a model module and adds up the time spent inside it, so that a driver's overhead
    (step time minus model time) is measured within the same steps, free of run-to-run noise."""

    def __init__(self, module):
        self.module = module
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args):
        t0 = time.perf_counter()
        # freeing the autograd graph is part of the model's cost (files older than the
        # in-module detach keep it alive in their outputs)
        out = {key: value.detach() for key, value in self.module(*args).items()}
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def md_drivers(potential, atoms, timestep: float, steps: int, rounds: int = 5, warmup: int = 10,
               drivers=("mlmd", "ase", "openmm")) -> Dict[str, Dict[str, float]]:
    """Per-step cost of NVE MD of ``atoms`` with ``potential`` in each driver.

    mlmd    mlmd.Simulation, velocity Verlet
    ase     ase.md.VelocityVerlet with mlmd.plugins.ase.MLMDCalculator
    openmm  OpenMM CPU platform, VerletIntegrator, mlmd.plugins.openmm.create_python_force
    All three call the same module through a timer and use the same Numba Verlet list (1 Å
    skin), so the overhead (step - model call) is the driver's own.  Returns for each driver
    seconds per step (``step``) and inside the model (``model``), each the fastest of
    ``rounds`` interleaved rounds, and the median over rounds of their difference (``overhead``).
    """
    import dataclasses

    from . import units
    from .md.integrators import maxwell_boltzmann

    atoms = atoms.copy()
    velocities = maxwell_boltzmann(atoms.get_masses(), 300.0, np.random.default_rng(0))
    atoms.set_momenta(velocities * atoms.get_masses()[:, None] / units.FS)
    steppers = {}
    for name in drivers:
        timed = _TimedModule(potential.module)
        wrapped = dataclasses.replace(potential, module=timed)
        if name == "mlmd":
            from .md.simulation import Simulation
            # the threads this benchmark runs under, as the ASE and OpenMM drivers beside it
            steppers[name] = (Simulation(atoms, wrapped, integrator="verlet", timestep=timestep, skin=1.0,
                                         threads=torch.get_num_threads()).run, timed)
        elif name == "ase":
            from ase.md.verlet import VelocityVerlet

            from .plugins.ase import MLMDCalculator
            ase_atoms = atoms.copy()
            ase_atoms.calc = MLMDCalculator(wrapped, skin=1.0)
            steppers[name] = (VelocityVerlet(ase_atoms, timestep=timestep * units.FS).run, timed)
        elif name == "openmm":
            steppers[name] = (_openmm_stepper(wrapped, atoms, timestep), timed)
    samples: Dict[str, List] = {name: [] for name in steppers}
    for name, (run_steps, _) in steppers.items():
        run_steps(warmup)
    for _ in range(rounds):            # interleaved, so slow phases of the machine hit every driver
        for name, (run_steps, timed) in steppers.items():
            timed.seconds, timed.calls = 0.0, 0
            t0 = time.perf_counter()
            run_steps(steps)
            total = time.perf_counter() - t0
            samples[name].append((total / steps, timed.seconds / max(timed.calls, 1),
                                  (total - timed.seconds) / steps))
    # fastest round for the times (least disturbed), median round for the difference
    return {name: {"step": float(np.min(np.array(rows)[:, 0])), "model": float(np.min(np.array(rows)[:, 1])),
                   "overhead": float(np.median(np.array(rows)[:, 2]))}
            for name, rows in samples.items()}


def _openmm_stepper(potential, atoms, timestep: float, path: str = "python"):
    import openmm
    from openmm import unit

    from . import units
    from .plugins.openmm import create_python_force, create_torch_force

    system = openmm.System()
    for mass in atoms.get_masses():
        system.addParticle(float(mass))
    if atoms.pbc.all():
        a, b, c = (openmm.Vec3(*row) * units.ANGSTROM_TO_NM for row in np.asarray(atoms.cell))
        system.setDefaultPeriodicBoxVectors(a, b, c)
    if path == "python":
        force = create_python_force(potential, atoms.get_atomic_numbers(), periodic=bool(atoms.pbc.all()), skin=1.0)
    else:
        force = create_torch_force(potential, atoms.get_atomic_numbers(), periodic=bool(atoms.pbc.all()))
    system.addForce(force)
    integrator = openmm.VerletIntegrator(timestep * 1e-3)   # ps
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    context.setPositions(atoms.positions * units.ANGSTROM_TO_NM * unit.nanometer)
    context.setVelocities(atoms.get_velocities() * units.FS * units.ANGSTROM_PER_FS_TO_NM_PER_PS
                          * unit.nanometer / unit.picosecond)

    def steps(n):
        integrator.step(n)

    steps.context = context   # the integrator is only usable while its Context lives
    return steps


def bench_md(sizes=(3, 7, 14), ethanol_model: str = "", steps_budget_s: float = 2.0) -> List[Dict]:
    """Driver overhead per step (step time minus the model call inside it), side by side.

    A Morse copper model (float64 TorchScript, energy + autograd forces) at ~100, 1k and 10k
    atoms (cubic fcc supercells of ``sizes`` cells a side), then the ethanol committee.
    Prints a markdown table; returns its rows.
    """
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
            steps = int(min(max(steps_budget_s / (3 * bare), 5), 1000))
            result = md_drivers(potential, atoms, timestep, steps)
            rows.append({"system": name, "atoms": len(atoms), "pairs": int(args[4].shape[1]),
                         "steps": steps, **result})
            print(f"{name}, {len(atoms)} atoms: " + ", ".join(
                f"{driver} {r['step'] * 1e3:.3f} ms/step (model {r['model'] * 1e3:.3f}, overhead "
                f"{r['overhead'] * 1e6:.0f} µs)" for driver, r in result.items()), flush=True)
    print(format_md_table(rows))
    return rows


def format_md_table(rows: List[Dict]) -> str:
    head = ("| system | atoms | model call ms | mlmd ms/step | ASE ms/step | OpenMM ms/step "
            "| mlmd overhead µs (% of model) | ASE overhead µs | OpenMM overhead µs "
            "| ASE/mlmd overhead | OpenMM/mlmd overhead | ASE/mlmd step |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        ours, ase, omm = row["mlmd"], row["ase"], row["openmm"]
        floor = max(ours["overhead"], 1e-7)
        lines.append(
            f"| {row['system']} | {row['atoms']} | {ours['model'] * 1e3:.3f} | {ours['step'] * 1e3:.3f} "
            f"| {ase['step'] * 1e3:.3f} | {omm['step'] * 1e3:.3f} "
            f"| {ours['overhead'] * 1e6:.0f} ({100 * ours['overhead'] / ours['model']:.1f}%) "
            f"| {ase['overhead'] * 1e6:.0f} | {omm['overhead'] * 1e6:.0f} "
            f"| {ase['overhead'] / floor:.1f} | {omm['overhead'] / floor:.1f} | {ase['step'] / ours['step']:.2f} |")
    return "\n".join(lines) + f"\n(torch threads {torch.get_num_threads()})"


def bench_skin(n_cells: int = 8, steps: int = 2000, skins=(0.0, 0.25, 0.5, 1.0),
               temperature: float = 300.0) -> List[Dict]:
    """Verlet-list statistics of Langevin runs of Morse copper: rebuild interval and amortized cost.

    Times every ``VerletList.update`` call of each run (rebuilds and the per-step filtering;
    skin 0 builds the list from scratch every step) and prints a markdown table.
    """
    from .models.pair import export_morse
    from .md.simulation import Simulation

    atoms = _copper(n_cells)
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = export_morse(os.path.join(tmp, "cu.pt"), cutoff=5.0)
        for skin in skins:
            sim = Simulation(atoms, model, integrator="langevin", timestep=2.0, temperature=temperature,
                             seed=0, skin=skin, threads=torch.get_num_threads())
            verlet = sim.forces.neighbors
            spent = []
            update = verlet.update

            def timed_update(positions, cell, pbc, update=update, spent=spent):
                t0 = time.perf_counter()
                result = update(positions, cell, pbc)
                spent.append(time.perf_counter() - t0)
                return result

            verlet.update = timed_update
            builds0 = verlet.builds
            sim.run(steps)
            builds = verlet.builds - builds0
            rows.append({"skin": skin, "builds": builds, "candidates": verlet.n_candidates,
                         "interval": steps / builds if builds else float("inf"),
                         "amortized_ms": 1e3 * float(np.mean(spent)), "step_ms": 1e3 * sim.wall_time / steps})
    lines = [f"Verlet list in {steps} steps of Langevin MD, {len(atoms)} atoms Cu (Morse, rc 5 Å), "
             f"{temperature:.0f} K, 2 fs",
             "| skin Å | builds | steps per build | candidates | list ms/step (amortized) | MD ms/step |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        interval = "never" if not row["builds"] else f"{row['interval']:.1f}"
        lines.append(f"| {row['skin']} | {row['builds']} | {interval} | {row['candidates']} "
                     f"| {row['amortized_ms']:.3f} | {row['step_ms']:.3f} |")
    print("\n".join(lines))
    return rows


OPENMM_SYSTEMS = (
    ("ethanol", os.path.join("systems", "ethanol", "ethanol_committee.pt"),
     os.path.join("systems", "ethanol", "ethanol.xyz")),
    ("alanine dipeptide", os.path.join("systems", "alanine_dipeptide", "alanine_dipeptide_committee.pt"),
     os.path.join("systems", "alanine_dipeptide", "alanine_dipeptide.pdb")),
)


def _openmm_temperature(context, n_atoms: int) -> float:
    """Instantaneous temperature (K) of an OpenMM context with no constraints."""
    from . import units

    kinetic = context.getState(getEnergy=True).getKineticEnergy()._value   # kJ/mol
    return 2.0 * kinetic * units.KJ_PER_MOL_TO_EV / (3 * n_atoms * units.BOLTZMANN_EV_PER_K)


def bench_openmm(systems=OPENMM_SYSTEMS, steps: int = 100, rounds: int = 7,
                 sizes=(300, 3000, 30000), compiled: bool = True) -> Dict:
    """OpenMM (CPU platform, Verlet 0.5 fs, 300 K) step time on the TorchForce and PythonForce
    paths vs the bare model call on the same molecule, and the TorchForce module's
    in-TorchScript pair search vs the Numba list at ``sizes`` atoms (random atoms at
    liquid-water density, 0.1 Å^-3, rc 5 Å).

    ``systems``: (name, model file, structure file) with paths relative to the repository.
    The bare call is the model module with its pairs built once, called from Python.  Every
    runner is warmed up (TorchScript's executor optimises after a few calls) and the rounds
    are interleaved; the table gives the median round (and the fastest). With ``compiled``, the
    bare call and the PythonForce path also run the compiled form (:mod:`mlmd.compiled`; the
    TorchForce path is TorchScript by nature).  The MD must
    stay physical: a run whose temperature leaves 30-1500 K is reported as an error, because an
    exploded molecule has no pairs and times as a fast model.
    """
    import ase.io

    from . import units
    from .md.integrators import maxwell_boltzmann
    from .plugins.openmm.torch_force import neighbor_pairs_torch
    from .potential import load
    from .neighbors import neighbor_list

    lines = [f"OpenMM {_openmm_version()} CPU platform, VerletIntegrator 0.5 fs from 300 K; "
             f"median (fastest) of {rounds} interleaved rounds of {steps} steps; torch threads "
             f"{torch.get_num_threads()}",
             "| system | atoms | runner | ms/step | × bare call | T after (K) |", "|---|---|---|---|---|---|"]
    results: Dict = {"steps": {}}
    for name, model_file, structure in systems:
        potential = load(os.path.join(_ROOT, model_file))
        atoms = ase.io.read(os.path.join(_ROOT, structure))
        velocities = maxwell_boltzmann(atoms.get_masses(), 300.0, np.random.default_rng(0))
        atoms.set_momenta(velocities * atoms.get_masses()[:, None] / units.FS)
        args = _module_args(potential, atoms)
        runners = {"bare call": lambda n, args=args, module=potential.module: [module(*args) for _ in range(n)]}
        for path in ("torch", "python"):
            runners[f"{path} path"] = _openmm_stepper(potential, atoms, 0.5, path)
        if compiled:
            fast = load(os.path.join(_ROOT, model_file), compiled=True)
            if fast.is_compiled:
                runners["bare call, compiled"] = lambda n, args=args, module=fast.module: [module(*args)
                                                                                            for _ in range(n)]
                runners["python path, compiled"] = _openmm_stepper(fast, atoms, 0.5, "python")
        for run_steps in runners.values():
            run_steps(20)
        samples = {runner: [] for runner in runners}
        for _ in range(rounds):
            for runner, run_steps in runners.items():
                t0 = time.perf_counter()
                run_steps(steps)
                samples[runner].append((time.perf_counter() - t0) / steps)
        median = {runner: float(np.median(times)) for runner, times in samples.items()}
        results["steps"][name] = median
        for runner, times in samples.items():
            temperature = ""
            if hasattr(runners[runner], "context"):
                kelvin = _openmm_temperature(runners[runner].context, len(atoms))
                if not 30.0 < kelvin < 1500.0:
                    raise RuntimeError(f"bench openmm: {name} on the {runner} reached {kelvin:.0f} K; "
                                       "the run is not physical and its timing would be meaningless")
                temperature = f"{kelvin:.0f}"
            lines.append(f"| {name} | {len(atoms)} | {runner} | {median[runner] * 1e3:.2f} "
                         f"({min(times) * 1e3:.2f}) | {median[runner] / median['bare call']:.3f} "
                         f"| {temperature} |")
    rng = np.random.default_rng(0)
    lines += ["", "Pair search of the TorchForce module (TorchScript) vs mlmd.neighbors (Numba), rc 5 Å",
              "| atoms | TorchScript ms | Numba ms | ratio |", "|---|---|---|---|"]
    scaling = {}
    for n in sizes:
        box = (n / 0.1) ** (1.0 / 3.0)
        positions = rng.uniform(0.0, box, (n, 3))
        cell = np.eye(3) * box
        ts = _time_call(lambda: neighbor_pairs_torch(torch.tensor(positions), torch.tensor(cell), True, 5.0), 3, 1)
        nb = _time_call(lambda: neighbor_list(positions, cell, [True] * 3, 5.0), 3, 1)
        scaling[n] = (ts, nb)
        lines.append(f"| {n} | {ts * 1e3:.1f} | {nb * 1e3:.2f} | {ts / nb:.0f} |")
    print("\n".join(lines))
    results["pairs"] = scaling
    return results


def _openmm_version() -> str:
    import openmm
    return openmm.__version__
