"""Reference methods ("oracles") that label frames with energy and forces.

Every oracle is an ASE calculator; nothing is downloaded at run time.

- ``gfn2-xtb``: GFN2-xTB through tblite (molecules)
- ``emt``: ASE's effective-medium theory (Cu, Ag, Au, Ni, Pd, Pt, Al)
- any ``ase.calculators.calculator.Calculator`` instance passed by the user
"""
from __future__ import annotations

from typing import Union

from ..errors import InputError, missing_dependency

ORACLES = ("gfn2-xtb", "gfn1-xtb", "emt")


def make_oracle(oracle: Union[str, object]):
    """An ASE calculator for ``oracle`` (a name from :data:`ORACLES` or a calculator)."""
    if not isinstance(oracle, str):
        if not hasattr(oracle, "get_potential_energy") and not hasattr(oracle, "calculate"):
            raise InputError(f"oracle: expected a name in {ORACLES} or an ASE calculator, "
                             f"got {type(oracle).__name__}")
        return oracle
    name = oracle.lower()
    if name in ("gfn2-xtb", "gfn1-xtb"):
        try:
            from tblite.ase import TBLite
        except ImportError:
            raise missing_dependency("tblite", "xtb", f"the {oracle} oracle") from None
        method = "GFN2-xTB" if name == "gfn2-xtb" else "GFN1-xTB"
        return TBLite(method=method, verbosity=0)
    if name == "emt":
        from ase.calculators.emt import EMT
        return EMT()
    raise InputError(f"oracle: unknown name {oracle!r}; choose one of {ORACLES} or pass an ASE calculator")
