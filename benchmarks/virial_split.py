"""Cost of the per-atom virial split (training only) against the plain virial (inference) in
mlmd.models.forces.edge_forces, Morse-like toy energy, M = 4, float64, 108 and 1372 Cu atoms.
Columns: atoms | edges | forces only ms | forces + virial (einsum) ms | forces + virial via atom split ms | ratio | same virial
Run: .venv/bin/python benchmarks/virial_split.py"""
import time, torch, numpy as np
from mlmd.models.forces import edge_forces
from mlmd.bench import _copper
from mlmd.neighbors import neighbor_pairs
for cells in (3, 7):
    atoms = _copper(cells)
    ei, sh = neighbor_pairs(atoms.positions, np.asarray(atoms.cell), atoms.pbc, 5.0)
    ei = torch.as_tensor(ei); pos = torch.as_tensor(atoms.positions)
    vec0 = (pos[ei[1]] - pos[ei[0]] + torch.as_tensor(sh)).unsqueeze(0).repeat(4, 1, 1)
    def run(new):
        v = vec0.clone().requires_grad_(True)
        e = torch.zeros(4, len(atoms), dtype=v.dtype).index_add(1, ei[0], torch.exp(-v.norm(dim=-1)))
        return edge_forces(e, v, ei, len(atoms), True, False, True) if new else edge_forces(e, v, ei, len(atoms), True, False)
    t = {0: [], 1: [], 2: []}
    for _ in range(25):
        for k in (0, 1, 2):
            t0 = time.perf_counter()
            if k == 2:   # forces only, no virial
                v = vec0.clone().requires_grad_(True)
                e = torch.zeros(4, len(atoms), dtype=v.dtype).index_add(1, ei[0], torch.exp(-v.norm(dim=-1)))
                edge_forces(e, v, ei, len(atoms), False, False)
            else:
                run(k)
            t[k].append(time.perf_counter() - t0)
    a, b = run(0)["virial"], run(1)["virial"]
    print(f"| {len(atoms)} | {ei.shape[1]} | {np.median(t[2])*1e3:.2f} | {np.median(t[0])*1e3:.2f} | {np.median(t[1])*1e3:.2f} | {np.median(t[1])/np.median(t[0]):.2f} | {torch.allclose(a, b, rtol=1e-12, atol=1e-10)} |")
