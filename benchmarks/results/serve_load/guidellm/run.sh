#!/usr/bin/env bash
# guidellm 0.8.1 in its own venv (pip install torch==2.13.0 guidellm), not a specray dependency.
# guidellm (an external load client) against `serve run deploy/serve.yaml` on this box.
set -u
cd "$(dirname "$0")/../../../.."   # the repository root
.venv/bin/serve run deploy/serve.yaml > benchmarks/results/serve_load/guidellm/serve.log 2>&1 &
SERVE=$!
for i in $(seq 1 600); do curl -sf http://127.0.0.1:8000/health > /dev/null && break; sleep 1; done
echo "healthy after ${i}s"
guidellm run \
  --backend kind=openai_http,target=http://127.0.0.1:8000,model=qwen2.5-coder-1.5b \
  --profile kind=concurrent,streams=16 \
  --data kind=synthetic_text,prompt_tokens=64,output_tokens=64 \
  --tokenizer kind=huggingface_auto,model=$HOME/.cache/specray/models/qwen2.5-coder-1.5b \
  --constraint kind=max_requests,count=32 \
  --output kind=json,path=benchmarks/results/serve_load/guidellm/guidellm.json \
  --disable-progress > benchmarks/results/serve_load/guidellm/guidellm.txt 2>&1
echo "guidellm rc=$?"
kill -INT $SERVE; sleep 20; kill -9 $SERVE 2>/dev/null; .venv/bin/ray stop --force > /dev/null 2>&1
