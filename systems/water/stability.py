"""Does the water committee hold 32 molecules together in NVT? (issue 17's stability check)

Langevin MD (BAOAB, friction 1/ps) at 300 K in mlmd's own engine, started from the first frame of
``data.extxyz`` (the 32-water box after 10 ps of flexible TIP3P-FB MD at 300 K) with
Maxwell-Boltzmann velocities drawn by the engine.  Not from ``water.pdb``: OpenMM's
``Modeller.addSolvent`` left an O...H pair 1.06 Å apart across the box edge there, a geometry no
training frame has (their shortest is 1.37 Å); the committee's σ_F is 3.5 eV/Å on it.  Every ``--check-every`` steps
each molecule is measured with minimum-image distances:

- broken: an O-H bond of the molecule longer than ``--max-bond`` Å (equilibrium 0.96 Å; the 400 K
  training frames reach 1.15 Å), or its two H closer to another molecule's O than to their own
  (a proton has moved);

and the run stops at the first broken molecule.  Written to OUT: ``stability.csv`` (time, T,
potential energy, committee σ, longest O-H, shortest intermolecular O...H, H-O-H range) and
``stability.png``; the last line printed is the verdict.

    .venv/bin/python systems/water/stability.py --picoseconds 20 --out runs/water_stability
"""
import argparse
import csv
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def molecules(atoms) -> np.ndarray:
    """[n_molecules, 3] atom indices (O, H, H), the frames' order: O H H per water."""
    numbers = atoms.numbers
    oxygens = np.flatnonzero(numbers == 8)
    triples = np.stack([oxygens, oxygens + 1, oxygens + 2], axis=1)
    if not (np.all(numbers[triples[:, 1:]] == 1) and 3 * len(oxygens) == len(atoms)):
        sys.exit("structure: expected water as O H H per molecule")
    return triples


def minimum_image(vectors: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """vectors [..., 3] Å as their minimum images in the periodic ``cell`` [3,3] Å (ASE's find_mic)."""
    from ase.geometry import find_mic

    return find_mic(vectors.reshape(-1, 3), cell, pbc=True)[0].reshape(vectors.shape)


def geometry(positions: np.ndarray, cell: np.ndarray, triples: np.ndarray):
    """Longest O-H bond (Å), shortest O...H between molecules (Å), H-O-H angles (deg) [n_mol],
    and the molecules whose H sits closer to another O than to its own."""
    oxygen = positions[triples[:, 0]]
    bonds = np.stack([minimum_image(positions[triples[:, k]] - oxygen, cell) for k in (1, 2)], axis=1)
    lengths = np.linalg.norm(bonds, axis=-1)                                      # [n_mol, 2]
    cosine = np.sum(bonds[:, 0] * bonds[:, 1], axis=-1) / (lengths[:, 0] * lengths[:, 1])
    angles = np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))
    hydrogens = triples[:, 1:].ravel()
    to_oxygens = np.linalg.norm(minimum_image(positions[hydrogens][:, None] - oxygen[None], cell), axis=-1)
    owner = np.repeat(np.arange(len(triples)), 2)
    own = to_oxygens[np.arange(len(hydrogens)), owner]
    to_oxygens[np.arange(len(hydrogens)), owner] = np.inf
    nearest_other = to_oxygens.min(axis=1)
    moved = np.unique(owner[nearest_other < own])
    return lengths, float(nearest_other.min()), angles, moved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(HERE, "water_committee.pt"))
    parser.add_argument("--structure", default=os.path.join(HERE, "data.extxyz"))
    parser.add_argument("--frame", type=int, default=0, help="frame of --structure to start from")
    parser.add_argument("--picoseconds", type=float, default=20.0)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument("--temperature", type=float, default=300.0, help="K")
    parser.add_argument("--max-bond", type=float, default=1.3, help="Å: a longer O-H bond is a broken molecule")
    parser.add_argument("--check-every", type=int, default=20, help="steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=os.path.join("runs", "water_stability"))
    args = parser.parse_args(argv)
    for name in ("picoseconds", "timestep", "temperature", "max_bond"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: must be > 0")
    if args.check_every < 1:
        parser.error("--check-every: must be >= 1")
    os.makedirs(args.out, exist_ok=True)

    import ase.io
    from tqdm.auto import tqdm

    import mlmd

    atoms = ase.io.read(args.structure, index=args.frame)
    atoms.calc = None
    triples = molecules(atoms)
    sim = mlmd.Simulation(atoms, args.model, integrator="langevin", timestep=args.timestep,
                          temperature=args.temperature, friction=1.0, seed=args.seed, threads=args.threads)
    steps = int(round(1000.0 * args.picoseconds / args.timestep))
    rows, broken = [], {}
    bar = tqdm(total=steps, unit="step", desc=f"water NVT {args.temperature:g} K")

    def check(s):
        lengths, shortest_other, angles, moved = geometry(s.state.positions, s.state.cell, triples)
        rows.append({"time_ps": s.state.step * args.timestep / 1000.0, "temperature_K": s.temperature,
                     "potential_eV": s.potential_energy, "sigma_eV_per_A": s.uncertainty,
                     "longest_OH_A": float(lengths.max()), "shortest_intermolecular_OH_A": shortest_other,
                     "min_HOH_deg": float(angles.min()), "max_HOH_deg": float(angles.max())})
        bar.update(args.check_every)
        over = np.flatnonzero(lengths.max(axis=1) > args.max_bond)
        if len(over) or len(moved) or not np.isfinite(s.potential_energy):
            broken.update({"step": int(s.state.step), "stretched": over.tolist(), "proton_moved": moved.tolist()})
            raise StopIteration

    sim.attach(check, args.check_every)
    start = time.perf_counter()
    try:
        sim.run(steps)
    except StopIteration:
        pass
    bar.close()
    wall = time.perf_counter() - start
    if not rows:
        sys.exit(f"broken before the first check: {broken}")
    with open(os.path.join(args.out, "stability.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, os.path.join(args.out, "stability.png"), args)
    table = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    simulated = table["time_ps"][-1]
    steps_done = max(1, int(round(simulated * 1000.0 / args.timestep)))
    print(f"{len(rows)} checks, {simulated:.2f} ps simulated in {wall:.0f} s ({1e3 * wall / steps_done:.1f} ms/step)")
    print(f"<T> {table['temperature_K'].mean():.1f} K (std {table['temperature_K'].std():.1f}); longest O-H "
          f"{table['longest_OH_A'].max():.3f} Å; shortest intermolecular O...H "
          f"{table['shortest_intermolecular_OH_A'].min():.3f} Å; H-O-H {table['min_HOH_deg'].min():.1f}-"
          f"{table['max_HOH_deg'].max():.1f} deg; committee σ median {np.median(table['sigma_eV_per_A']):.3f}, "
          f"max {table['sigma_eV_per_A'].max():.3f} eV/Å")
    if broken:
        print(f"BROKEN at step {broken['step']} ({broken['step'] * args.timestep / 1000:.2f} ps): "
              f"O-H over {args.max_bond} Å in molecules {broken['stretched']}, "
              f"proton moved in {broken['proton_moved']}")
        return {"intact": False, "time_ps": broken["step"] * args.timestep / 1000.0, "rows": rows}
    print(f"INTACT: all {len(triples)} molecules for {args.picoseconds:g} ps")
    return {"intact": True, "time_ps": float(simulated), "rows": rows}


def _plot(rows, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["time_ps"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(6.5, 7), sharex=True)
    axes[0].plot(t, [r["temperature_K"] for r in rows], lw=0.8)
    axes[0].axhline(args.temperature, color="k", lw=0.8, ls="--")
    axes[0].set_ylabel("T (K)")
    axes[1].plot(t, [r["longest_OH_A"] for r in rows], lw=0.8, label="longest O-H in a molecule")
    axes[1].plot(t, [r["shortest_intermolecular_OH_A"] for r in rows], lw=0.8, label="shortest O...H between")
    axes[1].axhline(args.max_bond, color="r", lw=0.8, ls="--", label="broken above")
    axes[1].set_ylabel("distance (Å)")
    axes[1].legend(fontsize=7)
    axes[2].plot(t, [r["sigma_eV_per_A"] for r in rows], lw=0.8)
    axes[2].set_ylabel("committee σ_F (eV/Å)")
    axes[2].set_xlabel("time (ps)")
    fig.suptitle(f"32 waters, Langevin {args.temperature:g} K, {args.timestep:g} fs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
