"""The data contract: every field name that crosses a module or host boundary.

Units inside mlmd are ASE's: Å, eV, amu, fs for time given by the MD engine.
Hosts with other units (OpenMM: nm, kJ/mol, ps) convert at their boundary with
the table in :mod:`mlmd.units`, nowhere else.

Pair convention: ``edge_index[0]`` is the centre atom i that receives the message,
``edge_index[1]`` the neighbour j, and the pair vector is
``d_ij = positions[j] - positions[i] + shifts[e]``.  Lists are *full* (both i→j and
j→i present) and a pair appears once per periodic image inside the cutoff.
"""

# ---- inputs of a Potential (one frame) ------------------------------------------------
POSITIONS = "positions"            # [N, 3] float, Å
ATOMIC_NUMBERS = "numbers"         # [N] int64
CELL = "cell"                      # [3, 3] float, Å, rows are lattice vectors (ASE)
PBC = "pbc"                        # [3] bool
EDGE_INDEX = "edge_index"          # [2, E] int64, (centre i, neighbour j)
SHIFTS = "shifts"                  # [E, 3] float, Å: cartesian image shift added to x_j - x_i

# ---- outputs ----------------------------------------------------------------------------
ENERGY = "energy"                  # [] float, eV (committee: mean over members)
FORCES = "forces"                  # [N, 3] float, eV/Å, = -dE/dx (committee: mean)
ENERGIES = "energies"              # [N] float, eV, per-atom energies (sum = ENERGY)
VIRIAL = "virial"                  # [3, 3] float, eV, = -sum_e d_e ⊗ dE/dd_e (only when asked)
STRESS = "stress"                  # [3, 3] float, eV/Å^3, = -VIRIAL / volume (ASE sign)

# committee only (M members)
MEMBER_ENERGIES = "member_energies"  # [M] float, eV
MEMBER_FORCES = "member_forces"      # [M, N, 3] float, eV/Å
ENERGY_STD = "energy_std"            # [] float, eV: std over members (population, 1/M)
FORCES_STD = "forces_std"            # [N] float, eV/Å: sqrt(mean_m |F_i^m - <F_i>|^2)
UNCERTAINTY = "uncertainty"          # [] float, eV/Å: max_i FORCES_STD[i] x calibration factor

OUTPUT_KEYS = (ENERGY, FORCES, ENERGIES, VIRIAL, STRESS, MEMBER_ENERGIES, MEMBER_FORCES,
               ENERGY_STD, FORCES_STD, UNCERTAINTY)

# ---- data sets (extxyz, read/written with ASE) -------------------------------------------
# Reference labels live in the calculator results of each frame (ASE's SinglePointCalculator),
# i.e. extxyz's ``energy=`` in the comment line and the ``forces`` per-atom column.
DATA_ENERGY = "energy"             # eV, total energy of the frame
DATA_FORCES = "forces"             # [N, 3] eV/Å
DATA_STRESS = "stress"             # [6] Voigt (xx yy zz yz xz xy) eV/Å^3, ASE sign; periodic frames only
DATA_ORACLE = "oracle"             # str in atoms.info: which reference method made the label
DATA_TEMPERATURE = "sample_temperature_K"  # float in atoms.info: temperature of the sampling run
DATA_STEP = "sample_step"          # int in atoms.info: MD step of the sampling run

# ---- model file metadata (JSON in the TorchScript archive's extra files) ------------------
METADATA_FILE = "mlmd.json"
CONTRACT_VERSION = "1.0"           # major.minor; a file with a higher major cannot be read
META_CONTRACT = "contract_version"
META_CUTOFF = "cutoff"             # Å
META_SPECIES = "species"           # list of atomic numbers the model knows
META_FAMILY = "model_family"       # e.g. "ponita"
META_HYPER = "hyperparameters"     # dict
META_COMMITTEE = "committee_size"  # int M (1 for a single model)
META_DTYPE = "dtype"               # "float32" | "float64"
META_FINGERPRINT = "training_data_fingerprint"  # sha256 of the training frames
META_CALIBRATION = "calibration_factor"        # float multiplying the raw force σ
META_STRESS = "supports_stress"    # bool
META_MLMD_VERSION = "mlmd_version"
META_TRAINING = "training"         # dict: data set path, split sizes, test metrics
META_EXAMPLE = "example_frame"     # dict(numbers, positions Å, cell Å, pbc): a training frame, for audits
