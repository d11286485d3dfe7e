#!/usr/bin/env bash
# Device-machine checks, by stage, each under its own time limit; outputs under $OUT (default ./out):
#   bash bench/device_check.sh sanitize attention   # memcheck of every Triton op (fwd + bwd), attention bench subset
#   bash bench/device_check.sh conformance          # full-tier conformance of triton (all kinds) and reference
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONPATH="$(pwd)" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
for stage in "$@"; do
  case "$stage" in
    sanitize)
      timeout 200 compute-sanitizer --tool memcheck --print-limit 20 python3 bench/sanitize_gpu.py \
          > "$out/sanitize.log" 2>&1
      echo "sanitizer exit status: $?"; tail -4 "$out/sanitize.log" ;;
    attention)
      # Sections start only with enough budget left (ceilings: 300 s), hence the large budget; the run
      # itself takes about a minute on an H100.
      timeout 420 python3 bench/attention_gpu.py --out "$out/h100-sparse-attention.json" --budget 400 \
          --only ceilings,prefill_v32,prefill_causal,decode_paged,correctness > "$out/attention.log" 2>&1
      echo "attention bench exit status: $?"; grep -E "causal|elements_outside|pass" "$out/attention.log" | tail -25 ;;
    conformance)
      for b in triton reference; do
        timeout 280 python3 -m opbridge conformance --backend "$b" --device cuda --tier full --time-limit 260 \
            --case-timeout 120 --report "$out/conformance-$b" > "$out/conformance-$b.log" 2>&1
        echo "$b conformance exit status: $?"; tail -20 "$out/conformance-$b.log"
      done ;;
  esac
done
