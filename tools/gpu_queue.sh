#!/usr/bin/env bash
# The GPU queue in one device call (about 3 minutes on an H200, 16 cores): build with CUDA, then
# each op's CUDA tests in its own pytest process (a crash loses one group, not the run), the
# error-path CUDA tests apart, compute-sanitizer memcheck on the smoke cases, the fuzz suite on
# CUDA tensors, and a quick bench.
# Every step is capped so that its log comes back before the call's limit (GENEXT_DEADLINE s).
#
# Logs (at most 8 files) go to $GENEXT_OUT, else $OUT, else ./gpu-queue-out. Peers the tests
# compare against (diffusers, open_clip_torch, vector-quantize-pytorch and what they need beyond
# the GPU machine's image) can travel as wheels in .gpu/ (see the device tool's README): they are
# installed into /tmp/site when present.
#
#   bash tools/gpu_queue.sh                       # everything, ops first
#   GENEXT_QUEUE=models bash tools/gpu_queue.sh   # the build, then the models' checks only
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export GENEXT_TESTS=full  # the slow tests too: GPU time is for every check
DEADLINE=${GENEXT_DEADLINE:-530}
O=${GENEXT_OUT:-${OUT:-$PWD/gpu-queue-out}}
mkdir -p "$O"
if compgen -G ".gpu/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/*.whl && export PYTHONPATH=/tmp/site
fi
run() {  # run LOG CAP CMD...: CMD under min(CAP, time left), appended to LOG with its status
  local log=$1 cap=$2; shift 2
  local t=$((DEADLINE - SECONDS)); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 15 ]; then echo "== skipped (no time): $*" >> "$O/$log"; return; fi
  echo "== $(date -u +%T) cap ${t}s: $*" >> "$O/$log"
  timeout "$t" "$@" >> "$O/$log" 2>&1
  echo "== rc $? after $SECONDS s" >> "$O/$log"
}
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"; c++ --version | head -1; } >> "$O/build.log" 2>&1
run build.log 240 env GENEXT_CUDA=ON GENEXT_WARN_SPILLS=ON TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} \
  GENEXT_FA_HEAD_DIMS="${GENEXT_FA_HEAD_DIMS:-64;128;256}" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  python3 -m pip install -v --no-build-isolation --no-deps -e .
python3 -m genext info --json >> "$O/build.log" 2>&1 || { tail -60 "$O/build.log"; exit 1; }
QUEUE=${GENEXT_QUEUE:-all}
PT="python3 -m pytest -q -p no:cacheprovider -m cuda -rfE"
if [ "$QUEUE" != models ]; then
# error-path tests apart: on the GPU machine's torch 2.11 a C++ ValueError crashes the process
NOERR='not bad and not error and not raise and not mismatch and not head_dim_limit'
run t_kvcache.log 100 $PT -k "$NOERR" tests/ops/test_attention_with_kvcache.py tests/nn/test_kvcache.py
run t_sampler.log 100 $PT -k "$NOERR" tests/ops/test_sampler_step.py tests/samplers
run t_vq.log 80 $PT -k "$NOERR" tests/ops/test_vq.py tests/nn/test_vector_quantizer.py
run t_contrastive.log 80 $PT -k "$NOERR" tests/ops/test_contrastive.py tests/losses
run t_gn_fa.log 150 $PT -k "$NOERR" tests/ops/test_group_norm_silu.py tests/ops/test_flash_attention.py tests/nn/test_sdpa_drop_in.py tests/test_package.py
run extra.log 60 $PT -k "bad or error or raise or mismatch or head_dim_limit" tests
run extra.log 90 compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/cuda_smoke.py
# every op's fuzz cases with CUDA tensors against the float64 reference (valid cases only while
# a C++ ValueError kills the process there)
run extra.log 150 env GENEXT_FUZZ_DEVICE=cuda GENEXT_FUZZ_VALID_ONLY=1 \
  python3 -m pytest -q -p no:cacheprovider -rfE tests/fuzz
run extra.log 120 python3 -W ignore -m genext bench --quick --no-compile
fi
# the models on the GPU: parity with diffusers and transformers (the U-Nets, DiT, VAE, CLIP,
# Llama, GPT-2, LLaVA, Flamingo, generation with CUDA graphs), genext.patch and the transformers
# attention backend (needs the diffusers
# wheel in .gpu/), then SD 1.5's U-Net step and training step, and a whole 30-step sample with
# guidance, against diffusers eager, patched and compiled; the SD VAE decode; fp16 (and bf16 for
# the VAE), with peak memory
run models.log 240 $PT tests/models tests/integrations
run models.log 120 python3 -W ignore -m genext bench --op unet --dtype float16 --no-compile
run models.log 150 python3 -W ignore -m genext bench --op ldm --dtype float16 --no-compile
run models.log 100 python3 -W ignore -m genext bench --op vae --dtype float16 --no-compile
run models.log 100 python3 -W ignore -m genext bench --op vae --dtype bfloat16 --no-compile
# the language side: greedy generation with a 1.1B Llama (prompt 2048, 128 new tokens, batch 1/8/64)
# against transformers (SDPA dynamic, static, static compiled, genext attention; needs transformers),
# and a ViT-B/32 CLIP training step at batch 4096 and 1024 against open_clip (its wheel in .gpu/)
run models.log 300 python3 -W ignore -m genext bench --op lm --dtype bfloat16
run models.log 120 python3 -W ignore -m genext bench --op clip
run models.log 200 python3 -W ignore -m genext bench --op unet --dtype float16
run models.log 200 python3 -W ignore -m genext bench --op ldm --dtype float16
run models.log 150 python3 -W ignore -m genext bench --op vae --dtype float16
for f in "$O"/t_*.log "$O"/models.log; do [ -f "$f" ] || continue; echo "$f: $(grep -E 'passed|failed' "$f" | tail -1) $(tail -1 "$f")"; done
