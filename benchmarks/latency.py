"""Per-call latency of model files: TorchScript vs the compiled form, at 9 to 10,000 atoms.

One energy+forces call of the module (the hosts' hot path: the caller's pairs in, committee
statistics out), median over repeats after warm-up, for

- the built-in copper committee and the MACE import of copper on the same structures: copper
  clusters of 9 and 22 atoms (the atoms nearest a site of the crystal), the periodic 108-atom
  crystal and its 1,000- and 10,000-atom supercells (thermal noise 0.05 Å);
- the shipped molecular committees: ethanol (9 atoms) and alanine dipeptide (22 atoms).

Columns: the TorchScript and compiled times, their ratio, the largest force difference between
the two forms, the matmul FLOPs of one call (torch.utils.flop_counter: mm/bmm/addmm, forward
and backward; the elementwise work is not counted) and the GFLOP/s that makes, beside the
machine's peak measured here by one 2048^3 matmul in the model's dtype on the same threads.
The compiled form is built once per model (dynamic shapes: one graph for every size); its
compile time is printed. Runs on one thread unless --threads says otherwise.

Run: .venv/bin/python benchmarks/latency.py [--sizes 9 22 108 1000 10000] [--threads 1] [--models MACE]
     (or `mlmd bench latency`)
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPPER = {"built-in committee": os.path.join(ROOT, "systems", "copper", "copper_committee.pt"),
          "MACE import": os.path.join(ROOT, "systems", "copper", "copper_mace.pt")}
MOLECULES = [("ethanol committee", os.path.join(ROOT, "systems", "ethanol", "ethanol_committee.pt"),
              os.path.join(ROOT, "systems", "ethanol", "ethanol.xyz")),
             ("alanine dipeptide committee", os.path.join(ROOT, "systems", "alanine_dipeptide", "alanine_dipeptide_committee.pt"),
              os.path.join(ROOT, "systems", "alanine_dipeptide", "alanine_dipeptide.pdb"))]


def copper_structure(n_atoms: int):
    """The copper test structures: a cluster (n < 108) or a periodic supercell of fcc copper."""
    import ase.io

    crystal = ase.io.read(os.path.join(ROOT, "systems", "copper", "cu_fcc_108.xyz"))   # 3x3x3 conventional
    rng = np.random.default_rng(0)
    if n_atoms < len(crystal):
        centre = crystal.positions[0]
        d = crystal.get_distances(0, range(len(crystal)), mic=True)
        nearest = np.argsort(d, kind="stable")[:n_atoms]
        vectors = crystal.get_distances(0, nearest, mic=True, vector=True)
        atoms = crystal[nearest]
        atoms.positions = centre + vectors
        atoms.pbc = False
        atoms.cell = np.zeros((3, 3))
    else:
        from ase.build import bulk

        a = float(np.linalg.norm(crystal.cell[0])) / 3.0
        cubic = bulk("Cu", "fcc", a=a, cubic=True)          # 4 atoms
        cells = n_atoms // 4
        repeats = {27: (3, 3, 3), 250: (5, 5, 10), 2500: (10, 10, 25)}.get(cells)
        if repeats is None:
            raise SystemExit(f"--sizes: {n_atoms} copper atoms is not one of 9, 22, 108, 1000, 10000")
        atoms = cubic.repeat(repeats)
    atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
    return atoms


def module_args(potential, atoms):
    from mlmd.neighbors import neighbor_pairs
    from mlmd.potential import local_frame

    cell, pbc = np.asarray(atoms.cell), atoms.pbc
    edge_index, shifts = neighbor_pairs(atoms.positions, cell, pbc, potential.cutoff)
    positions, shifts = local_frame(atoms.positions, cell, pbc, edge_index, shifts)
    return (torch.as_tensor(positions), torch.as_tensor(atoms.numbers), torch.as_tensor(cell),
            torch.as_tensor(np.asarray(pbc)), torch.as_tensor(edge_index), torch.as_tensor(shifts), False)


def time_calls(modules, args, budget_s: float = 8.0):
    """Median ms per call of each module, their calls interleaved (a, b, a, b, ...) so that the
    machine's drifts hit all alike: two warm-up calls each, then repeats within ``budget_s``."""
    first = 0.0
    for module in modules:
        start = time.perf_counter()
        module(*args)
        first += time.perf_counter() - start
        module(*args)
    repeats = int(min(60, max(3, budget_s / max(first, 1e-4))))
    samples = [[] for _ in modules]
    for _ in range(repeats):
        for index, module in enumerate(modules):
            start = time.perf_counter()
            module(*args)
            samples[index].append(time.perf_counter() - start)
    return [1e3 * float(np.median(s)) for s in samples]


def matmul_flops(module, args) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        module(*args)
    return float(counter.get_total_flops())


def peak_gflops(dtype: torch.dtype) -> float:
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 ** 3 / best / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[9, 22, 108, 1000, 10000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-mace", action="store_true")
    parser.add_argument("--models", nargs="+", default=None, metavar="WORD",
                        help="only the models whose name holds one of these words (e.g. MACE ethanol)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import mlmd

    peak = peak_gflops(torch.float32)
    print(f"peak: {peak:.1f} GFLOP/s float32 (2048^3 matmul, {args.threads} thread(s), "
          f"torch {torch.__version__})", flush=True)
    cases = [(name, path, [(f"Cu{n}", copper_structure(n)) for n in args.sizes])
             for name, path in COPPER.items() if not (args.skip_mace and "MACE" in name)]
    from mlmd.md.io import read_structure

    cases += [(name, path, [(os.path.basename(structure).split(".")[0], read_structure(structure))])
              for name, path, structure in MOLECULES]
    if args.models:
        cases = [case for case in cases if any(word.lower() in case[0].lower() for word in args.models)]
    print("| model | system | atoms | pairs | TorchScript ms | compiled ms | speed-up | max dF eV/Å | "
          "matmul MFLOP/call | GFLOP/s TorchScript | GFLOP/s compiled | % of peak (compiled) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name, path, structures in cases:
        scripted = mlmd.load(path)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = mlmd.load(path, compiled=True)
        compile_s = time.perf_counter() - start
        why_not = "; ".join(str(w.message).split(": ", 2)[-1] for w in caught if issubclass(w.category, RuntimeWarning))
        if compiled.is_compiled:
            print(f"<!-- {name}: compiled at load in {compile_s:.0f} s -->", flush=True)
        for label, atoms in structures:
            call = module_args(scripted, atoms)
            flops = matmul_flops(scripted.module, call)
            if compiled.is_compiled:
                ts_ms, c_ms = time_calls([scripted.module, compiled.module], call)
                diff = float((compiled.module(*call)["forces"] - scripted.module(*call)["forces"]).abs().max())
                cells = (f"{c_ms:.2f} | {ts_ms / c_ms:.2f}x | {diff:.1e}", f"{flops / c_ms / 1e6:.2f}",
                         f"{100 * flops / c_ms / 1e6 / peak:.1f}")
            else:
                ts_ms, = time_calls([scripted.module], call)
                cells = ("n/a | | ", "", "")
            print(f"| {name} | {label} | {len(atoms)} | {call[4].shape[1]} | {ts_ms:.2f} | {cells[0]} | "
                  f"{flops / 1e6:.1f} | {flops / ts_ms / 1e6:.2f} | {cells[1]} | {cells[2]} |", flush=True)
        if not compiled.is_compiled:
            print(f"<!-- {name}: no compiled form: {why_not} -->", flush=True)


if __name__ == "__main__":
    main()
