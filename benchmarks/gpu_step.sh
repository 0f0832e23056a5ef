#!/usr/bin/env bash
# The GPU half of the step-overhead check, on a node with one CUDA device:
#   bash benchmarks/gpu_step.sh
# The CUDA tests (no host synchronisation per step, pinned batches, augmentation on the device
# equal to the CPU's), then ddmpi's loop against a plain PyTorch loop with and without
# channels_last (benchmarks/RESULTS-step.md).
set -u
python3 -m pytest -q -p no:cacheprovider tests/test_defects.py tests/test_sources.py \
    tests/test_augment.py -k cuda
for layout in "" --channels-last; do
    python3 benchmarks/bench_step.py --device cuda --samples 50000 --epochs 2 --repeat 3 \
        --width 32 $layout
done
