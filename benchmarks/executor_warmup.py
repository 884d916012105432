"""MD ms/step of a model file on a freshly loaded module vs one that first evaluated other shapes.

A loaded module that evaluated frames of another size before MD runs the built-in's MD about 2x
slower; a freshly loaded one is fast again. Each case runs in its own process.

Columns: model | frames evaluated before MD | ms/step per block of 20 steps (Langevin, 108 Cu atoms, 2 fs)
Run: .venv/bin/python benchmarks/executor_warmup.py [MODEL ...]
"""
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_case(model: str, warm_frames: int, blocks: int) -> None:
    import ase.io
    import numpy as np

    import mlmd
    from mlmd.md.simulation import Simulation

    potential = mlmd.load(model)
    if warm_frames:
        for atoms in ase.io.read(os.path.join(ROOT, "systems", "copper", "data.extxyz"), f":{warm_frames}"):
            potential.compute_atoms(atoms)          # 32-atom frames, before any 108-atom step
    atoms = ase.io.read(os.path.join(ROOT, "systems", "copper", "cu_fcc_108.xyz"))
    atoms.positions += np.random.default_rng(0).normal(0.0, 0.05, atoms.positions.shape)
    sim = Simulation(atoms, potential, integrator="langevin", timestep=2.0, temperature=600, seed=1)
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        sim.run(20)
        times.append((time.perf_counter() - start) / 20 * 1e3)
    print(f"| {os.path.relpath(model, ROOT)} | {warm_frames} | {' '.join(f'{t:.0f}' for t in times)} "
          f"| median after the first block {float(np.median(times[1:])):.1f} |", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        one_case(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    models = sys.argv[1:] or [os.path.join(ROOT, "systems", "copper", "copper_committee.pt"),
                              os.path.join(ROOT, "systems", "copper", "copper_mace.pt")]
    print("| model | frames before MD | ms/step per 20-step block | |\n|---|---|---|---|", flush=True)
    for model in models:
        for warm_frames in (0, 100):
            subprocess.run([sys.executable, os.path.abspath(__file__), "--case", os.path.abspath(model),
                            str(warm_frames), "8"], check=True)


if __name__ == "__main__":
    main()
