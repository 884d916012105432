"""mlmd: machine-learned equivariant potentials as force providers in OpenMM, ASE and a Numba engine."""
__version__ = "0.1.0"

from .errors import DataError, InputError, MLMDError, ModelFileError  # noqa: E402

__all__ = ["__version__", "load", "load_module", "export", "Potential", "Simulation",
           "MLMDError", "InputError", "ModelFileError", "DataError"]


def __getattr__(name):
    # torch (2 s) and numba load on first use: `mlmd --help` and `import mlmd.errors` stay light
    if name in ("Potential", "export", "load", "load_module"):
        from . import potential
        return getattr(potential, name)
    if name == "Simulation":
        from .md.simulation import Simulation
        return Simulation
    raise AttributeError(f"module 'mlmd' has no attribute {name!r}")
