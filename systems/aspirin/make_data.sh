#!/usr/bin/env bash
# How systems/aspirin/data.extxyz was made: GFN2-xTB (tblite) Langevin MD of aspirin in vacuum
# at 300 K, 0.5 fs steps, friction 0.01/fs, one frame every 20 steps (10 fs) after 1000 steps of
# equilibration, from the GFN2-xTB minimum of aspirin.xyz (RDKit ETKDG + MMFF94 from SMILES,
# made once; the line that made it is in aspirin.xyz's comment).
set -euo pipefail
cd "$(dirname "$0")"
rm -f data.extxyz
../../.venv/bin/mlmd label aspirin.xyz --oracle gfn2-xtb --out data.extxyz \
    --frames 650 --temperature 300 --timestep 0.5 --interval 20 --equilibration 1000 --seed 0
