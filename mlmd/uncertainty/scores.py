"""Committee statistics of one frame and calibration of σ against true errors.

Per-atom force σ (``keys.FORCES_STD``, eV/Å) is the member spread of the force vector,
sqrt(mean_m |F_i^m - <F_i>|^2); the frame score is its maximum over atoms (DP-GEN's
``max_devi_f``), and the relative score divides each atom's σ by its force magnitude:

    score       = c · max_i σ_i                                  eV/Å
    relative    = max_i  c σ_i / (|<F_i>| + ε)                   dimensionless

Calibration (Musil et al., J. Chem. Theory Comput. 15, 906 (2019)): the committee spread is
too small, by a factor that depends on the model and the data, so σ is multiplied by the
factor c that maximises the Gaussian likelihood of the true errors of held-out frames,

    c² = mean_i |F_i - F*_i|² / σ_i²      (each atom's 3 components, σ_i² = 3 per-component variances),

and the figures that say whether σ ranks errors at all (Spearman ρ, per frame and per atom)
and how far its Gaussian intervals are from the observed coverage (miscalibration area) are
reported next to it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Sequence

import numpy as np

from .. import keys
from ..errors import InputError

SIGMA_FLOOR = 1e-6   # eV/Å: below it a member spread is rounding noise, not information


def frame_scores(output: Dict, calibration: float = 1.0, epsilon: float = 0.1) -> Dict[str, object]:
    """Scores of one frame from a committee's output dict (numpy or torch values).

    returns atom_sigma [N] eV/Å (calibrated), energy_sigma eV, score eV/Å (max atom σ),
    relative (max σ_i/(|F_i|+ε), ε eV/Å), worst_atom int.  NaN/Inf outputs give NaN scores,
    which triggers treat as "lost", never as "trusted".
    """
    if keys.FORCES_STD not in output:
        raise InputError("output: no forces_std; frame scores need a committee (committee_size >= 2)")
    sigma = np.asarray(_numpy(output[keys.FORCES_STD]), dtype=np.float64) * calibration
    forces = np.asarray(_numpy(output[keys.FORCES]), dtype=np.float64)
    energy_sigma = float(_numpy(output[keys.ENERGY_STD])) if keys.ENERGY_STD in output else math.nan
    if sigma.size == 0:
        return {"atom_sigma": sigma, "energy_sigma": energy_sigma, "score": 0.0, "relative": 0.0, "worst_atom": -1}
    finite = np.isfinite(sigma).all() and np.isfinite(forces).all()
    if not finite:
        return {"atom_sigma": sigma, "energy_sigma": energy_sigma, "score": math.nan, "relative": math.nan,
                "worst_atom": -1}
    relative = sigma / (np.linalg.norm(forces, axis=1) + epsilon)
    worst = int(np.argmax(sigma))
    return {"atom_sigma": sigma, "energy_sigma": energy_sigma, "score": float(sigma[worst]),
            "relative": float(relative.max()), "worst_atom": worst}


def _numpy(value):
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return value


@dataclass
class Calibration:
    """The fitted factor and the figures of merit on the frames it was fitted on."""

    factor: float                      # c, multiplies the raw per-atom σ
    frames: int
    spearman_frame: float              # ρ(max_i σ_i, max_i |ΔF_i|) over frames
    spearman_atom: float               # ρ(σ_i, |ΔF_i|) over all atoms
    miscalibration_area: float         # ∫ |observed - expected coverage| dp of c σ: 0 perfect, 0.5 worst
    frame_sigma: List[float] = field(default_factory=list)    # calibrated max_i σ_i per frame, eV/Å
    frame_error: List[float] = field(default_factory=list)    # max_i |ΔF_i| per frame, eV/Å
    atom_sigma: List[float] = field(default_factory=list)     # raw σ_i, eV/Å
    atom_error: List[float] = field(default_factory=list)     # |ΔF_i|, eV/Å
    force_mae: float = math.nan        # committee-mean force MAE on these frames, eV/Å

    def summary(self) -> Dict[str, float]:
        return {k: v for k, v in asdict(self).items() if not isinstance(v, list)}


def force_mae(potential, frames: Sequence) -> float:
    """Committee-mean force MAE (eV/Å) of ``potential`` on labelled ``frames``, averaged per frame."""
    errors = [np.abs(potential.compute_atoms(a)[keys.FORCES] - a.calc.results[keys.DATA_FORCES]).mean()
              for a in frames]
    return float(np.mean(errors))


def committee_errors(potential, frames: Sequence) -> Dict[str, np.ndarray]:
    """Raw per-atom σ and force errors of ``potential`` (an mlmd.Potential with a committee)
    on labelled ``frames``: arrays sigma [A], error [A] (|ΔF_i|, eV/Å), component errors
    [A,3], and frame index [A]."""
    if potential.committee_size < 2:
        raise InputError("model: calibration needs a committee (committee_size >= 2)")
    sigma, error, components, frame = [], [], [], []
    for index, atoms in enumerate(frames):
        reference = np.asarray(atoms.calc.results[keys.DATA_FORCES], dtype=np.float64)
        out = potential.compute_atoms(atoms)
        delta = np.asarray(out[keys.FORCES], dtype=np.float64) - reference
        sigma.append(np.asarray(out[keys.FORCES_STD], dtype=np.float64))   # raw: the file's factor is not in it
        error.append(np.linalg.norm(delta, axis=1))
        components.append(delta)
        frame.append(np.full(len(atoms), index))
    return {"sigma": np.concatenate(sigma), "error": np.concatenate(error),
            "components": np.concatenate(components), "frame": np.concatenate(frame)}


def fit_calibration(sigma: np.ndarray, error: np.ndarray, components: np.ndarray,
                    frame: np.ndarray) -> Calibration:
    """Fit c (see module docstring) from raw per-atom σ [A], |ΔF| [A], ΔF [A,3], frame index [A]."""
    sigma = np.maximum(np.asarray(sigma, dtype=np.float64), SIGMA_FLOOR)
    error = np.asarray(error, dtype=np.float64)
    if sigma.size == 0:
        raise InputError("frames: calibration needs at least one labelled frame")
    factor = float(np.sqrt(np.mean(error ** 2 / sigma ** 2)))
    n_frames = int(frame.max()) + 1
    frame_sigma = np.full(n_frames, -np.inf)
    frame_error = np.full(n_frames, -np.inf)
    np.maximum.at(frame_sigma, frame, sigma)
    np.maximum.at(frame_error, frame, error)
    return Calibration(
        factor=factor, frames=n_frames,
        spearman_frame=spearman(frame_sigma, frame_error) if n_frames > 2 else math.nan,
        spearman_atom=spearman(sigma, error),
        miscalibration_area=miscalibration_area(error / (factor * sigma)),
        frame_sigma=(factor * frame_sigma).tolist(), frame_error=frame_error.tolist(),
        atom_sigma=sigma.tolist(), atom_error=error.tolist(),
        force_mae=float(np.mean(np.abs(components))))


def calibrate(potential, frames: Sequence) -> Calibration:
    """Fit the calibration factor of a committee on labelled frames (held out from training)."""
    return fit_calibration(**committee_errors(potential, frames))


def calibrate_file(path, frames: Sequence) -> Dict:
    """Fit the calibration factor of the committee file ``path`` on labelled ``frames`` (held
    out from training) and write it into the file; returns the calibration summary, {} for a
    single model or no frames."""
    from ..potential import as_potential, set_calibration

    potential = as_potential(path)
    frames = list(frames)
    if potential.committee_size < 2 or not frames:
        return {}
    calibration = calibrate(potential, frames)
    set_calibration(path, calibration.factor)
    return calibration.summary()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (scipy's, average ranks for ties)."""
    from scipy.stats import spearmanr
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def coverage(ratio: np.ndarray, points: int = 99):
    """(expected, observed) fractions of atoms with |ΔF_i| inside the Gaussian interval of
    calibrated σ_i, from ratio = |ΔF_i| / (c σ_i).  For an isotropic 3D Gaussian error with
    E|ΔF|² = c²σ², |ΔF|/(cσ) follows chi(3)/√3."""
    from scipy.stats import chi
    ratio = np.sort(np.asarray(ratio, dtype=np.float64))
    expected = np.linspace(0.01, 0.99, points)
    observed = np.searchsorted(ratio, chi.ppf(expected, 3) / math.sqrt(3.0), side="right") / max(ratio.size, 1)
    return expected, observed


def miscalibration_area(ratio: np.ndarray) -> float:
    """Area between observed and expected coverage (Tran et al. 2020): 0 is perfect, 0.5 worst."""
    if np.asarray(ratio).size == 0:
        return math.nan
    expected, observed = coverage(ratio)
    return float(np.trapezoid(np.abs(observed - expected), expected))


def plot_calibration(calibrations: Dict[str, Calibration], path: str, title: str = "") -> str:
    """PNG: per-frame calibrated σ vs true max force error (log-log, one colour per set) and the
    coverage curve of the Gaussian intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.3))
    lo, hi = np.inf, 0.0
    for index, (name, cal) in enumerate(calibrations.items()):
        s, e = np.asarray(cal.frame_sigma), np.asarray(cal.frame_error)
        axes[0].scatter(s, e, s=10, alpha=0.6, color=f"C{index}",
                        label=f"{name}: ρ={cal.spearman_frame:.2f}, c={cal.factor:.2f}")
        lo, hi = min(lo, s.min(), e.min()), max(hi, s.max(), e.max())
        sigma = np.maximum(np.asarray(cal.atom_sigma), SIGMA_FLOOR) * cal.factor
        expected, observed = coverage(np.asarray(cal.atom_error) / sigma)
        axes[1].plot(expected, observed, color=f"C{index}", label=f"{name}: area {cal.miscalibration_area:.3f}")
    line = np.array([max(lo, 1e-4), hi])
    axes[0].plot(line, line, "k--", lw=1)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("calibrated σ, max over atoms (eV/Å)")
    axes[0].set_ylabel("true error, max over atoms (eV/Å)")
    axes[0].legend(fontsize=8)
    axes[1].plot([0, 1], [0, 1], "k--", lw=1)
    axes[1].set_xlabel("expected fraction of atoms inside the interval")
    axes[1].set_ylabel("observed fraction")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
