#!/usr/bin/env bash
# MIMIC-CXR v2.0.0 (DICOM release), https://physionet.org/content/mimic-cxr/2.0.0/
#
# 1. Become a credentialed PhysioNet user, complete the required training and sign the data
#    use agreement for MIMIC-CXR.
# 2. Download the label files (small) and the DICOMs (4.7 TB for everything), e.g.
#      wget -r -N -c -np --user YOUR_USER --ask-password \
#        https://physionet.org/files/mimic-cxr/2.0.0/
#    The three CSVs fastcxr needs are in the MIMIC-CXR-JPG project (same columns):
#      mimic-cxr-2.0.0-metadata.csv.gz, mimic-cxr-2.0.0-chexpert.csv.gz,
#      mimic-cxr-2.0.0-split.csv.gz — put them next to files/.
#    To download only what the study needs (frontal views), list those files first:
#      fastcxr prepare mimic /data/mimic-cxr --out /data/mimic-512 --manifest-only \
#        --list-files needed.txt
#      wget -N -c --user YOUR_USER --ask-password \
#        -B https://physionet.org/files/mimic-cxr/2.0.0/ -x -nH --cut-dirs=3 -i needed.txt
#    MIMIC-CXR-JPG works the same way (files/…/*.jpg are detected).
# 3. Prepare (all cores; re-running skips finished images; failures go to failures.csv;
#    on a cluster, one array task per --shard I/N, then one run without --shard):
#      data_prep/mimic.sh /data/mimic-cxr /data/mimic-cxr-512
set -euo pipefail
root=${1:?MIMIC-CXR root (holds files/ and the label CSVs)}
out=${2:?output folder}
size=${3:-512}
fastcxr prepare mimic "$root" --out "$out" --size "$size" --views PA,AP
