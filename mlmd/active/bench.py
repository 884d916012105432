"""``mlmd bench active``: labels needed by the uncertainty-driven loop vs random selection.

Ethanol, GFN2-xTB.  An initial committee is trained on 50 frames of the shipped 300 K data
set; MD runs at 600 K in the internal engine with the loop on.  After every retraining the
committee's force MAE on an independent 600 K test set (GFN2-xTB MD, labelled by the same
oracle) is measured, which gives the loop's learning curve.  The random arm starts from the
same initial committee, labels frames drawn at random from the loop's own 600 K trajectory
in batches of the same size, fine-tunes with the same settings and is measured the same way.
Printed side by side: labels needed by each arm to reach the loop's final MAE.

Everything is cached in OUT (test set, initial committee), so a second run only redoes the arms.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List

import numpy as np

from .. import keys
from ..errors import InputError
from ..uncertainty import force_mae

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ETHANOL = os.path.join(ROOT, "systems", "ethanol")


def prepare(out: str, n_train: int = 50, n_val: int = 10, n_test300: int = 100, test_frames: int = 100,
            temperature: float = 600.0, hyperparameters=None, epochs: int = 300, progress: bool = True) -> Dict:
    """The cached inputs: 300 K train/val/test frames, the 600 K test set, the initial committee."""
    import ase.io

    from ..models.data import read_dataset, sample_md

    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, f"{name}.extxyz") for name in ("train300", "val300", "test300")}
    paths["test600"] = os.path.join(out, f"test_{int(temperature)}K.extxyz")
    paths["initial"] = os.path.join(out, "initial", "model.pt")
    if not all(os.path.isfile(paths[k]) for k in ("train300", "val300", "test300")):
        frames = read_dataset(os.path.join(ETHANOL, "data.extxyz"))
        order = np.random.default_rng(0).permutation(len(frames))
        cuts = np.cumsum([n_train, n_val, n_test300])
        for name, idx in zip(("train300", "val300", "test300"), np.split(order[:cuts[-1]], cuts[:-1])):
            ase.io.write(paths[name], [frames[i] for i in idx], format="extxyz")
    if not os.path.isfile(paths["test600"]):
        start = ase.io.read(os.path.join(ETHANOL, "ethanol.xyz"))
        tmp = paths["test600"] + ".part"
        if os.path.exists(tmp):
            os.remove(tmp)
        sample_md(start, "gfn2-xtb", tmp, frames=test_frames, temperature=temperature, interval=40,
                  equilibration=1000, seed=11, progress=progress)
        os.replace(tmp, paths["test600"])
    paths["initial"] = train_initial(paths, os.path.join(out, "initial"), n_train, epochs=epochs,
                                     hyperparameters=hyperparameters, progress=progress)
    return paths


def train_initial(paths: Dict, folder: str, n_train: int, epochs: int = 300, hyperparameters=None,
                  progress: bool = True) -> str:
    """A committee of 4 trained on the first ``n_train`` frames of ``paths["train300"]`` (validated on
    ``paths["val300"]``), cached in ``folder``; returns its model path.  Its training frames are
    ``folder/train.extxyz``, which is what a loop that starts from it fine-tunes on."""
    import ase.io

    from ..models.data import read_dataset
    from ..models.train import TrainConfig, train

    model = os.path.join(folder, "model.pt")
    if os.path.isfile(model):
        return model
    train_frames = read_dataset(paths["train300"])
    if not 1 <= n_train <= len(train_frames):
        raise InputError(f"n_train: the initial committee needs 1 to {len(train_frames)} training frames, "
                         f"got {n_train}")
    val_frames = read_dataset(paths["val300"])
    os.makedirs(folder, exist_ok=True)
    ase.io.write(os.path.join(folder, "train.extxyz"), train_frames[:n_train], format="extxyz")
    both = os.path.join(folder, "data.extxyz")
    ase.io.write(both, train_frames[:n_train] + val_frames, format="extxyz")
    hp = dict(hyperparameters or {"channels": 16, "layers": 2})
    config = TrainConfig(data=both, out=folder, committee=4, epochs=epochs, n_train=n_train, n_val=len(val_frames),
                         n_test=0, warmup_epochs=10, patience=epochs, hyperparameters=hp, progress=progress)
    train(config)
    return model


def calibrated_initial(model_path: str, val_path: str) -> str:
    """The committee at ``model_path`` with its σ calibrated on the frames of ``val_path`` (so that
    the trust levels mean the same before and after the first retraining); cached next to it."""
    import shutil

    from ..models.data import read_dataset
    from ..uncertainty import calibrate_file

    path = os.path.join(os.path.dirname(model_path), "calibrated.pt")
    if not os.path.isfile(path):
        shutil.copyfile(model_path, path + ".tmp")
        calibrate_file(path + ".tmp", read_dataset(val_path))
        os.replace(path + ".tmp", path)
    return path


HOSTS = ("engine", "openmm", "ase")


def make_host(kind: str, atoms, model: str, temperature: float, timestep: float = 0.5, friction: float = 1.0,
              seed: int = 1):
    """A Langevin MD of ``atoms`` with ``model`` in host ``kind`` (engine | openmm | ase), at
    ``temperature`` K, ``timestep`` fs, ``friction`` 1/ps; returns (host adapter, advance(n_steps))."""
    from .hosts import ASEHost, EngineHost, OpenMMHost

    if kind == "engine":
        import mlmd
        sim = mlmd.Simulation(atoms.copy(), model, integrator="langevin", timestep=timestep,
                              temperature=temperature, friction=friction, seed=seed)
        return EngineHost(sim), sim.run
    if kind == "ase":
        from ase import units
        from ase.md.langevin import Langevin
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
        from mlmd.plugins.ase import MLMDCalculator

        from ase.constraints import FixCom

        atoms = atoms.copy()
        atoms.calc = MLMDCalculator(model)
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
        atoms.set_constraint(FixCom())      # ASE's advice over Langevin(fixcm=True) for small systems
        dyn = Langevin(atoms, timestep * units.fs, temperature_K=temperature, friction=friction / (1000 * units.fs),
                       fixcm=False, rng=np.random.default_rng(seed + 1))
        return ASEHost(dyn), dyn.run
    if kind == "openmm":
        import openmm
        from openmm import app, unit

        import mlmd.plugins.openmm as mm_plugin
        from ..md.io import mdtraj_topology

        topology = mdtraj_topology(atoms).to_openmm()
        system = mm_plugin.create_system(model, topology)
        integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, friction / unit.picosecond,
                                                     timestep * unit.femtosecond)
        integrator.setRandomNumberSeed(seed)
        simulation = app.Simulation(topology, system, integrator, openmm.Platform.getPlatformByName("CPU"))
        simulation.context.setPositions(atoms.positions * 0.1)
        simulation.context.setVelocitiesToTemperature(temperature * unit.kelvin, seed + 1)
        return OpenMMHost(simulation, model, topology), simulation.step
    raise InputError(f"host: expected one of {HOSTS}, got {kind!r}")


def run_loop(paths: Dict, model: str, out: str, steps: int, temperature: float, sigma_lo: float, sigma_hi: float,
             batch_size: int, finetune, check_interval: int = 20, seed: int = 1, client=None,
             progress: bool = True, host: str = "engine", pool: int = 1, select: str = "sigma") -> Dict:
    """The uncertainty-driven arm in ``host``; returns its learning curve and the frames it visited.

    MD advances ``check_interval`` steps at a time and the learner checks between chunks, which
    is what its observer / OpenMM reporter does inside each host."""
    import shutil

    import ase.io
    from tqdm.auto import tqdm

    from ..models.data import read_dataset
    from ..uncertainty import Trigger, TrustLevels
    from .hooks import RetrainingHook
    from .loop import ActiveLearner

    workdir = os.path.join(out, "loop" if host == "engine" else f"loop_{host}")
    shutil.rmtree(workdir, ignore_errors=True)
    test = read_dataset(paths["test600"])
    hook = RetrainingHook(model, "gfn2-xtb", workdir, train_data=paths["train300"], val_data=paths["val300"],
                          client=client, finetune=finetune)
    curve = [(0, force_mae(hook.potential, test))]
    trigger = Trigger(TrustLevels(sigma_lo, sigma_hi), batch_size=batch_size, pool=pool, select=select)
    learner = ActiveLearner(hook, trigger, log=os.path.join(workdir, "learn.csv"), seed=seed)
    adapter, advance = make_host(host, ase.io.read(os.path.join(ETHANOL, "ethanol.xyz")), model, temperature,
                                 seed=seed)
    visited = []
    start = time.perf_counter()
    for _ in tqdm(range(steps // check_interval), desc=f"loop in {host}", disable=not progress):
        advance(check_interval)
        generation = hook.generation
        learner.check(adapter)
        if hook.generation != generation:
            curve.append((len(hook.labels), force_mae(hook.potential, test)))
        visited.append(adapter.frame())
    generation = hook.generation
    learner.finish(adapter)
    if hook.generation != generation:
        curve.append((len(hook.labels), force_mae(hook.potential, test)))
    ase.io.write(os.path.join(workdir, "visited.extxyz"), visited, format="extxyz")
    return {"curve": curve, "visited": visited, "hook": hook, "stats": dict(learner.stats),
            "counts": dict(learner.trigger.counts), "labels": len(hook.labels),
            "wall_s": time.perf_counter() - start}


def refit_mae(hook, final, test) -> float:
    """Force MAE on ``test`` of the hook's committee after a longer fine-tune (``final``) on all
    its training frames; the hook's own model is left as it was."""
    import tempfile

    import mlmd
    from ..potential import export
    from .finetune import finetune_committee

    train, _ = hook.split_frames()
    model, _, _ = finetune_committee(hook.potential, train, final, client=hook.client)
    with tempfile.TemporaryDirectory() as tmp:
        path = export(model, os.path.join(tmp, "refit.pt"), dict(hook.potential.metadata),
                      dtype=hook.potential.metadata[keys.META_DTYPE])
        return force_mae(mlmd.load(path), test)


def run_random(paths: Dict, model: str, out: str, frames: List, batch_size: int, max_labels: int, target: float,
               finetune, seed: int = 0, client=None, final=None, refit_at=()) -> Dict:
    """The random arm: batches of frames drawn at random from ``frames``, same hook, same settings;
    with ``final``, also the MAE after a refit (as the loop's final one) at each label count of
    ``refit_at``.  Stops at ``max_labels``, or once the in-loop MAE reaches ``target`` and every
    refit is made."""
    import shutil

    from ..models.data import read_dataset
    from .hooks import RetrainingHook

    workdir = os.path.join(out, "random")
    shutil.rmtree(workdir, ignore_errors=True)
    test = read_dataset(paths["test600"])
    hook = RetrainingHook(model, "gfn2-xtb", workdir, train_data=paths["train300"], val_data=paths["val300"],
                          client=client, finetune=finetune)
    order = np.random.default_rng(seed).permutation(len(frames))
    curve = [(0, force_mae(hook.potential, test))]
    refits = []
    start = time.perf_counter()
    for lo in range(0, min(max_labels, len(order)), batch_size):
        batch = [frames[i].copy() for i in order[lo:lo + batch_size]]
        for atoms in batch:
            atoms.info["active_host"] = "random"
        if hook.on_candidates(batch) is not None:
            curve.append((len(hook.labels), force_mae(hook.potential, test)))
        due = [count for count in refit_at if count <= len(hook.labels)]
        if final is not None and len(due) > len(refits):
            refits.append((len(hook.labels), refit_mae(hook, final, test)))
        if curve[-1][1] <= target and (final is None or len(refits) == len(refit_at)):
            break
    return {"curve": curve, "labels": len(hook.labels), "wall_s": time.perf_counter() - start, "refits": refits}


def labels_to_reach(curve, target: float) -> float:
    for labels, mae in curve:
        if mae <= target:
            return labels
    return float("nan")


def bench_active(out: str = "runs/bench_active", steps: int = 6000, temperature: float = 600.0,
                 sigma_lo: float = 0.3, sigma_hi: float = 3.0, batch_size: int = 8, epochs: int = 40,
                 final_epochs: int = 300, final_lr: float = 1e-2, dask: str = None, progress: bool = True,
                 hosts=("engine",), pool: int = 1, select: str = "sigma") -> Dict:
    """The loop in each of ``hosts`` and, with the engine, the random arm; prints the tables,
    writes OUT/active_bench.json (engine and random) or OUT/active_hosts.json, and a PNG.

    In-loop retrainings are short fine-tunes (``epochs`` at the default lr) so that MD waits
    little; the final committee of each run is a longer refit (``final_epochs`` at
    ``final_lr``) on all its labels, made once MD is over.  Every host starts from the same
    initial committee; the random arm draws its frames from the engine's trajectory and is
    refitted the same way once it has 1, 1.5 and 2 times as many labels as the loop, which
    compares the arms with converged training as well (the in-loop curves track how many
    short fine-tunes were made about as much as which frames were labelled)."""
    from ..models.data import read_dataset
    from .finetune import FinetuneConfig
    from .labeling import make_client

    unknown = sorted(set(hosts) - set(HOSTS))
    if unknown or not hosts:
        raise InputError(f"hosts: expected some of {HOSTS}, got {list(hosts)}")
    paths = prepare(out, temperature=temperature, progress=progress)
    model = calibrated_initial(paths["initial"], paths["val300"])
    test = read_dataset(paths["test600"])
    finetune = FinetuneConfig(epochs=epochs, batch_size=8)
    final = FinetuneConfig(epochs=final_epochs, lr=final_lr, batch_size=8) if final_epochs else None
    client = make_client(dask) if dask else None
    runs, per_host, rand = {}, {}, None
    try:
        for host in [h for h in HOSTS if h in hosts]:
            runs[host] = run_loop(paths, model, out, steps, temperature, sigma_lo, sigma_hi, batch_size, finetune,
                                  client=client, progress=progress, host=host, pool=pool, select=select)
            refit = (runs[host]["labels"], refit_mae(runs[host]["hook"], final, test)) if final is not None else None
            per_host[host] = _host_summary(runs[host], refit)
            if host == "engine":
                loop = runs[host]
                labels = max(loop["labels"], batch_size)
                schedule = [labels, batch_size * -(-3 * labels // (2 * batch_size)), 2 * labels]
                rand = run_random(paths, model, out, loop["visited"], batch_size,
                                  max_labels=3 * labels, target=loop["curve"][-1][1],
                                  finetune=finetune, client=client, final=final, refit_at=schedule)
    finally:
        if client is not None:
            client.close()
    initial_mae = next(iter(runs.values()))["curve"][0][1]
    settings = {"temperature_K": temperature, "steps": steps, "sigma_lo": sigma_lo, "sigma_hi": sigma_hi,
                "batch_size": batch_size, "finetune_epochs": epochs, "final_epochs": final_epochs,
                "final_lr": final_lr, "initial_mae": initial_mae, "pool": pool, "select": select}
    print(f"ethanol, GFN2-xTB, {temperature:.0f} K; initial committee (50 frames at 300 K): 600 K force MAE "
          f"{initial_mae:.4f} eV/Å")
    result = dict(settings, hosts=per_host, curves={h: r["curve"] for h, r in runs.items()})
    if rand is not None:
        result.update(_compare_with_random(runs["engine"], rand, per_host["engine"]))
        with open(os.path.join(out, "active_bench.json"), "w") as handle:
            json.dump(result, handle, indent=1)
        _plot(result, os.path.join(out, "active_bench.png"))
    else:
        with open(os.path.join(out, "active_hosts.json"), "w") as handle:
            json.dump(result, handle, indent=1)
    print(f"\nthe loop in each host (target: initial/final >= 2; final = the refit after MD, "
          f"{final_epochs} epochs at lr {final_lr:g})")
    print(f"{'host':<8}{'labels':>8}{'retrainings':>13}{'rollbacks':>11}{'last in-loop MAE':>18}"
          f"{'final MAE':>11}{'initial/final':>15}")
    for host, row in per_host.items():
        print(f"{host:<8}{row['labels']:>8}{row['retrainings']:>13}{row['rollbacks']:>11}{row['in_loop_mae']:>18.4f}"
              f"{row['final_mae']:>11.4f}{initial_mae / row['final_mae']:>15.2f}")
    return result


def _compare_with_random(loop: Dict, rand: Dict, summary: Dict) -> Dict:
    """Labels each arm needs to reach the loop's last in-loop MAE; prints the side-by-side table."""
    target = loop["curve"][-1][1]
    need_loop, need_random = labels_to_reach(loop["curve"], target), labels_to_reach(rand["curve"], target)
    ratio = need_loop / need_random if need_random == need_random and need_random else float("nan")
    print(f"{'arm':<22}{'labels':>8}{'retrainings':>13}{'last MAE':>12}")
    print(f"{'uncertainty loop':<22}{loop['labels']:>8}{loop['stats']['retrainings']:>13}{target:>12.4f}")
    print(f"{'random frames':<22}{rand['labels']:>8}{len(rand['curve']) - 1:>13}{rand['curve'][-1][1]:>12.4f}")
    print(f"labels to reach {target:.4f} eV/Å: loop {need_loop}, random {need_random} "
          f"(loop/random = {ratio:.2f}; target <= 0.50)")
    refit_ratio = float("nan")
    if rand["refits"]:
        loop_refit = summary["final_mae"]
        reached = [labels for labels, mae in rand["refits"] if mae <= loop_refit]
        refit_ratio = loop["labels"] / reached[0] if reached and loop["labels"] else float("nan")
        print(f"after a refit ({loop['labels']} labels for the loop): loop {loop_refit:.4f}; random "
              + ", ".join(f"{mae:.4f} with {labels}" for labels, mae in rand["refits"]) + " eV/Å")
        if reached:
            print(f"refitted, random needs {reached[0]} labels to match the loop: loop/random = {refit_ratio:.2f}")
        else:
            print(f"refitted, random does not match the loop with {rand['refits'][-1][0]} labels: "
                  f"loop/random < {loop['labels'] / rand['refits'][-1][0]:.2f}")
    return {"target_mae": target, "loop_curve": loop["curve"], "random_curve": rand["curve"],
            "loop_stats": loop["stats"], "loop_counts": loop["counts"], "labels_loop": need_loop,
            "labels_random": need_random, "loop_wall_s": loop["wall_s"], "random_wall_s": rand["wall_s"],
            "random_refits": rand["refits"], "refit_ratio": refit_ratio}


def _host_summary(loop: Dict, refit) -> Dict:
    return {"labels": loop["labels"], "retrainings": loop["stats"].get("retrainings", 0),
            "rollbacks": loop["stats"].get("rollbacks", 0), "in_loop_mae": loop["curve"][-1][1],
            "final_mae": refit[1] if refit is not None else loop["curve"][-1][1], "wall_s": loop["wall_s"]}


def _plot(result: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, key in (("uncertainty loop", "loop_curve"), ("random frames", "random_curve")):
        labels, mae = zip(*result[key])
        ax.plot(labels, mae, "o-", label=name)
    ax.axhline(result["target_mae"], color="k", ls="--", lw=0.8)
    if result.get("random_refits"):
        engine = result["hosts"]["engine"]
        ax.plot([engine["labels"]], [engine["final_mae"]], "s", color="C0", label="loop, refitted")
        labels, mae = zip(*result["random_refits"])
        ax.plot(labels, mae, "s", color="C1", label="random, refitted")
    ax.set_xlabel("new GFN2-xTB labels")
    ax.set_ylabel(f"force MAE on {result['temperature_K']:.0f} K test set (eV/Å)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
