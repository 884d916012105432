"""The compiled form of a model file: the eager model rebuilt from the file, its energy graph
compiled by ``torch.compile`` (TorchInductor: fused C++/OpenMP kernels on the CPU, Triton on a
GPU), behind :func:`mlmd.potential.load_module` (``compiled=True``).

Why: a TorchScript call of the built-in committee on ethanol (9 atoms, 72 pairs) runs ~2,000
small ops (forward and backward) of 5-15 µs each; the arithmetic is a few hundred µs. Inductor
fuses the elementwise chains and the backward into a handful of kernels.

What is compiled: for the built-in model, :meth:`PonitaPotential.energy_in_slots` (edge vectors ->
per-atom energies, no data-dependent shapes); for a MACE import, each member's forward, rebuilt
from the construction arguments the file keeps (``mlmd.plugins.mace.eager_committee``; needs
mace-torch). Both with ``dynamic=True``, so one graph serves every atom and pair count;
its backward (forces, virial) is compiled with it by AOTAutograd. The slot layout of the pairs
(an argsort and a max) and the committee statistics run eagerly around it. The module that
comes back has the TorchScript module's call signature and outputs, so every host (engine,
ASE, OpenMM PythonForce) runs it unchanged.

The compile runs once per process (~1.5 min on 2 CPU cores the first time on a machine, ~30 s
when Inductor's on-disk cache, ``TORCHINDUCTOR_CACHE_DIR`` or /tmp/torchinductor_$USER, already
holds it; 5-6 s for another model in the same process); :func:`compile_module` does it at load, on a small frame, and checks the compiled
numbers against the TorchScript module there (a MACE import: ~3 min cold, ~40 s cached).
Whenever it cannot (no C++ compiler, a model family without an eager builder such as Morse, a
MACE import without construction arguments or without mace-torch, a compiler error, numbers
that disagree), the TorchScript module is used and a warning says why.
"""
from __future__ import annotations

import shutil
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import keys

#: relative agreement asked of compiled vs TorchScript forces on the load-time check frame
#: (float32 kernels reassociate sums: ~1e-6 relative measured; float64 ~1e-13)
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


class CompileUnavailable(RuntimeError):
    """The compiled form cannot be built here; the message says why (the TorchScript form is used)."""


def _eager_ponita(scripted, meta: Dict[str, Any]) -> nn.Module:
    from .models.ponita import PonitaPotential

    core_scripted = scripted.model
    # the architecture from the scripted module itself (metadata may hold only some of it)
    hyperparameters = {"cutoff": float(core_scripted.cutoff), "channels": int(core_scripted.channels),
                       "layers": int(core_scripted.n_layers), "degree": int(core_scripted.degree),
                       "correlation": int(core_scripted.correlation),
                       "radial_basis": int(core_scripted.radial_basis),
                       "radial_width": int(core_scripted.radial_in.n_out),
                       "envelope_exponent": int(core_scripted.envelope_exponent)}
    core = PonitaPotential([int(z) for z in meta[keys.META_SPECIES]], int(meta[keys.META_COMMITTEE]),
                           hyperparameters=hyperparameters)
    # the scalars the file was trained with (set by training from its data statistics)
    core.energy_scale = float(core_scripted.energy_scale)
    core.inv_avg_neighbours = float(core_scripted.inv_avg_neighbours)
    return core


def _eager_mace(scripted, meta: Dict[str, Any]) -> nn.Module:
    try:
        from .plugins.mace import eager_committee
        return eager_committee(scripted.model, meta)
    except ImportError as exc:
        raise CompileUnavailable(f"the MACE members need mace-torch to be rebuilt ({exc})") from exc
    except ValueError as exc:
        raise CompileUnavailable(str(exc)) from exc


#: model family (metadata) -> builder of the eager core from the scripted file
EAGER_BUILDERS = {"ponita": _eager_ponita, "mace": _eager_mace}


def eager_module(scripted, meta: Dict[str, Any]) -> nn.Module:
    """The model file's :class:`~mlmd.potential.PotentialModule` as a plain (eager) module with the
    same weights and settings, for the model families mlmd can rebuild (:data:`EAGER_BUILDERS`)."""
    from .potential import PotentialModule

    family = meta.get(keys.META_FAMILY)
    if family not in EAGER_BUILDERS:
        raise CompileUnavailable(f"model family {family!r} has no eager builder in mlmd (only "
                                 f"{sorted(EAGER_BUILDERS)} files are rebuilt and compiled; the file keeps "
                                 "running as TorchScript)")
    core = EAGER_BUILDERS[family](scripted, meta)
    module = PotentialModule(core, [int(z) for z in meta[keys.META_SPECIES]], float(scripted.calibration_factor),
                             bool(scripted.supports_stress))
    state = scripted.state_dict()
    module = module.to(device=state["dtype_probe"].device, dtype=state["dtype_probe"].dtype)
    if family == "mace":
        # the members already hold their weights (eager_committee checked every name and shape);
        # the scripted members also carry e3nn's generated-code constants, which eager ones lack
        own = {k: v for k, v in state.items() if not k.startswith("model.")}
        missing = [k for k in module.state_dict() if not k.startswith("model.") and k not in own]
        if missing:
            raise CompileUnavailable(f"the file lacks {missing}")
        module.load_state_dict({**module.state_dict(), **own}, strict=True)
    else:
        module.load_state_dict(state, strict=True)
    module.calibration_factor = float(scripted.calibration_factor)
    # a compiled backward computes the gradient of every input that requires one: weights that
    # did added a weight-gradient matmul per layer to every force call, and one of the tensors
    # saved for them came out of Inductor with the first call's atom count in its stride (an
    # assert_size_stride crash at the next size, measured)
    module.requires_grad_(False)
    return module.eval()


def compiler_problem() -> Optional[str]:
    """Why torch.compile cannot build CPU kernels here (None when it can)."""
    try:
        from torch._inductor import cpp_builder
        compiler = cpp_builder.get_cpp_compiler()
    except Exception as exc:   # torch raises RuntimeError with its own wording when none is found
        return f"no C++ compiler for TorchInductor ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})"
    if shutil.which(compiler) is None:
        return f"no C++ compiler for TorchInductor ({compiler!r} not on PATH; install g++ or set CXX)"
    return None


def _configure_dynamo() -> None:
    import torch.fx.experimental._config as fx_config

    # duck shaping gives dims of equal size one symbol, so a 32-atom check frame would tie the
    # atom count to a 32-channel model's width; every atom and pair count stays its own symbol
    fx_config.use_duck_shape = False
    import torch._dynamo.config as dynamo_config

    # every model (and each dtype of it) is one more compiled entry of the same code, energy_in_slots:
    # past Dynamo's default 8 a ninth model failed to compile (a learning loop swaps in a new model
    # per retraining), so allow many
    dynamo_config.recompile_limit = max(int(dynamo_config.recompile_limit), 256)
    dynamo_config.accumulated_recompile_limit = max(int(dynamo_config.accumulated_recompile_limit), 4096)


def _compile_mace(module: nn.Module) -> None:
    """Each MACE member's forward compiled whole (dynamic shapes); the host's pairs go in as MACE's
    shifts, and forces come from the compiled backward through them (plugins/mace)."""
    _configure_dynamo()
    committee = module.model
    committee.members = nn.ModuleList([torch.compile(member, dynamic=True, fullgraph=True)
                                       for member in committee.members])


def _compile_core(module: nn.Module) -> None:
    """Route the eager core's forward through a compiled :meth:`energy_in_slots`."""
    from .plugins.mace import MaceCommittee

    if isinstance(module.model, MaceCommittee):
        _compile_mace(module)
        return
    _configure_dynamo()
    core = module.model
    for layer in core.layers:
        layer.contract_by_sum = True
    # Dynamo's guards on the module stay on: every model shares the code of energy_in_slots, and
    # dropping them (skip_guard_on_all_nn_modules_unsafe, ~0.05 ms a call) let a second model in
    # the same process run the first one's graph (caught by the check below, measured)
    compiled_energy = torch.compile(core.energy_in_slots, dynamic=True, fullgraph=True)

    # MD hosts pass the same pairs for many steps (a Verlet list is rebuilt every ~75 steps in the
    # main job): the slot layout (argsort, bincount, scatter: 0.25 ms of a 7 ms ethanol call) is
    # kept for pairs equal to the last ones; one tuple, replaced whole, so threads never mix them
    last: List[Any] = [None]

    def forward(edge_vectors, species_index, edge_index):
        n_atoms = species_index.shape[0]
        entry = last[0]
        if (entry is not None and entry[0] == n_atoms and entry[1].shape == edge_index.shape
                and entry[1].device == edge_index.device and torch.equal(entry[1], edge_index)):
            slot, neighbour = entry[2], entry[3]
        else:
            slot, neighbour, slots = core.neighbour_slots(edge_index, n_atoms)
            neighbour = neighbour.reshape(-1, slots)
            last[0] = (n_atoms, edge_index.clone(), slot, neighbour)
        return compiled_energy(edge_vectors, species_index, slot, neighbour)

    core.forward = forward


def check_frames(meta: Dict[str, Any]) -> List[Dict[str, np.ndarray]]:
    """Two frames of different sizes to compile on and to compare the two forms: the file's
    example frame (or 7 atoms of its species on a jittered line 1.2 Å apart), then its first
    atoms, without periodic boundaries (at least 3, never the same count)."""
    example = meta.get(keys.META_EXAMPLE)
    if example and len(example.get("numbers", ())) >= 4:
        frame = {"positions": np.asarray(example["positions"], dtype=np.float64),
                 "numbers": np.asarray(example["numbers"], dtype=np.int64),
                 "cell": np.asarray(example["cell"], dtype=np.float64),
                 "pbc": np.asarray(example["pbc"], dtype=bool)}
    else:
        species = [int(z) for z in meta[keys.META_SPECIES]]
        n_atoms = 7
        positions = np.zeros((n_atoms, 3))
        positions[:, 0] = 1.2 * np.arange(n_atoms)
        positions += np.random.default_rng(0).normal(0.0, 0.1, positions.shape)
        frame = {"positions": positions, "numbers": np.array([species[i % len(species)] for i in range(n_atoms)]),
                 "cell": np.zeros((3, 3)), "pbc": np.zeros(3, bool)}
    n_part = max(3, len(frame["numbers"]) // 2 - 1)
    part = {"positions": frame["positions"][:n_part].copy(), "numbers": frame["numbers"][:n_part].copy(),
            "cell": np.zeros((3, 3)), "pbc": np.zeros(3, bool)}
    return [frame, part]


def _call(module, frame: Dict[str, np.ndarray], cutoff: float, device) -> Dict[str, torch.Tensor]:
    from .neighbors import neighbor_pairs

    edge_index, shifts = neighbor_pairs(frame["positions"], frame["cell"], frame["pbc"], cutoff)
    return module(torch.as_tensor(frame["positions"], device=device),
                  torch.as_tensor(frame["numbers"], device=device),
                  torch.as_tensor(frame["cell"], device=device),
                  torch.as_tensor(frame["pbc"], device=device),
                  torch.as_tensor(edge_index, device=device),
                  torch.as_tensor(shifts, device=device), True)


def compile_module(scripted, meta: Dict[str, Any]) -> Tuple[nn.Module, Dict[str, Any]]:
    """(compiled module, report) from a loaded TorchScript module and its metadata.

    Compiles on a small frame at once (so no MD step pays it) and compares energy and forces with
    ``scripted`` there. Raises :class:`CompileUnavailable` with the reason when it cannot.
    """
    dtype = scripted.dtype_probe.dtype
    device = scripted.dtype_probe.device
    if device.type == "cpu":
        problem = compiler_problem()
        if problem:
            raise CompileUnavailable(problem)
    module = eager_module(scripted, meta)
    _compile_core(module)
    cutoff = float(meta[keys.META_CUTOFF])
    force_error = energy_error = 0.0
    start = time.perf_counter()
    # the frame, then its first atoms: a graph that only works at the size it was traced at
    # (a wrongly specialised stride) fails here, at load, instead of in the middle of a run
    for frame in check_frames(meta):
        try:
            got = _call(module, frame, cutoff, device)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CompileUnavailable(f"torch.compile failed ({type(exc).__name__}: {first})") from exc
        want = _call(scripted, frame, cutoff, device)
        scale = float(want[keys.FORCES].abs().max()) + 1e-12
        force_error = max(force_error, float((got[keys.FORCES] - want[keys.FORCES]).abs().max()))
        energy_error = max(energy_error, abs(float(got[keys.ENERGY]) - float(want[keys.ENERGY])))
        tolerance = CHECK_TOLERANCE.get(dtype, 1e-4)
        if not force_error <= tolerance * scale or \
                not energy_error <= tolerance * max(1.0, abs(float(want[keys.ENERGY]))):
            raise CompileUnavailable(f"the compiled module disagrees with the TorchScript one on a check frame of "
                                     f"{len(frame['numbers'])} atoms (max |dF| {force_error:.2e} eV/Å, "
                                     f"|dE| {energy_error:.2e} eV)")
    seconds = time.perf_counter() - start
    return module, {"compile_seconds": seconds, "check_force_error": force_error, "check_energy_error": energy_error}


def compiled_or_scripted(scripted, meta: Dict[str, Any], path: str):
    """The compiled module, or ``scripted`` with a warning that says why not."""
    try:
        module, report = compile_module(scripted, meta)
    except CompileUnavailable as exc:
        warnings.warn(f"model file {path!r}: running the TorchScript form, not a compiled one: {exc}",
                      RuntimeWarning, stacklevel=3)
        return scripted, None
    module.compile_report = report
    return module, report

