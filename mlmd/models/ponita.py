"""PONITA-style potential on position-orientation space R^3 x S^2, exactly E(3) invariant.

Following Bekkers et al., "Fast, Expressive SE(n) Equivariant Networks through Weight-Sharing
in Position-Orientation Space": an atom i sees its neighbours as a signal over orientations
o in S^2, built with kernels shared over the bi-invariant attributes of the pair
(x_i, o) <- (x_j, o), here the distance r_ij and the cosine o . d_ij / r_ij:

    a_i(o) = 1/<n> sum_j  k_l(r_ij, o . d_ij / r_ij) * s_j           (C channels, per layer)
           = 1/<n> sum_j  sum_{l<=L} R_lc(r_ij) P_l(o . d_ij / r_ij) s_jc

The earlier version of this model sampled o on a 16-point grid fixed in the lab frame and
applied MLPs point by point: invariant only as the grid becomes infinitely fine (measured
on the shipped files: 2-9 meV/atom and up to 0.17 eV/Å under rotation, more than the
models' own test error).  Here every operation on the sphere is exact:

1. The kernel is a polynomial of degree L in o, so a_i is band-limited: by the addition
   theorem P_l(o . d) = 4pi/(2l+1) sum_m Y_lm(o) Y_lm(d), its real spherical-harmonic
   coefficients are A_i,lm,c = 1/<n> sum_j R_lc(r_ij) Y_lm(d_ij) s_jc (the constant folded
   into R).  Rotating the molecule rotates each degree l of A by its Wigner matrix.
2. Channel mixing per degree (A_l W_l, one C x C matrix per l and per factor) commutes
   with that rotation; it stands in for PONITA's depthwise spherical convolution, which by
   Funk-Hecke is a per-degree scaling of the same coefficients.
3. The nonlinearity on the sphere is a polynomial: products of the mixed signals taken
   point by point, u_1(o) u_2(o) ... u_k(o) for k = 1..nu (the sphere's version of MACE's
   symmetric contraction, a body order up to nu + 1 per layer), integrated over S^2:

       B_i,k,c = int_{S^2} prod_{t<=k} u_t,c(o) do = sum_q w_q prod_t u_t,c(o_q)

   The integrand is a polynomial of degree k L <= nu L, and (o_q, w_q) is a Lebedev rule
   exact to at least that degree, so the sum equals the integral: B is invariant under
   every rotation and reflection to float round-off (measured: ~1e-15 relative in float64).
4. Everything after B works on invariants: h_i += MLP([h_i, B_i]) (receiver-dependent
   through h_i), messages s_j = W h_j for the next layer, energies e_i = sum_t readout_t(h_i^t).

Energies: e_i * scale + E0[Z_i]; E = sum_i e_i; forces are -dE/dx by autograd.  R carries a
polynomial cutoff envelope so that energy and forces are continuous (C^2) at the cutoff.
Translations and permutations are exact (relative vectors and sums only).

Committees: every weight has a leading member axis M and all members run in one batched
pass on one set of pairs (``torch.bmm``), so a committee of 4 costs far less than 4 models.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .forces import edge_forces

from .config import DEFAULT_HYPERPARAMETERS  # noqa: E402  (torch-free, for the CLI)

# the grid-based files (mlmd <= 0.1) had these; they cannot be rebuilt by this class
_GRID_HYPERPARAMETERS = ("grid", "angular_degree", "spherical_degree", "basis_width")


def check_hyperparameters(hyperparameters: Optional[Dict[str, float]]) -> Dict[str, float]:
    """The full hyper-parameter dict, or a ValueError that names the unknown keys."""
    hp = dict(DEFAULT_HYPERPARAMETERS)
    if hyperparameters:
        unknown = set(hyperparameters) - set(hp)
        if unknown & set(_GRID_HYPERPARAMETERS):
            raise ValueError(f"hyperparameters: {sorted(unknown)} belong to the grid-based model of mlmd 0.1, "
                             "which was not rotation invariant; retrain with `mlmd train` (known keys: "
                             f"{sorted(hp)})")
        if unknown:
            raise ValueError(f"hyperparameters: unknown keys {sorted(unknown)}; known: {sorted(hp)}")
        hp.update(hyperparameters)
    if int(hp["degree"]) < 0 or int(hp["correlation"]) < 1 or int(hp["layers"]) < 1 or int(hp["channels"]) < 1:
        raise ValueError(f"hyperparameters: need degree >= 0, correlation >= 1, layers >= 1, channels >= 1; "
                         f"got {hp}")
    return hp


def lebedev_rule(min_degree: int) -> Tuple[np.ndarray, np.ndarray]:
    """The smallest Lebedev rule exact for polynomials of degree ``min_degree`` on S^2:
    points [Q,3] (unit vectors) and weights [Q] summing to 4 pi."""
    from scipy.integrate import lebedev_rule as scipy_rule

    order = max(3, min_degree + (1 - min_degree % 2))    # Lebedev orders are odd
    points, weights = scipy_rule(order)
    return np.ascontiguousarray(points.T), np.asarray(weights)


def real_spherical_harmonics(u: Tensor, degree: int) -> Tensor:
    """Orthonormal real spherical harmonics Y_lm of unit vectors u [..., 3], for l = 0..degree,
    m = -l..l, stacked on the last axis [..., (degree+1)^2] (index l^2 + l + m).

    Polynomials in (x, y, z), so smooth everywhere (no angles): Y_lm = N_lm Q_l^|m|(z) C_|m|
    (m >= 0) or N_lm Q_l^|m|(z) S_|m| (m < 0), with C_m + i S_m = (x + i y)^m and Q_l^m the
    associated Legendre function divided by (1 - z^2)^(m/2).
    """
    x = u[..., 0]
    y = u[..., 1]
    z = u[..., 2]
    cos_m: List[Tensor] = [torch.ones_like(x)]
    sin_m: List[Tensor] = [torch.zeros_like(x)]
    for m in range(1, degree + 1):
        cos_m.append(x * cos_m[m - 1] - y * sin_m[m - 1])
        sin_m.append(x * sin_m[m - 1] + y * cos_m[m - 1])
    # q[l][m], l = 0..degree, m = 0..l
    q: List[List[Tensor]] = []
    for l in range(degree + 1):
        row: List[Tensor] = []
        for m in range(l + 1):
            if m == l:
                double_factorial = 1.0
                for k in range(1, 2 * m, 2):
                    double_factorial *= float(k)
                row.append(torch.full_like(z, double_factorial))
            elif m == l - 1:
                row.append((2 * m + 1) * z * q[m][m])
            else:
                row.append(((2 * l - 1) * z * q[l - 1][m] - (l + m - 1) * q[l - 2][m]) / float(l - m))
        q.append(row)
    out: List[Tensor] = []
    for l in range(degree + 1):
        for m in range(-l, l + 1):
            a = abs(m)
            ratio = 1.0
            for k in range(l - a + 1, l + a + 1):
                ratio /= float(k)                          # (l-|m|)! / (l+|m|)!
            norm = math.sqrt((2 * l + 1) / (4.0 * math.pi) * ratio)
            if m == 0:
                out.append(norm * q[l][0])
            elif m > 0:
                out.append(math.sqrt(2.0) * norm * q[l][a] * cos_m[a])
            else:
                out.append(math.sqrt(2.0) * norm * q[l][a] * sin_m[a])
    return torch.stack(out, dim=-1)


class MemberLinear(nn.Module):
    """A linear layer with independent weights per committee member.

    x: [M, ..., in] (or [1, ..., in], shared by all members) -> [M, ..., out]
    """

    def __init__(self, members: int, n_in: int, n_out: int, bias: bool, generators: List[torch.Generator],
                 gain: float = 1.0):
        super().__init__()
        weight = torch.empty(members, n_in, n_out, dtype=torch.float64)
        for m, gen in enumerate(generators):
            weight[m].normal_(0.0, gain / math.sqrt(n_in), generator=gen)
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


class SphereLayer(nn.Module):
    """One interaction: neighbour signal on S^2 -> invariant products -> update of h."""

    def __init__(self, members: int, channels: int, degree: int, correlation: int,
                 generators: List[torch.Generator]):
        super().__init__()
        self.channels = channels
        self.degree = degree
        self.correlation = correlation
        #: contract neighbour slots by a multiply-and-sum instead of a batched matmul (set by
        #: mlmd.compiled, where the compiler fuses it; TorchScript keeps the matmul)
        self.contract_by_sum = False
        self.sender = MemberLinear(members, channels, channels, False, generators)
        # per degree l: C -> nu C, the factors u_1..u_nu of the products
        self.mix = nn.ModuleList([MemberLinear(members, channels, correlation * channels, False, generators)
                                  for _ in range(degree + 1)])
        self.norm = MemberLayerNorm(members, (correlation + 1) * channels)
        self.update_in = MemberLinear(members, (correlation + 1) * channels, 2 * channels, True, generators)
        self.update_out = MemberLinear(members, 2 * channels, channels, True, generators, gain=0.5)

    def forward(self, h: Tensor, radial: Tensor, harmonics: Tensor, neighbour: Tensor,
                grid_harmonics: Tensor, grid_weights: Tensor, inv_avg_neighbours: float) -> Tensor:
        """h [M,N,C]; radial [M,N,L+1,K,C] (R_lc of each atom's K neighbour slots, zero on empty
        slots); harmonics [M,N,S,K]; neighbour [N*K]; grid_harmonics [Q,S]; grid_weights [Q]
        -> new h [M,N,C]."""
        members, n_atoms, c = h.shape[0], h.shape[1], self.channels
        s = torch.index_select(self.sender(h), 1, neighbour).reshape(members, n_atoms, 1, -1, c)
        weighted = radial * s                                               # [M,N,L+1,K,C]
        # A_i,lm,c = sum_k Y_lm(k) R_lc(k) s_c(k): a matmul over the neighbour slots, per degree
        # split/unbind rather than slices: a slice's gradient is a full-size zero tensor per slice
        # (in the double backward of training, 20 % of a step), split's is one concatenation
        mixed: List[Tensor] = []
        per_degree = torch.split(harmonics, [2 * l + 1 for l in range(self.degree + 1)], dim=2)
        weighted_per_degree = torch.unbind(weighted, dim=2)
        for l, mix in enumerate(self.mix):
            if self.contract_by_sum:
                # the same sum as one fused loop (compiled form): a matmul batched over M*N atoms
                # runs M*N tiny mm calls on the CPU (about a third of a copper call in TorchScript)
                coefficients = (per_degree[l].unsqueeze(-1) * weighted_per_degree[l].unsqueeze(2)).sum(3)
            else:
                coefficients = torch.matmul(per_degree[l], weighted_per_degree[l])
            mixed.append(mix(coefficients * inv_avg_neighbours))           # [M,N,2l+1,nu C]
        # the sphere signal at the Q quadrature points as ONE matmul [Q,S] @ [S, nu*M*N*C] (a
        # matmul broadcast over [M,N] runs M*N tiny products: 4x slower for ethanol), laid out
        # [Q, nu, M, N, C] so that each factor u_t is one contiguous block
        n_points = grid_harmonics.shape[0]
        coefficients = torch.cat(mixed, dim=2).reshape(members, n_atoms, -1, self.correlation, c)
        coefficients = coefficients.permute(2, 3, 0, 1, 4).reshape(grid_harmonics.shape[1], -1)
        signal = torch.mm(grid_harmonics, coefficients).reshape(n_points, self.correlation, -1)
        factors = torch.unbind(signal, dim=1)                               # nu x [Q, M*N*C]
        quadrature = grid_weights.unsqueeze(0)
        product = factors[0]
        integrals: List[Tensor] = [torch.mm(quadrature, product)]
        for k in range(1, self.correlation):
            product = product * factors[k]
            integrals.append(torch.mm(quadrature, product))
        invariants = torch.cat(integrals, dim=0).reshape(self.correlation, members, n_atoms, c)
        invariants = torch.cat([h, invariants.permute(1, 2, 0, 3).reshape(members, n_atoms, -1)], dim=-1)
        update = self.norm(invariants)
        return h + self.update_out(nn.functional.silu(self.update_in(update)))


class PonitaPotential(nn.Module):
    """The model core: edge vectors in, per-atom energies out, for M members at once.

    Species are given as indices into ``species`` (0..S-1), not atomic numbers.
    """

    def __init__(self, species: List[int], committee_size: int = 1, seed: int = 0,
                 hyperparameters: Optional[Dict[str, float]] = None,
                 energy_shift: Optional[List[float]] = None, energy_scale: float = 1.0,
                 avg_num_neighbors: float = 1.0):
        super().__init__()
        hp = check_hyperparameters(hyperparameters)
        self.hyperparameters = hp
        members = int(committee_size)
        if members < 1:
            raise ValueError(f"committee_size must be >= 1, got {committee_size}")
        channels = int(hp["channels"])
        width = int(hp["radial_width"])
        self.species: List[int] = [int(z) for z in species]
        self.committee_size = members
        self.cutoff = float(hp["cutoff"])
        self.channels = channels
        self.degree = int(hp["degree"])
        self.correlation = int(hp["correlation"])
        self.radial_basis = int(hp["radial_basis"])
        self.envelope_exponent = int(hp["envelope_exponent"])
        self.inv_avg_neighbours = 1.0 / float(avg_num_neighbors)
        self.energy_scale = float(energy_scale)
        self.n_layers = int(hp["layers"])
        degree = self.degree

        # constants of the sphere, each as a float32 pair (hi, lo) with hi + lo = the float64 value
        # to 1e-14: both follow .to(dtype) exactly, so a float32 file turned float64 (an audit)
        # still has an exact quadrature, which float32-rounded weights would not be
        points, weights = lebedev_rule(self.correlation * degree)
        constants = {"grid_harmonics": real_spherical_harmonics(torch.as_tensor(points), degree),   # [Q,S]
                     "grid_weights": torch.as_tensor(weights),                                         # [Q]
                     "bessel_frequencies": torch.arange(1, self.radial_basis + 1, dtype=torch.float64)
                     * math.pi / self.cutoff}                                                         # [K] 1/Å
        for name, value in constants.items():
            hi = value.to(torch.float32)
            self.register_buffer(name + "_hi", hi)
            self.register_buffer(name + "_lo", (value - hi.double()).to(torch.float32))

        generators = [torch.Generator().manual_seed(int(seed) * 1000003 + m) for m in range(members)]
        shift = torch.zeros(len(self.species)) if energy_shift is None else torch.tensor(energy_shift)
        self.register_buffer("energy_shift", shift.to(torch.float32))   # [S] eV, E0 per species
        embedding = torch.empty(members, len(self.species), channels, dtype=torch.float64)
        for m, gen in enumerate(generators):
            embedding[m].normal_(0.0, 1.0, generator=gen)
        self.embedding = nn.Parameter(embedding.float())
        # one radial MLP for all layers: R_lc(r) of layer t in block t
        self.radial_in = MemberLinear(members, self.radial_basis, width, True, generators)
        self.radial_hidden = MemberLinear(members, width, width, True, generators)
        self.radial_out = MemberLinear(members, width, self.n_layers * (degree + 1) * channels, False, generators)
        self.layers = nn.ModuleList([SphereLayer(members, channels, degree, self.correlation, generators)
                                     for _ in range(self.n_layers)])
        # a linear readout of every layer but the last, an MLP of the last (as MACE)
        self.readouts = nn.ModuleList([MemberLinear(members, channels, 1, False, generators)
                                       for _ in range(self.n_layers - 1)])
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
        slot, neighbour, slots = self.neighbour_slots(edge_index, species_index.shape[0])   # [E], [N*K], K
        return self.energy_in_slots(edge_vectors, species_index, slot, neighbour.reshape(-1, slots))

    def energy_in_slots(self, edge_vectors: Tensor, species_index: Tensor, slot: Tensor,
                        neighbour: Tensor) -> Tensor:
        """:meth:`forward` once the pairs have their slots (see :meth:`neighbour_slots`).

        edge_vectors [M,E,3] Å; species_index [N]; slot [E] int64; neighbour [N,K] int64
        -> [M,N] eV.  Free of data-dependent shapes (K is the size of ``neighbour``), so that
        a compiler traces it as one graph for every atom and pair count.
        """
        members = self.committee_size
        n_atoms = species_index.shape[0]
        slots = neighbour.shape[1]
        neighbour = neighbour.reshape(-1)
        c = self.channels
        n_degrees = self.degree + 1
        grid_harmonics = self.grid_harmonics_hi + self.grid_harmonics_lo
        grid_weights = self.grid_weights_hi + self.grid_weights_lo
        frequencies = self.bessel_frequencies_hi + self.bessel_frequencies_lo
        # everything per pair is computed on the E real pairs and only then laid out in K slots per
        # atom (K = the largest neighbour count): padding is 36 % of the slots in liquid water
        r = torch.linalg.norm(edge_vectors, dim=-1)                                   # [M,E]
        harmonics = real_spherical_harmonics(edge_vectors / r.unsqueeze(-1), self.degree)   # [M,E,S]
        harmonics = self.to_slots(harmonics, slot, n_atoms * slots)                   # [M,N*K,S]
        harmonics = harmonics.reshape(members, n_atoms, slots, -1).transpose(2, 3)    # [M,N,S,K]
        bessel = torch.sin(r.unsqueeze(-1) * frequencies) / r.unsqueeze(-1)           # [M,E,B]
        hidden = nn.functional.silu(self.radial_in(bessel))
        hidden = nn.functional.silu(self.radial_hidden(hidden))
        # radial_out is linear without bias: the envelope scales its input, 4x narrower than its
        # output; each layer multiplies its own block of radial_out's columns, so that no layer's
        # gradient is a zero-filled tensor of all layers' radial values (23 % of a copper step)
        hidden = hidden * self.envelope(r).unsqueeze(-1)                               # [M,E,W]
        radial_blocks = torch.split(self.radial_out.weight, n_degrees * c, dim=2)      # T x [M,W,(L+1)*C]

        h = torch.index_select(self.embedding, 1, species_index)                     # [M,N,C]
        atom_energy = torch.zeros((members, n_atoms), dtype=h.dtype, device=h.device)
        for index, layer in enumerate(self.layers):
            radial = self.to_slots(torch.bmm(hidden, radial_blocks[index]), slot, n_atoms * slots)
            radial = radial.reshape(members, n_atoms, slots, n_degrees, c)
            radial = radial.transpose(2, 3).contiguous()                               # [M,N,L+1,K,C]
            h = layer(h, radial, harmonics, neighbour, grid_harmonics, grid_weights,
                      self.inv_avg_neighbours)
            if index < self.n_layers - 1:
                for k, readout in enumerate(self.readouts):
                    if k == index:
                        atom_energy = atom_energy + readout(h).squeeze(-1)
        out = self.readout_out(nn.functional.silu(self.readout_hidden(h))).squeeze(-1)
        atom_energy = (atom_energy + out) * self.energy_scale
        return atom_energy + torch.index_select(self.energy_shift, 0, species_index).unsqueeze(0)

    def neighbour_slots(self, edge_index: Tensor, n_atoms: int) -> Tuple[Tensor, Tensor, int]:
        """The pairs laid out as K slots per centre atom (K = the largest neighbour count), so
        that sums over neighbours are matmuls instead of scatters of [E, S, C] tensors.

        edge_index [2,E] -> slot [E] (pair e sits in slot slot[e] of the N*K), neighbour [N*K]
        (atom j of each slot, 0 for an empty slot, whose kernels are zero), K.
        """
        centre = edge_index[0]
        counts = torch.bincount(centre, minlength=n_atoms)
        slots = int(counts.max()) if centre.shape[0] > 0 else 1
        order = torch.argsort(centre, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        sorted_centre = centre[order]
        sorted_slot = sorted_centre * slots + torch.arange(centre.shape[0], device=centre.device) - starts[sorted_centre]
        slot = torch.empty_like(sorted_slot).index_copy(0, order, sorted_slot)
        neighbour = torch.zeros(n_atoms * slots, dtype=torch.long, device=centre.device).index_copy(
            0, slot, edge_index[1])
        return slot, neighbour, slots

    def to_slots(self, per_pair: Tensor, slot: Tensor, n_slots: int) -> Tensor:
        """[M,E,F] values of the pairs -> [M,N*K,F], zero in empty slots."""
        padded = torch.zeros((per_pair.shape[0], n_slots, per_pair.shape[2]), dtype=per_pair.dtype,
                             device=per_pair.device)
        return padded.index_copy(1, slot, per_pair)

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
