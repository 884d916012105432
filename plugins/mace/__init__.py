"""MACE models (mace-torch) in mlmd's Potential contract.

One or more trained MACE models (``mace_run_train``'s ``*.model`` files, or modules in memory)
become one mlmd model file: the members form a committee (σ = their force spread, as for
mlmd's own committees), the host's neighbour list (mlmd's cell list, OpenMM's TorchForce
module, ASE) supplies the pairs, and the file runs unchanged in the internal engine, ASE and
OpenMM.

>>> from mlmd.plugins.mace import import_mace
>>> import_mace(["cu_0.model", "cu_1.model"], "cu_mace.pt")        # or: mlmd import-mace ...
>>> import mlmd; mlmd.load("cu_mace.pt").compute_atoms(atoms)["uncertainty"]

How the pairs cross over: MACE builds edge vectors as ``x[receiver] - x[sender] + shift``
with messages flowing sender → receiver. mlmd's pair (centre i, neighbour j) has
``d_ij = x_j - x_i + shift`` and i receives, so MACE gets ``edge_index = (j, i)``, positions
all zero and ``shifts = -d_ij``: its vectors are then exactly the ones it would build itself,
and mlmd's ``edge_forces`` turns dE/dd into forces and the virial, as for built-in models.

The written file is plain TorchScript: loading and running it needs neither mace-torch nor
e3nn. Only importing does, and importing mace-torch sets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
for the whole process (its e3nn 0.4.4 cannot otherwise read its own constants under torch 2.9).
"""
from __future__ import annotations

import copy
import os
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from ...errors import InputError
from ...models.forces import edge_forces

MODEL_FAMILY = "mace"


def _import_mace():
    try:
        import mace  # noqa: F401
        from e3nn.util import jit
    except ImportError as error:     # pragma: no cover - mace-torch is in requirements.lock
        raise ImportError("the MACE plugin needs mace-torch: pip install mace-torch==0.3.16 "
                          "(it pins e3nn 0.4.4; torch stays at 2.9.1)") from error
    return jit


class MaceCommittee(nn.Module):
    """M MACE models behind mlmd's ``energy_and_forces`` (see :func:`mlmd.potential.export`).

    Every member must know the same elements (in the same order) and the same cutoff: the
    host builds one neighbour list for all of them.
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) == 0:
            raise ValueError("members: give at least one MACE model")
        species = [[int(z) for z in m.atomic_numbers] for m in members]
        cutoffs = [float(m.r_max) for m in members]
        if any(s != species[0] for s in species):
            raise ValueError(f"members: the models know different elements {species}; train them on one "
                             "data set (mace_run_train --E0s from the same file)")
        if any(abs(c - cutoffs[0]) > 1e-9 for c in cutoffs):
            raise ValueError(f"members: the models have different cutoffs (r_max {cutoffs}); use one r_max")
        jit = _import_mace()
        self.species: List[int] = species[0]
        self.cutoff = cutoffs[0]
        self.committee_size = len(members)
        # e3nn's compile scripts the code-generated tensor products the way MACE's own export does
        self.members = nn.ModuleList([jit.compile(m.eval()) for m in members])

    @torch.jit.export
    def energy_and_forces(self, edge_vectors: Tensor, species_index: Tensor, edge_index: Tensor,
                          compute_virial: bool, create_graph: bool) -> Dict[str, Tensor]:
        """edge_vectors [E,3] Å, species_index [N], edge_index [2,E] (centre, neighbour) ->
        atom_energy [M,N] eV, forces [M,N,3] eV/Å, virial [M,3,3] eV (if asked)."""
        n_atoms = species_index.shape[0]
        dtype = edge_vectors.dtype
        vectors = edge_vectors.detach().unsqueeze(0).repeat(self.committee_size, 1, 1).requires_grad_(True)
        node_attrs = torch.nn.functional.one_hot(species_index, len(self.species)).to(dtype)
        mace_edges = torch.stack([edge_index[1], edge_index[0]])
        batch = torch.zeros(n_atoms, dtype=torch.long, device=edge_vectors.device)
        ptr = torch.tensor([0, n_atoms], dtype=torch.long, device=edge_vectors.device)
        cell = torch.zeros((1, 3, 3), dtype=dtype, device=edge_vectors.device)
        positions = torch.zeros((n_atoms, 3), dtype=dtype, device=edge_vectors.device)
        unit_shifts = torch.zeros_like(edge_vectors)       # read by MACE only for its own stress
        shifts = -vectors                                   # [M,E,3]: MACE's x_receiver - x_sender
        energies: List[Tensor] = []
        for index, member in enumerate(self.members):
            data: Dict[str, Tensor] = {
                "positions": positions,
                "node_attrs": node_attrs,
                "edge_index": mace_edges,
                "shifts": shifts[index],
                "unit_shifts": unit_shifts,
                "cell": cell,
                "batch": batch,
                "ptr": ptr,
            }
            out = member(data, training=create_graph, compute_force=False)
            node_energy = out["node_energy"]
            assert node_energy is not None
            energies.append(node_energy.to(dtype))
        atom_energy = torch.stack(energies)                                          # [M,N]
        return edge_forces(atom_energy, vectors, edge_index, n_atoms, compute_virial, create_graph)


# What a torch.save of a MACE model refers to.  Anything else (os, subprocess, builtins.eval,
# another package) is refused before the file is unpickled.
_ALLOWED_MODULES = ("mace.", "e3nn.", "torch.", "torch", "collections", "numpy.", "numpy", "opt_einsum.",
                    "copyreg", "_codecs")
_ALLOWED_BUILTINS = ("set", "frozenset", "slice", "complex", "range", "bytearray")


def pickle_globals(path: str) -> list:
    """The (module, name) pairs the pickle inside the ``torch.save`` archive ``path`` would import,
    read from its opcodes without unpickling anything."""
    import pickletools
    import zipfile

    if not zipfile.is_zipfile(path):
        raise InputError(f"models: {path} is not a torch.save archive (zip), which mace_run_train writes; "
                         "refused without unpickling it")
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(names) != 1:
            raise InputError(f"models: {path} is a zip archive without one data.pkl, not a torch.save file; "
                             "refused without unpickling it")
        data = archive.read(names[0])
    found, strings, memo = [], [], {}
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name == "GLOBAL":
            module, _, attribute = str(arg).partition(" ")
            found.append((module, attribute))
        elif name == "STACK_GLOBAL":
            found.append((strings[-2], strings[-1]) if len(strings) >= 2 else ("?", "?"))
        elif "UNICODE" in name or name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
            strings.append(str(arg))
        elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT") and strings:
            memo[len(memo) if name == "MEMOIZE" else arg] = strings[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
            strings.append(memo[arg])
    return found


def check_mace_file(path: str) -> None:
    """Refuse, before unpickling, a file that is not a MACE model or that imports anything a MACE
    model does not.  This screens out other files and the obvious payloads; it does not make
    unpickling safe (MACE's e3nn/torch.fx parts carry Python code that runs on load): import only
    files you trust."""
    found = pickle_globals(path)
    outside = sorted({f"{m}.{n}" for m, n in found
                      if not (m.startswith(_ALLOWED_MODULES) or (m in ("builtins", "__builtin__")
                                                                 and n in _ALLOWED_BUILTINS))})
    if outside:
        raise InputError(f"models: {path} refers to {outside[:5]}, which no MACE model does; refused "
                         "without unpickling it (unpickling runs what a file refers to)")
    if not any(m.startswith("mace.modules") for m, _ in found):
        raise InputError(f"models: {path} holds no MACE model class (mace.modules.*), it is not a "
                         "mace_run_train .model file; refused without unpickling it")


def load_mace_model(path: str | os.PathLike) -> nn.Module:
    """A model written by ``mace_run_train`` (``torch.save`` of the module), on the CPU.

    MACE's format is a pickle, and unpickling runs code: :func:`check_mace_file` refuses files
    that are not MACE models first, but only import files you trust."""
    _import_mace()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"models: {path} does not exist (mace_run_train writes NAME.model "
                                "in its working directory)")
    check_mace_file(path)
    model = torch.load(path, map_location="cpu", weights_only=False)
    if not hasattr(model, "atomic_numbers") or not hasattr(model, "r_max"):
        raise ValueError(f"models: {path} is not a MACE energy model (no atomic_numbers / r_max)")
    return model


def import_mace(models: Sequence, out: str | os.PathLike, dtype: str = "float64",
                example=None, training: Dict | None = None) -> str:
    """Write the MACE ``models`` (paths or modules) as one mlmd model file at ``out``.

    ``dtype``: the file's precision ("float64" or "float32"). ``example``: an ASE Atoms
    stored in the file so that ``mlmd audit`` can check it without input. ``training``:
    free-form notes (data set, test metrics) kept in the metadata. Returns ``out``.
    """
    from ... import keys
    from ...potential import export

    if isinstance(models, (str, os.PathLike, nn.Module)):
        models = [models]
    # modules given in memory are copied: the caller's stay in their dtype and mode
    modules = [load_mace_model(m) if isinstance(m, (str, os.PathLike)) else copy.deepcopy(m) for m in models]
    modules = [m.to(torch.float64 if dtype == "float64" else torch.float32) for m in modules]
    committee = MaceCommittee(modules)
    first = modules[0]
    hyper = {"cutoff": committee.cutoff,
             "num_interactions": int(first.num_interactions),
             "hidden_irreps": str(first.products[0].linear.irreps_out),
             "class": type(first).__name__}
    metadata = {keys.META_FAMILY: MODEL_FAMILY, keys.META_HYPER: hyper}
    if training:
        metadata[keys.META_TRAINING] = training
    if example is not None:
        import numpy as np
        metadata[keys.META_EXAMPLE] = {"numbers": example.numbers.tolist(), "positions": example.positions.tolist(),
                                       "cell": np.asarray(example.cell).tolist(), "pbc": example.pbc.tolist()}
    return export(committee, out, metadata, dtype=dtype)
