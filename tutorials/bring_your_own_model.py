"""Bring your own model: a PyTorch potential of your own design, in mlmd's contract, in every host.

mlmd asks little of a model (``mlmd.potential.export``): a ``torch.nn.Module`` with

    species          list of atomic numbers it knows
    cutoff           Å; the host's neighbour list hands it every pair closer than this
    committee_size   M members evaluated together (M >= 2 gives σ, the uncertainty)
    energy_and_forces(edge_vectors [E,3] Å, species_index [N], edge_index [2,E], compute_virial,
                      create_graph) -> {"atom_energy" [M,N] eV, "forces" [M,N,3] eV/Å, "virial" [M,3,3] eV}

that TorchScript can compile.  Below, a small radial network in the style of Behler and
Parrinello (Gaussian radial features of each atom's neighbours, a per-element MLP to the atom's
energy; forces by autograd through ``mlmd.models.forces.edge_forces``), written from scratch,
is trained as a committee of 4 on the shipped EMT copper frames, exported to one file, checked
with ``mlmd audit``'s contract checks, and run in mlmd's engine, in ASE and in OpenMM, which
must give the same energy and forces.

    python tutorials/bring_your_own_model.py --steps 300 --out runs/own_model
"""
import argparse
import math
import os
from typing import Dict, List

import numpy as np
import torch               # before openmm, which may load openmmtorch
from torch import Tensor, nn

from mlmd.models.forces import edge_forces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COPPER = os.path.join(ROOT, "systems", "copper")


class RadialNet(nn.Module):
    """E = sum_i MLP_{Z_i}(G_i),  G_i,k = sum_j exp(-((r_ij - mu_k)/w)^2) f_c(r_ij),
    f_c(r) = (1 + cos(pi r / r_c)) / 2: a smooth, invariant, local atomic energy for M members."""

    def __init__(self, species: List[int], cutoff: float = 4.5, features: int = 16, hidden: int = 32,
                 committee_size: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.species: List[int] = [int(z) for z in species]
        self.cutoff = float(cutoff)
        self.committee_size = int(committee_size)
        self.register_buffer("centers", torch.linspace(1.5, cutoff, features))
        self.width = float((cutoff - 1.5) / features) * 1.5
        # one MLP per member, per element: weights [M, S, ...] applied with einsum
        members, elements = self.committee_size, len(self.species)
        self.w1 = nn.Parameter(torch.randn(members, elements, features, hidden) / features ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(members, elements, hidden))
        self.w2 = nn.Parameter(torch.randn(members, elements, hidden) / hidden ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(members, elements))

    def atom_energies(self, vectors: Tensor, species_index: Tensor, edge_index: Tensor) -> Tensor:
        """vectors [M,E,3] Å -> atom energies [M,N] eV."""
        r = torch.linalg.norm(vectors, dim=-1)                                            # [M,E]
        cutoff_fn = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1.0) * (r < self.cutoff).to(r.dtype)
        basis = torch.exp(-(((r.unsqueeze(-1) - self.centers) / self.width) ** 2)) * cutoff_fn.unsqueeze(-1)
        n_atoms = species_index.shape[0]
        features = torch.zeros((r.shape[0], n_atoms, basis.shape[-1]), dtype=r.dtype, device=r.device)
        features = features.index_add(1, edge_index[0], basis) / 8.0    # [M,N,K], ~ O(1) in a metal
        w1 = self.w1[:, species_index]                                                    # [M,N,K,H]
        hidden = torch.tanh(torch.einsum("mnk,mnkh->mnh", features, w1) + self.b1[:, species_index])
        return torch.einsum("mnh,mnh->mn", hidden, self.w2[:, species_index]) + self.b2[:, species_index]

    @torch.jit.export
    def energy_and_forces(self, edge_vectors: Tensor, species_index: Tensor, edge_index: Tensor,
                          compute_virial: bool, create_graph: bool) -> Dict[str, Tensor]:
        vectors = edge_vectors.detach().unsqueeze(0).repeat(self.committee_size, 1, 1).requires_grad_(True)
        energies = self.atom_energies(vectors, species_index, edge_index)
        return edge_forces(energies, vectors, edge_index, species_index.shape[0], compute_virial, create_graph)


def graphs(frames, cutoff: float):
    """Each frame's tensors for the model: edge vectors, species index, edge index, labels."""
    from mlmd.neighbors import neighbor_pairs

    out = []
    for atoms in frames:
        edge_index, shifts = neighbor_pairs(atoms.positions, np.asarray(atoms.cell), atoms.pbc, cutoff)
        vectors = atoms.positions[edge_index[1]] - atoms.positions[edge_index[0]] + shifts
        out.append((torch.tensor(vectors), torch.zeros(len(atoms), dtype=torch.long), torch.tensor(edge_index),
                    float(atoms.get_potential_energy()), torch.tensor(atoms.get_forces())))
    return out


def train(model: RadialNet, frames, steps: int, lr: float = 1e-2, energy_weight: float = 100.0) -> None:
    """Plain PyTorch: Adam (cosine decay to lr/100) on energy per atom (eV) and forces (eV/Å), one
    frame per step, every member on it; ``energy_weight`` makes 10 meV/atom count as 0.1 eV/Å."""
    data = graphs(frames, model.cutoff)
    energy_per_atom = np.mean([e / len(f) for (_, _, _, e, _), f in zip(data, frames)])
    with torch.no_grad():
        model.b2.fill_(energy_per_atom)                   # start at the data's mean energy per atom
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 100)
    rng = np.random.default_rng(0)
    for step in range(steps):
        vectors, species_index, edge_index, energy, forces = data[rng.integers(len(data))]
        out = model.energy_and_forces(vectors, species_index, edge_index, False, True)
        n_atoms = forces.shape[0]
        loss = energy_weight * (((out["atom_energy"].sum(dim=1) - energy) / n_atoms) ** 2).mean() \
            + ((out["forces"] - forces) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (one frame each)")
    parser.add_argument("--out", default=os.path.join("runs", "own_model"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    import ase.io
    from ase.calculators.emt import EMT

    import mlmd
    from mlmd import keys
    from mlmd.potential import export
    from mlmd.testing import audit

    frames = ase.io.read(os.path.join(COPPER, "data.extxyz"), ":")
    train_frames, test_frames = frames[13::4], frames[15::8]       # frames 0-12: an EOS scan
    model = RadialNet([29]).double()
    train(model, train_frames, args.steps)

    # one file in the mlmd contract; the example frame lets `mlmd audit` check it without input
    example = test_frames[0]
    path = export(model, os.path.join(args.out, "radial_net.pt"),
                  {"model_family": "radial-net (tutorial)", "hyperparameters": {"cutoff": model.cutoff},
                   keys.META_EXAMPLE: {"numbers": example.numbers.tolist(), "positions": example.positions.tolist(),
                                       "cell": np.asarray(example.cell).tolist(), "pbc": example.pbc.tolist()}},
                  dtype="float64")
    report = audit(path)                    # the shell: mlmd audit runs/own_model/radial_net.pt

    potential = mlmd.load(path)
    predictions = [potential.compute_atoms(atoms) for atoms in test_frames]
    errors = [np.abs(p["forces"] - atoms.get_forces()).mean() for p, atoms in zip(predictions, test_frames)]
    energy_errors = [abs(float(p["energy"]) - atoms.get_potential_energy()) / len(atoms)
                     for p, atoms in zip(predictions, test_frames)]
    spread = np.std(np.concatenate([atoms.get_forces().ravel() for atoms in test_frames]))

    # the same frame in the three hosts; OpenMM wants the cell in its lower-triangular form
    atoms = test_frames[1].copy()
    atoms.set_cell(atoms.cell.standard_form()[0], scale_atoms=True)
    from mlmd.plugins.ase import MLMDCalculator
    atoms.calc = MLMDCalculator(path)
    ase_result = (atoms.get_potential_energy(), atoms.get_forces())
    sim = mlmd.Simulation(atoms.copy(), path, integrator="verlet", timestep=1.0)
    engine_result = (sim.state.potential_energy, np.asarray(sim.state.forces))
    openmm_result = _openmm_energy_forces(path, atoms)
    host_gap = {name: (abs(result[0] - ase_result[0]), float(np.abs(result[1] - ase_result[1]).max()))
                for name, result in (("engine", engine_result), ("openmm", openmm_result))}

    emt = atoms.copy()
    emt.calc = EMT()
    print(f"\nRadialNet, committee of 4, {args.steps} steps on {len(train_frames)} EMT frames: "
          f"held-out force MAE {np.mean(errors):.4f} eV/Å (force std of the data {spread:.3f}), "
          f"energy MAE {1000 * np.mean(energy_errors):.1f} meV/atom; audit verdict: {report['verdict']}")
    print(f"{'host':<8}{'energy (eV)':>16}{'|ΔE| vs ASE':>14}{'max |ΔF|':>12}")
    print(f"{'ASE':<8}{ase_result[0]:>16.6f}{'':>14}{'':>12}   (EMT itself: {emt.get_potential_energy():.4f} eV)")
    for name, (de, df) in host_gap.items():
        print(f"{name:<8}{(engine_result if name == 'engine' else openmm_result)[0]:>16.6f}{de:>14.2e}{df:>12.2e}")
    return {"verdict": report["verdict"], "force_mae": float(np.mean(errors)), "force_std": float(spread),
            "energy_mae_per_atom": float(np.mean(energy_errors)),
            "host_gap": host_gap, "path": path}


def _openmm_energy_forces(path, atoms):
    """Energy (eV) and forces (eV/Å) of ``atoms`` from an OpenMM Context with the mlmd force."""
    import openmm
    from openmm import unit

    import mlmd.plugins.openmm as mm_plugin
    from mlmd.units import EV_TO_KJ_PER_MOL

    system = openmm.System()
    for mass in atoms.get_masses():
        system.addParticle(mass)
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) * 0.1 for row in np.asarray(atoms.cell)))
    system.addForce(mm_plugin.create_force(path, atoms.numbers, periodic=True))
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(atoms.positions * 0.1)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / EV_TO_KJ_PER_MOL
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return energy, np.asarray(forces) / EV_TO_KJ_PER_MOL / 10.0


if __name__ == "__main__":
    main()
