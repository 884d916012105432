"""``mlmd bench stability``: time to failure of MD with the learning loop off vs on.

A scaled-down version of the protocol of "Forces are not enough" (Fu et al. 2023): ethanol
with GFN2-xTB as the reference, Langevin MD at 500 K with a 0.5 fs step from the same initial
committee, several seeds, a fixed length per seed.  The initial committee is trained on the first
``n_train`` of the 300 K frames of ``mlmd bench active`` (5 by default: the 50-frame committee of
that benchmark, and a 10-frame one, kept ethanol intact for 20 ps at 500 K with seed 1, which
leaves the loop nothing to rescue).  A run fails when any covalent bond of the start structure
deviates more than ``tolerance`` Å from its length there.  Loop off: the initial committee drives MD unchanged.
Loop on: the uncertainty loop labels, retrains, swaps and rolls back as in ``mlmd learn``, within
a budget of ``labels_per_ns`` reference labels per ns of MD.
Reported: the time to failure of every seed (a run that never fails is censored at its length),
the median of each arm and their ratio.  Time is MD time simulated (steps × timestep, a rolled
back segment included), so the loop is not credited for time it threw away.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, List, Tuple

import numpy as np

from ..errors import InputError


def covalent_bonds(atoms, scale: float = 1.2) -> Tuple[np.ndarray, np.ndarray]:
    """Bonded pairs (n_bonds, 2) of ``atoms`` (ASE natural cutoffs × ``scale``) and their lengths (Å)."""
    from ase.neighborlist import NeighborList, natural_cutoffs

    cutoffs = natural_cutoffs(atoms, mult=scale)
    nl = NeighborList(cutoffs, self_interaction=False, bothways=False, skin=0.0)
    nl.update(atoms)
    pairs = []
    for i in range(len(atoms)):
        neighbors, offsets = nl.get_neighbors(i)
        pairs.extend((i, int(j)) for j, o in zip(neighbors, offsets) if not np.any(o))
    if not pairs:
        raise InputError("structure: no covalent bonds found; the bond criterion needs a molecule")
    pairs = np.array(sorted(pairs), dtype=np.int64)
    return pairs, bond_lengths(atoms.positions, pairs)


def bond_lengths(positions: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Lengths (n_bonds,) in Å of ``pairs`` (n_bonds, 2) at ``positions`` (n_atoms, 3) Å."""
    return np.linalg.norm(positions[pairs[:, 1]] - positions[pairs[:, 0]], axis=1)


class _Failed(Exception):
    pass


def time_to_failure(model: str, structure, seed: int, picoseconds: float, temperature: float = 500.0,
                    timestep: float = 0.5, tolerance: float = 0.5, check_every: int = 20,
                    learner_factory=None, progress: bool = False) -> Dict:
    """One seed: MD until a bond deviates more than ``tolerance`` Å, or ``picoseconds`` of MD.

    learner_factory  None: loop off; else a function () -> ActiveLearner (loop on, checked
                     every ``check_every`` steps, the same cadence as the bond check)
    Returns {"seed", "failed", "time_ps", "max_deviation", "wall_s", "stats"}.
    """
    import mlmd
    from .hosts import EngineHost
    from .loop import ModelLostError

    pairs, reference = covalent_bonds(structure)
    sim = mlmd.Simulation(structure.copy(), model, integrator="langevin", timestep=timestep,
                          temperature=temperature, friction=1.0, seed=seed)   # 1/ps
    host = EngineHost(sim)
    learner = learner_factory() if learner_factory is not None else None
    worst = [0.0]

    def watch(s):
        deviation = float(np.abs(bond_lengths(s.state.positions, pairs) - reference).max())
        if not np.isfinite(deviation) or deviation > tolerance:
            worst[0] = deviation
            raise _Failed
        worst[0] = max(worst[0], deviation)
        if learner is not None:
            learner.check(host)

    sim.attach(watch, check_every)
    steps = int(round(picoseconds * 1000.0 / timestep))
    start = time.perf_counter()
    failed = False
    try:
        sim.run(steps, progress=progress)
    except (_Failed, ModelLostError):      # a broken bond, or the loop gave up: both are failures
        failed = True
    stats = {}
    if learner is not None:
        learner.close()
        stats = dict(learner.stats, labels=len(learner.hook.labels))
    return {"seed": seed, "failed": failed, "time_ps": sim.state.step * timestep / 1000.0,
            "max_deviation": worst[0], "wall_s": time.perf_counter() - start, "stats": stats}


def bench_stability(out: str = "runs/bench_stability", seeds: int = 5, picoseconds: float = 20.0,
                    temperature: float = 500.0, timestep: float = 0.5, tolerance: float = 0.5,
                    sigma_lo: float = 0.3, sigma_hi: float = 3.0, batch_size: int = 8, epochs: int = 40,
                    labels_per_ns: float = 4000.0, n_train: int = 5, active_inputs: str = "runs/bench_active",
                    progress: bool = True) -> Dict:
    """Both arms over ``seeds`` seeds; prints the table, writes OUT/stability.json and .png.

    Each run is written to OUT/runs/seed{N}_{arm}.json as it ends and reused by a later call with
    the same settings (delete OUT/runs to recompute, e.g. after changing the loop's code).

    labels_per_ns   the loop's budget (4000/ns: at most 8 + 80 labels in 20 ps)
    n_train         300 K frames the initial committee is trained on"""
    import ase.io

    from ..uncertainty import Trigger, TrustLevels
    from .bench import ETHANOL, calibrated_initial, prepare, train_initial
    from .finetune import FinetuneConfig

    for name, value in (("seeds", seeds), ("picoseconds", picoseconds), ("tolerance", tolerance),
                        ("n_train", n_train)):
        if not value > 0:
            raise InputError(f"{name}: must be > 0, got {value!r}")
    paths = prepare(active_inputs, progress=progress)
    folder = os.path.join(out, f"initial_{n_train}frames")
    model = calibrated_initial(train_initial(paths, folder, n_train, progress=progress), paths["val300"])
    structure = ase.io.read(os.path.join(ETHANOL, "ethanol.xyz"))
    os.makedirs(out, exist_ok=True)
    settings = {"n_train": n_train, "picoseconds": picoseconds, "temperature_K": temperature, "timestep_fs": timestep,
                "tolerance_A": tolerance, "sigma_lo": sigma_lo, "sigma_hi": sigma_hi, "batch_size": batch_size,
                "finetune_epochs": epochs, "labels_per_ns": labels_per_ns}
    runs: Dict[str, List[Dict]] = {"off": [], "on": []}
    for seed in range(1, seeds + 1):
        for arm in ("off", "on"):
            # each run is kept as it ends, so a stopped benchmark resumes at the run it was in
            record = os.path.join(out, "runs", f"seed{seed}_{arm}.json")
            if os.path.isfile(record):
                with open(record) as handle:
                    saved = json.load(handle)
                if saved["settings"] == settings:
                    runs[arm].append(saved["result"])
                    _print_run(seed, arm, saved["result"], " (kept from an earlier run)")
                    continue
            factory = None
            if arm == "on":
                workdir = os.path.join(out, f"loop_seed{seed}")
                shutil.rmtree(workdir, ignore_errors=True)
                hook_args = dict(train_data=os.path.join(folder, "train.extxyz"), val_data=paths["val300"],
                                 finetune=FinetuneConfig(epochs=epochs))
                trigger = Trigger(TrustLevels(sigma_lo, sigma_hi), batch_size=batch_size, labels_per_ns=labels_per_ns)
                factory = _learner_factory(model, workdir, hook_args, trigger, seed)
            result = time_to_failure(model, structure, seed, picoseconds, temperature, timestep, tolerance,
                                     learner_factory=factory, progress=progress)
            runs[arm].append(result)
            os.makedirs(os.path.dirname(record), exist_ok=True)
            with open(record + ".tmp", "w") as handle:
                json.dump({"settings": settings, "result": result}, handle, indent=1)
            os.replace(record + ".tmp", record)
            _print_run(seed, arm, result)
    summary = {arm: float(np.median([r["time_ps"] for r in runs[arm]])) for arm in runs}
    result = {"seeds": seeds, **settings, "runs": runs, "median_ps": summary,
              "ratio": summary["on"] / summary["off"] if summary["off"] > 0 else float("nan")}
    with open(os.path.join(out, "stability.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    _plot(result, os.path.join(out, "stability.png"))
    print(f"\nethanol, {temperature:.0f} K, {timestep:g} fs, {seeds} seeds x {picoseconds:g} ps, failure: a bond "
          f"off by > {tolerance:g} Å (censored at {picoseconds:g} ps); initial committee: {n_train} frames at "
          f"300 K; loop budget {labels_per_ns:g} labels/ns")
    print(f"{'arm':<12}{'failed':>8}{'median time to failure (ps)':>30}")
    for arm in ("off", "on"):
        failed = sum(r["failed"] for r in runs[arm])
        print(f"{'loop ' + arm:<12}{failed:>5}/{seeds:<2}{summary[arm]:>30.2f}")
    print(f"on/off = {result['ratio']:.2f} (target >= 2)")
    return result


def _print_run(seed: int, arm: str, result: Dict, note: str = "") -> None:
    print(f"seed {seed} loop {arm:>3}: {'failed' if result['failed'] else 'survived'} at "
          f"{result['time_ps']:.2f} ps (max bond deviation {result['max_deviation']:.3f} Å, "
          f"{result['stats'].get('labels', 0)} labels, {result['wall_s']:.0f} s){note}", flush=True)


def _learner_factory(model, workdir: str, hook_args: Dict, trigger, seed: int):
    def factory():
        from .hooks import RetrainingHook
        from .loop import ActiveLearner

        hook = RetrainingHook(model, "gfn2-xtb", workdir, **hook_args)
        return ActiveLearner(hook, trigger, log=os.path.join(workdir, "learn.csv"), seed=seed)
    return factory


def _plot(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for x, arm in enumerate(("off", "on")):
        for r in result["runs"][arm]:
            ax.plot(x, r["time_ps"], "x" if r["failed"] else "o", color="C3" if r["failed"] else "C2")
        ax.hlines(result["median_ps"][arm], x - 0.2, x + 0.2, color="k")
    ax.set_xticks([0, 1], ["loop off", "loop on"])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylabel("time to failure (ps); o = survived")
    ax.set_title(f"ethanol {result['temperature_K']:.0f} K, bond > {result['tolerance_A']:g} Å")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
