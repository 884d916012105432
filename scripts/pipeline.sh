#!/usr/bin/env bash
# The whole life of a model file on the ethanol system, printed as it goes (about 2 minutes):
# label fresh geometries with GFN2-xTB (tblite), train a committee of 4, export it to
# TorchScript, show its metadata, audit it, and time the committee against one member.
# Outputs go to runs/pipeline/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MLMD=.venv/bin/mlmd
OUT=runs/pipeline
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1/5 label: GFN2-xTB Langevin MD of ethanol at 300 K, 300 frames =="
$MLMD label systems/ethanol/ethanol.xyz --oracle gfn2-xtb --out "$OUT/data.extxyz" \
    --frames 300 --temperature 300 --timestep 0.5 --interval 20 --equilibration 1000 --seed 1

echo "== 2/5 train: committee of 4 (batched members), 200 train / 25 val / 75 test frames =="
$MLMD train "$OUT/data.extxyz" --out "$OUT/train" --committee 4 --epochs 25 \
    --n-train 200 --n-val 25 --n-test 75 --lr 5e-3

echo "== 3/5 export: model file metadata =="
$MLMD info "$OUT/train/model.pt"

echo "== 4/5 audit: contract checks in float64 =="
$MLMD audit "$OUT/train/model.pt"

echo "== 5/5 committee cost: one step of M members vs one member =="
$MLMD bench committee --model "$OUT/train/model.pt" --members 1 4 --repeats 100

echo
echo "outputs in $OUT/: data.extxyz (labelled trajectory), train/metrics.json (log), train/parity.png (plot), train/model.pt"
