#!/usr/bin/env bash
# The GPU check, in stages, on a machine with a CUDA GPU: scripts/gpu-check.sh [STAGE...]
#   tests   the gpu-marked tests
#   layers  whole-model against per-layer compression on CUDA (int4 / float8 weight-only and
#           structured pruning against their sensitivity-guided versions; 1 seed)
#   noise   latency ratios on a quiet GPU machine and beside busy CPU processes (3 repeats)
#   apply   one trial (compile default + int8-dynamic; its training knobs sampled), exported,
#           then `advisor apply` re-measuring the shipped file in a fresh process
#   knobs   each technique alone
#   stopping  early stopping live, one seed of 10 trials with it and without
# Default: tests layers noise apply. Each stage has STAGE_TIMEOUT seconds (default 240) and
# its output goes to $OUT (the device tool's folder) or studies/gpu-check; a table of the
# stages' exits and times ends the run. Untimed on a GPU so far: give the device call a
# timeout that leaves room for a rerun, and run the rest of the stages in a second call.
#
# The workload is the GPU-sized vision transformer (advisor.examples.vit:build_gpu: width 384,
# so int4 and float8 apply; no transformers package needed). GPU_CHECK_DEVICE and
# GPU_CHECK_MODEL replace the device and workload, for a dry run on a CPU
# (GPU_CHECK_DEVICE=cpu GPU_CHECK_MODEL=advisor.examples.digits:build PYTHON=.venv/bin/python).
#
# A machine whose image lacks optuna, sqlalchemy, plotly, torchao or torch-pruning takes them
# as wheels in ./.whl (../shared/gpu/wheels.sh pytest-timeout, run from the repository; carry
# .whl); this script installs them into ./.site.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-studies/gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${GPU_CHECK_DEVICE:-cuda}
model=${GPU_CHECK_MODEL:-advisor.examples.vit:build_gpu}
limit=${STAGE_TIMEOUT:-240}
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.site:$PWD
fi
export PYTHONUNBUFFERED=1
"$py" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, ' + \
  (f'{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}' \
   if torch.cuda.is_available() else 'no CUDA device'))" || exit 1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

stage() {  # stage NAME COMMAND...: run it under the time limit, its output in $out/NAME.log
  local name=$1; shift
  local began=$SECONDS
  echo "== $name: $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-9s exit %-3s %5d s' "$name" "$rc" $(( SECONDS - began )))")
  [ "$rc" -eq 0 ] || failed=1
}

apply_check() {  # one trial of fixed deployed knobs, exported, and the shipped file re-measured
  local db="sqlite:///$work/apply.db"
  "$py" -m advisor run --model "$model" --device "$device" --trials 1 --trial-steps 20 \
    --storage "$db" --study gpu-apply --trial-timeout 200 \
    --try precision=fp32,compile=default,prune_kind=none,quantization=int8-dynamic,quant_protect=0 || return
  "$py" -m advisor export --study gpu-apply --storage "$db" -o "$out/recommended.yaml" || return
  "$py" -m advisor apply "$out/recommended.yaml" --model "$model" --device "$device" --steps 20 \
    -o "$work/optimized.pt2"
}

summary=()
failed=0
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests layers noise apply)
for name in "${stages[@]}"; do  # a mistyped stage is refused before any stage spends device time
  case $name in
    tests|layers|noise|apply|knobs|stopping) ;;
    *) echo "unknown stage '$name': expected tests, layers, noise, apply, knobs or stopping"; exit 2 ;;
  esac
done
for name in "${stages[@]}"; do
  case $name in
    tests) stage tests "$py" -m pytest -q -o addopts="-p no:cacheprovider" -m gpu tests ;;
    layers) stage layers "$py" -m advisor bench layers --model "$model" --device "$device" --seeds 1 \
              --trial-steps 20 --trial-timeout 120 --json "$out/layers.json" ;;
    noise) stage noise "$py" -m advisor bench noise --model "$model" --device "$device" --repeats 3 \
             --trial-steps 10 --trial-timeout 120 --json "$out/noise.json" ;;
    apply) export -f apply_check; export py model device work out
           stage apply bash -c apply_check ;;
    knobs) stage knobs "$py" -m advisor bench knobs --model "$model" --device "$device" \
             --trial-steps 20 --latency-seconds 0.3 --trial-timeout 90 --json "$out/knobs.json" ;;
    stopping) stage stopping "$py" -m advisor bench stopping --model "$model" --device "$device" \
                --seeds 1 --trials 10 --dir "$work/stopping" --json "$out/stopping.json" ;;
  esac
done
echo "== gpu check on $device ($model)"
printf '%s\n' "${summary[@]}"
exit $failed
