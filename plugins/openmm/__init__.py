"""mlmd in OpenMM.

:func:`create_python_force` wraps a model file in an ``openmm.PythonForce`` (needs only
``openmm``; the model runs in this Python process, on the caller's neighbour list):

>>> import torch, openmm
>>> from mlmd.plugins.openmm import create_python_force
>>> system.addForce(create_python_force("model.pt", topology))            # whole system
>>> system.addForce(create_python_force("model.pt", topology, atoms=ligand))  # ML/MM region

:func:`create_torch_force` builds an openmm-torch ``TorchForce`` instead: the model runs inside
OpenMM's C++ loop, with its neighbour pairs built in TorchScript (same arguments).

``openmm``/``openmmtorch`` are imported only when a force is created, with an install hint if
missing.
"""
from .python_force import MLMDComputation, create_python_force
from .torch_force import TorchForceModule, create_torch_force

__all__ = ["create_python_force", "create_torch_force", "MLMDComputation", "TorchForceModule"]
