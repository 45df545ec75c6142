#!/usr/bin/env bash
# NIH ChestX-ray14, https://nihcc.app.box.com/v/ChestXray-NIHCC
# 1. Download images_001.tar.gz … images_012.tar.gz, Data_Entry_2017_v2020.csv,
#    train_val_list.txt and test_list.txt into ROOT and unpack the archives there.
# 2. data_prep/nih.sh /data/nih /data/nih-512
set -euo pipefail
root=${1:?ChestX-ray14 folder}
out=${2:?output folder}
size=${3:-512}
fastcxr prepare nih "$root" --out "$out" --manifest-only
fastcxr labels "$out" --findings "Edema,Pleural Effusion"
fastcxr prepare nih "$root" --out "$out" --size "$size"
