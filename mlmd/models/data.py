"""Data sets: extxyz frames with reference energy and forces (read and written with ASE).

Labels are the calculator results of each frame (extxyz ``energy=`` and ``forces``
column); provenance (oracle, sampling temperature, MD step) goes into ``atoms.info``.
"""
from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, List, Optional

import numpy as np

from .. import keys
from ..errors import DataError, InputError


def read_dataset(path: str | os.PathLike, require_forces: bool = True) -> List:
    """All frames of an extxyz file, checked to carry energy (and forces)."""
    import ase.io

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"data: file {path!r} does not exist")
    try:
        frames = ase.io.read(path, index=":", format="extxyz")
    except Exception as exc:
        raise DataError(f"data: cannot read {path!r} as extxyz ({type(exc).__name__}: {exc})") from None
    if not frames:
        raise DataError(f"data: {path!r} holds no frames")
    for index, atoms in enumerate(frames):
        results = atoms.calc.results if atoms.calc is not None else {}
        if keys.DATA_ENERGY not in results:
            raise DataError(f"data: frame {index} of {path!r} has no energy label "
                            "(extxyz comment line needs energy=...); label it with `mlmd label`")
        if require_forces and keys.DATA_FORCES not in results:
            raise DataError(f"data: frame {index} of {path!r} has no forces "
                            "(extxyz needs a forces:R:3 column); training needs forces; "
                            "label it with `mlmd label`")
        forces = results.get(keys.DATA_FORCES)
        if forces is not None and np.shape(forces) != (len(atoms), 3):
            raise DataError(f"data: frame {index} of {path!r}: forces have shape {np.shape(forces)}, "
                            f"expected [{len(atoms)}, 3]")
        if not np.isfinite(atoms.positions).all() or not np.isfinite(results[keys.DATA_ENERGY]):
            raise DataError(f"data: frame {index} of {path!r} has NaN/Inf positions or energy")
    return frames


def fingerprint(frames: Iterable) -> str:
    """sha256 over numbers, positions, cell, pbc and labels of the frames (order matters)."""
    digest = hashlib.sha256()
    for atoms in frames:
        digest.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).round(10).tobytes())
        digest.update(np.ascontiguousarray(np.asarray(atoms.cell), dtype=np.float64).round(10).tobytes())
        digest.update(np.ascontiguousarray(atoms.pbc).tobytes())
        results = atoms.calc.results
        digest.update(np.float64(results[keys.DATA_ENERGY]).round(10).tobytes())
        if keys.DATA_FORCES in results:
            digest.update(np.asarray(results[keys.DATA_FORCES], dtype=np.float64).round(10).tobytes())
    return digest.hexdigest()


def append_frames(path: str | os.PathLike, frames: Iterable) -> None:
    """Append labelled frames as one write + fsync, so a crash never leaves half a frame."""
    import ase.io

    buffer = io.StringIO()
    for atoms in frames:
        ase.io.write(buffer, atoms, format="extxyz")
    with open(path, "a") as handle:
        handle.write(buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def label_frame(atoms, calculator, info: Optional[dict] = None):
    """A copy of ``atoms`` with the calculator's energy and forces frozen in as labels, and its
    stress (Voigt, eV/Å^3) too for a fully periodic frame when the calculator implements it."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    source = atoms if atoms.calc is calculator else frame   # reuse the MD step's cached results
    if source is frame:
        frame.calc = calculator
    # the oracle's own forces: an MD constraint (FixCom in sample_md) must not edit the labels
    labels = {"energy": float(source.get_potential_energy()),
              "forces": np.array(source.get_forces(apply_constraint=False))}
    frame.set_constraint()
    if frame.pbc.all() and "stress" in getattr(calculator, "implemented_properties", ()):
        labels["stress"] = np.array(source.get_stress(voigt=True))
    frame.calc = SinglePointCalculator(frame, **labels)
    frame.info.update(info or {})
    return frame


def sample_md(atoms, oracle, out: str | os.PathLike, frames: int, temperature: float = 300.0,
              timestep: float = 0.5, interval: int = 20, equilibration: int = 1000,
              friction: float = 0.01, seed: int = 0, relax: bool = True, progress: bool = True) -> str:
    """Sample ``frames`` geometries from Langevin MD driven by the oracle itself, labelled.

    atoms: ase.Atoms (start structure); oracle: name or ASE calculator; temperature K;
    timestep fs; interval: MD steps between saved frames; equilibration: steps before the
    first saved frame; friction 1/fs.  Frames are appended to ``out`` as they come, so an
    interrupted run keeps what it labelled.
    """
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.optimize import BFGS
    from tqdm.auto import tqdm

    from ..active.oracles import make_oracle, oracle_name

    if frames < 1:
        raise InputError(f"frames: need at least 1, got {frames}")
    if interval < 1:
        raise InputError(f"interval: need at least 1 MD step between frames, got {interval}")
    calc = make_oracle(oracle)
    name = oracle_name(oracle)
    atoms = atoms.copy()
    atoms.calc = calc
    if relax:
        BFGS(atoms, logfile=None).run(fmax=0.01, steps=500)
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    atoms.set_constraint(FixCom())       # ASE's advice over Langevin(fixcm=True), which is deprecated
    dyn = Langevin(atoms, timestep * units.fs, temperature_K=temperature, friction=friction / units.fs,
                   fixcm=False, rng=rng)
    out = os.fspath(out)
    if os.path.exists(out):
        raise InputError(f"out: {out!r} already exists; choose a new file (labels are appended, "
                         "never overwritten)")
    dyn.run(equilibration)
    with tqdm(total=frames, desc=f"labelling with {name} at {temperature:g} K",
              disable=not progress, unit="frame") as bar:
        for index in range(frames):
            dyn.run(interval)
            step = equilibration + (index + 1) * interval
            frame = label_frame(atoms, calc, {keys.DATA_ORACLE: name,
                                              keys.DATA_TEMPERATURE: float(temperature),
                                              keys.DATA_STEP: int(step)})
            append_frames(out, [frame])
            bar.update(1)
    return out
