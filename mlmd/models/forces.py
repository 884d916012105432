"""Forces and virial from per-edge gradients, shared by every built-in model family.

The models see only edge vectors d_e = x_j - x_i + shift_e, so one backward pass through
them gives F_i = -dE/dx_i = sum_{e=(i,.)} dE/dd_e - sum_{e=(.,i)} dE/dd_e, and the virial
W = -sum_e d_e (x) dE/dd_e, for all committee members at once.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor


def edge_forces(atom_energy: Tensor, vectors: Tensor, edge_index: Tensor, n_atoms: int,
                compute_virial: bool, create_graph: bool, atom_virial: bool = False) -> Dict[str, Tensor]:
    """atom_energy [M,N] eV computed from vectors [M,E,3] Å (requires_grad).

    Returns atom_energy [M,N], forces [M,N,3] eV/Å and, if ``compute_virial``, virial [M,3,3] eV;
    with ``atom_virial`` also its split over atoms, atom_virial [M,N,3,3] eV (each edge booked to
    its centre atom), from which training sums the virial of each frame of a batch (1.5x the
    cost of the plain virial, so inference does not ask for it).
    """
    grads = torch.autograd.grad([atom_energy.sum()], [vectors], create_graph=create_graph,
                                allow_unused=True)
    dE_dd = grads[0]
    if dE_dd is None:   # no pairs inside the cutoff
        dE_dd = torch.zeros_like(vectors)
    forces = torch.zeros((vectors.shape[0], n_atoms, 3), dtype=vectors.dtype, device=vectors.device)
    forces = forces.index_add(1, edge_index[0], dE_dd).index_add(1, edge_index[1], -dE_dd)
    result: Dict[str, Tensor] = {"atom_energy": atom_energy, "forces": forces}
    if compute_virial and atom_virial:
        edge_virial = -vectors.unsqueeze(-1) * dE_dd.unsqueeze(-2)                  # [M,E,3,3]
        split = torch.zeros((vectors.shape[0], n_atoms, 3, 3), dtype=vectors.dtype, device=vectors.device)
        split = split.index_add(1, edge_index[0], edge_virial)
        result["atom_virial"] = split
        result["virial"] = split.sum(dim=1)
    elif compute_virial:
        result["virial"] = -torch.einsum("mei,mej->mij", vectors, dE_dd)
    return result
