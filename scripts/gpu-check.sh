#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, run the gpu-marked tests, then measure the
# GPU-sized vision transformer (advisor.examples.vit:build_gpu) with each technique alone
# on CUDA and print the table. Meant to finish in under 4 minutes on one H100 / H200; not
# yet timed with the transformer (the digits-CNN version took under 6 minutes on an H200).
#
# A machine whose image lacks optuna and sqlalchemy takes them as wheels in ./.whl
# (../shared/gpu/wheels.sh pytest-timeout, run from the repository); this script installs
# them into ./.site. Results go to $OUT (the device tool's folder) or studies/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-studies/gpu-check}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.site:$PWD
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, ' \
  f'{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}')" || exit 1
start=$(date +%s)
python3 -m pytest -q -o addopts="-p no:cacheprovider" -m gpu tests 2>&1 \
  | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
echo "gpu tests: exit $tests after $(( $(date +%s) - start )) s"
python3 -m advisor bench knobs --model advisor.examples.vit:build_gpu --device cuda \
  --trial-steps 20 --latency-seconds 0.3 --trial-timeout 90 --json "$out/knobs.json" 2>&1 \
  | tee "$out/knobs.log"
bench=${PIPESTATUS[0]}
echo "gpu check: tests exit $tests, knobs exit $bench, $(( $(date +%s) - start )) s in all"
exit $(( tests || bench ))
