"""Structures in (anything ASE or mdtraj reads), trajectories out (mdtraj DCD/XTC, ASE extxyz)."""
from __future__ import annotations

import os

import numpy as np

from .. import units
from ..errors import InputError

TRAJECTORY_FORMATS = ("dcd", "xtc", "extxyz")


def read_structure(path):
    """Read one frame as ase.Atoms: ASE first (xyz, extxyz, pdb, cif, POSCAR, ...), then mdtraj
    (gro, h5, mol2, ...); a PDB's CRYST1 record sets the cell and pbc."""
    import ase.io

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"structure: file {path!r} does not exist")
    try:
        return ase.io.read(path, index=-1)
    except Exception as ase_error:   # ASE raises many types for unknown formats
        try:
            import mdtraj
            traj = mdtraj.load_frame(path, -1)
        except Exception:
            raise InputError(f"structure: neither ASE nor mdtraj can read {path!r} ({ase_error}); "
                             "give a PDB, xyz/extxyz or another format they know") from None
        from ase import Atoms
        numbers = [atom.element.atomic_number for atom in traj.topology.atoms]
        atoms = Atoms(numbers=numbers, positions=traj.xyz[0] * units.NM_TO_ANGSTROM)
        if traj.unitcell_vectors is not None:
            atoms.set_cell(traj.unitcell_vectors[0] * units.NM_TO_ANGSTROM)
            atoms.set_pbc(True)
        return atoms


def mdtraj_topology(atoms):
    """A one-chain, one-residue mdtraj Topology with the elements of ``atoms`` (for DCD/XTC readers)."""
    import mdtraj
    from ase.data import chemical_symbols

    top = mdtraj.Topology()
    chain = top.add_chain()
    residue = top.add_residue("MOL", chain)
    for index, z in enumerate(atoms.get_atomic_numbers()):
        symbol = chemical_symbols[int(z)]
        top.add_atom(f"{symbol}{index + 1}", mdtraj.element.get_by_symbol(symbol), residue)
    return top


def openmm_topology(atoms, bonds: bool = False):
    """A one-chain, one-residue ``openmm.app.Topology`` with the elements of ``atoms``, its
    box vectors (nm) when ``atoms`` is periodic along all three axes and, with ``bonds``, the
    :func:`covalent_bonds`."""
    from openmm import Vec3, app

    top = app.Topology()
    residue = top.addResidue("MOL", top.addChain())
    added = []
    for index, z in enumerate(atoms.get_atomic_numbers()):
        element = app.Element.getByAtomicNumber(int(z))
        added.append(top.addAtom(f"{element.symbol}{index + 1}", element, residue))
    if bonds:
        for i, j in covalent_bonds(atoms):
            top.addBond(added[i], added[j])
    if np.all(atoms.get_pbc()):
        cell = np.asarray(atoms.get_cell()) * units.ANGSTROM_TO_NM
        top.setPeriodicBoxVectors([Vec3(*row) for row in cell])
    return top


# what each trajectory format needs beyond mlmd's core: (module, package, extra)
FORMAT_NEEDS = {"dcd": [("openmm", "openmm", "openmm")],
                "xtc": [("mdtraj", "mdtraj", "traj"), ("openmm", "openmm", "openmm")],
                "extxyz": []}


def check_trajectory_format(fmt: str) -> None:
    """Raise ImportError with the install hint when ``fmt``'s optional packages are missing
    (DCD: OpenMM's DCDFile and PDBFile for topology.pdb; XTC: mdtraj too)."""
    import importlib

    for module, package, extra in FORMAT_NEEDS[fmt]:
        try:
            importlib.import_module(module)
        except ImportError:
            from ..errors import missing_dependency
            raise missing_dependency(package, extra, f"trajectory: the {fmt.upper()} format") from None


def covalent_bonds(atoms) -> np.ndarray:
    """[B, 2] atom index pairs closer than 1.2 x the sum of their covalent radii (ASE's natural
    cutoffs; at 1.0 a C-H bond of 1.09 Å against 1.07 Å is missed), images included, metal-metal
    pairs left out: the bonds a viewer should draw."""
    from ase.neighborlist import natural_cutoffs, neighbor_list

    if len(atoms) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.2))
    numbers = atoms.get_atomic_numbers()
    keep = (i < j) & ~(np.isin(numbers[i], _METALS) & np.isin(numbers[j], _METALS))
    return np.unique(np.stack([i[keep], j[keep]], axis=1), axis=0)


_NONMETALS = (1, 2, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17, 18, 33, 34, 35, 36, 52, 53, 54, 85, 86)
_METALS = np.setdiff1d(np.arange(1, 119), _NONMETALS)


def write_topology_pdb(path, atoms) -> str:
    """``topology.pdb`` for a DCD/XTC trajectory: elements, the cell, and CONECT records for the
    covalent bonds (mdtraj and VMD read them), written by OpenMM's PDBFile."""
    from openmm.app import PDBFile

    topology = openmm_topology(atoms, bonds=True)
    with open(path, "w") as handle:
        PDBFile.writeFile(topology, atoms.get_positions(), handle)   # plain numbers: Å
    return os.fspath(path)


class TrajectoryWriter:
    """Append frames to a DCD (OpenMM's DCDFile), XTC (mdtraj) or extxyz (ASE) file.

    Every frame is flushed to the operating system as it is written, so a crash loses no
    frame already reported.  ``frames`` counts what is in the file; ``truncate(n)`` keeps the
    first n frames and continues after them, so that a restart from a checkpoint continues
    the file exactly where the checkpoint was written.
    """

    def __init__(self, path, atoms, fmt=None, timestep_fs: float = 1.0, interval: int = 1):
        self.path = os.fspath(path)
        fmt = (fmt or os.path.splitext(self.path)[1].lstrip(".")).lower()
        if fmt == "xyz":
            fmt = "extxyz"
        if fmt not in TRAJECTORY_FORMATS:
            raise InputError(f"trajectory: format {fmt!r} not supported; use one of {TRAJECTORY_FORMATS}")
        check_trajectory_format(fmt)
        self.format = fmt
        self.atoms = atoms.copy()
        self.periodic = bool(np.all(self.atoms.get_pbc()))
        self.timestep_fs = float(timestep_fs)
        self.interval = int(interval)
        self.frames = 0
        self._file = None      # the open binary file (DCD)
        self._writer = None    # openmm.app.DCDFile or mdtraj XTCTrajectoryFile

    def _open_dcd(self, append: bool) -> None:
        from openmm import app

        self._file = open(self.path, "r+b" if append else "wb")
        if append:
            self._file.seek(0, os.SEEK_END)
        self._writer = app.DCDFile(self._file, openmm_topology(self.atoms), self.timestep_fs * 1e-3,
                                   0, self.interval, append=append)

    def write(self, positions, cell, step: int, time_fs: float, info=None) -> None:
        """positions [N,3] Å, cell [3,3] Å."""
        if self.format == "extxyz":
            import ase.io
            atoms = self.atoms
            atoms.set_positions(positions)
            atoms.set_cell(cell)
            atoms.info = {"step": int(step), "time_fs": float(time_fs), **(info or {})}
            with open(self.path, "a") as handle:
                ase.io.write(handle, atoms, format="extxyz")
            self.frames += 1
            return
        positions_nm = np.asarray(positions) * units.ANGSTROM_TO_NM
        box_nm = np.asarray(cell) * units.ANGSTROM_TO_NM if self.periodic else None
        if self.format == "dcd":
            from openmm import Vec3
            if self._writer is None:
                self._open_dcd(append=self.frames > 0)
            self._writer.writeModel(positions_nm, periodicBoxVectors=None if box_nm is None else
                                    [Vec3(*row) for row in box_nm])
            self._file.flush()
        else:
            if self._writer is None:
                from mdtraj.formats import XTCTrajectoryFile
                self._writer = XTCTrajectoryFile(self.path, "w")
            self._writer.write(positions_nm[None].astype(np.float32), time=[time_fs * 1e-3],
                               step=[int(step)], box=None if box_nm is None else box_nm[None])
            self._writer.flush()
        self.frames += 1

    def truncate(self, frames: int) -> None:
        """Keep only the first ``frames`` frames and write after them (for a restart)."""
        self.close()
        if not os.path.exists(self.path):
            if frames:
                raise InputError(f"trajectory: {self.path!r} is missing but the checkpoint counts "
                                 f"{frames} frames in it; restore the file or start a new run")
            self.frames = 0
            return
        if self.format == "extxyz":
            import ase.io
            kept = ase.io.read(self.path, index=f":{frames}") if frames else []
            tmp = self.path + ".tmp"
            ase.io.write(tmp, kept, format="extxyz")
            os.replace(tmp, self.path)
        elif self.format == "dcd":
            _truncate_dcd(self.path, frames)
        else:
            from mdtraj.formats import XTCTrajectoryFile
            with XTCTrajectoryFile(self.path, "r") as handle:
                xyz, time_ps, step, box = handle.read(n_frames=frames) if frames else (None,) * 4
            # XTC frames are compressed (variable length): rewrite the kept ones, keep writing after
            self._writer = XTCTrajectoryFile(self.path, "w")
            if frames:
                self._writer.write(xyz, time=time_ps, step=step, box=box if self.periodic else None)
                self._writer.flush()
        self.frames = frames

    def close(self) -> None:
        if self._writer is not None and self.format == "xtc":
            self._writer.close()
        if self._file is not None:
            self._file.close()
        self._writer = self._file = None


def _truncate_dcd(path: str, frames: int) -> None:
    """Cut a DCD file to its first ``frames`` frames (fixed-size records after the header)."""
    import struct

    with open(path, "r+b") as handle:
        header = handle.read(100)
        count = struct.unpack("<i", header[8:12])[0]
        title_bytes = struct.unpack("<i", header[92:96])[0]
        header_end = 112 + title_bytes          # 84-byte block, title block, atom-count block
        size = os.path.getsize(path)
        if frames > count or count == 0:
            raise InputError(f"trajectory: {path!r} holds {count} frames but the checkpoint counts "
                             f"{frames}; the file was changed after the checkpoint")
        frame_bytes = (size - header_end) // count
        handle.truncate(header_end + frames * frame_bytes)
        first, interval = struct.unpack("<ii", header[12:20])
        handle.seek(8)
        handle.write(struct.pack("<i", frames))
        handle.seek(20)
        handle.write(struct.pack("<i", first + max(frames - 1, 0) * interval))


def _cell_parameters(cell) -> np.ndarray:
    from ase.geometry import cell_to_cellpar
    return np.asarray(cell_to_cellpar(np.asarray(cell)), dtype=np.float32)
