#!/usr/bin/env bash
# How systems/ethanol/data.extxyz was made: GFN2-xTB (tblite) Langevin MD at 300 K,
# 0.5 fs steps, friction 0.01/fs (7 ps in all), one frame every 20 steps (10 fs) after 1000 steps
# of equilibration, starting from the GFN2-xTB minimum of ASE's CH3CH2OH.
set -euo pipefail
cd "$(dirname "$0")"
rm -f data.extxyz
../../.venv/bin/mlmd label ethanol.xyz --oracle gfn2-xtb --out data.extxyz \
    --frames 650 --temperature 300 --timestep 0.5 --interval 20 --equilibration 1000 --seed 0
