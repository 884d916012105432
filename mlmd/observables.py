"""MD observables with credible intervals from the committee (Thaler et al., "Scalable Bayesian
uncertainty quantification for neural network potentials: promise and pitfalls").

A committee is a sample of models from (an approximation of) the posterior. What a user needs
is the spread of an *observable* (an RDF, a bond-length distribution, the mean potential energy)
over that posterior, not a per-frame force spread. Running MD once per member is expensive, so
the trajectory sampled with the committee mean U_0 (what every mlmd host integrates) is
reweighted to each member m at the run's temperature T (β = 1/k_B T):

    w_mt = exp(-β [U_m(x_t) - U_0(x_t)])           (normalised over the frames t)
    <A>_m = Σ_t w_mt A(x_t)

For a histogram, A is the frame's (density-normalised) histogram; for the mean potential energy,
A = U_m itself. Reweighting only works while the weights are spread over many frames: Kish's
effective sample size n_eff,m = (Σ_t w_mt)² / Σ_t w_mt² is reported per member, and when the
smallest n_eff / n_frames falls below ``min_ess_fraction`` the result says so (then run short
MD segments with each member instead: ``Simulation(..., member=m)``).

Credible interval at level p (0.9 by default) from the M member estimates, bin by bin: with
M >= 20 members their empirical quantiles; with fewer, the predictive interval of a normal
posterior estimated from M draws, mean ± t_{(1+p)/2, M-1} · s · sqrt(1 + 1/M) (four members
give only the spread of four numbers, so quantiles would understate it).

Separately, the sampling error of the run itself (a finite trajectory) is estimated by block
averaging the unweighted estimate over ``blocks`` consecutive blocks: ``sampling_se``. The
``lower_total`` / ``upper_total`` columns widen the posterior interval by it (in quadrature, with
the t factor for ``blocks`` - 1 degrees of freedom): the band to compare with a reference run.

Observables (``observables:`` in ``mlmd run``'s YAML, or :func:`parse_observables`)::

    - {kind: rdf, elements: [O, H], r_max: 5.0, bins: 50}   # g(r) if periodic, else p(r) of the pairs
    - {kind: distance, atoms: [0, 1], range: [1.2, 1.9], bins: 40}   # Å
    - {kind: angle, atoms: [1, 0, 2], bins: 36}                     # degrees, vertex in the middle
    - {kind: dihedral, atoms: [3, 0, 1, 4], bins: 36}               # degrees, -180..180
    - {kind: energy}                                                 # mean potential energy, eV

Atom indices count from 0, in the order of the structure file.
"""
from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import units
from .errors import InputError

KINDS = ("rdf", "distance", "angle", "dihedral", "energy")
_N_ATOMS = {"distance": 2, "angle": 3, "dihedral": 4}
_DEFAULT_RANGE = {"angle": (0.0, 180.0), "dihedral": (-180.0, 180.0)}
_DEFAULT_BINS = {"rdf": 60, "distance": 40, "angle": 36, "dihedral": 36, "energy": 1}


@dataclass
class Observable:
    """One observable: its ``kind`` (:data:`KINDS`), the atoms (indices) or elements (for rdf) it
    reads, the histogram ``range`` (Å or degrees) and ``bins``."""
    kind: str
    atoms: List[int] = field(default_factory=list)
    elements: List[str] = field(default_factory=list)
    range: Optional[Tuple[float, float]] = None
    bins: int = 0

    @property
    def name(self) -> str:
        if self.kind == "rdf":
            return f"rdf_{'-'.join(self.elements)}"
        if self.kind == "energy":
            return "potential_energy"
        return f"{self.kind}_{'-'.join(str(i) for i in self.atoms)}"

    @property
    def unit(self) -> str:
        return {"rdf": "Å", "distance": "Å", "angle": "deg", "dihedral": "deg", "energy": "eV"}[self.kind]


def parse_observables(items: Sequence[Dict[str, Any]], atoms=None) -> List[Observable]:
    """Observables from their YAML/dict form (see the module docstring), checked against
    ``atoms`` (ase.Atoms) when given. Raises :class:`InputError` naming the entry and key."""
    from ase.data import atomic_numbers as symbol_to_z

    if not isinstance(items, (list, tuple)):
        raise InputError("observables: expected a list of mappings such as {kind: rdf, elements: [O, H]}")
    result = []
    for index, item in enumerate(items):
        where = f"observables[{index}]"
        if not isinstance(item, dict) or "kind" not in item:
            raise InputError(f"{where}: expected a mapping with a 'kind' (one of {KINDS}), got {item!r}")
        kind = str(item["kind"]).lower()
        if kind not in KINDS:
            raise InputError(f"{where}.kind: {item['kind']!r} is not one of {KINDS}")
        unknown = set(item) - {"kind", "atoms", "elements", "range", "r_max", "bins"}
        if unknown:
            raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; use kind, atoms, elements, range, "
                             "r_max, bins")
        spec = Observable(kind=kind, bins=int(item.get("bins", _DEFAULT_BINS[kind])))
        if spec.bins < 1:
            raise InputError(f"{where}.bins: give a positive number of bins, got {item.get('bins')!r}")
        if kind == "rdf":
            elements = item.get("elements")
            if not isinstance(elements, (list, tuple)) or len(elements) != 2:
                raise InputError(f"{where}.elements: give two element symbols, e.g. [O, H]")
            for symbol in elements:
                if str(symbol) not in symbol_to_z:
                    raise InputError(f"{where}.elements: {symbol!r} is not an element symbol")
                if atoms is not None and symbol_to_z[str(symbol)] not in set(atoms.numbers.tolist()):
                    raise InputError(f"{where}.elements: the structure has no {symbol} atom")
            spec.elements = [str(e) for e in elements]
            r_max = float(item.get("r_max", item.get("range", [0, 6.0])[1]))
            if not r_max > 0:
                raise InputError(f"{where}.r_max: give a positive distance in Å, got {r_max}")
            spec.range = (0.0, r_max)
        elif kind in _N_ATOMS:
            need = _N_ATOMS[kind]
            indices = item.get("atoms")
            if not isinstance(indices, (list, tuple)) or len(indices) != need:
                raise InputError(f"{where}.atoms: a {kind} needs {need} atom indices (from 0), got {indices!r}")
            spec.atoms = [int(i) for i in indices]
            if len(set(spec.atoms)) != need:
                raise InputError(f"{where}.atoms: the indices {spec.atoms} repeat an atom")
            if atoms is not None and (min(spec.atoms) < 0 or max(spec.atoms) >= len(atoms)):
                raise InputError(f"{where}.atoms: {spec.atoms} is outside the structure's 0..{len(atoms) - 1}")
            spec.range = tuple(float(v) for v in item["range"]) if "range" in item else _DEFAULT_RANGE.get(kind)
        if spec.range is not None and not (len(spec.range) == 2 and spec.range[1] > spec.range[0]):
            raise InputError(f"{where}.range: give [low, high] with high > low, got {item.get('range')!r}")
        result.append(spec)
    return result


def frame_samples(spec: Observable, atoms) -> np.ndarray:
    """The values one frame contributes to the histogram of ``spec`` (Å or degrees)."""
    if spec.kind == "distance":
        return np.array([atoms.get_distance(*spec.atoms, mic=bool(atoms.pbc.any()))])
    if spec.kind == "angle":
        return np.array([atoms.get_angle(*spec.atoms, mic=bool(atoms.pbc.any()))])
    if spec.kind == "dihedral":
        value = atoms.get_dihedral(*spec.atoms, mic=bool(atoms.pbc.any()))     # ASE: 0..360
        return np.array([(value + 180.0) % 360.0 - 180.0])
    if spec.kind == "rdf":
        from ase.data import atomic_numbers as symbol_to_z

        from .neighbors import neighbor_pairs

        # mlmd's cell list within r_max (linear in N, periodic images included); the full list holds
        # each pair both ways: for two elements keep centre A, neighbour B; for one, each pair once
        edge_index, shifts = neighbor_pairs(atoms.positions, np.asarray(atoms.cell), atoms.pbc, spec.range[1])
        z_a, z_b = symbol_to_z[spec.elements[0]], symbol_to_z[spec.elements[1]]
        centre, neighbour = edge_index
        keep = (atoms.numbers[centre] == z_a) & (atoms.numbers[neighbour] == z_b)
        if z_a == z_b:
            keep &= (centre < neighbour) | ((centre == neighbour) & _first_of_image_pair(shifts))
        vectors = atoms.positions[neighbour[keep]] - atoms.positions[centre[keep]] + shifts[keep]
        return np.linalg.norm(vectors, axis=1)
    raise ValueError(spec.kind)


def _first_of_image_pair(shifts: np.ndarray) -> np.ndarray:
    """For an atom paired with its own periodic image (shift s and -s both listed): True for one of
    the two, the one whose first non-zero component is positive."""
    sign = np.zeros(len(shifts))
    for column in range(3):
        undecided = sign == 0
        sign[undecided] = np.sign(shifts[undecided, column])
    return sign > 0


def _histogram(spec: Observable, atoms, samples: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(bin centres, the frame's normalised histogram): a probability density (1/unit) for
    distance, angle, dihedral and non-periodic rdf (the distribution of pair distances p(r), over
    all A–B pairs of the molecule: pairs beyond r_max count in the total), g(r) for a periodic
    rdf (ideal-gas normalised with the frame's volume)."""
    edges = np.linspace(spec.range[0], spec.range[1], spec.bins + 1)
    counts, _ = np.histogram(samples, bins=edges)
    centres = 0.5 * (edges[1:] + edges[:-1])
    width = np.diff(edges)
    if spec.kind == "rdf":
        from ase.data import atomic_numbers as symbol_to_z

        n_a = int((atoms.numbers == symbol_to_z[spec.elements[0]]).sum())
        n_b = int((atoms.numbers == symbol_to_z[spec.elements[1]]).sum())
        total = n_a * (n_a - 1) / 2 if spec.elements[0] == spec.elements[1] else n_a * n_b
        if bool(atoms.pbc.all()):
            shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
            return centres, counts / (total / atoms.get_volume() * shell)
    else:
        total = len(samples)
    return centres, counts / (max(total, 1) * width)


@dataclass
class ObservableResult:
    """One observable over a trajectory: bin centres ``x`` [B] (one row for energy), the estimate of
    the sampled ensemble ``mean`` [B], each member's reweighted estimate ``members`` [M,B], the
    credible interval ``lower``/``upper`` [B], ``sampling_se`` [B] and the widened
    ``lower_total``/``upper_total`` [B]."""
    spec: Observable
    x: np.ndarray
    mean: np.ndarray
    members: np.ndarray
    centre: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    sampling_se: np.ndarray
    lower_total: np.ndarray
    upper_total: np.ndarray
    quantity: str = ""


@dataclass
class ObservablesReport:
    """Every observable of one trajectory, with the reweighting diagnostics: ``ess_fraction`` [M]
    (Kish n_eff / n_frames per member), ``reliable`` (all above ``min_ess_fraction``) and the
    ``level`` of the intervals."""
    results: List[ObservableResult]
    ess_fraction: np.ndarray
    n_frames: int
    temperature: float
    level: float
    reliable: bool
    min_ess_fraction: float
    interval_method: str

    def warning(self) -> Optional[str]:
        if self.reliable:
            return None
        worst = int(np.argmin(self.ess_fraction))
        return (f"reweighting to committee member {worst} keeps {100 * self.ess_fraction[worst]:.1f} % of the "
                f"{self.n_frames} frames' weight (below {100 * self.min_ess_fraction:.0f} %): the intervals are "
                "not reliable; run short MD segments with each member instead (Simulation(..., member=m)) or "
                "a longer trajectory")


def credible_interval(estimates: np.ndarray, level: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(centre, lower, upper, method) over axis 0 of ``estimates`` [M, ...]: quantiles for M >= 20,
    else mean ± t·s·sqrt(1 + 1/M) (a normal posterior predictive from M draws)."""
    from scipy import stats

    m = estimates.shape[0]
    centre = estimates.mean(axis=0)
    if m >= 20:
        lower, upper = np.quantile(estimates, [(1 - level) / 2, (1 + level) / 2], axis=0)
        return centre, lower, upper, f"empirical {100 * level:.0f} % quantiles of {m} members"
    if m < 2:
        return centre, centre.copy(), centre.copy(), "one model: no interval"
    spread = estimates.std(axis=0, ddof=1) * np.sqrt(1.0 + 1.0 / m) * stats.t.ppf((1 + level) / 2, m - 1)
    return centre, centre - spread, centre + spread, (f"normal predictive from {m} members: mean ± "
                                                      f"t({(1 + level) / 2:.2f}, {m - 1})·s·sqrt(1+1/{m})")


def member_weights(member_energies: np.ndarray, temperature: float) -> np.ndarray:
    """w [M,T] (rows sum to 1) reweighting frames sampled with the committee mean to each member:
    w_mt ∝ exp(-β (U_mt - mean_m U_mt)). ``member_energies`` [T,M] eV, ``temperature`` K."""
    energies = np.asarray(member_energies, dtype=np.float64)
    beta = 1.0 / (units.BOLTZMANN_EV_PER_K * float(temperature))
    log_w = -beta * (energies - energies.mean(axis=1, keepdims=True))      # [T,M]
    log_w -= log_w.max(axis=0, keepdims=True)
    w = np.exp(log_w).T
    return w / w.sum(axis=1, keepdims=True)


def evaluate(frames, model, observables, temperature: float, level: float = 0.9, blocks: int = 5,
             min_ess_fraction: float = 0.1, member_energies: Optional[np.ndarray] = None,
             progress: bool = False) -> ObservablesReport:
    """Observables with credible intervals over a trajectory sampled with ``model``'s committee mean.

    frames        a list of ase.Atoms, or a trajectory path (:func:`read_frames`; OpenMM's DCD with a
                  ``topology`` next to it is read by mdtraj)
    model         the committee that ran the trajectory (path or :class:`mlmd.Potential`)
    observables   :class:`Observable` list or its dict form (:func:`parse_observables`)
    temperature   K, of the run
    member_energies  [T,M] eV if already known (else the committee is evaluated on every frame)
    """
    from .potential import as_potential

    if isinstance(frames, (str, os.PathLike)):
        frames = read_frames(frames)
    frames = list(frames)
    if len(frames) < 2:
        raise InputError(f"frames: need at least 2 frames to average over, got {len(frames)}")
    if not (temperature and float(temperature) > 0):
        raise InputError(f"temperature: the run's temperature in K is needed to reweight, got {temperature!r}")
    if not 0 < level < 1:
        raise InputError(f"level: give the interval's probability in (0, 1), e.g. 0.9, got {level}")
    blocks = int(min(max(blocks, 2), len(frames)))
    specs = [o if isinstance(o, Observable) else None for o in observables]
    if any(s is None for s in specs):
        specs = parse_observables(observables, frames[0])
    if member_energies is None:
        potential = as_potential(model)
        if potential.committee_size < 2:
            raise InputError("model: a single model has no posterior spread; give a committee file")
        rows = []
        iterator = frames
        if progress:
            from tqdm import tqdm
            iterator = tqdm(frames, desc="committee on frames", unit="frame")
        for atoms in iterator:
            rows.append(np.asarray(potential.compute_atoms(atoms)["member_energies"], dtype=np.float64))
        member_energies = np.array(rows)
    member_energies = np.asarray(member_energies, dtype=np.float64)
    if member_energies.shape[0] != len(frames):
        raise InputError(f"member_energies: {member_energies.shape[0]} rows for {len(frames)} frames")
    weights = member_weights(member_energies, temperature)                    # [M,T]
    n_frames = len(frames)
    ess_fraction = 1.0 / (weights ** 2).sum(axis=1) / n_frames
    block_of = np.minimum((np.arange(n_frames) * blocks) // n_frames, blocks - 1)
    from scipy import stats
    t_blocks = stats.t.ppf((1 + level) / 2, blocks - 1)
    results, method = [], ""
    for spec in specs:
        if spec.kind == "energy":
            x = np.array([0.0])
            members = (weights * member_energies.T).sum(axis=1, keepdims=True)   # [M,1]: A_m = U_m
            sampled = member_energies.mean(axis=1)[:, None]                   # [T,1]
        else:
            histograms = []
            for atoms in frames:
                x, h = _histogram(spec, atoms, frame_samples(spec, atoms))
                histograms.append(h)
            sampled = np.array(histograms)                                    # [T,B]
            members = weights @ sampled                                       # [M,B]
        mean = sampled.mean(axis=0)
        block_means = np.array([sampled[block_of == b].mean(axis=0) for b in range(blocks)])
        sampling_se = block_means.std(axis=0, ddof=1) / np.sqrt(blocks)
        centre, lower, upper, method = credible_interval(members, level)
        half = np.sqrt(((upper - lower) / 2) ** 2 + (t_blocks * sampling_se) ** 2)
        lower_total = centre - half
        if spec.kind != "energy":          # a density or g(r) is never negative: the symmetric t band is cut at 0
            lower, lower_total = np.maximum(lower, 0.0), np.maximum(lower_total, 0.0)
        if spec.kind == "energy":
            quantity = "mean potential energy (eV)"
        elif spec.kind == "rdf":
            quantity = "g(r)" if bool(frames[0].pbc.all()) else "p(r), pair distances (1/Å)"
        else:
            quantity = f"probability density (1/{spec.unit})"
        results.append(ObservableResult(spec, np.asarray(x), mean, members, centre, lower, upper, sampling_se,
                                        lower_total, centre + half, quantity))
    reliable = bool(ess_fraction.min() >= min_ess_fraction)
    report = ObservablesReport(results, ess_fraction, n_frames, float(temperature), float(level), reliable,
                               float(min_ess_fraction), method)
    if not reliable:
        warnings.warn(report.warning(), RuntimeWarning, stacklevel=2)
    return report


def read_frames(path, topology=None) -> list:
    """Every frame of a trajectory as ase.Atoms: extxyz/xyz/traj by ASE; DCD/XTC by mdtraj with
    ``topology`` (default: topology.pdb next to the file, as ``mlmd run`` writes it)."""
    import ase.io

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"frames: trajectory {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".dcd", ".xtc"):
        return ase.io.read(path, index=":")
    import mdtraj
    from ase import Atoms

    topology = topology or os.path.join(os.path.dirname(path), "topology.pdb")
    if not os.path.isfile(topology):
        raise InputError(f"topology: {ext} trajectories hold no elements; give topology= (a PDB of the system), "
                         f"{topology!r} does not exist")
    traj = mdtraj.load(path, top=topology)
    numbers = [atom.element.atomic_number for atom in traj.topology.atoms]
    frames = []
    for index in range(traj.n_frames):
        atoms = Atoms(numbers=numbers, positions=traj.xyz[index].astype(np.float64) * units.NM_TO_ANGSTROM)
        if traj.unitcell_vectors is not None and np.abs(traj.unitcell_vectors[index]).sum() > 0:
            atoms.set_cell(traj.unitcell_vectors[index].astype(np.float64) * units.NM_TO_ANGSTROM)
            atoms.set_pbc(True)
        frames.append(atoms)
    return frames


def write_csv(report: ObservablesReport, path: str) -> str:
    """One row per observable and bin: observable, unit, x, mean, centre, lower, upper,
    sampling_se, lower_total, upper_total, member_0..member_{M-1}."""
    n_members = report.results[0].members.shape[0] if report.results else 0
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["observable", "unit", "x", "mean", "centre", "lower", "upper", "sampling_se",
                         "lower_total", "upper_total"] + [f"member_{m}" for m in range(n_members)])
        for result in report.results:
            for b in range(len(result.x)):
                writer.writerow([result.spec.name, result.spec.unit, f"{result.x[b]:.6g}"]
                                + [f"{v:.8g}" for v in (result.mean[b], result.centre[b], result.lower[b],
                                                         result.upper[b], result.sampling_se[b],
                                                         result.lower_total[b], result.upper_total[b])]
                                + [f"{v:.8g}" for v in result.members[:, b]])
    return path


def plot(report: ObservablesReport, path: str, reference: Optional[Dict[str, np.ndarray]] = None,
         title: str = "") -> str:
    """One panel per observable: the credible band (posterior, and widened by the sampling error),
    the sampled estimate, and ``reference`` curves {observable name: values per bin} if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report.results)
    columns = min(n, 3)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, result in zip(axes.flat, report.results):
        spec = result.spec
        label_level = f"{100 * report.level:.0f} % credible"
        if spec.kind == "energy":
            ax.errorbar([0], result.centre, yerr=[[result.centre[0] - result.lower_total[0]],
                                                 [result.upper_total[0] - result.centre[0]]],
                        fmt="o", color="C0", capsize=6, label=f"{label_level} (+ sampling)")
            ax.plot(np.zeros(len(result.members)), result.members[:, 0], "x", color="C1", label="members")
            if reference and spec.name in reference:
                ax.axhline(float(np.ravel(reference[spec.name])[0]), color="k", lw=1, label="reference")
            ax.set_xticks([])
            ax.set_ylabel("mean potential energy (eV)")
        else:
            ax.fill_between(result.x, result.lower_total, result.upper_total, color="C0", alpha=0.2,
                            label=f"{label_level} + sampling")
            ax.fill_between(result.x, result.lower, result.upper, color="C0", alpha=0.45, label=label_level)
            ax.plot(result.x, result.mean, color="C0", lw=1, label="this run")
            if reference and spec.name in reference:
                ax.plot(result.x, reference[spec.name], color="k", lw=1, ls="--", label="reference")
            ax.set_xlabel(f"{spec.kind} ({spec.unit})" if spec.kind != "rdf" else "r (Å)")
            ax.set_ylabel(result.quantity)
        ax.set_title(spec.name, fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title or f"{report.n_frames} frames, {report.temperature:.0f} K; min ESS "
                 f"{100 * report.ess_fraction.min():.0f} %", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
