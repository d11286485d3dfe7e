#!/usr/bin/env bash
# One H100 device call for the record: full-tier conformance + bench of the triton backend, the
# full-tier conformance of the reference backend, and the mid-size transformers port check.
# Everything lands in $OUT/results.tgz (the device tool returns at most 8 files).
#   carry: .whl (transformers wheel, see docs/porting.md)
set -uo pipefail
out="${OUT:-out}"
export PYTHONPATH="$(pwd)" PYTHONUNBUFFERED=1
mkdir -p "$out/all"
OUT="$out/all/triton" bash bench/device_run.sh triton 2>&1 | tee "$out/all/triton.log" | tail -45
timeout 75 python3 -m opbridge conformance --backend reference --device cuda --tier full --time-limit 65 \
    --report "$out/all/reference" > "$out/all/reference.log" 2>&1
echo "reference conformance exit status: $?"; tail -25 "$out/all/reference.log"
if ls .whl/transformers-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/transformers-*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
OPBRIDGE_FALLBACK=reference timeout 80 python3 bench/port_gpu.py --out "$out/all/port" --families v4 \
    --budget 55 > "$out/all/port.log" 2>&1
echo "port check exit status: $?"; tail -15 "$out/all/port.log"
tar czf "$out/results.tgz" -C "$out" all
