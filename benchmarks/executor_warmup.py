"""MD ms/step of a model file on a freshly loaded module vs one that first evaluated other shapes.

In mlmd 0.1 a process whose loaded module had evaluated frames of other sizes ran the built-in's
MD about 2x slower than a fresh process (66.6 -> 131.5 ms/step, copper committee). The cause is
glibc's malloc: by default it serves blocks above its adaptive mmap threshold from fresh mmaps
and trims freed heap, so a model call that allocates tens of MB pays page faults, and what the
earlier frames did to the heap and to the threshold decides how many. mlmd sets
M_MMAP_THRESHOLD 32 MB and no trimming at load (``mlmd.threads.keep_freed_memory``). The
settings compared, one process-wide cause switched at a time:

- ``glibc-malloc``: glibc's defaults (mlmd 0.1);
- ``mlmd``: as mlmd loads files now;
- ``legacy-executor``: mlmd plus TorchScript's legacy executor, which does not re-specialise
  graphs on new shapes (the other suspect; it makes no difference).

Each case is its own process (the state in question is the process's): "fresh" loads the file
and runs MD; "after" loads it, evaluates 100 frames of other sizes (32-atom copper frames, each
with its own pair count), then runs the same MD (Langevin, 108 Cu atoms rattled 0.05 Å, 600 K,
2 fs). Fresh and after processes alternate (fresh, after, fresh, after, ...) so that drifts of
the machine hit both; each reports the median of its blocks of 20 steps after the first.

Columns: model | setting | ms/step fresh | ms/step after other shapes | ratio (medians over processes)
Run: .venv/bin/python benchmarks/executor_warmup.py [--pairs 2] [--blocks 5] [--settings ...] [MODEL ...]
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_case(model: str, setting: str, warm_frames: int, blocks: int) -> None:
    import ase.io
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import mlmd
    from mlmd.md.simulation import Simulation

    if setting == "glibc-malloc":
        # mlmd 0.1: glibc's default malloc settings (mlmd.threads.keep_freed_memory not applied)
        import mlmd.threads
        mlmd.threads.keep_freed_memory = lambda: False
    elif setting == "legacy-executor":
        torch._C._jit_set_profiling_executor(False)
    elif setting != "mlmd":
        raise SystemExit(f"--settings: unknown setting {setting!r}; use glibc-malloc, mlmd or legacy-executor")
    potential = mlmd.load(model)
    if warm_frames:
        for atoms in ase.io.read(os.path.join(ROOT, "systems", "copper", "data.extxyz"), f":{warm_frames}"):
            potential.compute_atoms(atoms)          # 32-atom frames, before any 108-atom step
    atoms = ase.io.read(os.path.join(ROOT, "systems", "copper", "cu_fcc_108.xyz"))
    atoms.positions += np.random.default_rng(0).normal(0.0, 0.05, atoms.positions.shape)
    sim = Simulation(atoms, potential, integrator="langevin", timestep=2.0, temperature=600, seed=1)
    times = []
    for _ in range(blocks + 1):
        start = time.perf_counter()
        sim.run(20)
        times.append((time.perf_counter() - start) / 20 * 1e3)
    print(f"{float(np.median(times[1:])):.3f}", flush=True)


def main(argv=None) -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        one_case(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--pairs", type=int, default=2, help="fresh/after process pairs per setting (2)")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks of 20 steps per process (5)")
    parser.add_argument("--settings", nargs="+", default=["glibc-malloc", "mlmd", "legacy-executor"],
                        help="glibc-malloc (mlmd 0.1), mlmd (now), legacy-executor (mlmd + TorchScript's legacy "
                             "executor)")
    args = parser.parse_args(argv)
    models = args.models or [os.path.join(ROOT, "systems", "copper", "copper_committee.pt"),
                             os.path.join(ROOT, "systems", "copper", "copper_mace.pt")]
    print("| model | setting | ms/step fresh | ms/step after 100 other shapes | ratio |\n|---|---|---|---|---|",
          flush=True)
    for model in models:
        for setting in args.settings:
            medians = {0: [], 100: []}
            for _ in range(args.pairs):
                for warm_frames in (0, 100):
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", os.path.abspath(model),
                                          setting, str(warm_frames), str(args.blocks)],
                                         check=True, stdout=subprocess.PIPE, text=True).stdout
                    medians[warm_frames].append(float(out.strip().splitlines()[-1]))
            fresh, after = float(np.median(medians[0])), float(np.median(medians[100]))
            print(f"| {os.path.relpath(model, ROOT)} | {setting} | {fresh:.1f} | {after:.1f} | {after / fresh:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
