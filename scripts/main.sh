#!/usr/bin/env bash
# The main job: 2 ps of Langevin MD (300 K, 0.5 fs) of ethanol with the shipped GFN2-xTB
# committee of 4 in mlmd's own engine, watching the committee's force uncertainty.
# Ends with runs/ethanol/{trajectory.dcd, topology.pdb, log.csv, summary.png, checkpoint.npz} and
# observables.{csv,png} (bond, angle, dihedral distributions with the committee's credible intervals).
# A previous runs/ethanol/ is kept as runs/ethanol.<date>/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=runs/ethanol
if [ -e "$OUT" ]; then
    mv "$OUT" "$OUT.$(date +%Y%m%d-%H%M%S)"
fi
.venv/bin/mlmd run systems/ethanol --out "$OUT"
echo
echo "trajectory: $OUT/trajectory.dcd (topology $OUT/topology.pdb), log: $OUT/log.csv, plot: $OUT/summary.png," \
     "observables: $OUT/observables.png"
