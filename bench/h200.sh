#!/usr/bin/env bash
# The H200 recipe for bench/learner_gpu.py (the machine has torch, Triton 3.6 and transformers but no
# DeepSpeed, fla or tilelang, and no network: wheels travel with the call, ≤ 64 MiB per call).
#   bash bench/h200.sh install .devcarry/a   # tilelang 0.1.15, apache-tvm-ffi 0.1.12, torch-c-dlpack-ext, fla 0.6.0
#   bash bench/h200.sh install .devcarry/b   # z3-solver, DeepSpeed 0.19.8 (package tarball), pydantic, hjson
#   bash bench/h200.sh run [bench/learner_gpu.py arguments]
# JIT caches (Triton incl. fla's autotune results, tilelang) go to /tmp/jit and back under $OUT as
# jitcache.tgz; a later call can restore them with `bash bench/h200.sh restore <folder>`.
set -euo pipefail
SITE=/tmp/site
export TRITON_CACHE_DIR=/tmp/jit/triton TILELANG_CACHE_DIR=/tmp/jit/tilelang
case "$1" in
  install)
    mkdir -p $SITE
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE "$2"/*.whl
    for t in "$2"/*.tgz; do [ -e "$t" ] && tar xzf "$t" -C $SITE; done
    ls $SITE ;;
  restore)
    [ -e "$2/jitcache.tgz" ] && tar xzf "$2/jitcache.tgz" -C / || true ;;
  run)
    shift
    export PYTHONPATH=$SITE:$PWD TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
    status=0
    timeout "${BENCH_TIMEOUT:-540}" python3 bench/learner_gpu.py "$@" || status=$?
    if [ -n "${OUT:-}" ]; then tar czf "$OUT/jitcache.tgz" -C / tmp/jit 2>/dev/null || true; ls -la "$OUT"; fi
    exit $status ;;
esac
