"""PONITA-style equivariant potential on position-orientation space R^3 x S^2.

Following Bekkers et al., "Fast, Expressive SE(n) Equivariant Networks through
Weight-Sharing in Position-Orientation Space": every atom carries a feature map over a
grid of orientations o in S^2, ``x_i(o) in R^C``.  Messages are conditioned on the
bi-invariant attributes of the point pair (x_i, o) <- (x_j, o):

    a1 = o . d_ij              (component of d along o)
    a2 = |d_ij - (o . d_ij) o|  (distance perpendicular to o)

which we feed as the equivalent smooth pair (r = |d|, cos = o . d / r) through a radial
Bessel basis and Legendre polynomials, and the orientation pair (o, o') through
o . o'.  A layer is PONITA's separable group convolution:

    spatial    y_i(o)  = 1/<n> sum_j k_l(r_ij, o . d_ij) * x_j(o)      (depthwise, C)
    spherical  z_i(o)  = 1/|G| sum_o' q_l(o . o') * y_i(o')            (depthwise, C)
    update     x_i(o) += MLP(LayerNorm(W z_i(o) + b))                   (pointwise)

Energies: e_i = scale * mean_o readout(x_i(o)) + E0[Z_i]; E = sum_i e_i; forces are
-dE/dx by autograd.  Kernels carry a polynomial cutoff envelope so that energy and
forces are continuous (C^2) at the cutoff.

The invariance to rotations is exact only in the limit of an infinitely fine grid; the
error for a finite grid is measured by :func:`mlmd.testing.rotation_invariance_error`.
Translations and permutations are exact (only relative vectors and sums are used).

Committees: every weight has a leading member axis M and all members run in one
batched pass on one set of pairs (``torch.baddbmm``), so a committee of 4 costs far
less than 4 single models.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .forces import edge_forces

DEFAULT_HYPERPARAMETERS: Dict[str, float] = {
    "cutoff": 5.0,          # Å
    "channels": 32,         # C, features per orientation
    "layers": 3,
    "grid": 16,             # orientations on S^2
    "radial_basis": 8,      # Bessel functions
    "angular_degree": 4,    # Legendre degree in o . d / r
    "spherical_degree": 3,  # Legendre degree in o . o'
    "basis_width": 32,      # width of the shared kernel-basis MLP
    "envelope_exponent": 6,
}


def fibonacci_sphere(n: int) -> np.ndarray:
    """[n, 3] unit vectors spread quasi-uniformly over S^2 (golden-angle spiral)."""
    if n < 1:
        raise ValueError(f"grid: need at least 1 orientation, got {n}")
    k = np.arange(n, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * k / n
    rho = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = math.pi * (1.0 + math.sqrt(5.0)) * k
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def legendre(x: Tensor, degree: int) -> Tensor:
    """Legendre polynomials P_1..P_degree of x, stacked on a new last axis."""
    polys: List[Tensor] = []
    p_prev = torch.ones_like(x)
    p = x
    polys.append(p)
    for n in range(1, degree):
        p_next = ((2 * n + 1) * x * p - n * p_prev) / (n + 1)
        p_prev = p
        p = p_next
        polys.append(p)
    return torch.stack(polys, dim=-1)


class MemberLinear(nn.Module):
    """A linear layer with independent weights per committee member.

    x: [M, ..., in] (or [1, ..., in], shared by all members) -> [M, ..., out]
    """

    def __init__(self, members: int, n_in: int, n_out: int, bias: bool, generators: List[torch.Generator]):
        super().__init__()
        weight = torch.empty(members, n_in, n_out, dtype=torch.float64)
        for m, gen in enumerate(generators):
            weight[m].normal_(0.0, 1.0 / math.sqrt(n_in), generator=gen)
        self.weight = nn.Parameter(weight.float())
        self.bias = nn.Parameter(torch.zeros(members, 1, n_out)) if bias else None
        self.n_in = n_in
        self.n_out = n_out

    def forward(self, x: Tensor) -> Tensor:
        members = self.weight.shape[0]
        lead = x.shape[:-1]
        flat = x.reshape(x.shape[0], -1, self.n_in)
        if flat.shape[0] != members:
            flat = flat.expand(members, flat.shape[1], self.n_in)
        bias = self.bias
        if bias is not None:
            out = torch.baddbmm(bias, flat, self.weight)
        else:
            out = torch.bmm(flat, self.weight)
        shape: List[int] = [members]
        for s in lead[1:]:
            shape.append(s)
        shape.append(self.n_out)
        return out.reshape(shape)


class MemberLayerNorm(nn.Module):
    """LayerNorm over the last axis with per-member gain and bias; x: [M, ..., C]."""

    def __init__(self, members: int, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(members, channels))
        self.bias = nn.Parameter(torch.zeros(members, channels))

    def forward(self, x: Tensor) -> Tensor:
        # on [M, rows, C]: a shape list built in a loop broke under TorchScript's legacy executor
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        mean = flat.mean(dim=-1, keepdim=True)
        var = (flat - mean).pow(2).mean(dim=-1, keepdim=True)
        y = (flat - mean) * torch.rsqrt(var + 1e-5)
        return (y * self.gain.unsqueeze(1) + self.bias.unsqueeze(1)).reshape(x.shape)


class PonitaLayer(nn.Module):
    """One separable convolution; its kernels come precomputed for all layers at once."""

    def __init__(self, members: int, channels: int, generators: List[torch.Generator]):
        super().__init__()
        self.mix = MemberLinear(members, channels, channels, True, generators)
        self.norm = MemberLayerNorm(members, channels)
        self.mlp_in = MemberLinear(members, channels, 2 * channels, True, generators)
        self.mlp_out = MemberLinear(members, 2 * channels, channels, True, generators)

    def forward(self, x: Tensor, kernel: Tensor, sphere: Tensor, centre: Tensor,
                neighbour: Tensor, inv_avg_neighbours: float) -> Tensor:
        # x [M,N,O,C]; kernel [M,E,O,C]; sphere [M,O,O,C]
        messages = kernel * torch.index_select(x, 1, neighbour)        # [M,E,O,C]
        spatial = torch.zeros_like(x).index_add_(1, centre, messages) * inv_avg_neighbours
        spherical = torch.einsum("mpqc,mnqc->mnpc", sphere, spatial) / float(sphere.shape[1])
        update = self.norm(self.mix(spherical))
        update = self.mlp_out(nn.functional.silu(self.mlp_in(update)))
        return x + update


class PonitaPotential(nn.Module):
    """The model core: edge vectors in, per-atom energies out, for M members at once.

    Species are given as indices into ``species`` (0..S-1), not atomic numbers.
    """

    def __init__(self, species: List[int], committee_size: int = 1, seed: int = 0,
                 hyperparameters: Optional[Dict[str, float]] = None,
                 energy_shift: Optional[List[float]] = None, energy_scale: float = 1.0,
                 avg_num_neighbors: float = 1.0):
        super().__init__()
        hp = dict(DEFAULT_HYPERPARAMETERS)
        if hyperparameters:
            unknown = set(hyperparameters) - set(hp)
            if unknown:
                raise ValueError(f"hyperparameters: unknown keys {sorted(unknown)}; known: {sorted(hp)}")
            hp.update(hyperparameters)
        self.hyperparameters = hp
        members = int(committee_size)
        if members < 1:
            raise ValueError(f"committee_size must be >= 1, got {committee_size}")
        channels = int(hp["channels"])
        width = int(hp["basis_width"])
        self.species: List[int] = [int(z) for z in species]
        self.committee_size = members
        self.cutoff = float(hp["cutoff"])
        self.channels = channels
        self.radial_basis = int(hp["radial_basis"])
        self.angular_degree = int(hp["angular_degree"])
        self.spherical_degree = int(hp["spherical_degree"])
        self.envelope_exponent = int(hp["envelope_exponent"])
        self.inv_avg_neighbours = 1.0 / float(avg_num_neighbors)
        self.energy_scale = float(energy_scale)

        generators = [torch.Generator().manual_seed(int(seed) * 1000003 + m) for m in range(members)]
        self.register_buffer("grid", torch.tensor(fibonacci_sphere(int(hp["grid"])), dtype=torch.float32))
        shift = torch.zeros(len(self.species)) if energy_shift is None else torch.tensor(energy_shift)
        self.register_buffer("energy_shift", shift.to(torch.float32))   # [S] eV, E0 per species
        self.register_buffer("bessel_frequencies",
                             torch.arange(1, self.radial_basis + 1, dtype=torch.float32) * math.pi / self.cutoff)

        embedding = torch.empty(members, len(self.species), channels, dtype=torch.float64)
        for m, gen in enumerate(generators):
            embedding[m].normal_(0.0, 1.0, generator=gen)
        self.embedding = nn.Parameter(embedding.float())
        # shared kernel bases (PONITA: one basis embedding, a linear map per layer)
        self.edge_radial = MemberLinear(members, self.radial_basis, width, True, generators)
        self.edge_angular = MemberLinear(members, self.angular_degree, width, False, generators)
        self.edge_hidden = MemberLinear(members, width, width, True, generators)
        self.sphere_in = MemberLinear(members, self.spherical_degree, width, True, generators)
        self.sphere_hidden = MemberLinear(members, width, width, True, generators)
        n_layers = int(hp["layers"])
        self.n_layers = n_layers
        # the per-layer linear maps from the shared bases, stacked into one matmul each
        self.spatial_kernels = MemberLinear(members, width, n_layers * channels, False, generators)
        self.spherical_kernels = MemberLinear(members, width, n_layers * channels, False, generators)
        self.layers = nn.ModuleList([PonitaLayer(members, channels, generators) for _ in range(n_layers)])
        self.readout_hidden = MemberLinear(members, channels, channels, True, generators)
        self.readout_out = MemberLinear(members, channels, 1, True, generators)

    def envelope(self, r: Tensor) -> Tensor:
        """Polynomial cutoff u(r/rc) (DimeNet): u(1) = u'(1) = u''(1) = 0."""
        p = float(self.envelope_exponent)
        x = r / self.cutoff
        u = (1.0 - (p + 1.0) * (p + 2.0) / 2.0 * x.pow(p) + p * (p + 2.0) * x.pow(p + 1.0)
             - p * (p + 1.0) / 2.0 * x.pow(p + 2.0))
        return torch.where(x < 1.0, u, torch.zeros_like(u))

    def forward(self, edge_vectors: Tensor, species_index: Tensor, edge_index: Tensor) -> Tensor:
        """Per-atom energies.

        edge_vectors  [M, E, 3] Å (x_j - x_i + shift, one copy per member so that
                      member forces come out of one backward pass)
        species_index [N] int64 in 0..S-1
        edge_index    [2, E] int64 (centre i, neighbour j)
        returns       [M, N] eV
        """
        members = self.committee_size
        n_atoms = species_index.shape[0]
        centre = edge_index[0]
        neighbour = edge_index[1]
        grid = self.grid
        r = torch.linalg.norm(edge_vectors, dim=-1)                         # [M,E]
        unit = edge_vectors / r.unsqueeze(-1)
        cos = torch.matmul(unit, grid.t())                                  # [M,E,O]
        radial = torch.sin(r.unsqueeze(-1) * self.bessel_frequencies) / r.unsqueeze(-1)  # [M,E,K]
        angular = legendre(cos, self.angular_degree)                        # [M,E,O,L]
        hidden = self.edge_radial(radial).unsqueeze(2) + self.edge_angular(angular)
        edge_basis = self.edge_hidden(nn.functional.silu(hidden))
        edge_basis = edge_basis * self.envelope(r).unsqueeze(-1).unsqueeze(-1)   # [M,E,O,B]

        sphere_cos = torch.matmul(grid, grid.t()).unsqueeze(0)             # [1,O,O]
        sphere_basis = self.sphere_hidden(nn.functional.silu(
            self.sphere_in(legendre(sphere_cos, self.spherical_degree))))  # [M,O,O,B]

        n_grid = grid.shape[0]
        x = torch.index_select(self.embedding, 1, species_index)           # [M,N,C]
        x = x.unsqueeze(2).expand(members, n_atoms, n_grid, self.channels).contiguous()
        kernels = self.spatial_kernels(edge_basis)                         # [M,E,O,L*C]
        spheres = self.spherical_kernels(sphere_basis)                     # [M,O,O,L*C]
        c = self.channels
        for index, layer in enumerate(self.layers):
            x = layer(x, kernels[..., index * c:(index + 1) * c], spheres[..., index * c:(index + 1) * c],
                      centre, neighbour, self.inv_avg_neighbours)
        out = self.readout_out(nn.functional.silu(self.readout_hidden(x)))  # [M,N,O,1]
        atom_energy = out.squeeze(-1).mean(dim=-1) * self.energy_scale
        return atom_energy + torch.index_select(self.energy_shift, 0, species_index).unsqueeze(0)

    @torch.jit.export
    def energy_and_forces(self, edge_vectors: Tensor, species_index: Tensor, edge_index: Tensor,
                          compute_virial: bool, create_graph: bool,
                          atom_virial: bool = False) -> Dict[str, Tensor]:
        """Member per-atom energies [M,N], forces [M,N,3] and, if asked, virials [M,3,3]
        (and with ``atom_virial`` their split over atoms [M,N,3,3], for training).

        edge_vectors [E,3] Å (no member axis).  F_i = -dE/dx_i with d_e = x_j - x_i, hence
        F_i += dE/dd_e for e=(i,j) and F_j -= dE/dd_e; virial W = -sum_e d_e (x) dE/dd_e.
        """
        members = self.committee_size
        n_atoms = species_index.shape[0]
        vectors = edge_vectors.detach().unsqueeze(0).repeat(members, 1, 1).requires_grad_(True)
        atom_energy = self.forward(vectors, species_index, edge_index)
        return edge_forces(atom_energy, vectors, edge_index, n_atoms, compute_virial, create_graph, atom_virial)
