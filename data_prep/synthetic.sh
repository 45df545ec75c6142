#!/usr/bin/env bash
# The built-in synthetic MIMIC-CXR: no credentials needed.
#   data_prep/synthetic.sh [OUT] [PATIENTS] [SIZE]
# A larger set for a GPU run of the paper preset (≈5,000 frontal images at 512x512):
#   data_prep/synthetic.sh data/synthetic-2300 2300 512
set -euo pipefail
out=${1:-data/synthetic}
patients=${2:-1000}
size=${3:-512}
fastcxr prepare synthetic "$out/raw" --patients "$patients" --rows 1024 --cols 896
fastcxr prepare mimic "$out/raw" --out "$out/prepared-$size" --size "$size"
echo "manifest: $out/prepared-$size/manifest.csv"
