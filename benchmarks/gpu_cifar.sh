#!/usr/bin/env bash
# The CIFAR-10 and MNIST 10k comparisons on a GPU node (one GPU, 2 ranks sharing it):
#   bash benchmarks/gpu_cifar.sh OUT_DIR
# Run from the checkout's root. Needs data/cifar10k.h5 and data/mnist10k_u8.h5 (the MNIST run
# reads the uint8 copy of mnist10k.h5); prepares whichever is absent from the real data sets
# ($DDMPI_SHARED_DATA, else ../shared/data) with
#   python -m data_prep cifar --src ../shared/data/cifar10 --limit 12500 --test-fraction 0.12 \
#       --val-fraction 0.08 --dtype uint8 --out data/cifar10k.h5
#   python -m data_prep mnist --src ../shared/data/mnist-test10k --out data/mnist10k_u8.h5 \
#       --val-fraction 0.1 --test-fraction 0.1 --dtype uint8
# Prints each table.
set -u
out=${1:-runs/gpu}
mkdir -p "$out"
shared=${DDMPI_SHARED_DATA:-../shared/data}
prepare() {  # FILE KIND ARGS...: python -m data_prep KIND ARGS --out FILE, unless FILE exists
    local file=$1 kind=$2; shift 2
    [ -e "$file" ] && return 0
    mkdir -p "$(dirname "$file")"
    echo "gpu_cifar.sh: preparing $file"
    python3 -m data_prep "$kind" "$@" --out "$file" --quiet \
        || { echo "gpu_cifar.sh: could not prepare $file" >&2; exit 1; }
}
prepare data/cifar10k.h5 cifar --src "$shared/cifar10" --limit 12500 --test-fraction 0.12 \
    --val-fraction 0.08 --dtype uint8
prepare data/mnist10k_u8.h5 mnist --src "$shared/mnist-test10k" --val-fraction 0.1 \
    --test-fraction 0.1 --dtype uint8
ranks=2
if ! mpirun -n 2 python3 -c "from mpi4py import MPI; assert MPI.COMM_WORLD.size == 2" \
        >/dev/null 2>&1; then
    echo "gpu_cifar.sh: mpirun -n 2 does not work here; running 1 rank"; ranks=1
fi
launch() { if [ "$ranks" = 1 ]; then python3 -m ddmpi "$@"; else mpirun -n "$ranks" python3 -m ddmpi "$@"; fi; }
run() {  # NAME CONFIG ARGS...
    local name=$1 config=$2; shift 2
    local start=$SECONDS
    launch compare --config "$config" --run-dir "$out/$name" --overwrite --set run.device=cuda \
        --set run.threads_per_rank=4 "$@" > "$out/$name.log" 2>&1
    echo "=== $name (exit $?, $((SECONDS - start)) s)"
    sed -n '/^data\//,$p' "$out/$name.log" | grep -v "^comparison:" | head -20
}
run cifar_2x2 benchmarks/configs/compare_cifar10k.yaml
run cifar_2x2_aug benchmarks/configs/compare_cifar10k.yaml --set data.augment.shift=4 \
    --set "data.augment.flip_axes=[-1]"
run cifar_4x4 benchmarks/configs/compare_cifar10k.yaml --set "decomposition.grid=[4, 4]" \
    --seeds 1
run cifar_4x4_aug benchmarks/configs/compare_cifar10k.yaml --set "decomposition.grid=[4, 4]" \
    --seeds 1 --set data.augment.shift=4 --set "data.augment.flip_axes=[-1]"
run mnist10k benchmarks/configs/compare_mnist10k.yaml --set data.path=data/mnist10k_u8.h5
