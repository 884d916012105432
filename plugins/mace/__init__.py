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

The file also keeps each member's MACE construction arguments as JSON (``mace_configs`` in its
hyperparameters: irreps as strings, classes and activations by name, arrays as lists). With
mace-torch installed, :func:`eager_committee` rebuilds the members as plain modules from them
and the file's weights, which is what ``mlmd.load(path, compiled=True)`` compiles.
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

    def __init__(self, members: Sequence[nn.Module], script_members: bool = True):
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
        # e3nn's compile scripts the code-generated tensor products the way MACE's own export does;
        # the compiled form (mlmd.compiled) keeps them eager for torch.compile instead
        self.members = nn.ModuleList([jit.compile(m.eval()) if script_members else m.eval() for m in members])

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


# The construction arguments of a MACE model as JSON, and back.  Decoding resolves names only inside
# these modules (a config is data: it cannot make mlmd import or call anything else).
_CONFIG_MODULES = ("mace.modules", "torch.nn.functional", "torch")
_MODEL_CLASSES = ("MACE", "ScaleShiftMACE")


def _name_of(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def config_to_json(model: nn.Module) -> Dict | None:
    """The arguments that rebuild ``model`` (an eager MACE or ScaleShiftMACE), JSON-safe; None for
    other classes (their files run as TorchScript only)."""
    import numpy as np
    from e3nn import o3
    from mace.tools.scripts_utils import extract_config_mace_model

    if type(model).__name__ != "ScaleShiftMACE":
        return None
    config = extract_config_mace_model(model)
    if "error" in config:
        return None

    def encode(value):
        if isinstance(value, o3.Irreps):
            return {"irreps": str(value)}
        if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
            return {"name": _name_of(value)}
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            return {"array": value.tolist(), "dtype": str(value.dtype)}
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        if isinstance(value, dict):
            return {"dict": {str(k): encode(v) for k, v in value.items()}}
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"a MACE config value of type {type(value).__name__} has no JSON form")

    return {"model_class": type(model).__name__, "arguments": {k: encode(v) for k, v in config.items()}}


def config_from_json(data: Dict) -> tuple:
    """(model class, keyword arguments) from :func:`config_to_json`'s output."""
    import importlib

    import numpy as np
    from e3nn import o3
    from mace import modules

    if data.get("model_class") not in _MODEL_CLASSES:
        raise ValueError(f"mace_configs: model class {data.get('model_class')!r} is not one of {_MODEL_CLASSES}")

    def resolve(name: str):
        module_name, _, qualname = name.partition(":")
        if not any(module_name == m or module_name.startswith(m + ".") for m in _CONFIG_MODULES):
            raise ValueError(f"mace_configs: {name!r} is outside {_CONFIG_MODULES}; refused")
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj

    def decode(value):
        if isinstance(value, dict):
            if "irreps" in value:
                return o3.Irreps(value["irreps"])
            if "name" in value:
                return resolve(value["name"])
            if "array" in value:
                return np.asarray(value["array"], dtype=value["dtype"])
            if "dict" in value:
                return {k: decode(v) for k, v in value["dict"].items()}
            raise ValueError(f"mace_configs: unknown encoded value {sorted(value)}")
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    arguments = {k: decode(v) for k, v in data["arguments"].items()}
    arguments["atomic_numbers"] = [int(z) for z in np.asarray(arguments["atomic_numbers"]).reshape(-1)]
    return getattr(modules, data["model_class"]), arguments


def eager_committee(scripted_committee, meta: Dict) -> MaceCommittee:
    """The file's MACE committee with plain (eager, torch.compile-able) members: each rebuilt from
    its ``mace_configs`` entry without e3nn's code generation (as ``mace.tools.compile.prepare``
    does), then given the file's weights. Raises ``ValueError`` when the file has no configs (an
    import by an mlmd before 0.1.1: import it again) and ``ImportError`` without mace-torch."""
    from ... import keys

    _import_mace()
    from mace.tools.compile import disable_e3nn_codegen, simplify

    configs = (meta.get(keys.META_HYPER) or {}).get("mace_configs")
    if not configs:
        raise ValueError("the file holds no MACE construction arguments (mace_configs): it was imported before "
                         "import_mace kept them; import the .model files again to get a compiled form")
    if len(configs) != int(scripted_committee.committee_size):
        raise ValueError(f"mace_configs: {len(configs)} entries for {int(scripted_committee.committee_size)} members")
    members = []
    for index, config in enumerate(configs):
        scripted = getattr(scripted_committee.members, str(index))     # a scripted ModuleList has no [i]
        model_class, arguments = config_from_json(config)
        with disable_e3nn_codegen():
            member = model_class(**arguments)
        member = simplify(member)
        state = scripted.state_dict()
        member = member.to(dtype=next(v.dtype for v in state.values() if v.is_floating_point()))
        wanted = member.state_dict()
        missing = [k for k in wanted if k not in state]
        # e3nn's code-generated tensor products also store their Wigner 3j blocks (_compiled_main_*);
        # simplify()'s fx trace drops the symmetric contractions' unused weights_*_zeroed flags (a
        # zeroed path also has an empty weight, which the shape check below would catch)
        extra = [k for k in state if k not in wanted and "._compiled_main" not in k
                 and not (k.endswith("_zeroed") and not bool(state[k]))]
        if missing or extra:
            raise ValueError(f"mace_configs[{index}] does not rebuild the file's member {index}: missing "
                             f"{missing[:3]}, unexpected {extra[:3]}")
        shapes = [k for k in wanted if tuple(wanted[k].shape) != tuple(state[k].shape)]
        if shapes:
            raise ValueError(f"mace_configs[{index}]: weight shapes differ from the file's at {shapes[:3]}")
        member.load_state_dict({k: state[k] for k in wanted}, strict=True)
        members.append(member)
    return MaceCommittee(members, script_members=False)


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
    configs = [config_to_json(m) for m in modules]     # before scripting touches the members
    committee = MaceCommittee(modules)
    first = modules[0]
    hyper = {"cutoff": committee.cutoff,
             "num_interactions": int(first.num_interactions),
             "hidden_irreps": str(first.products[0].linear.irreps_out),
             "class": type(first).__name__}
    if all(c is not None for c in configs):
        hyper["mace_configs"] = configs
    metadata = {keys.META_FAMILY: MODEL_FAMILY, keys.META_HYPER: hyper}
    if training:
        metadata[keys.META_TRAINING] = training
    if example is not None:
        import numpy as np
        metadata[keys.META_EXAMPLE] = {"numbers": example.numbers.tolist(), "positions": example.positions.tolist(),
                                       "cell": np.asarray(example.cell).tolist(), "pbc": example.pbc.tolist()}
    return export(committee, out, metadata, dtype=dtype)
