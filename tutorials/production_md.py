"""Production MD with ``mlmd run``: fcc copper at 600 K, continued after a stop, analysed with mdtraj.

The shell commands this script runs (and prints) are the whole workflow:

    mlmd run systems/copper --steps 1000 --out runs/copper          # NVT (Bussi), 2 fs
    mlmd run systems/copper --steps 2000 --out runs/copper --restart  # continue, exactly

``systems/copper/run.yaml`` holds the rest (structure, model, thermostat, intervals).  The
trajectory (DCD with ``topology.pdb``) is then read with mdtraj, and the Cu–Cu radial
distribution function is compared with one from ASE's EMT itself (the committee's reference),
run with ASE's Bussi thermostat at the same temperature, step and length.  Written: both RDFs in
``rdf.png`` and ``rdf.csv``.

    python tutorials/production_md.py --steps 2000 --out runs/production
"""
import argparse
import csv
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPPER = os.path.join(ROOT, "systems", "copper")
R_MAX = 0.6          # nm: below half the 1.077 nm box


def mlmd_command(*args) -> None:
    """Run ``mlmd ARGS`` as a user would in a shell (the console script of this environment)."""
    command = [sys.executable, "-c", "import sys; from mlmd.cli import main; sys.exit(main())", *args]
    print("$ mlmd " + " ".join(args), flush=True)
    subprocess.run(command, check=True)


def rdf(traj, bins: int = 120):
    """g(r) of all atom pairs of an mdtraj trajectory; r in Å."""
    import mdtraj

    pairs = traj.topology.select_pairs("all", "all")
    r, g = mdtraj.compute_rdf(traj, pairs, r_range=(0.15, R_MAX), n_bins=bins)
    return r * 10.0, g


def first_shell(r, g, traj, r_min: float = 2.1, r_max: float = 3.05):
    """(mean distance (Å), coordination number) of the first neighbour shell, r_min < r < r_max."""
    shell = (r > r_min) & (r < r_max)
    dr = r[1] - r[0]
    density = traj.n_atoms / np.mean(traj.unitcell_volumes) / 1000.0      # atoms per Å^3
    weight = 4.0 * np.pi * r[shell] ** 2 * g[shell] * dr
    return float((weight * r[shell]).sum() / weight.sum()), float(density * weight.sum())


def emt_reference(steps: int, interval: int, temperature: float, timestep: float, tau: float, seed: int):
    """The same NVT run with ASE's EMT and ASE's Bussi thermostat, frames as an mdtraj trajectory."""
    import ase.io
    import mdtraj
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.bussi import Bussi
    from ase.md.velocitydistribution import thermalize_momenta

    atoms = ase.io.read(os.path.join(COPPER, "cu_fcc_108.xyz"))
    atoms.calc = EMT()
    thermalize_momenta(atoms, temperature, rng=np.random.default_rng(seed))
    dyn = Bussi(atoms, timestep * units.fs, temperature_K=temperature, taut=tau * units.fs,
                rng=np.random.default_rng(seed + 1))
    frames = []
    dyn.attach(lambda: frames.append(atoms.get_positions(wrap=True) / 10.0), interval=interval)
    dyn.run(steps)
    topology = mdtraj.Topology()
    chain = topology.add_chain()
    for _ in atoms:
        topology.add_atom("Cu", mdtraj.element.copper, topology.add_residue("CU", chain))
    traj = mdtraj.Trajectory(np.array(frames), topology)
    traj.unitcell_vectors = np.repeat(np.asarray(atoms.cell)[None] / 10.0, len(frames), axis=0)
    return traj


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="total MD steps (the first half, then a restart)")
    parser.add_argument("--out", default=os.path.join("runs", "production"))
    args = parser.parse_args(argv)
    run_dir = os.path.join(args.out, "copper")
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)

    mlmd_command("run", COPPER, "--steps", str(args.steps // 2), "--out", run_dir, "--no-progress")
    mlmd_command("run", COPPER, "--steps", str(args.steps), "--out", run_dir, "--restart", "--no-progress")

    import mdtraj
    import yaml

    with open(os.path.join(run_dir, "config.yaml")) as handle:
        config = yaml.safe_load(handle)
    with open(os.path.join(run_dir, "log.csv")) as handle:
        log = list(csv.DictReader(handle))
    steps = np.array([int(row["step"]) for row in log])
    temperature = np.array([float(row["temperature_K"]) for row in log])
    traj = mdtraj.load(os.path.join(run_dir, config["trajectory"]), top=os.path.join(run_dir, "topology.pdb"))
    half = len(traj) // 2          # the first half is equilibration
    r, g_mlmd = rdf(traj[half:])
    reference = emt_reference(args.steps, config["trajectory_interval"], config["temperature"],
                              config["timestep"], config["tau"], config["seed"])
    _, g_emt = rdf(reference[len(reference) // 2:])

    peak_mlmd, peak_emt = first_shell(r, g_mlmd, traj), first_shell(r, g_emt, reference)
    mean_t = float(temperature[len(temperature) // 2:].mean())
    with open(os.path.join(args.out, "rdf.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["r_A", "g_mlmd", "g_emt"])
        writer.writerows(zip(np.round(r, 4), np.round(g_mlmd, 5), np.round(g_emt, 5)))
    _plot(r, g_mlmd, g_emt, config, os.path.join(args.out, "rdf.png"))
    print(f"\n{steps[-1]} steps ({len(traj)} frames) of 108 Cu atoms at {config['temperature']} K; "
          f"<T> over the second half {mean_t:.0f} K")
    print(f"{'first shell':<14}{'mean r (Å)':>12}{'neighbours':>12}")
    for name, (distance, neighbours) in (("mlmd", peak_mlmd), ("EMT (ASE)", peak_emt)):
        print(f"{name:<14}{distance:>12.4f}{neighbours:>12.2f}")
    return {"steps": steps, "mean_temperature": mean_t, "frames": len(traj), "shell_mlmd": peak_mlmd,
            "shell_emt": peak_emt, "r": r, "g_mlmd": g_mlmd, "g_emt": g_emt}


def _plot(r, g_mlmd, g_emt, config, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(r, g_emt, color="k", lw=2, alpha=0.4, label="EMT (ASE)")
    ax.plot(r, g_mlmd, color="C0", lw=1.2, label="mlmd committee")
    ax.set_xlabel("r (Å)")
    ax.set_ylabel("g(r)")
    ax.set_title(f"fcc Cu, {config['temperature']} K")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
