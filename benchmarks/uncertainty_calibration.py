"""How well does a committee's σ rank and size its force errors, in and out of its domain?

For each molecule (ethanol, aspirin) fresh GFN2-xTB (tblite) Langevin trajectories at 300 K and at a
hot temperature (700 K by default) give labelled frames no model saw; the shipped committee is
scored on them with its own calibration factor c from the file (no refit on these frames):

- force MAE (committee mean, eV/Å);
- Spearman rank correlation of σ with the error, per frame (max_i cσ_i vs max_i |ΔF_i|) and
  per atom (cσ_i vs |ΔF_i|);
- miscalibration area of |ΔF_i| / (cσ_i) against chi(3)/√3 (0 perfect, 0.5 worst);
- Gaussian NLL per force component, ΔF_ia ~ N(0, (cσ_i)²), in nats (lower is better);
- from 300 K to the hot set: the ratio of mean σ against the ratio of mean error (a σ that
  follows the error grows as much as it).

This is the measuring stick of issue 21's calibration table: a posterior other than the deep
ensemble (SG-MCMC, a mean-variance head) is scored by the same function, on the same frames.

Run: .venv/bin/python benchmarks/uncertainty_calibration.py [--frames 100] [--hot 700] [--systems ethanol aspirin]
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = {"ethanol": ("ethanol.xyz", "ethanol_committee.pt"), "aspirin": ("aspirin.xyz", "aspirin_committee.pt")}
TIMESTEP_FS = 0.5
FRICTION_PER_PS = 5.0


def gfn2_frames(structure: str, temperature: float, n_frames: int, seed: int, work: str, spacing: int = 40,
                equilibration: int = 2000):
    """Frames of a GFN2-xTB Langevin run with their GFN2-xTB energy and forces as labels
    (``mlmd label``'s sampler, mlmd.models.data.sample_md, written to a file under ``work``)."""
    import ase.io

    from mlmd.models.data import read_dataset, sample_md

    out = os.path.join(work, f"{os.path.splitext(os.path.basename(structure))[0]}_{temperature:.0f}K.extxyz")
    if os.path.exists(out):
        os.remove(out)          # this benchmark's own scratch file, remade every run
    sample_md(ase.io.read(structure), "gfn2-xtb", out, frames=n_frames, temperature=temperature,
              timestep=TIMESTEP_FS, interval=spacing, equilibration=equilibration,
              friction=FRICTION_PER_PS * 1e-3, seed=seed, relax=False)
    return read_dataset(out)


def score(potential, frames) -> dict:
    """The metrics above for ``potential`` (a committee) on labelled ``frames``, with the file's c
    (Spearman is rank-based, so fit_calibration's own factor does not change it)."""
    from mlmd import keys
    from mlmd.uncertainty.scores import committee_errors, fit_calibration, miscalibration_area

    raw = committee_errors(potential, frames)
    fitted = fit_calibration(**raw)
    factor = float(potential.metadata.get(keys.META_CALIBRATION, 1.0))
    sigma = np.maximum(raw["sigma"], 1e-6) * factor
    components = raw["components"]
    nll = float(np.mean(0.5 * np.log(2 * math.pi * sigma[:, None] ** 2) + 0.5 * components ** 2 / sigma[:, None] ** 2))
    return {"mae": fitted.force_mae, "spearman_frame": fitted.spearman_frame, "spearman_atom": fitted.spearman_atom,
            "miscalibration": miscalibration_area(raw["error"] / sigma), "nll": nll,
            "mean_sigma": float(sigma.mean()), "mean_error": float(raw["error"].mean()), "factor": factor}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--hot", type=float, default=700.0, help="the out-of-domain temperature, K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=os.path.join(ROOT, "runs", "bench_uncertainty"),
                        help="folder for the labelled frames")
    parser.add_argument("--extra", nargs="+", default=[], metavar="SYSTEM:LABEL=PATH",
                        help="more committees to score on the same frames, e.g. ethanol:sgmcmc=runs/sg/model.pt")
    args = parser.parse_args(argv)
    extra = {}
    for item in args.extra:
        system, _, rest = item.partition(":")
        label, _, path = rest.rpartition("=")   # a label may hold "=" (T=1)
        if system not in SYSTEMS or not label or not os.path.isfile(path):
            raise SystemExit(f"--extra: {item!r} is not SYSTEM:LABEL=PATH with SYSTEM in {list(SYSTEMS)} and an "
                             "existing model file")
        extra.setdefault(system, []).append((label, path))
    import torch

    import mlmd

    torch.set_num_threads(1)
    os.makedirs(args.work, exist_ok=True)
    print("| system | posterior | T (K) | frames | force MAE eV/Å | Spearman per frame | Spearman per atom | "
          "miscalibration area | NLL per component | mean cσ eV/Å |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    ratios = []
    for name in args.systems:
        structure, model = (os.path.join(ROOT, "systems", name, f) for f in SYSTEMS[name])
        committees = [("deep ensemble (shipped)", mlmd.load(model))]
        committees += [(label, mlmd.load(path)) for label, path in extra.get(name, [])]
        rows = {}
        for temperature in (300.0, args.hot):
            start = time.perf_counter()
            frames = gfn2_frames(structure, temperature, args.frames, args.seed + int(temperature), args.work)
            label_s = time.perf_counter() - start
            for label, potential in committees:
                rows[label, temperature] = r = score(potential, frames)
                print(f"| {name} | {label} ({potential.committee_size}, c = {r['factor']:.2f}) | "
                      f"{temperature:.0f} | {len(frames)} | {r['mae']:.4f} | {r['spearman_frame']:.2f} | "
                      f"{r['spearman_atom']:.2f} | {r['miscalibration']:.3f} | {r['nll']:.2f} | "
                      f"{r['mean_sigma']:.4f} |<!-- labels {label_s:.0f} s -->", flush=True)
        for label, _ in committees:
            cold, hot = rows[label, 300.0], rows[label, args.hot]
            ratios.append((f"{name}, {label}", hot["mean_error"] / cold["mean_error"],
                           hot["mean_sigma"] / cold["mean_sigma"]))
    print()
    print(f"| system, posterior | error ratio {args.hot:.0f} K / 300 K | σ ratio | σ ratio / error ratio |")
    print("|---|---|---|---|")
    for name, error_ratio, sigma_ratio in ratios:
        print(f"| {name} | {error_ratio:.2f} | {sigma_ratio:.2f} | {sigma_ratio / error_ratio:.2f} |")


if __name__ == "__main__":
    main()
