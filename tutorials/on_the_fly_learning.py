"""On-the-fly learning with ``mlmd learn``: copper far above the committee's training temperatures.

The shipped copper committee was trained on EMT frames between 300 and 1200 K.  At 2000 K the
crystal visits geometries it has not seen; the committee's σ rises, and the loop labels those
frames with EMT (the oracle), fine-tunes every member, and swaps each new generation into the
running MD.  Once MD is over, ``final_finetune`` refits once more, longer, on every label.  The
run is an ordinary run directory: stop it at any time and continue with
``mlmd learn CONFIG --restart`` without losing a label or a trajectory frame.

1. write ``learn.yaml``: a ``mlmd run`` config plus the loop's keys;
2. run it, from Python here; ``mlmd learn learn.yaml`` does the same from the shell;
3. compare the initial and final committees, on the labels and on the frames the run visited,
   all labelled afresh by EMT.

    python tutorials/on_the_fly_learning.py --steps 1000 --out runs/learn_copper

took 5 min on 2 cores: 16 labels, 4 swaps during MD; force MAE 0.049 -> 0.028 eV/Å on the labels and
0.042 -> 0.025 eV/Å on the 50 trajectory frames, median σ 0.20 -> 0.13 eV/Å.
"""
import argparse
import os

import ase.io
import numpy as np
import yaml
from ase.calculators.emt import EMT

import mlmd
from mlmd.active.learn import LearnConfig, learn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPPER = os.path.join(ROOT, "systems", "copper")


def write_inputs(out: str) -> str:
    """The training frames the committee keeps seeing while it fine-tunes, validation frames
    for the σ calibration, the start structure and ``learn.yaml``; returns the config's path."""
    os.makedirs(out, exist_ok=True)
    frames = ase.io.read(os.path.join(COPPER, "data.extxyz"), ":")
    ase.io.write(os.path.join(out, "train.extxyz"), frames[13::28])      # 20 frames of the 300-1200 K set
    ase.io.write(os.path.join(out, "val.extxyz"), frames[20::40])
    start = frames[6].copy()                  # the unstrained 32-atom lattice (frames 0-12: the EOS scan)
    start.calc = None
    ase.io.write(os.path.join(out, "cu32.xyz"), start)
    config = {
        "structure": "cu32.xyz",
        "model": os.path.join(COPPER, "copper_committee.pt"),
        "oracle": "emt",
        "train_data": "train.extxyz",
        "val_data": "val.extxyz",
        "integrator": "langevin", "temperature": 2000, "timestep": 2.0, "seed": 3,
        "sigma_lo": 0.15,            # eV/Å (calibrated σ): below, trusted
        "sigma_hi": 1.5,             # at or above: lost, roll back after retraining
        "labels_per_ns": 4000,       # at most 8 + 4 per ps of MD
        "batch_size": 4, "check_interval": 10, "dedup_rmsd": 0.02,
        "finetune": {"epochs": 10},      # quick refits while MD waits for them
        "final_finetune": {"epochs": 30},   # one longer refit on every label once MD is over
        "trajectory": "trajectory.extxyz", "trajectory_interval": 20, "checkpoint_interval": 20,
        "log_interval": 10, "output": os.path.join(os.path.abspath(out), "run"),
    }
    path = os.path.join(out, "learn.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    return path


def errors(model: str, frames) -> tuple:
    """(force MAE eV/Å, median calibrated σ eV/Å) of ``model`` on EMT-labelled ``frames``."""
    potential = mlmd.load(model)
    mae, sigma = [], []
    for atoms in frames:
        out = potential.compute_atoms(atoms)
        mae.append(np.abs(out["forces"] - atoms.get_forces()).mean())
        sigma.append(float(out["uncertainty"]))
    return float(np.mean(mae)), float(np.median(sigma))


def emt_labelled(frames):
    for atoms in frames:
        atoms.calc = EMT()
        atoms.get_forces()
    return frames


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="MD steps at 2000 K (2 fs each)")
    parser.add_argument("--out", default=os.path.join("runs", "learn_copper"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    config_path = write_inputs(args.out)
    config = LearnConfig.from_file(config_path, {"steps": args.steps})     # the CLI: mlmd learn learn.yaml
    summary = learn(config, progress=not args.no_progress)
    print(f"{summary['labels']} EMT labels, {summary['retrainings']} retrainings, "
          f"{summary['rollbacks']} rollbacks; model in use: {os.path.basename(summary['model'])}")

    # the labels (what the loop trained on) and the frames the run visited (mostly never labelled),
    # all labelled afresh by EMT: how much did the loop learn, and how far does it carry?
    sets = {"labelled": emt_labelled(ase.io.read(os.path.join(config.output, "active", "labels.extxyz"), ":")),
            "visited": emt_labelled(ase.io.read(os.path.join(config.output, "trajectory.extxyz"), ":")[1:])}
    result = {"labels": summary["labels"], "retrainings": summary["retrainings"], "model": summary["model"],
              "output": config.output}
    for name, frames in sets.items():
        before, after = errors(config.model, frames), errors(summary["model"], frames)
        print(f"{len(frames):3d} {name} frames: force MAE {before[0]:.4f} -> {after[0]:.4f} eV/Å, "
              f"median σ {before[1]:.4f} -> {after[1]:.4f} eV/Å")
        result[name] = {"frames": len(frames), "mae_before": before[0], "mae_after": after[0],
                        "sigma_before": before[1], "sigma_after": after[1]}
    return result


if __name__ == "__main__":
    main()
