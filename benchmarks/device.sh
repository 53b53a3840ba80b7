#!/usr/bin/env bash
# Every accelerator figure benchmarks/RESULTS.md lacks, in one bounded command (one GPU, <= 8 min).
#
#   bash benchmarks/device.sh [OUTDIR]        # OUTDIR defaults to $OUT (the device tool's folder)
#   DEVICE_SMOKE=1 bash benchmarks/device.sh /tmp/out   # tiny sizes on a CPU: checks the plumbing
#   DEVICE_ONLY=restore,daclip bash benchmarks/device.sh   # rerun some steps (name prefixes)
#
# Steps, most wanted first; each runs in its own process under its own timeout, capped by what is
# left of the total budget (DEVICE_BUDGET_S, default 470 s), and a failing or timed-out step never
# stops the next one:
#   env           versions, devices, whether TensorFlow is there
#   attention     cuDNN vs plain ("naive") attention in bf16: op max|diff| at the U-Net's shapes and
#                 the whole U-Net forward (benchmarks/attention.py)
#   train_*       U-Net (IR-SDE) and NAFNet + DA-CLIP training step: images/s, MFU, memory, bf16 and
#                 fp32, data-parallel; FSDP too where there is more than one device (on one device
#                 the FSDP mesh (1, 1) is the same program, so it is reported as skipped)
#                 (benchmarks/train.py)
#   restore_float32  one 256² photo restored with 100 and 10 posterior calls
#                 (benchmarks/unet.py --only restore)
#   daclip_float32  DA-CLIP ViT-B/32, batch 64: encode_image(control=True) and controller
#                 training, images/s (benchmarks/daclip.py)
#   input_pipeline  degraded 256² examples/s per core on the host CPU: tf.data when TensorFlow is
#                 installed (the GPU image has none), else the NumPy/OpenCV reference only
#                 (benchmarks/input_pipeline.py)
#   sd_unet_vae   SD-1.5 UNet forward (64² latent) and SD VAE decode (512²), bf16, ours only
#                 (benchmarks/sd.py; the diffusers comparison is the CPU run's)
#   sd_compile    SD-1.5 UNet forward at 1024² (128² latent, batch 2) compiled: temp memory with
#                 "auto" attention (cuDNN flash in bf16) and the plain one
#   sd_generate   20-step DDIM text-to-image at 512² with guidance, one jitted scan, bf16
#   then, while the budget lasts: restore and daclip in the other dtype (bf16).
# Steps the budget cut are listed as skipped; a second call with DEVICE_ONLY=<their prefixes> takes
# them (on the device tool each call gets a fresh $OUT: keep both calls' files).
#
# Output, in OUTDIR (at most 8 files come back from the device tool; these are 3):
#   results.jsonl  every JSON line the scripts printed, each with "step" added, plus one
#                  {"name": "device.sh/step", ...} line per step (rc, seconds, status)
#   log.txt        everything else the scripts printed (stderr, warnings, tracebacks)
#   summary.txt    the table printed at the end
#
# On a session's lent nvidia-h200 (Python 3.12; jax 0.11 with CUDA, optax, orbax, PyTorch; no
# TensorFlow, no ml_collections), prepare ONCE on the development machine, in the repository root:
#
#   echo /.whl/ >> .git/info/exclude     # .gitignore already lists /.whl/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl ml_collections==1.1.0
#
# (the configs import ml_collections: a 77 KB pure-Python wheel; its needs, absl-py and PyYAML, are
# in the image). The image's own jax (0.11, CUDA) and flax are used as they are: the env step
# records their versions next to the tested ones (jax 0.10.2, flax 0.12.8); if flax's API differs,
# add flax==0.12.8 to the download line. Then one call:
#
#   run(command="bash benchmarks/device.sh", carry=[".whl"], timeout_s=540)
#
# This script installs .whl/*.whl itself (pip --no-index --target /tmp/site) when the folder exists.
# The files come back under the tool's files_at; add their figures to benchmarks/RESULTS.md.

set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUTDIR=${1:-${OUT:-}}
if [ -z "$OUTDIR" ]; then
  echo "usage: benchmarks/device.sh OUTDIR   (or set OUT)" >&2
  exit 2
fi
mkdir -p "$OUTDIR" || exit 2
RESULTS=$OUTDIR/results.jsonl
LOG=$OUTDIR/log.txt
SUMMARY=$OUTDIR/summary.txt
if [ -z "${DEVICE_ONLY:-}" ]; then : > "$RESULTS"; : > "$LOG"; fi  # a rerun of some steps appends
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

PY=${PYTHON:-python3}
SMOKE=${DEVICE_SMOKE:-0}
BUDGET=${DEVICE_BUDGET_S:-470}
ONLY=${DEVICE_ONLY:-}  # e.g. "restore,daclip": rerun only the steps with these name prefixes
START=$(date +%s)
DEADLINE=$((START + BUDGET))

export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
# One compilation cache for the steps (and for a rerun on the same warm machine).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/uir_jax_xla_cache}

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "+ installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site" | tee -a "$LOG"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >> "$LOG" 2>&1; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "wheel install failed (see log.txt); going on with the installed packages" | tee -a "$LOG"
  fi
fi
# The repository root: the scripts import uir_jax, configs and input_pipeline from it.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

# Adds "step" to each JSON line of $2 (a script's stdout) into results.jsonl; other lines -> log.
_collect() {
  "$PY" - "$1" "$2" "$RESULTS" "$LOG" <<'EOF'
import json, sys
step, src, results, log = sys.argv[1:]
n = 0
with open(src, errors="replace") as f, open(results, "a") as r, open(log, "a") as lg:
  for line in f:
    s = line.strip()
    try:
      rec = json.loads(s) if s.startswith("{") else None
    except ValueError:
      rec = None
    if isinstance(rec, dict):
      r.write(json.dumps({"step": step, **rec}) + "\n")
      n += 1
    elif s:
      lg.write(f"[{step}] {line.rstrip()}\n")
print(n)
EOF
}

_status() {  # step status rc seconds lines [reason]
  "$PY" -c 'import json, sys; a = sys.argv[1:]; print(json.dumps({"name": "device.sh/step",
    "step": a[0], "status": a[1], "rc": int(a[2]), "seconds": float(a[3]), "json_lines": int(a[4]),
    **({"reason": a[5]} if len(a) > 5 else {})}))' "$@" >> "$RESULTS"
}

_wanted() {  # is step $1 named by a prefix in DEVICE_ONLY?
  local p
  for p in ${ONLY//,/ }; do
    case $1 in "$p"*) return 0 ;; esac
  done
  return 1
}

# step NAME TIMEOUT_S CMD...: runs CMD under min(TIMEOUT_S, budget left); never aborts the script.
step() {
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && [ "$name" != env ] && ! _wanted "$name"; then return; fi
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    echo "--- $name: skipped (total budget of ${BUDGET}s spent)" | tee -a "$LOG"
    _status "$name" skipped 0 0 0 "total budget of ${BUDGET}s spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local shown="$*"
  echo "--- $name (timeout ${limit}s): ${shown:0:240}" | tee -a "$LOG"
  local t0 rc secs lines status
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" > "$TMP/$name.out" 2> "$TMP/$name.err"
  rc=$?
  secs=$("$PY" -c "import sys; print(round($(date +%s.%N) - $t0, 1))")
  sed "s/^/[$name] /" "$TMP/$name.err" >> "$LOG"
  lines=$(_collect "$name" "$TMP/$name.out")
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "    $status (rc $rc, ${secs}s, $lines JSON lines)" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then tail -n 5 "$TMP/$name.err" | sed 's/^/    /'; fi
  _status "$name" "$status" "$rc" "$secs" "$lines"
}

B=benchmarks
if [ "$SMOKE" = 1 ]; then
  # Tiny models, few iterations: every step and every JSON line of the real run, in ~minutes on a CPU.
  TRAIN=(--variant tiny --daclip tiny --batch 2 --size 32 --steps 1)
  RESTORE=(--size 32 --nf 8 --ch-mult 1,2 --steps 3 2 --repeats 1)
  ATTN=(--batch 1 --tokens 64 --repeats 2 --size 32 --nf 8 --ch-mult 1,2)
  DACLIP=(--model tiny --batch 4 --steps 1 --warmup 1)
  PIPE=(--num-examples 8 --warmup 2 --pool-size 4 --no-clip)
  SD=(--quick --no-torch --repeats 1)
  T_TRAIN=240 T_RESTORE=240 T_ATTN=180 T_DACLIP=120 T_PIPE=180 T_SD=300
else
  TRAIN=(--batch 16 --size 256 --steps 10)
  RESTORE=(--size 256 --steps 100 10 --repeats 1)
  ATTN=()
  DACLIP=(--model ViT-B-32 --batch 64 --steps 5 --warmup 2)
  PIPE=(--num-examples 128 --warmup 16)
  SD=(--no-torch --repeats 5)
  T_TRAIN=110 T_RESTORE=120 T_ATTN=90 T_DACLIP=75 T_PIPE=60 T_SD=90
fi

step env 60 "$PY" -c '
import importlib.metadata as md, importlib.util, json, os, platform, sys
import jax
rec = {"name": "device.sh/env", "python": platform.python_version(), "jax": jax.__version__,
       "backend": jax.default_backend(), "device_count": jax.device_count(),
       "devices": sorted({getattr(d, "device_kind", d.platform) for d in jax.devices()}),
       "cpu_count": os.cpu_count(), "smoke": os.environ.get("DEVICE_SMOKE", "0") == "1"}
for dist in ("jaxlib", "flax", "optax", "orbax-checkpoint", "ml_collections", "tensorflow",
             "tensorflow-cpu", "opencv-python-headless", "scikit-image"):
  try:
    rec[dist] = md.version(dist)
  except md.PackageNotFoundError:
    rec[dist] = None
rec["flax_from"] = os.path.dirname(importlib.util.find_spec("flax").origin)
has_tf = int(importlib.util.find_spec("tensorflow") is not None)
rec["tensorflow_importable"] = bool(has_tf)
print(json.dumps(rec))
with open(sys.argv[1], "w") as f:
  f.write(f"{jax.device_count()} {has_tf}\n")
' "$TMP/env"
NDEV=1 HAS_TF=0
[ -s "$TMP/env" ] && read -r NDEV HAS_TF < "$TMP/env"

step attention "$T_ATTN" "$PY" $B/attention.py --dtype bfloat16 "${ATTN[@]}"

LAYOUTS=data
if [ "${NDEV:-1}" -gt 1 ]; then LAYOUTS=data,fsdp; fi
for run in unet_bfloat16 nafnet_bfloat16 unet_float32 nafnet_float32; do
  step "train_$run" "$T_TRAIN" "$PY" $B/train.py --models "${run%%_*}" --dtypes "${run#*_}" \
    --layouts $LAYOUTS "${TRAIN[@]}"
done
if [ "$LAYOUTS" = data ] && { [ -z "$ONLY" ] || _wanted train; }; then
  _status train_fsdp skipped 0 0 0 \
    "one device: the FSDP mesh (1, 1) is the data-parallel program; needs >= 2 devices"
fi

step restore_float32 "$T_RESTORE" "$PY" $B/unet.py --only restore --dtypes float32 "${RESTORE[@]}"
step daclip_float32 "$T_DACLIP" "$PY" $B/daclip.py --dtype float32 "${DACLIP[@]}"

if [ "${HAS_TF:-0}" = 1 ]; then
  step input_pipeline "$T_PIPE" "$PY" $B/input_pipeline.py "${PIPE[@]}"
else
  step input_pipeline "$T_PIPE" "$PY" $B/input_pipeline.py --only numpy "${PIPE[@]}"
  { [ -z "$ONLY" ] || _wanted input_pipeline; } && _status input_pipeline_tf skipped 0 0 0 \
    "TensorFlow is not installed on this machine"
fi

step sd_unet_vae "$T_SD" "$PY" $B/sd.py --only unet,vae --dtype bfloat16 "${SD[@]}"
step sd_compile "$T_SD" "$PY" $B/sd.py --only compile --dtype bfloat16 "${SD[@]}"
step sd_generate "$T_SD" "$PY" $B/sd.py --only generate --dtype bfloat16 "${SD[@]}"

# Extras, while the budget lasts: the same figures in the other dtype.
step restore_bfloat16 "$T_RESTORE" "$PY" $B/unet.py --only restore --dtypes bfloat16 "${RESTORE[@]}"
step daclip_bfloat16 "$T_DACLIP" "$PY" $B/daclip.py --dtype bfloat16 "${DACLIP[@]}"

# Summary: one row per step, then the figures.
"$PY" - "$RESULTS" "$(( $(date +%s) - START ))" <<'EOF' | tee "$SUMMARY"
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
env = next((r for r in recs if r.get("name") == "device.sh/env"), {})
print(f"device.sh: {env.get('devices')} x{env.get('device_count')}, jax {env.get('jax')}, "
      f"flax {env.get('flax')}, smoke={env.get('smoke')}; {sys.argv[2]} s in all")
print(f"{'step':24} {'status':8} {'rc':>4} {'s':>7}  lines  reason")
for r in recs:
  if r.get("name") == "device.sh/step":
    print(f"{r['step']:24} {r['status']:8} {r['rc']:>4} {r['seconds']:>7}  {r['json_lines']:>5}  "
          f"{r.get('reason', '')}")
print()
keys = ("dtype", "layout", "steps", "impl", "shape", "clip", "cores")
for r in recs:
  if r.get("name", "").startswith("device.sh/"):
    continue
  what = " ".join(f"{k}={r[k]}" for k in keys if r.get(k) is not None)
  if "skipped" in r:
    print(f"{r['step']:18} {r.get('name')}  {what}  SKIPPED: {r['skipped'][:120]}")
    continue
  extra = "".join(f"  {k}={r[k]}" for k in ("mfu", "step_ms", "compile_s", "ms_per_call",
                                             "max_abs_diff_vs_float32", "ours_s", "temp_gib")
                  if r.get(k) is not None)
  print(f"{r['step']:18} {r.get('name')}  {what}  {r.get('value')} {r.get('unit')}{extra}")
last = {r["step"]: r["status"] for r in recs if r.get("name") == "device.sh/step"}  # reruns win
failed = [step for step, status in last.items() if status in ("failed", "timeout")]
print(f"\nfailed or timed out: {', '.join(failed) if failed else 'none'}")
EOF
echo "results: $RESULTS  log: $LOG  summary: $SUMMARY"
