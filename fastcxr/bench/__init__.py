"""Benchmarks that print a ratio against a baseline measured in the same run: conversion
(`prepare`: `fastcxr bench-prepare`) and training (`train`: `fastcxr bench`, whose measured
loops are `arms`)."""

from fastcxr.bench.arms import BenchJob, Throughput, run_rounds
from fastcxr.bench.prepare import MIMIC_IMAGES, bench_prepare
from fastcxr.bench.train import (
    BENCH_STAGES,
    MIN_ROUNDS,
    WIDE,
    bench_train,
    project_compare,
    summarise,
    write_bench_cache,
)

__all__ = [
    "BENCH_STAGES", "MIMIC_IMAGES", "MIN_ROUNDS", "WIDE", "BenchJob", "Throughput",
    "bench_prepare", "bench_train", "project_compare", "run_rounds", "summarise",
    "write_bench_cache",
]  # fmt: skip
