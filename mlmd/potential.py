"""The Potential contract: the exported TorchScript module, export, load and a Python wrapper.

A model file is a TorchScript archive (``torch.jit.save``) whose extra file
``mlmd.json`` holds the metadata (see :mod:`mlmd.keys`).  Its module is called as

    module(positions [N,3] Å, numbers [N] int64, cell [3,3] Å, pbc [3] bool,
           edge_index [2,E] int64, shifts [E,3] Å, compute_stress: bool) -> Dict[str, Tensor]

and returns the keys documented in :mod:`mlmd.keys`.  Loading goes through one function,
:func:`load_module`, so that another serialisation (torch.export / AOTInductor) can be
added there without touching the hosts.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from . import keys
from .errors import InputError, ModelFileError

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class PotentialModule(nn.Module):
    """What a model file holds: input checks, species mapping, committee statistics."""

    def __init__(self, model: nn.Module, species: List[int], calibration_factor: float = 1.0,
                 supports_stress: bool = True):
        super().__init__()
        self.model = model
        self.committee_size = int(model.committee_size)
        self.cutoff = float(model.cutoff)
        self.supports_stress = bool(supports_stress)
        self.species: List[int] = [int(z) for z in species]
        species_map = torch.full((119,), -1, dtype=torch.long)
        for index, z in enumerate(species):
            species_map[int(z)] = index
        self.register_buffer("species_map", species_map)
        self.calibration_factor = float(calibration_factor)
        # follows .to(dtype) like the model's weights, whatever the model family calls them
        self.register_buffer("dtype_probe", torch.zeros(()))

    def forward(self, positions: Tensor, numbers: Tensor, cell: Tensor, pbc: Tensor,
                edge_index: Tensor, shifts: Tensor, compute_stress: bool = False) -> Dict[str, Tensor]:
        n_atoms = positions.shape[0]
        if positions.dim() != 2 or positions.shape[1] != 3:
            raise ValueError("positions: expected shape [N, 3]")
        if numbers.dim() != 1 or numbers.shape[0] != n_atoms:
            raise ValueError("numbers: expected shape [N] matching positions")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError("edge_index: expected shape [2, E]")
        if shifts.dim() != 2 or shifts.shape[1] != 3 or shifts.shape[0] != edge_index.shape[1]:
            raise ValueError("shifts: expected shape [E, 3] matching edge_index")
        if not bool(torch.isfinite(positions).all()):
            raise ValueError("positions: contain NaN or Inf")
        if bool((numbers < 0).any()) or bool((numbers > 118).any()):
            raise ValueError("numbers: atomic numbers must be in 1..118")
        species_index = self.species_map[numbers]
        if bool((species_index < 0).any()):
            raise ValueError("numbers: an element is not among the model's species (see its metadata)")
        if compute_stress and not self.supports_stress:
            raise ValueError("compute_stress: this model does not support stress")

        dtype = self.dtype_probe.dtype
        # differences in the callers' precision (float64 from every mlmd host), then the model's:
        # a float32 model far from the origin keeps its edge vectors exact
        vectors = (torch.index_select(positions, 0, edge_index[1])
                   - torch.index_select(positions, 0, edge_index[0]) + shifts).to(dtype)
        out = self.model.energy_and_forces(vectors, species_index, edge_index, compute_stress,
                                           self.training)
        atom_energy = out["atom_energy"]           # [M,N]
        member_forces = out["forces"]              # [M,N,3]
        member_energy = atom_energy.sum(dim=1)     # [M]
        result: Dict[str, Tensor] = {
            "energy": member_energy.mean(),
            "forces": member_forces.mean(dim=0),
            "energies": atom_energy.mean(dim=0),
        }
        if compute_stress:
            virial = out["virial"].mean(dim=0)
            result["virial"] = virial
            volume = torch.abs(torch.det(cell.to(dtype)))
            if bool(volume > 0.0):
                result["stress"] = -virial / volume
        if self.committee_size > 1:
            mean_forces = result["forces"]
            forces_std = ((member_forces - mean_forces.unsqueeze(0)).pow(2).sum(dim=-1).mean(dim=0)).sqrt()
            result["member_energies"] = member_energy
            result["member_forces"] = member_forces
            result["energy_std"] = ((member_energy - member_energy.mean()).pow(2).mean()).sqrt()
            result["forces_std"] = forces_std
            if n_atoms > 0:
                result["uncertainty"] = forces_std.max() * self.calibration_factor
            else:
                result["uncertainty"] = torch.zeros((), dtype=dtype)
        if not self.training:
            # callers only read numbers: let the autograd graph go now, inside the call
            for key in list(result.keys()):
                result[key] = result[key].detach()
        return result


def export(model: nn.Module, path: str | os.PathLike, metadata: Dict[str, Any],
           dtype: str = "float64", calibration_factor: float = 1.0) -> str:
    """Script ``model`` and save it with metadata.

    ``model`` is any module with ``species``, ``cutoff``, ``committee_size`` and
    ``energy_and_forces(edge_vectors, species_index, edge_index, compute_virial, create_graph)``
    (see :class:`~mlmd.models.ponita.PonitaPotential` and :class:`~mlmd.models.pair.MorsePotential`).
    """
    if dtype not in _DTYPES:
        raise InputError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    import copy

    model = copy.deepcopy(model).eval()
    supports_stress = _probe_virial(model)
    # eval: forces without a double-backward graph (train() turns it on for fine-tuning)
    module = PotentialModule(model, list(model.species), calibration_factor,
                             supports_stress).to(_DTYPES[dtype]).eval()
    scripted = torch.jit.script(module)
    meta = dict(metadata)
    meta.setdefault(keys.META_CONTRACT, keys.CONTRACT_VERSION)
    meta[keys.META_CUTOFF] = float(model.cutoff)
    meta[keys.META_SPECIES] = [int(z) for z in model.species]
    meta[keys.META_COMMITTEE] = int(model.committee_size)
    meta[keys.META_DTYPE] = dtype
    meta[keys.META_CALIBRATION] = float(calibration_factor)
    meta[keys.META_STRESS] = supports_stress
    from . import __version__
    meta.setdefault(keys.META_MLMD_VERSION, __version__)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.jit.save(scripted, tmp, _extra_files={keys.METADATA_FILE: json.dumps(meta, indent=1)})
    os.replace(tmp, path)   # a crash mid-write never leaves a truncated model file
    return path


def _probe_virial(model: nn.Module) -> bool:
    """Whether ``model.energy_and_forces`` returns a virial [M,3,3] when asked (what the file's
    ``supports_stress`` then says), tried on a dimer of its first species at half its cutoff."""
    committee = int(model.committee_size)
    first = next(model.parameters(), None)
    dtype = torch.float64 if first is None else first.dtype
    device = torch.device("cpu") if first is None else first.device
    half = 0.5 * float(model.cutoff)
    vectors = torch.tensor([[half, 0.0, 0.0], [-half, 0.0, 0.0]], dtype=dtype, device=device)
    edge_index = torch.tensor([[0, 1], [1, 0]], device=device)
    out = model.energy_and_forces(vectors, torch.zeros(2, dtype=torch.long, device=device), edge_index,
                                  True, False)
    virial = out.get("virial")
    return virial is not None and tuple(virial.shape) == (committee, 3, 3) and bool(torch.isfinite(virial).all())


def set_calibration(path: str | os.PathLike, factor: float) -> str:
    """Rewrite the σ calibration factor of the model file ``path`` in place (atomically), without
    scripting the model again."""
    if not (np.isfinite(factor) and factor > 0):
        raise InputError(f"factor: the calibration factor must be finite and > 0, got {factor}")
    path = os.fspath(path)
    module, meta = load_module(path)
    module.calibration_factor = float(factor)
    meta[keys.META_CALIBRATION] = float(factor)
    tmp = path + ".tmp"
    torch.jit.save(module, tmp, _extra_files={keys.METADATA_FILE: json.dumps(meta, indent=1)})
    os.replace(tmp, path)
    return path


def load_module(path: str | os.PathLike, device: str = "cpu", compiled: bool = False):
    """Load a model file: returns (module, metadata dict). The only loader.

    ``compiled``: return the compiled form (:mod:`mlmd.compiled`: the eager model rebuilt from
    the file, its energy graph compiled by torch.compile, checked against the TorchScript module
    at load); where that cannot be built, the TorchScript module with a warning that says why.
    """
    from .threads import keep_freed_memory

    keep_freed_memory()      # every host's model call allocates tens of MB per step (water: 220 -> 170 ms)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {path!r} does not exist")
    extra = {keys.METADATA_FILE: ""}
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device: {device!r} is not a torch device ({exc}); use 'cpu' or 'cuda'") from None
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {device!r} asked for, but torch sees no CUDA device on this machine "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use device='cpu'")
    try:
        module = torch.jit.load(path, map_location=device, _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError/ValueError with zip-reader jargon
        if zipfile.is_zipfile(path):
            # an archive torch could not load: its own message is the cause, keep it
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"model file {path!r}: torch could not load it on {device!r}: "
                                 f"{first_line}") from exc
        raise ModelFileError(
            f"model file {path!r} is not a TorchScript archive ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
            "model files are written by `mlmd export` or mlmd.potential.export") from exc
    raw = extra[keys.METADATA_FILE]
    if not raw:
        raise ModelFileError(
            f"model file {path!r} is a TorchScript archive without mlmd metadata "
            f"(no '{keys.METADATA_FILE}' extra file); export it with `mlmd export`")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"model file {path!r}: metadata is not valid JSON ({exc})") from None
    version = str(meta.get(keys.META_CONTRACT, ""))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        raise ModelFileError(f"model file {path!r}: metadata has no valid contract_version") from None
    ours = int(keys.CONTRACT_VERSION.split(".")[0])
    if major > ours:
        raise ModelFileError(
            f"model file {path!r} uses mlmd contract {version}, newer than this mlmd "
            f"({keys.CONTRACT_VERSION}); upgrade mlmd to read it")
    for key in (keys.META_CUTOFF, keys.META_SPECIES, keys.META_COMMITTEE, keys.META_DTYPE):
        if key not in meta:
            raise ModelFileError(f"model file {path!r}: metadata lacks {key!r}")
    _check_metadata_against_module(path, meta, module)
    # files saved in training mode would build a double-backward graph on every call
    module.eval()
    if compiled:
        from .compiled import compiled_or_scripted
        module, _ = compiled_or_scripted(module, meta, path)
    return module, meta


def _check_metadata_against_module(path: str, meta: Dict[str, Any], module) -> None:
    """The hosts build neighbour lists from the metadata's cutoff and check elements against its
    species: a file whose metadata disagrees with its module would give wrong energies silently."""
    def disagree(key, theirs, ours):
        raise ModelFileError(f"model file {path!r}: the metadata says {key} = {theirs!r} but the module was "
                             f"built with {ours!r}; the file was edited or assembled by hand, re-export it "
                             "with `mlmd export` (or mlmd.potential.export)")

    cutoff = getattr(module, "cutoff", None)
    if cutoff is not None and not abs(float(cutoff) - float(meta[keys.META_CUTOFF])) <= 1e-9 * max(1.0, float(cutoff)):
        disagree(keys.META_CUTOFF, meta[keys.META_CUTOFF], float(cutoff))
    species = getattr(module, "species", None)
    if species is not None and [int(z) for z in species] != [int(z) for z in meta[keys.META_SPECIES]]:
        disagree(keys.META_SPECIES, meta[keys.META_SPECIES], [int(z) for z in species])
    committee = getattr(module, "committee_size", None)
    if committee is not None and int(committee) != int(meta[keys.META_COMMITTEE]):
        disagree(keys.META_COMMITTEE, meta[keys.META_COMMITTEE], int(committee))
    probe = getattr(module, "dtype_probe", None)
    if probe is not None and str(probe.dtype).replace("torch.", "") != meta[keys.META_DTYPE]:
        disagree(keys.META_DTYPE, meta[keys.META_DTYPE], str(probe.dtype).replace("torch.", ""))


@dataclass
class Potential:
    """A loaded model file with input validation, for Python callers and the hosts.

    >>> pot = mlmd.load("systems/ethanol/ethanol_committee.pt")
    >>> out = pot.compute_atoms(atoms)          # numpy arrays, eV / Å
    """

    module: Any
    metadata: Dict[str, Any]
    path: str = ""
    device: str = "cpu"
    #: the dtype asked for with :meth:`with_dtype` (None: the file's); hosts keep it across swaps
    dtype_override: Optional[str] = None
    #: whether the compiled form was asked for (:mod:`mlmd.compiled`); copies and reloads keep it
    compiled: bool = False
    _species: set = field(default_factory=set, repr=False)

    def __post_init__(self):
        self._species = set(int(z) for z in self.metadata[keys.META_SPECIES])

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", compiled: bool = False) -> "Potential":
        module, meta = load_module(path, device, compiled=compiled)
        return cls(module=module, metadata=meta, path=os.fspath(path), device=device, compiled=compiled)

    @property
    def is_compiled(self) -> bool:
        """Whether the module in use is the compiled form (False when it was asked for but fell
        back to TorchScript)."""
        return not isinstance(self.module, torch.jit.ScriptModule)

    @property
    def cutoff(self) -> float:
        return float(self.metadata[keys.META_CUTOFF])

    @property
    def species(self) -> List[int]:
        return [int(z) for z in self.metadata[keys.META_SPECIES]]

    @property
    def committee_size(self) -> int:
        return int(self.metadata[keys.META_COMMITTEE])

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.metadata[keys.META_DTYPE]]

    def with_dtype(self, dtype: str) -> "Potential":
        """A copy of this potential whose module computes in ``dtype`` ("float32"/"float64")."""
        if dtype not in _DTYPES:
            raise InputError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        if self.path:
            module, meta = load_module(self.path, self.device)
        elif isinstance(self.module, torch.jit.ScriptModule):
            module, meta = self.module, dict(self.metadata)
        else:
            raise InputError("dtype: this compiled Potential has no file to reload in another dtype; "
                             "load it with mlmd.load(path, compiled=True)")
        module = module.to(_DTYPES[dtype])
        meta = dict(meta)
        meta[keys.META_DTYPE] = dtype
        if self.compiled:
            from .compiled import compiled_or_scripted
            module, _ = compiled_or_scripted(module, meta, self.path)
        return Potential(module=module, metadata=meta, path=self.path, device=self.device,
                         dtype_override=dtype, compiled=self.compiled)

    def check_numbers(self, numbers: np.ndarray) -> None:
        unknown = sorted(set(int(z) for z in np.unique(numbers)) - self._species)
        if unknown:
            from ase.data import chemical_symbols
            names = ", ".join(f"{chemical_symbols[z] if 0 < z < len(chemical_symbols) else '?'} (Z={z})"
                              for z in unknown)
            known = ", ".join(chemical_symbols[z] for z in self.species)
            raise InputError(f"numbers: element(s) {names} not in this model's species [{known}]; "
                             "use a model trained on them or remove those atoms")

    def compute(self, positions, numbers, cell=None, pbc=None, edge_index=None, shifts=None,
                stress: bool = False) -> Dict[str, np.ndarray]:
        """Evaluate one frame; arrays in Å, returns numpy arrays in eV, eV/Å, eV/Å^3.

        When ``edge_index``/``shifts`` are not given, pairs are built with
        :func:`mlmd.neighbors.neighbor_pairs` at the model's cutoff.
        """
        positions = _as_array("positions", positions, np.float64, (None, 3))
        n_atoms = len(positions)
        numbers = _as_array("numbers", numbers, np.int64, (n_atoms,))
        cell = np.zeros((3, 3)) if cell is None else _as_array("cell", cell, np.float64, (3, 3))
        pbc = np.zeros(3, bool) if pbc is None else _as_array("pbc", np.broadcast_to(pbc, (3,)), bool, (3,))
        if not np.isfinite(positions).all():
            bad = np.unique(np.nonzero(~np.isfinite(positions))[0])
            raise InputError(f"positions: NaN or Inf at atom(s) {bad[:10].tolist()}; "
                             "check the structure or the step that produced it")
        self.check_numbers(numbers)
        if pbc.any():
            from .neighbors.cell_list import effective_cell
            effective_cell(cell, pbc)   # the neighbour list's rule: raises on zero/dependent periodic vectors
        if edge_index is None:
            from .neighbors import neighbor_pairs
            edge_index, shifts = neighbor_pairs(positions, cell, pbc, self.cutoff)
        else:
            edge_index = _as_array("edge_index", edge_index, np.int64, (2, None))
            if shifts is None:
                shifts = np.zeros((edge_index.shape[1], 3))
            shifts = _as_array("shifts", shifts, np.float64, (edge_index.shape[1], 3))
            if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= n_atoms):
                raise InputError(f"edge_index: indices must be in 0..{n_atoms - 1}")
        if stress and not self.metadata.get(keys.META_STRESS, False):
            raise InputError("stress: this model file does not support stress; "
                             "ask only for energy and forces")
        if self.dtype != torch.float64:
            positions, shifts = local_frame(positions, cell, pbc, edge_index, shifts)
        dev = self.device
        # float64 in: the module takes the differences before casting to its own dtype
        out = self.module(torch.as_tensor(positions, dtype=torch.float64, device=dev),
                          torch.as_tensor(numbers, device=dev),
                          torch.as_tensor(cell, dtype=torch.float64, device=dev),
                          torch.tensor(np.array(pbc, dtype=bool), device=dev),
                          torch.as_tensor(edge_index, device=dev),
                          torch.as_tensor(shifts, dtype=torch.float64, device=dev),
                          bool(stress))
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def compute_atoms(self, atoms, stress: bool = False) -> Dict[str, np.ndarray]:
        """Evaluate an ``ase.Atoms``."""
        return self.compute(atoms.get_positions(), atoms.get_atomic_numbers(),
                            np.asarray(atoms.get_cell()), atoms.get_pbc(), stress=stress)

    def compute_batch(self, frames, stress: bool = False, progress: bool = False) -> List[Dict[str, np.ndarray]]:
        """Evaluate many frames (screening): one result dict per ``ase.Atoms``, in order.

        Every frame is checked before any is computed, so a bad frame k (an element the model
        lacks, NaN positions) raises an InputError naming ``frames[k]`` at once instead of after
        an hour of work. ``progress`` shows a bar.
        """
        frames = list(frames)
        for index, atoms in enumerate(frames):
            if not hasattr(atoms, "get_positions"):
                raise InputError(f"frames[{index}]: expected an ase.Atoms, got {type(atoms).__name__}")
            try:
                self.check_numbers(atoms.get_atomic_numbers())
                if not np.isfinite(atoms.get_positions()).all():
                    raise InputError("positions: NaN or Inf")
            except InputError as exc:
                raise InputError(f"frames[{index}]: {exc}") from None
        iterator = frames
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(frames, desc="mlmd compute_batch", unit="frame")
        return [self.compute_atoms(atoms, stress=stress) for atoms in iterator]


def local_frame(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, edge_index: np.ndarray,
                shifts: np.ndarray):
    """The same edge vectors from positions near the origin: (positions [N,3] Å, shifts [E,3] Å).

    Each atom is moved by whole lattice vectors into the cell along its periodic axes (its
    edges' shifts take up the difference, exactly), then everything by the mean position.
    Files written before the module took float64 differences cast positions to their dtype
    first: a float32 model 10⁴ Å from the origin (an unwrapped engine trajectory, a shifted
    input) would otherwise see edge vectors rounded to ~1e-3 Å.
    """
    positions = np.asarray(positions, dtype=np.float64)
    shifts = np.asarray(shifts, dtype=np.float64)
    if len(positions) == 0:
        return positions, shifts
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.any():
        from .neighbors.cell_list import effective_cell
        frac = positions @ np.linalg.inv(effective_cell(cell, pbc))
        images = np.where(pbc, np.floor(frac), 0.0)          # [N,3] whole cells, periodic axes only
        if images.any():
            positions = positions - images @ cell
            i, j = edge_index
            shifts = shifts + (images[j] - images[i]) @ cell
    return positions - positions.mean(axis=0), shifts


def as_potential(model, device: Optional[str] = None, dtype: Optional[str] = None,
                 compiled: bool = False) -> Potential:
    """A :class:`Potential` from a model file path or an existing one, on ``device`` and in ``dtype``.

    What every host accepts as ``model``; ``device=None`` keeps a Potential's own device
    ("cpu" for a path), ``dtype=None`` the file's. ``compiled`` applies to a path (a Potential
    keeps its own form: pass ``mlmd.load(path, compiled=True)`` to any host).
    """
    if isinstance(model, Potential):
        potential = model
        if device is not None and device != potential.device:
            if not potential.path:
                raise InputError(f"device: the Potential lives on {potential.device!r} and has no "
                                 f"file to reload on {device!r}; load it with mlmd.load(path, "
                                 f"device={device!r}) or leave device unset")
            potential = Potential.load(potential.path, device, compiled=potential.compiled)
    elif isinstance(model, (str, os.PathLike)):
        potential = Potential.load(model, device or "cpu", compiled=compiled)
    else:
        raise InputError(f"model: expected a model file path or an mlmd.Potential, got "
                         f"{type(model).__name__}")
    if dtype is not None and dtype != potential.metadata[keys.META_DTYPE]:
        potential = potential.with_dtype(dtype)
    return potential


def load(path: str | os.PathLike, device: str = "cpu", compiled: bool = False) -> Potential:
    """Load a model file (TorchScript archive with mlmd metadata) as a :class:`Potential`.

    ``compiled=True``: run the compiled form (:mod:`mlmd.compiled`; a one-off compile at load,
    1-3 min on a 2-core CPU, then 2-3x faster calls at small sizes), which every host accepts
    unchanged; falls back to TorchScript with a warning where it cannot be built."""
    return Potential.load(path, device, compiled=compiled)


def _as_array(name: str, value, dtype, shape) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name}: cannot convert to a {np.dtype(dtype).name} array ({exc})") from None
    if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape)):
        want = "[" + ", ".join("N" if (s is None and i == 0) else ("E" if s is None else str(s))
                               for i, s in enumerate(shape)) + "]"
        raise InputError(f"{name}: expected shape {want}, got {list(arr.shape)}")
    return arr
