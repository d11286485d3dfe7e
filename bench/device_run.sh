#!/usr/bin/env bash
# One device-machine call: the full-tier conformance run and the full-tier bench of one backend.
#   bash bench/device_run.sh reference   # or: triton
# Writes $OUT/conformance/report.{json,md} and $OUT/bench/bench.{json,md,png} (OUT defaults to ./out).
# Time limits keep the whole call under about 7 minutes; cases or workloads not reached are reported as such.
set -uo pipefail
backend="${1:-reference}"
out="${OUT:-out}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
timeout 260 python3 -m opbridge conformance --backend "$backend" --device cuda --tier full \
    --time-limit 230 --case-timeout 120 --report "$out/conformance" 2>&1 | tail -60
echo "conformance exit status: ${PIPESTATUS[0]}"
timeout 150 python3 -m opbridge bench --backend "$backend" --device cuda --tier full --time-limit 110 \
    --out "$out/bench" 2>&1 | tail -70
echo "bench exit status: ${PIPESTATUS[0]}"
