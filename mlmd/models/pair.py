"""A Morse pair potential in the mlmd contract: the cheap reference model.

It is the model the MD benchmarks time against (a real TorchScript potential with
autograd forces whose cost is dominated by the pair count, as for any message-passing
model's first layer), and a committee of Morse members with perturbed parameters gives
cheap, physically meaningful uncertainty for tests of the engine:

    phi(r) = D [(1 - exp(-a (r - r0)))^2 - 1] * s(r)
    e_i    = 1/2 sum_j phi(r_ij)                 (full neighbour list)
    s(r)   = 1 for r <= r_on, 1 - 10x^3 + 15x^4 - 6x^5 with x = (r - r_on)/(rc - r_on) above,

so energy, forces and their first derivative are continuous at the cutoff rc.
Defaults are Girifalco & Weizer's copper (Phys. Rev. 114, 687 (1959)).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .forces import edge_forces

COPPER = {"D": 0.3429, "a": 1.3588, "r0": 2.866}   # eV, 1/Å, Å


class MorsePotential(nn.Module):
    """Morse pair potential for M members (parameters [M]); species only select E0."""

    def __init__(self, species: List[int], D: float = COPPER["D"], a: float = COPPER["a"],
                 r0: float = COPPER["r0"], cutoff: float = 5.0, switch_width: float = 1.0,
                 committee_size: int = 1, spread: float = 0.0, seed: int = 0,
                 energy_shift: Optional[List[float]] = None):
        super().__init__()
        if cutoff <= switch_width or switch_width <= 0:
            raise ValueError(f"switch_width: must be in (0, cutoff={cutoff}), got {switch_width}")
        members = int(committee_size)
        if members < 1:
            raise ValueError(f"committee_size: must be >= 1, got {committee_size}")
        self.species: List[int] = [int(z) for z in species]
        self.committee_size = members
        self.cutoff = float(cutoff)
        self.switch_on = float(cutoff - switch_width)
        # member 0 keeps the nominal parameters; the others are perturbed by `spread` (relative)
        noise = np.random.default_rng(seed).normal(0.0, 1.0, size=(3, members))
        noise[:, 0] = 0.0
        params = np.array([D, a, r0])[:, None] * (1.0 + float(spread) * noise)
        self.register_buffer("depth", torch.tensor(params[0], dtype=torch.float64))      # [M] eV
        self.register_buffer("stiffness", torch.tensor(params[1], dtype=torch.float64))  # [M] 1/Å
        self.register_buffer("r0", torch.tensor(params[2], dtype=torch.float64))         # [M] Å
        shift = torch.zeros(len(self.species)) if energy_shift is None else torch.tensor(energy_shift)
        self.register_buffer("energy_shift", shift.to(torch.float64))                   # [S] eV
        self.hyperparameters = {"D": D, "a": a, "r0": r0, "cutoff": cutoff, "switch_width": switch_width,
                                "spread": spread, "seed": seed}

    def forward(self, edge_vectors: Tensor, species_index: Tensor, edge_index: Tensor) -> Tensor:
        """edge_vectors [M,E,3] Å -> per-atom energies [M,N] eV."""
        r = torch.linalg.norm(edge_vectors, dim=-1)                                   # [M,E]
        x = ((r - self.switch_on) / (self.cutoff - self.switch_on)).clamp(0.0, 1.0)
        switch = 1.0 - x * x * x * (10.0 - 15.0 * x + 6.0 * x * x)
        switch = torch.where(r < self.cutoff, switch, torch.zeros_like(switch))
        decay = torch.exp(-self.stiffness.unsqueeze(1) * (r - self.r0.unsqueeze(1)))
        pair = self.depth.unsqueeze(1) * ((1.0 - decay) ** 2 - 1.0) * switch
        atom_energy = torch.zeros((edge_vectors.shape[0], species_index.shape[0]),
                                  dtype=edge_vectors.dtype, device=edge_vectors.device)
        atom_energy = atom_energy.index_add(1, edge_index[0], 0.5 * pair)
        return atom_energy + torch.index_select(self.energy_shift, 0, species_index).unsqueeze(0)

    @torch.jit.export
    def energy_and_forces(self, edge_vectors: Tensor, species_index: Tensor, edge_index: Tensor,
                          compute_virial: bool, create_graph: bool) -> Dict[str, Tensor]:
        """Member per-atom energies [M,N], forces [M,N,3] eV/Å, virials [M,3,3] eV if asked."""
        vectors = edge_vectors.detach().unsqueeze(0).repeat(self.committee_size, 1, 1).requires_grad_(True)
        atom_energy = self.forward(vectors, species_index, edge_index)
        return edge_forces(atom_energy, vectors, edge_index, species_index.shape[0], compute_virial,
                           create_graph)


def export_morse(path, species=(29,), dtype: str = "float64", **parameters) -> str:
    """Write a Morse model file (see :class:`MorsePotential` for ``parameters``)."""
    from ..potential import export

    model = MorsePotential(list(species), **parameters)
    return export(model, path, {"model_family": "morse", "hyperparameters": model.hyperparameters},
                  dtype=dtype)
