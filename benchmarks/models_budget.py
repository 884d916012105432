"""Built-in committee vs MACE committee: the same frames, the same wall-clock budget, this machine.

For each system: ``mlmd train`` trains the built-in committee (4 members in one batched model)
for ``--budget-minutes`` of training; mace-torch's ``mace_run_train`` then trains 4 MACE members
one after the other on exactly the built-in run's train/val split, each for a quarter of the same
budget counted from its first epoch, so both sides get the same training wall time (data
preparation, final evaluation and export are outside it on both sides; a member always gets at
least one epoch, and the table shows each side's training seconds).  A MACE member is
stopped at its deadline and finished from its best-validation EMA checkpoint (MACE's own
``--restart_latest`` with ``--max_num_epochs`` at that epoch).  The members are imported into one
mlmd file (``mlmd.plugins.mace.import_mace``) and both files are scored the same way:

- test force / energy MAE on the held-out test split (the same frames for both),
- rotation error in float64 (max |F(Rx) - R F(x)| over 20 rotations of a test frame),
- MD ms/step in mlmd's engine (velocity Verlet, 0.5 fs, committee σ included), freshly loaded.

    .venv/bin/mlmd bench models --budget-minutes 6                    # ethanol, aspirin, copper
    .venv/bin/python benchmarks/models_budget.py --systems ethanol --budget-minutes 2

Nothing else may run beside it: two torch processes on two cores slow each other several-fold.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

# frames per split and the cutoff both sides use; the md frame is what the engine is timed on
SYSTEMS: Dict[str, Dict] = {
    "ethanol": {"n_train": 500, "n_val": 50, "n_test": 100, "cutoff": 5.0, "md": "ethanol.xyz"},
    "aspirin": {"n_train": 500, "n_val": 50, "n_test": 100, "cutoff": 5.0, "md": "aspirin.xyz"},
    "copper": {"n_train": 420, "n_val": 40, "n_test": 103, "cutoff": 4.5, "md": "cu_fcc_108.xyz", "stress": True},
}
MACE_ARGUMENTS = [  # mace-torch's README recipe (ScaleShiftMACE, AMSGrad lr 0.01, EMA 0.99), sized for a CPU
    "--model=ScaleShiftMACE", "--num_interactions=2", "--correlation=3", "--E0s=average",
    "--energy_weight=1.0", "--forces_weight=100.0", "--lr=0.01", "--amsgrad",
    "--ema", "--ema_decay=0.99", "--batch_size=10", "--valid_batch_size=20", "--default_dtype=float32",
    "--device=cpu", "--eval_interval=1", "--error_table=PerAtomMAE", "--save_cpu"]


def builtin_command(system: str, work: str, budget_minutes: float, committee: int) -> List[str]:
    spec = SYSTEMS[system]
    return [os.path.join(BIN, "mlmd"), "train", os.path.join("systems", system, "data.extxyz"),
            "--out", work, "--committee", str(committee), "--budget-minutes", f"{budget_minutes:g}",
            "--n-train", str(spec["n_train"]), "--n-val", str(spec["n_val"]), "--n-test", str(spec["n_test"]),
            "--cutoff", str(spec["cutoff"]), "--no-progress"]


def mace_command(system: str, paths: Dict[str, str], work: str, seed: int, epochs: int,
                 channels: int, max_l: int) -> List[str]:
    return ([os.path.join(BIN, "mace_run_train"), f"--name=mace_{seed}", f"--work_dir={work}", f"--seed={seed}",
             f"--train_file={paths['train']}", f"--valid_file={paths['val']}", f"--test_file={paths['test']}",
             "--energy_key=REF_energy", "--forces_key=REF_forces"]
            # a stress label only enters MACE's loss with --loss=stress (MACE's default stress weight);
            # the built-in side trains on the virial of these frames too
            + (["--stress_key=REF_stress", "--loss=stress"] if SYSTEMS[system].get("stress") else ["--loss=weighted"])
            + MACE_ARGUMENTS
            + [f"--num_channels={channels}", f"--max_L={max_l}", f"--r_max={SYSTEMS[system]['cutoff']}",
               f"--max_num_epochs={epochs}", "--restart_latest"])


def write_split(system: str, split: Dict[str, List[int]], work: str) -> Dict[str, str]:
    """train/val/test extxyz with MACE's REF_* keys, from the built-in run's split."""
    import ase.io

    frames = ase.io.read(os.path.join(ROOT, "systems", system, "data.extxyz"), ":")
    paths = {}
    for part in ("train", "val", "test"):
        chosen = []
        for index in split[part]:
            atoms = frames[index].copy()
            atoms.info["REF_energy"] = frames[index].get_potential_energy()
            atoms.arrays["REF_forces"] = frames[index].get_forces()
            if atoms.pbc.all():
                atoms.info["REF_stress"] = frames[index].get_stress(voigt=False)
            atoms.calc = None
            chosen.append(atoms)
        paths[part] = os.path.join(work, f"{part}.extxyz")
        ase.io.write(paths[part], chosen)
    return paths


def _latest_checkpoint(work: str, seed: int):
    found = []
    for path in glob.glob(os.path.join(work, "checkpoints", f"mace_{seed}_run-{seed}_epoch-*.pt")):
        match = re.search(r"_epoch-(\d+)\.pt$", path)
        if match:
            found.append((int(match.group(1)), path))
    return max(found) if found else None


def train_mace_member(system: str, paths: Dict[str, str], work: str, seed: int, seconds: float,
                      channels: int, max_l: int) -> Dict:
    """One member for ``seconds`` of training (from MACE's first epoch), then finished from its
    best-validation checkpoint.  Returns the model path, epochs run and the wall times."""
    log_path = os.path.join(work, f"mace_{seed}.log")
    command = mace_command(system, paths, work, seed, 100000, channels, max_l)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        train_start = None
        while process.poll() is None:
            time.sleep(0.5)
            if train_start is None:
                with open(log_path, errors="replace") as handle:
                    if "Started training" in handle.read():
                        train_start = time.perf_counter()
            elif time.perf_counter() - train_start >= seconds and _latest_checkpoint(work, seed) is not None:
                # past the deadline with a checkpoint (a member gets at least one epoch, and the
                # extra time counts in its train_s); the pause lets a save in progress finish
                time.sleep(1.0)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
    if process.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"mace_run_train failed (exit {process.returncode}); see {log_path}")
    trained = time.perf_counter() - (train_start or start)
    latest = _latest_checkpoint(work, seed)
    if latest is None:
        raise RuntimeError(f"MACE member {seed} ended before its first checkpoint; see {log_path}")
    import torch
    try:
        torch.load(latest[1], map_location="cpu", weights_only=False)
    except Exception as error:   # the kill landed inside a save: that file is torn
        raise RuntimeError(f"MACE checkpoint {latest[1]} unreadable after the deadline ({error})") from error
    finish = time.perf_counter()
    with open(log_path, "a") as log:
        subprocess.run(mace_command(system, paths, work, seed, latest[0], channels, max_l),
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    with open(log_path, errors="replace") as handle:
        epochs = len(re.findall(r"Epoch \d+:", handle.read()))
    return {"model": os.path.join(work, f"mace_{seed}.model"), "train_s": trained, "best_epoch": latest[0],
            "epochs": epochs, "finish_s": time.perf_counter() - finish, "prepare_s": (train_start or start) - start}


def score(path: str, test_frames, md_atoms) -> Dict:
    """Test MAE, float64 rotation error and engine ms/step of one model file."""
    from mlmd.bench import md_drivers
    from mlmd.potential import load
    from mlmd.testing import rotation_invariance_error

    potential = load(path)
    md = md_drivers(potential, md_atoms, 0.5, 50, rounds=5, drivers=("mlmd",))["mlmd"]
    force_errors, energy_errors = [], []
    for atoms in test_frames:
        out = potential.compute_atoms(atoms)
        force_errors.append(np.abs(out["forces"] - atoms.get_forces()).ravel())
        energy_errors.append(abs(out["energy"] - atoms.get_potential_energy()) / len(atoms))
    rotation = rotation_invariance_error(potential.with_dtype("float64"), test_frames[0], n_rotations=20)
    return {"force_mae": float(np.mean(np.concatenate(force_errors))),
            "energy_mae_mev": 1000 * float(np.mean(energy_errors)),
            "rotation_forces_max": rotation["forces_max"],
            "rotation_energy_max_per_atom": rotation["energy_max"] / len(test_frames[0]),
            "step_ms": 1e3 * md["step"], "call_ms": 1e3 * md["model"]}


def md_frame(system: str):
    import ase.io

    atoms = ase.io.read(os.path.join(ROOT, "systems", system, SYSTEMS[system]["md"]))
    atoms.rattle(0.05, seed=0)
    return atoms


def run_system(system: str, out: str, budget_minutes: float, committee: int, channels: int, max_l: int) -> Dict:
    import ase.io

    from mlmd.plugins.mace import import_mace
    from mlmd.uncertainty import calibrate_file

    work = os.path.join(out, system)
    builtin = os.path.join(work, "builtin")
    mace = os.path.join(work, "mace")
    os.makedirs(mace, exist_ok=True)
    frames = ase.io.read(os.path.join(ROOT, "systems", system, "data.extxyz"), ":")

    command = builtin_command(system, builtin, budget_minutes, committee)
    print(f"[{system}] built-in: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    builtin_wall = time.perf_counter() - start
    with open(os.path.join(builtin, "metrics.json")) as handle:
        metrics = json.load(handle)
    split = metrics["split"]
    builtin_train_s = float(metrics["summary"]["train_wall_s"])

    paths = write_split(system, split, mace)
    seconds = 60.0 * budget_minutes / committee
    print(f"[{system}] MACE: {committee} members x {seconds:.0f} s: "
          f"{' '.join(mace_command(system, paths, mace, 0, 100000, channels, max_l))}", flush=True)
    members = []
    for seed in range(committee):
        members.append(train_mace_member(system, paths, mace, seed, seconds, channels, max_l))
        print(f"[{system}] MACE member {seed}: {members[-1]['epochs']} epochs in {members[-1]['train_s']:.0f} s, "
              f"best epoch {members[-1]['best_epoch']}", flush=True)
    mace_file = os.path.join(mace, "mace_committee.pt")
    import_mace([m["model"] for m in members], mace_file, dtype="float32", example=frames[split["train"][0]],
                training={"data": f"systems/{system}/data.extxyz", "split": "the built-in run's",
                          "train_wall_s": float(sum(m["train_s"] for m in members)),
                          "mace_run_train": {"num_channels": channels, "max_L": max_l}})
    calibrate_file(mace_file, [frames[i] for i in split["val"]])

    test_frames = [frames[i] for i in split["test"]]
    atoms = md_frame(system)
    result = {"system": system, "atoms": len(atoms), "budget_minutes": budget_minutes, "committee": committee,
              "builtin": {"file": os.path.join(builtin, "model.pt"), "train_s": builtin_train_s,
                          "wall_s": builtin_wall, "epochs": metrics["summary"].get("epochs"),
                          **score(os.path.join(builtin, "model.pt"), test_frames, atoms)},
              "mace": {"file": mace_file, "train_s": float(sum(m["train_s"] for m in members)),
                       "epochs": [m["epochs"] for m in members], "channels": channels, "max_L": max_l,
                       **score(mace_file, test_frames, atoms)}}
    with open(os.path.join(work, "result.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    return result


def format_table(results: List[Dict], threads: int) -> str:
    lines = [f"same frames, same training wall time per system, committee of 4 each, {threads} torch threads; "
             "MD: mlmd engine, velocity Verlet, freshly loaded file; ratio = MACE / built-in",
             "",
             "| system | atoms | budget | model | train s | epochs | test force MAE eV/Å | energy MAE meV/atom "
             "| max ΔF under rotation (float64) eV/Å | MD ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b, m = r["builtin"], r["mace"]
        lines.append(f"| {r['system']} | {r['atoms']} | {r['budget_minutes']:g} min | built-in | {b['train_s']:.0f} | {b['epochs']} "
                     f"| {b['force_mae']:.4f} | {b['energy_mae_mev']:.2f} | {b['rotation_forces_max']:.1e} "
                     f"| {b['step_ms']:.2f} |")
        lines.append(f"| | | | MACE {m['channels']}ch L{m['max_L']} | {m['train_s']:.0f} | {'/'.join(str(e) for e in m['epochs'])} "
                     f"| {m['force_mae']:.4f} ({m['force_mae'] / b['force_mae']:.2f}) "
                     f"| {m['energy_mae_mev']:.2f} ({m['energy_mae_mev'] / b['energy_mae_mev']:.2f}) "
                     f"| {m['rotation_forces_max']:.1e} | {m['step_ms']:.2f} ({m['step_ms'] / b['step_ms']:.2f}) |")
    lines.append("")
    for r in results:
        b, m = r["builtin"], r["mace"]
        force = "met" if b["force_mae"] <= m["force_mae"] else \
            f"missed: built-in {b['force_mae'] / m['force_mae']:.2f}x MACE's force MAE"
        speed = "met" if m["step_ms"] >= 2 * b["step_ms"] else \
            f"missed: MACE step / built-in step = {m['step_ms'] / b['step_ms']:.2f} (target >= 2)"
        lines.append(f"- {r['system']}: force MAE <= MACE's: {force}; MD step >= 2x faster: {speed}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="training wall time per side per system")
    parser.add_argument("--committee", type=int, default=4)
    parser.add_argument("--mace-channels", type=int, default=32)
    parser.add_argument("--mace-max-l", type=int, default=1)
    parser.add_argument("--out", default=os.path.join("runs", "bench_models"))
    args = parser.parse_args(argv)
    if args.budget_minutes <= 0:
        parser.error(f"--budget-minutes: must be > 0, got {args.budget_minutes}")
    import torch

    results = []
    for system in args.systems:
        if not os.path.exists(os.path.join(ROOT, "systems", system, "data.extxyz")):
            parser.error(f"--systems: systems/{system}/data.extxyz is missing; make it with its make_data script")
        results.append(run_system(system, os.path.abspath(args.out), args.budget_minutes, args.committee,
                                  args.mace_channels, args.mace_max_l))
        print(format_table(results, torch.get_num_threads()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
