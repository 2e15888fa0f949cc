#!/usr/bin/env bash
# Everything measured on a CUDA machine in one go: the GPU tests, the cost-model constants, the fused
# transforms, and the bf16 tables (training and few-token evaluation). Usage:
#   bash benchmarks/run_gpu.sh OUTDIR
# Writes pytest.log, calibrate.json, transforms.json, gpu-bf16.{json,md} and decode-bf16.{json,md}.
set -u
out=${1:?usage: bash benchmarks/run_gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, peft, transformers, triton; print('torch', torch.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_compute_paths.py tests/test_cuda.py tests/test_dct.py 2>&1 | tail -25 | tee "$out/pytest.log"
timeout 60 python3 -m benchmarks.calibrate --device cuda > "$out/calibrate.json" 2>&1; tail -c 1500 "$out/calibrate.json"
timeout 60 python3 -m benchmarks.transforms --out "$out" 2>&1 | tail -30
timeout 240 python3 -m benchmarks.run --device cuda --dtype bf16 --suite all --all-paths --repeats 3 --out "$out" --name gpu-bf16 > /dev/null 2>&1; echo "tables: $?"
timeout 50 python3 -m benchmarks.run --device cuda --dtype bf16 --suite layers --tokens 1 16 --kinds linear eval --repeats 5 --out "$out" --name decode-bf16 > /dev/null 2>&1; echo "decode: $?"
ls -la "$out"
