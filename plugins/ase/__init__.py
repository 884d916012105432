"""mlmd in ASE: :class:`MLMDCalculator`, an ASE calculator for mlmd model files.

>>> from mlmd.plugins.ase import MLMDCalculator
>>> atoms.calc = MLMDCalculator("systems/ethanol/ethanol_committee.pt")
>>> atoms.get_forces()                      # eV/Å
>>> atoms.calc.results["uncertainty"]       # eV/Å, committees only
"""
from .calculator import MLMDCalculator

__all__ = ["MLMDCalculator"]
