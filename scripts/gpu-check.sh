#!/usr/bin/env bash
# GPU checks on a machine with an NVIDIA GPU and driver: NVML discovery (a gpu.* profile
# in machine-types), device assignment (CUDA_VISIBLE_DEVICES of a run), and per-run GPU
# series while a small CUDA workload (driver API through ctypes: no pip, no network)
# holds GPU memory and keeps the GPU busy. Prints what it saw; exits non-zero on a miss.
# Usage: scripts/gpu-check.sh   (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
D=$(mktemp -d); PORT=18931; KEY=lk_gpucheckgpucheckgpucheck0001
STOA_ADMIN_KEY=$KEY STOA_METRICS__INTERVAL_MS=500 ./target/release/stoa server --listen 127.0.0.1:$PORT --data-dir "$D" >"$D/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 100); do curl -sf -H "Authorization: Bearer $KEY" http://127.0.0.1:$PORT/api/v2/external/machine-types >/dev/null && break; sleep 0.1; done
api() { curl -sf -H "Authorization: Bearer $KEY" -H 'content-type: application/json' "$@"; }
echo "== machine-types"; api http://127.0.0.1:$PORT/api/v2/external/machine-types | python3 -m json.tool
PROFILE=$(api http://127.0.0.1:$PORT/api/v2/external/machine-types | python3 -c 'import json,sys; print(next(m["hardware_profile"] for m in json.load(sys.stdin)["machine_types"] if m["hardware_profile"].startswith("gpu.")))')
echo "GPU profile: $PROFILE"
CODE=$(cat <<'PY'
import ctypes, os, time
print("CUDA_VISIBLE_DEVICES =", os.environ.get("CUDA_VISIBLE_DEVICES"), flush=True)
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
dev = ctypes.c_int(); assert cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
ctx = ctypes.c_void_p(); assert cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev) == 0
ptr = ctypes.c_uint64(); size = 4 << 30
assert cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size)) == 0
t = time.time()
while time.time() - t < 6:
    cuda.cuMemsetD8_v2(ptr, 7, ctypes.c_size_t(size)); cuda.cuCtxSynchronize()
print("held 4 GiB and kept the GPU busy for 6 s", flush=True)
PY
)
BODY=$(python3 -c 'import json,sys; print(json.dumps({"code": sys.argv[1], "execution_type": sys.argv[2], "timeout": 120}))' "$CODE" "$PROFILE")
ID=$(api -X POST -d "$BODY" http://127.0.0.1:$PORT/api/v2/external/execution/streaming/start | python3 -c 'import json,sys; print(json.load(sys.stdin)["execution_id"])')
for _ in $(seq 240); do
  ST=$(api http://127.0.0.1:$PORT/api/v2/external/execution/$ID | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  case $ST in completed|failed|system_failure|aborted|cancelled) break;; esac; sleep 0.5
done
echo "== run $ID: $ST"; api http://127.0.0.1:$PORT/api/v2/external/execution/$ID | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["stdout"], r["stderr"], "gpu_ids:", r["gpu_ids"], "summary:", r["metrics_summary"])'
echo "== metrics (step 1s)"
api "http://127.0.0.1:$PORT/api/v2/external/execution/$ID/metrics?step=1s" | python3 -c '
import json, sys
m = json.load(sys.stdin)
for k, v in m.items():
    if k.startswith("gpu") or k.startswith("system"):
        print(f"{k:34s}", [p["value"] for p in v])
ok = m["gpuUtilizationPercent"] and max(p["value"] for p in m["gpuMemoryUtilizationPercent"]) > 0
sys.exit(0 if ok else 1)'
[ "$ST" = completed ] && echo "GPU checks passed"
