"""mlmd for openmm-ml: ``MLPotential('mlmd', modelPath='model.pt')``.

Registered through the ``openmmml.potentials`` entry point (pyproject.toml), so that, once
mlmd is installed, openmm-ml users write

    from openmmml import MLPotential
    potential = MLPotential("mlmd", modelPath="systems/ethanol/ethanol_committee.pt")
    system = potential.createSystem(topology)                           # all atoms ML
    mixed = potential.createMixedSystem(topology, mm_system, ml_atoms)   # ML/MM

Extra arguments of ``MLPotential``/``createSystem``: ``modelPath`` (required), ``path``
("auto": openmm-torch's TorchForce when it loads, else OpenMM's PythonForce; or "torch" /
"python"), ``device``, ``dtype``, ``threads`` (torch CPU threads, see mlmd.threads); any
other keyword is refused by name.
"""
from __future__ import annotations

from typing import Iterable, Optional

import openmm
import openmm.app
from openmmml.mlpotential import MLPotentialImpl, MLPotentialImplFactory

from mlmd.errors import InputError

__all__ = ["MLMDPotentialImplFactory", "MLMDPotentialImpl"]


class MLMDPotentialImplFactory(MLPotentialImplFactory):
    """Creates :class:`MLMDPotentialImpl` for the name "mlmd"."""

    def createImpl(self, name: str, modelPath: Optional[str] = None, **args) -> MLPotentialImpl:
        if modelPath is None:
            raise InputError("modelPath: MLPotential('mlmd') needs the model file, e.g. "
                             "MLPotential('mlmd', modelPath='systems/ethanol/ethanol_committee.pt')")
        _refuse_unknown("MLPotential('mlmd', ...)", args)
        return MLMDPotentialImpl(modelPath, **args)


_OPTIONS = ("path", "device", "dtype", "threads")


def _refuse_unknown(where: str, args: dict) -> None:
    unknown = sorted(set(args) - set(_OPTIONS))
    if unknown:
        raise InputError(f"{', '.join(unknown)}: not an option of {where}; mlmd takes "
                         f"{', '.join(_OPTIONS)} (and modelPath when the potential is made)")


class MLMDPotentialImpl(MLPotentialImpl):
    """Adds the mlmd force (TorchForce or PythonForce path) for the ML atoms."""

    def __init__(self, modelPath: str, path: str = "auto", device: Optional[str] = None,
                 dtype: Optional[str] = None, threads: Optional[int] = None):
        from mlmd.potential import as_potential
        from mlmd.threads import check_threads

        self.potential = as_potential(modelPath, device, dtype)
        self.path = path
        self.threads = check_threads(threads)

    def getMLLongRange(self) -> bool:
        """mlmd models are local: every interaction ends at the model's cutoff."""
        return False

    def addForces(self, topology: openmm.app.Topology, system: openmm.System,
                  atoms: Optional[Iterable[int]], forceGroup: int, path: Optional[str] = None,
                  device: Optional[str] = None, dtype: Optional[str] = None, threads: Optional[int] = None,
                  **args) -> None:
        """Called by createSystem/createMixedSystem; their ``path``, ``device`` and ``dtype``
        override the ones given to MLPotential, any other keyword is refused by name."""
        from mlmd.plugins.openmm import create_force
        from mlmd.potential import as_potential

        _refuse_unknown("createSystem/createMixedSystem", args)
        potential = as_potential(self.potential, device, dtype)
        force = create_force(potential, topology, atoms=None if atoms is None else list(atoms),
                             path=path or self.path, threads=threads or self.threads)
        force.setForceGroup(forceGroup)
        system.addForce(force)
