"""One table of unit conversions, used only at host boundaries.

Inside mlmd: Å, eV, amu; the internal MD engine's time unit is fs.
OpenMM: nm, kJ/mol, ps, dalton (= amu).
"""
from ase import units as _ase_units

# length
NM_TO_ANGSTROM = 10.0
ANGSTROM_TO_NM = 0.1

# energy (CODATA values as used by ASE)
EV_TO_KJ_PER_MOL = _ase_units.eV / (_ase_units.kJ / _ase_units.mol)   # 96.485...
KJ_PER_MOL_TO_EV = 1.0 / EV_TO_KJ_PER_MOL
EV_TO_KCAL_PER_MOL = _ase_units.eV / (_ase_units.kcal / _ase_units.mol)
HARTREE_TO_EV = _ase_units.Hartree

# forces: eV/Å -> kJ/mol/nm
EV_PER_ANGSTROM_TO_KJ_PER_MOL_NM = EV_TO_KJ_PER_MOL * NM_TO_ANGSTROM
KJ_PER_MOL_NM_TO_EV_PER_ANGSTROM = 1.0 / EV_PER_ANGSTROM_TO_KJ_PER_MOL_NM

# stress: eV/Å^3 -> GPa
EV_PER_ANGSTROM3_TO_GPA = _ase_units.eV / _ase_units.Angstrom**3 / _ase_units.GPa

# temperature
BOLTZMANN_EV_PER_K = _ase_units.kB

# time: one fs in ASE's internal time unit (0.0982...); an ASE velocity times FS is in Å/fs
FS = _ase_units.fs

# velocity: Å/fs -> nm/ps
ANGSTROM_PER_FS_TO_NM_PER_PS = ANGSTROM_TO_NM * 1e3             # 100

# MD engine (Å, fs, eV, amu): a = F/m in Å/fs^2 from eV/Å and amu, and m v^2 in eV from amu (Å/fs)^2
FORCE_OVER_MASS_TO_ANGSTROM_PER_FS2 = FS ** 2                 # 9.6485e-3
AMU_ANGSTROM2_PER_FS2_TO_EV = 1.0 / FS ** 2                    # 103.64
