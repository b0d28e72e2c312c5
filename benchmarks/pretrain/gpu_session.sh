#!/usr/bin/env bash
# Every GPU check of the pretraining engine in one call, for a machine that is lent for a few minutes:
# the GPU tests, the step benchmark (ViT-L/14 at 32 and ViT-g/14 at 12 images, ZeRO-2 and ZeRO-3, DeepSpeed's
# bf16 and bf16 autocast, compiled blocks), when given, a peer benchmark at the same sizes and, when given
# a CIFAR-10 tarball (`cifar10/{train,test}/<class>/*.jpg`), a learning curve of the one-GPU CIFAR recipe
# (configs/recipes/cifar_vits16_gpu.yaml) for a few minutes, MLflow tracking off (DINOV2_TRACKING=off).
#
#   bash benchmarks/pretrain/gpu_session.sh [--dry] [--peer SCRIPT] [--budget SECONDS]
#       [--cifar TARBALL] [--cifar-minutes MINUTES] [--cifar-iterations N] [--cifar-only]
#
# --cifar-only runs the CIFAR-10 learning curve alone (the recipe's whole 8 minutes need a call of its own).
#
# Run from the repository root. Results go to $OUT (default: ./gpu_session_out): results.jsonl (one JSON
# line per part: name, exit code, seconds, and the part's own JSON line when it printed one), env.json and
# logs/<part>.log. Parts run in order of importance, each under its own timeout and never past the budget
# (default 480 s); a part that fails or times out is recorded and the next one runs.
#
# A bare machine: wheels in .whl/ (deepspeed, pydantic, rich, pytest, lightly for the peer, ...) are
# installed with --no-index into a private folder first; Fashion-MNIST for the tests comes from
# data/fashion-mnist (the install step's copy) or $DINOV2_FASHION_MNIST.
#
# --dry runs every part on the CPU at tiny sizes (cpu_tiny recipe, the peer's tiny arch) in the current
# environment (no wheels installed), to check the script itself where no GPU is.
set -u

DRY=0
PEER=""
BUDGET=480
CIFAR=""
CIFAR_MINUTES=3
CIFAR_ITERATIONS=600
CIFAR_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry) DRY=1 ;;
        --peer) PEER="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        --cifar) CIFAR="$2"; shift ;;
        --cifar-minutes) CIFAR_MINUTES="$2"; shift ;;
        --cifar-iterations) CIFAR_ITERATIONS="$2"; shift ;;
        --cifar-only) CIFAR_ONLY=1 ;;
        *) echo "error: unknown argument $1 (expected --dry, --peer SCRIPT, --budget SECONDS, --cifar TARBALL," \
               "--cifar-minutes MINUTES, --cifar-iterations N, --cifar-only)" >&2; exit 2 ;;
    esac
    shift
done
if [ ! -f benchmarks/pretrain/bench_step.py ]; then
    echo "error: run from the repository root (benchmarks/pretrain/bench_step.py not found)" >&2
    exit 2
fi
if [ -n "$PEER" ] && [ ! -f "$PEER" ]; then
    echo "error: --peer $PEER does not exist" >&2
    exit 2
fi
if [ -n "$CIFAR" ] && [ ! -f "$CIFAR" ]; then
    echo "error: --cifar $CIFAR does not exist" >&2
    exit 2
fi
if [ "$CIFAR_ONLY" = 1 ] && [ -z "$CIFAR" ]; then
    echo "error: --cifar-only needs --cifar TARBALL" >&2
    exit 2
fi

OUT="${OUT:-$PWD/gpu_session_out}"
mkdir -p "$OUT/logs"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"
START=$(date +%s)
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

if [ "$DRY" = 0 ] && ls .whl/*.whl > /dev/null 2>&1; then
    SITE="${TMPDIR:-/tmp}/dinov2_gpu_site"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl > "$OUT/logs/wheels.log" 2>&1 \
        || echo "wheels: pip install failed, see logs/wheels.log" >&2
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# DeepSpeed's parser of the CUDA architectures refuses "9.0a", which some images set
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true
if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
fi

"$PYTHON" - > "$OUT/env.json" 2> "$OUT/logs/env.log" << 'EOF'
import importlib, json, torch
modules = {}
for name in ("deepspeed", "pydantic", "rich", "pytest", "timm", "lightly", "xformers", "pyarrow"):
    try:
        modules[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as error:
        modules[name] = f"missing: {type(error).__name__}: {error}"[:200]
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    "modules": modules,
}))
EOF
cat "$OUT/env.json"

# run_part NAME LIMIT_SECONDS COMMAND...: the command under a timeout (never past the budget), its
# output in logs/NAME.log, one line in results.jsonl with its last JSON line
run_part() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        echo "{\"part\": \"$name\", \"skipped\": \"budget of ${BUDGET} s spent\"}" >> "$RESULTS"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local began=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    local code=$?
    local seconds=$(($(date +%s) - began))
    local figures
    figures=$(grep '^{' "$OUT/logs/$name.log" | tail -n 1)
    echo "{\"part\": \"$name\", \"rc\": $code, \"seconds\": $seconds, \"limit\": $limit, \"result\": ${figures:-null}}" \
        >> "$RESULTS"
    echo "$name: rc $code in ${seconds} s ${figures}"
}

bench() {  # bench NAME LIMIT RECIPE BATCH [--set KEY=VALUE ...]
    local name="$1" limit="$2" recipe="$3" batch="$4"
    shift 4
    if [ "$DRY" = 1 ]; then
        run_part "$name" "$limit" "$PYTHON" benchmarks/pretrain/bench_step.py --recipe cpu_tiny --batch-size 4 \
            --steps 1 --warmup 1 "$@"
    else
        run_part "$name" "$limit" "$PYTHON" benchmarks/pretrain/bench_step.py --recipe "$recipe" --batch-size "$batch" \
            --steps 10 --warmup 3 "$@"
    fi
}

peer() {  # peer NAME LIMIT ARCH BATCH [--compile]
    local name="$1" limit="$2" arch="$3" batch="$4"
    shift 4
    [ -n "$PEER" ] || return 0
    if [ "$DRY" = 1 ]; then
        run_part "$name" "$limit" "$PYTHON" "$PEER" --arch tiny --batch 4 --steps 1 --global-size 64 --local-size 32 "$@"
    else
        run_part "$name" "$limit" "$PYTHON" "$PEER" --arch "$arch" --batch "$batch" --steps 10 "$@"
    fi
}

cifar_curve() {  # the one-GPU CIFAR recipe's learning curve, training stopped after CIFAR_MINUTES
    [ -n "$CIFAR" ] || return 0
    local data="${TMPDIR:-/tmp}/dinov2_cifar"
    rm -rf "$data" "$OUT/cifar_curve"
    mkdir -p "$data"
    tar -xzf "$CIFAR" -C "$data" || { echo "cifar: could not unpack $CIFAR" >&2; return 0; }
    local recipe=configs/recipes/cifar_vits16_gpu.yaml minutes="$CIFAR_MINUTES" iterations="$CIFAR_ITERATIONS"
    local every=100 extra=()
    if [ "$DRY" = 1 ]; then
        recipe=cpu_tiny minutes=1 iterations=4 every=2
        extra=(--knn-train 200 --knn-test 100 --set train.num_workers=1)
    fi
    run_part cifar_curve $(awk "BEGIN {print int($minutes * 60 + 120)}") \
        env DINOV2_TRACKING=off "$PYTHON" benchmarks/pretrain/learning_curve.py --recipe "$recipe" --data "$data/cifar10/train" \
        --knn-data "$data/cifar10" --output "$OUT/cifar_curve" --iterations "$iterations" --minutes "$minutes" \
        --every "$every" "${extra[@]}"
    # the per-iteration losses and collapse statistics beside the curve (the run folder stays here)
    cp "$OUT/cifar_curve/run/plots/train.csv" "$OUT/cifar_curve/train.csv" 2> /dev/null
    cp "$OUT/cifar_curve/pretrain.log" "$OUT/logs/cifar_pretrain.log" 2> /dev/null
    mv "$OUT/cifar_curve/run" "$data/run" 2> /dev/null
    mv "$OUT/cifar_curve/fashion_mnist" "$data/" 2> /dev/null
}

BF16="deepspeed.precision=deepspeed_bf16"
AUTOCAST="deepspeed.precision=autocast_bf16"
if [ "$CIFAR_ONLY" = 1 ]; then
    cifar_curve
    echo "results: $RESULTS ($(($(date +%s) - START)) s)"
    exit 0
fi
# in order of importance: that the engine is right on a GPU, its speed beside the peer's at ViT-L, the
# small-scale recipe's learning on a GPU, then ViT-g and the variants
run_part gpu_tests 200 "$PYTHON" -m pytest tests/train/test_gpu.py -m gpu -q -rs -p no:cacheprovider \
    --basetemp "${TMPDIR:-/tmp}/dinov2_gpu_tests" --junitxml "$OUT/gpu_tests.xml"
bench vitl14_b32_zero2_deepspeed_bf16 120 vitl14 32 --set "$BF16" --set deepspeed.zero_stage=2
peer peer_vitl14_b32 90 vitl14 32
cifar_curve
bench vitg14_b12_zero2_deepspeed_bf16 150 vitg14 12 --set "$BF16" --set deepspeed.zero_stage=2
peer peer_vitg14_b12 120 vitg14 12
bench vitl14_b32_zero3_deepspeed_bf16 150 vitl14 32 --set "$BF16" --set deepspeed.zero_stage=3
bench vitl14_b32_zero2_autocast_bf16 150 vitl14 32 --set "$AUTOCAST" --set deepspeed.zero_stage=2
bench vitl14_b32_zero2_deepspeed_bf16_compiled 240 vitl14 32 --set "$BF16" --set deepspeed.zero_stage=2 \
    --set train.compile=true
peer peer_vitl14_b32_compiled 180 vitl14 32 --compile
bench vitg14_b12_zero3_deepspeed_bf16 150 vitg14 12 --set "$BF16" --set deepspeed.zero_stage=3
bench vitg14_b12_zero2_deepspeed_bf16_compiled 240 vitg14 12 --set "$BF16" --set deepspeed.zero_stage=2 \
    --set train.compile=true

echo "results: $RESULTS ($(($(date +%s) - START)) s)"
