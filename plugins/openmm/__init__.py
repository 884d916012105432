"""mlmd in OpenMM.

:func:`create_python_force` wraps a model file in an ``openmm.PythonForce`` (needs only
``openmm``; the model runs in this Python process, on the caller's neighbour list):

>>> import torch, openmm
>>> from mlmd.plugins.openmm import create_python_force
>>> system.addForce(create_python_force("model.pt", topology))            # whole system
>>> system.addForce(create_python_force("model.pt", topology, atoms=ligand))  # ML/MM region

:func:`create_torch_force` builds an openmm-torch ``TorchForce`` instead: the model runs inside
OpenMM's C++ loop, with its neighbour pairs built in TorchScript (same arguments).

:func:`create_force` picks the path (TorchForce when openmm-torch loads, else PythonForce) and
:func:`create_system` builds a whole ML System from a Topology.

``openmm``/``openmmtorch`` are imported only when a force is created, with an install hint if
missing.
"""
from .python_force import FORCE_SETTINGS, MLMDComputation, create_python_force
from .reporter import UncertaintyReporter, swap_model
from .torch_force import TorchForceModule, create_torch_force, torch_force_available

__all__ = ["create_force", "create_system", "create_python_force", "create_torch_force", "MLMDComputation",
           "TorchForceModule", "torch_force_available", "UncertaintyReporter", "swap_model"]

PATHS = ("auto", "torch", "python")


def create_force(model, topology_or_numbers, atoms=None, periodic=None, path: str = "auto", **kwargs):
    """The mlmd force for an OpenMM System, on the path asked for.

    path "auto": openmm-torch's TorchForce when openmmtorch loads with this torch, else
    OpenMM's PythonForce (which works with any torch); "torch" or "python" to choose.  Both
    give the same energies and forces.  Other arguments as :func:`create_python_force`.
    """
    if path not in PATHS:
        from mlmd.errors import InputError
        raise InputError(f"path: expected one of {PATHS}, got {path!r}")
    if path == "torch" or (path == "auto" and torch_force_available()):
        return create_torch_force(model, topology_or_numbers, atoms=atoms, periodic=periodic, **kwargs)
    return create_python_force(model, topology_or_numbers, atoms=atoms, periodic=periodic, **kwargs)


def create_system(model, topology, path: str = "auto", remove_cm_motion: bool = True, **kwargs):
    """A System in which ``model`` computes every interaction of ``topology``.

    One particle per atom with its element's mass, the topology's periodic box (if any), the
    mlmd force from :func:`create_force` (``path`` and ``kwargs`` as there), and a
    ``CMMotionRemover`` unless ``remove_cm_motion`` is False.  The same System as openmm-ml's
    ``MLPotential("mlmd", modelPath=model).createSystem(topology)``, without needing openmm-ml.
    """
    from mlmd.errors import InputError
    from .python_force import _import_openmm

    openmm = _import_openmm()
    from openmm import app

    if not isinstance(topology, app.Topology):
        raise InputError(f"topology: expected an openmm.app.Topology, got {type(topology).__name__}; "
                         "for bare atomic numbers build the System yourself and use create_force")
    force = create_force(model, topology, path=path, **kwargs)    # checks elements against the model
    system = openmm.System()
    for atom in topology.atoms():
        system.addParticle(atom.element.mass)
    box = topology.getPeriodicBoxVectors()
    if box is not None:
        system.setDefaultPeriodicBoxVectors(*box)
    system.addForce(force)
    if remove_cm_motion:
        system.addForce(openmm.CMMotionRemover())
    return system
