#!/usr/bin/env bash
# The CUDA path, end to end, on a machine with an NVIDIA GPU (issue 30): a QLoRA fine-tune with
# bitsandbytes on CUDA (and a LoRA one), merge, export for the gpu-cuda profile (int4 RTN and fp16),
# validate both on the CUDA execution provider, bundle, and `edgetune run` the bundle.
#
#   benchmarks/gpu_path.sh [OUT]          # default OUT: runs/gpu-path
#   MODELS=qwen2.5-0.5b,llama-3.2-1b TOKENIZER=dir KEEP=1 benchmarks/gpu_path.sh
#
# It is benchmarks.scale with --target gpu-cuda: random weights in published configurations (cost and
# "does it run" only; no quality figure means anything), every stage a fresh `edgetune` process,
# its wall time and peak RSS in OUT/results.md. Needs, in the Python that runs it: torch with CUDA,
# onnxruntime-gpu and onnxruntime-genai-cuda (instead of the CPU packages), bitsandbytes, and
# edgetune's host dependencies; EDGETUNE_DEVICE_VENV names the folder whose bin/edgetune runs the
# bundle (default .venv-device). Never part of `make test`: CI has no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-path}
py=${PYTHON:-python3}
mkdir -p "$out"

# Preflight: what this machine offers, in one JSON line (fails fast where the CUDA pieces are missing).
"$py" - <<'EOF' | tee "$out/preflight.json"
import json, subprocess
import torch, onnxruntime as ort, onnxruntime_genai as og, bitsandbytes as bnb, transformers, peft
info = {
    "gpu": subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip(),
    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
    "onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "onnxruntime_genai": og.__version__,
    "bitsandbytes": bnb.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
}
print(json.dumps(info))
assert info["cuda_available"], "torch sees no GPU"
assert "CUDAExecutionProvider" in info["providers"], "onnxruntime has no CUDA execution provider (install onnxruntime-gpu)"
EOF

"$py" -m benchmarks.scale --models "${MODELS:-qwen2.5-0.5b}" --target gpu-cuda --methods qlora,lora \
  --algorithms rtn --precisions int4,fp16 --validate-all --timeout "${STAGE_TIMEOUT:-600}" --out "$out" \
  ${TOKENIZER:+--tokenizer "$TOKENIZER"} ${KEEP:+--keep}
