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
    the file exactly where the checkpoint was written.  A trajectory is never rewritten: a
    restart cuts the tail after the checkpoint's frames (a torn last frame included), checks
    what is left, and appends after it.
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
        self._file = None      # the open binary file (DCD, XTC after a restart)
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
        elif self.frames > 0 and self._writer is None:
            self._append_xtc(positions_nm, box_nm, step, time_fs)
        else:
            if self._writer is None:
                from mdtraj.formats import XTCTrajectoryFile
                self._writer = XTCTrajectoryFile(self.path, "w")
            self._writer.write(positions_nm[None].astype(np.float32), time=[time_fs * 1e-3],
                               step=[int(step)], box=None if box_nm is None else box_nm[None])
            self._writer.flush()
        self.frames += 1

    def _append_xtc(self, positions_nm, box_nm, step: int, time_fs: float) -> None:
        # mdtraj writes XTC only from the start of a file; XTC is a plain sequence of frames, so
        # a frame encoded into a scratch file is appended after the frames already there
        from mdtraj.formats import XTCTrajectoryFile

        scratch = os.path.join(os.path.dirname(os.path.abspath(self.path)),
                               "." + os.path.basename(self.path) + ".frame")
        with XTCTrajectoryFile(scratch, "w") as one:
            one.write(positions_nm[None].astype(np.float32), time=[time_fs * 1e-3], step=[int(step)],
                      box=None if box_nm is None else box_nm[None])
        with open(scratch, "rb") as handle:
            data = handle.read()
        os.remove(scratch)
        if self._file is None:
            self._file = open(self.path, "ab")
        self._file.write(data)
        self._file.flush()

    def truncate(self, frames: int) -> None:
        """Keep only the first ``frames`` frames and write after them (for a restart).

        Only the tail after those frames is cut (frames written after the checkpoint, a torn
        last frame); the kept bytes are never rewritten, and the file is checked after the cut.
        """
        self.close()
        if not os.path.exists(self.path):
            if frames:
                raise InputError(f"trajectory: {self.path!r} is missing but the checkpoint counts "
                                 f"{frames} frames in it; restore the file or start a new run")
            self.frames = 0
            return
        if self.format == "dcd":
            _truncate_dcd(self.path, frames, len(self.atoms), self.periodic)
        else:
            offsets, end = (_xtc_offsets if self.format == "xtc" else _extxyz_offsets)(self.path)
            _cut(self.path, offsets, end, frames)
            again, end = (_xtc_offsets if self.format == "xtc" else _extxyz_offsets)(self.path)
            if len(again) != frames or end != os.path.getsize(self.path):
                raise InputError(f"trajectory: {self.path!r} holds {len(again)} frames after cutting it "
                                 f"to the checkpoint's {frames}; the file is damaged, restore it")
        self.frames = frames

    def close(self) -> None:
        if self._writer is not None and self.format == "xtc":
            self._writer.close()
        if self._file is not None:
            self._file.close()
        self._writer = self._file = None


def _cut(path: str, offsets, end: int, frames: int) -> None:
    """Cut ``path`` after its first ``frames`` complete frames (``offsets``: where each complete
    frame starts, ``end``: where the last complete one ends)."""
    if frames > len(offsets):
        raise InputError(f"trajectory: {path!r} holds {len(offsets)} complete frames but the checkpoint "
                         f"counts {frames}; the file lost frames after the checkpoint was written "
                         "(restore it, or start a new run)")
    size = offsets[frames] if frames < len(offsets) else end
    with open(path, "r+b") as handle:
        handle.truncate(size)
        handle.flush()
        os.fsync(handle.fileno())


def _xtc_offsets(path: str):
    """(byte offset of every complete XTC frame, end of the last complete one).

    A frame: magic 1995, natoms, step, time, box [9], natoms (56 bytes, big-endian XDR), then
    3·natoms floats for natoms <= 9, else precision, minint [3], maxint [3], smallidx, a byte
    count n and n bytes padded to 4.
    """
    import struct

    offsets = []
    size = os.path.getsize(path)
    position = 0
    with open(path, "rb") as handle:
        while position + 56 <= size:
            handle.seek(position)
            head = handle.read(56)
            magic, natoms = struct.unpack(">ii", head[:8])
            if magic != 1995:
                raise InputError(f"trajectory: {path!r} is not an XTC file where frame {len(offsets)} should "
                                 f"start (byte {position}); restore the file or start a new run")
            if natoms <= 9:
                length = 56 + 12 * natoms
            else:
                rest = handle.read(36)
                if len(rest) < 36:
                    break
                count = struct.unpack(">i", rest[32:36])[0]
                length = 92 + (count + 3) // 4 * 4
            if position + length > size:
                break                                   # a torn last frame
            offsets.append(position)
            position += length
    return offsets, position


def _extxyz_offsets(path: str):
    """(byte offset of every complete extxyz frame, end of the last complete one): a frame is a
    line with the atom count, a comment line and that many atom lines, each ended by a newline."""
    offsets = []
    end = 0
    with open(path, "rb") as handle:
        while True:
            start = handle.tell()
            first = handle.readline()
            if not first.endswith(b"\n") or not first.strip().isdigit():
                break
            lines = [handle.readline() for _ in range(int(first) + 1)]
            if not lines or not all(line.endswith(b"\n") for line in lines):
                break
            offsets.append(start)
            end = handle.tell()
    return offsets, end


def _truncate_dcd(path: str, frames: int, n_atoms: int, periodic: bool) -> None:
    """Cut a DCD file to its first ``frames`` frames and set its header to match.

    A frame is fixed-size: a 56-byte unit-cell record when the header says so, then x, y, z,
    each 4·N bytes between two 4-byte markers.  The size comes from the atom count, never from
    the file size and the header's frame count: OpenMM counts a frame in the header before it
    writes it, so a kill in between leaves a count one too high and a torn frame.
    """
    import struct

    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        header = handle.read(100)
        if len(header) < 100 or header[4:8] != b"CORD" or struct.unpack("<i", header[:4])[0] != 84:
            raise InputError(f"trajectory: {path!r} has no DCD header; restore the file or start a new run")
        title_bytes = struct.unpack("<i", header[92:96])[0]
        header_end = 112 + title_bytes          # 84-byte block, title block, atom-count block
        handle.seek(header_end - 8)
        atoms_in_file = struct.unpack("<i", handle.read(4))[0]
        if atoms_in_file != n_atoms:
            raise InputError(f"trajectory: {path!r} holds {atoms_in_file} atoms per frame, this run has "
                             f"{n_atoms}; restart with the structure the run started from")
        has_cell = struct.unpack("<i", header[48:52])[0] != 0
        frame_bytes = (56 if has_cell else 0) + 3 * (8 + 4 * n_atoms)
        complete = max(size - header_end, 0) // frame_bytes
        if frames > complete:
            raise InputError(f"trajectory: {path!r} holds {complete} complete frames but the checkpoint "
                             f"counts {frames}; the file lost frames after the checkpoint was written "
                             "(restore it, or start a new run)")
        keep = header_end + frames * frame_bytes
        handle.truncate(keep)
        first, interval = struct.unpack("<ii", header[12:20])
        handle.seek(8)
        handle.write(struct.pack("<i", frames))
        handle.seek(20)
        handle.write(struct.pack("<i", first + max(frames - 1, 0) * interval))
        handle.flush()
        os.fsync(handle.fileno())
        # the cut must land on a frame boundary: the last kept frame's closing marker is 4·N
        if frames:
            handle.seek(keep - 4)
            marker = struct.unpack("<i", handle.read(4))[0]
            if marker != 4 * n_atoms or os.path.getsize(path) != keep:
                raise InputError(f"trajectory: {path!r} does not end on a frame after the cut (marker "
                                 f"{marker}, expected {4 * n_atoms}); the file is damaged, restore it")


def _cell_parameters(cell) -> np.ndarray:
    from ase.geometry import cell_to_cellpar
    return np.asarray(cell_to_cellpar(np.asarray(cell)), dtype=np.float32)
