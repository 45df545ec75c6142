#!/usr/bin/env bash
# CheXpert (Stanford ML Group), https://stanfordmlgroup.github.io/competitions/chexpert/
# 1. Register and accept the research use agreement; download CheXpert-v1.0-small (11 GB)
#    or the full-resolution release, and unpack it: ROOT holds train.csv, valid.csv, train/, valid/.
# 2. Composition first (no conversion), then the cache:
#      data_prep/chexpert.sh /data/CheXpert-v1.0-small /data/chexpert-512
set -euo pipefail
root=${1:?CheXpert folder (train.csv, valid.csv)}
out=${2:?output folder}
size=${3:-512}
fastcxr prepare chexpert "$root" --out "$out" --manifest-only
fastcxr labels "$out" --findings "Edema,Pleural Effusion"
fastcxr prepare chexpert "$root" --out "$out" --size "$size"
