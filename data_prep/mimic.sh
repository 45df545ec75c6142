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
# 3. Prepare (all cores; re-running skips finished images; failures go to failures.csv):
#      data_prep/mimic.sh /data/mimic-cxr /data/mimic-cxr-512
set -euo pipefail
root=${1:?MIMIC-CXR root (holds files/ and the label CSVs)}
out=${2:?output folder}
size=${3:-512}
fastcxr prepare mimic "$root" --out "$out" --size "$size" --views PA,AP
