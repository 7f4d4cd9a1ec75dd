#!/usr/bin/env bash
# shellcheck disable=SC2317 # sections run through run_section "$fn", which shellcheck cannot follow
# benches/gpu/run.sh: the GPU check, run ON the lent GPU machine from the repo
# root, over a pack that benches/gpu/build.sh made here. It builds nothing.
#
#   device run: command "bash benches/gpu/run.sh", carry ["target/gpu-pack", ".gl"], timeout_s 600
#
# Sections, each timed, each skippable, each with its own time budget:
#   setup      Vulkan loaders (.gl/*.deb), CUDA library path, nvidia-smi, lockstep backends
#   tests      every test executable of the pack (a serial rerun if one times out)
#   digests    the same operands through lockstep matmul on cpu, cuda and wgpu; digests compared
#   model      lockstep generate on cpu, cuda and wgpu (tiny trained models, a SmolLM2-shaped
#              random model): tokens, token digests and traces compared, greedy and sampled;
#              lockstep bench generate --backend cuda|wgpu at batch 1 and 32
#   bench      lockstep bench matmul --backend cuda (lockstep against cuBLAS SGEMM)
#   sanitizer  compute-sanitizer memcheck and racecheck on lockstep matmul --backend cuda
# Everything lands in $OUT (default /tmp/gpu-out), at most 8 files:
#   summary.md  verdict, machine, per-section tables (rewritten after every section)
#   run.log     environment, lockstep backends, bench stderr
#   tests.log   the output of every test executable
#   digests.log generator and lockstep matmul output per shape and backend
#   bench.jsonl one `lockstep bench matmul --json` object per line
#   sanitizer.log compute-sanitizer output
#   model.log   lockstep generate / bench generate output per model and backend
# The last line printed is the overall verdict: "GPU CHECK: PASS" or "GPU CHECK: FAIL".
#
# Environment (defaults in brackets); see benches/gpu/README.md:
#   GPU_CHECK_DRY_RUN [0]        1: no GPU expected; CUDA parts skipped, small shapes, nothing unpacked into /
#   GPU_CHECK_BUDGET_S [520]     the whole script stops starting work after this many seconds
#   GPU_CHECK_SKIP_TESTS, _DIGESTS, _BENCH, _SANITIZER [0]   1: skip that section
#   GPU_CHECK_TESTS_BUDGET_S [180]  GPU_CHECK_TEST_TIMEOUT [150]  per test executable
#   GPU_CHECK_TESTS ["" = all]   test executables to run (names from manifest.tsv)
#   GPU_CHECK_TESTS_FIRST [cuda_sources matmul_matches_spec cuda_ops cuda_model wgsl_softfloat wgsl_limits wgsl_ops lockstep_kernels-lib]
#                                run these first, in this order; the rest follow in manifest order
#   GPU_CHECK_TEST_ARGS [--nocapture]  arguments for every test executable (a filter may follow)
#   GPU_CHECK_DIGESTS_BUDGET_S [120]   GPU_CHECK_MATMUL_TIMEOUT [150]
#   GPU_CHECK_SHAPES             "MxKxN:values[:exp_range] ..." (values: plain, magnitudes, specials)
#   GPU_CHECK_BACKENDS [cpu cuda wgpu]
#   GPU_CHECK_WGPU_MAX_GFLOP [2000]  no wgpu run for products above this (8192^3 is 1100 GFLOP)
#   GPU_CHECK_WGPU_GFLOPS [170]  expected wgpu speed: a wgpu run that would not fit the time left is skipped
#   GPU_CHECK_BENCH_BUDGET_S [75]  GPU_CHECK_BENCH_SHAPES  GPU_CHECK_BENCH_BACKENDS [cuda]
#   GPU_CHECK_BENCH_REPS [5]     GPU_CHECK_BENCH_TIMEOUT [60]
#   GPU_CHECK_SANITIZER_BUDGET_S [90]  GPU_CHECK_SANITIZER_SHAPES  GPU_CHECK_SANITIZER_TOOLS [memcheck racecheck]
#   GPU_CHECK_SANITIZER_TIMEOUT [60]
#   GPU_CHECK_SKIP_MODEL [0]  GPU_CHECK_MODEL_BUDGET_S [120]  GPU_CHECK_MODEL_BACKENDS [cpu cuda wgpu]
#   GPU_CHECK_MODEL_TOKENS [24]  GPU_CHECK_MODEL_BENCH_BATCH [1,32]  GPU_CHECK_MODEL_SHAPE [smollm2]
#   GPU_PACK [target/gpu-pack]   GPU_CHECK_WORK [/tmp/gpu-check-work] (operands, scratch; removed at exit)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
HERE=$ROOT/benches/gpu

# ---------------------------------------------------------------- settings
OUT=${OUT:-/tmp/gpu-out}
PACK=${GPU_PACK:-$ROOT/target/gpu-pack}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check-work}
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-520}

TESTS_BUDGET=${GPU_CHECK_TESTS_BUDGET_S:-200}
# Short: the GPU test executables finish in seconds on an H100, and one that
# hangs with parallel test threads (seen with WGSL) is then rerun serially.
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-60}
ONLY_TESTS=${GPU_CHECK_TESTS:-}
TEST_FIRST=${GPU_CHECK_TESTS_FIRST:-cuda_sources matmul_matches_spec cuda_ops cuda_model wgsl_softfloat wgsl_limits wgsl_ops lockstep_kernels-lib}
TEST_ARGS=${GPU_CHECK_TEST_ARGS---nocapture}

DIGESTS_BUDGET=${GPU_CHECK_DIGESTS_BUDGET_S:-120}
MATMUL_TIMEOUT=${GPU_CHECK_MATMUL_TIMEOUT:-150}
WGPU_MAX_GFLOP=${GPU_CHECK_WGPU_MAX_GFLOP:-2000}
WGPU_GFLOPS=${GPU_CHECK_WGPU_GFLOPS:-170}

BENCH_BUDGET=${GPU_CHECK_BENCH_BUDGET_S:-75}
BENCH_REPS=${GPU_CHECK_BENCH_REPS:-5}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-60}

MODEL_BUDGET=${GPU_CHECK_MODEL_BUDGET_S:-120}
MODEL_BACKENDS=${GPU_CHECK_MODEL_BACKENDS:-cpu cuda wgpu}
MODEL_TOKENS=${GPU_CHECK_MODEL_TOKENS:-24}
MODEL_BENCH_BATCH=${GPU_CHECK_MODEL_BENCH_BATCH:-1,32}
MODEL_SHAPE=${GPU_CHECK_MODEL_SHAPE:-smollm2}

SANITIZER_BUDGET=${GPU_CHECK_SANITIZER_BUDGET_S:-90}
SANITIZER_TOOLS=${GPU_CHECK_SANITIZER_TOOLS:-memcheck racecheck}
SANITIZER_TIMEOUT=${GPU_CHECK_SANITIZER_TIMEOUT:-60}
SANITIZER_MODEL=${GPU_CHECK_SANITIZER_MODEL:-1}

if [ "$DRY_RUN" = 1 ]; then
  # Small enough for a 2-core machine with lavapipe as its only Vulkan device.
  SHAPES=${GPU_CHECK_SHAPES:-64x300x65:plain 33x257x17:magnitudes:60 9x1000x130:specials 1x513x130:specials}
  BACKENDS=${GPU_CHECK_BACKENDS:-cpu cuda wgpu}
  BENCH_SHAPES=${GPU_CHECK_BENCH_SHAPES:-256x256x256 1x512x512}
  BENCH_BACKENDS=${GPU_CHECK_BENCH_BACKENDS:-cpu}
else
  SHAPES=${GPU_CHECK_SHAPES:-4096x4096x4096:plain 4095x4099x4097:magnitudes:60 1x8192x8192:specials 8x8192x8192:specials 9x8192x8192:specials 3000x1000x2000:specials 8192x8192x8192:plain}
  BACKENDS=${GPU_CHECK_BACKENDS:-cpu cuda wgpu}
  BENCH_SHAPES=${GPU_CHECK_BENCH_SHAPES:-4096x4096x4096 8192x8192x8192 2048x2048x2048 1x8192x8192 1x4096x4096 8x8192x8192}
  BENCH_BACKENDS=${GPU_CHECK_BENCH_BACKENDS:-cuda}
fi
SANITIZER_SHAPES=${GPU_CHECK_SANITIZER_SHAPES:-70x300x65:specials 1x513x130:magnitudes:60 8x1000x300:specials 129x257x131:plain}

SUMMARY=$OUT/summary.md
RUN_LOG=$OUT/run.log
TESTS_LOG=$OUT/tests.log
DIGESTS_LOG=$OUT/digests.log
BENCH_JSONL=$OUT/bench.jsonl
SANITIZER_LOG=$OUT/sanitizer.log
MODEL_LOG=$OUT/model.log
SUMDIR=$WORK/summary # one markdown fragment per section, joined into summary.md

DEADLINE=$((SECONDS + BUDGET))
SECTION_END=$DEADLINE
FAILS=() # each makes the verdict FAIL
WARNS=() # worth reading, not a failure
TIMES=() # "section: N s"

# ---------------------------------------------------------------- helpers
# Progress goes to stderr (the device tool returns stdout and stderr
# together), so functions can print table rows on stdout.
log() { printf '%s\n' "$*" >&2; printf '%s\n' "$*" >>"$RUN_LOG"; }
fail() { FAILS+=("$*"); log "FAIL: $*"; }
warn() { WARNS+=("$*"); log "WARN: $*"; }
# Something the check could not cover (not run for time, a device absent, a
# test skipped): on the GPU machine the check cannot pass on gaps, so it is a
# failure unless GPU_CHECK_ALLOW_GAPS=1; in a dry run it is a warning.
gap() { if ((HAVE_GPU)) && [ "${GPU_CHECK_ALLOW_GAPS:-0}" != 1 ]; then fail "$@"; else warn "$@"; fi; }
now_ms() { date +%s%3N; }
secs_since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

# Seconds a command may run: the least of what it wants, what is left of the
# section and what is left of the whole budget. Fails when under 5 s remain.
budget_timeout() {
  local want=$1 left=$((SECTION_END - SECONDS)) all=$((DEADLINE - SECONDS))
  ((all < left)) && left=$all
  ((left < 5)) && return 1
  ((want < left)) && left=$want
  echo "$left"
}
section_begin() { # name budget_s
  SECTION_NAME=$1
  SECTION_START=$SECONDS
  SECTION_END=$((SECONDS + $2))
  ((SECTION_END > DEADLINE)) && SECTION_END=$DEADLINE
  log ""
  log "=== $1 (budget $(( SECTION_END - SECONDS )) s, $(( SECONDS ))s elapsed) ==="
}
section_end() {
  TIMES+=("$SECTION_NAME: $((SECONDS - SECTION_START)) s")
  log "=== $SECTION_NAME done in $((SECONDS - SECTION_START)) s ==="
  render_summary running
}

# "MxKxN[:values[:exp]]" -> M K N VALUES EXP (exits non-zero when malformed)
parse_shape() {
  local spec=$1 dims values exp
  IFS=: read -r dims values exp <<<"$spec"
  [[ $dims =~ ^([0-9]+)x([0-9]+)x([0-9]+)$ ]] || return 1
  echo "${BASH_REMATCH[1]} ${BASH_REMATCH[2]} ${BASH_REMATCH[3]} ${values:-plain} ${exp:-60}"
}
gflop() { awk -v m="$1" -v k="$2" -v n="$3" 'BEGIN { printf "%.1f", 2 * m * k * n / 1e9 }'; }

# Exit status of `timeout`: 124 when it fired, 137 when it had to SIGKILL.
timed_out() { [ "$1" = 124 ] || [ "$1" = 137 ]; }

# Writes summary.md from the fragments; state is "running" or "final".
render_summary() {
  local state=$1 verdict
  if [ "$state" = running ]; then
    verdict="INCOMPLETE (still running, or cut off at ${SECONDS}s: later sections are missing)"
  elif [ ${#FAILS[@]} -gt 0 ]; then
    verdict="FAIL (${#FAILS[@]} failures, ${#WARNS[@]} warnings)"
  elif [ "$DRY_RUN" = 1 ]; then
    verdict="DRY RUN PASS (${#WARNS[@]} warnings; GPU parts not checked)"
  else
    verdict="PASS (${#WARNS[@]} warnings)"
  fi
  {
    echo "# lockstep GPU check"
    echo
    echo "**Verdict: $verdict**, ${SECONDS} s in all."
    echo
    if [ ${#FAILS[@]} -gt 0 ]; then
      echo "Failures:"
      printf -- '- %s\n' "${FAILS[@]}"
      echo
    fi
    if [ ${#WARNS[@]} -gt 0 ]; then
      echo "Warnings:"
      printf -- '- %s\n' "${WARNS[@]}"
      echo
    fi
    if [ ${#TIMES[@]} -gt 0 ]; then
      echo "Time per section: $(printf '%s; ' "${TIMES[@]}")"
      echo
    fi
    cat "$SUMDIR"/*.md 2>/dev/null
  } >"$SUMMARY"
}

# Keeps every file in $OUT under the device tool's 16 MiB: head and tail of
# anything larger.
cap_outputs() {
  local f size max=$((15 * 1048576)) half=$((7 * 1048576))
  for f in "$OUT"/*; do
    [ -f "$f" ] || continue
    size=$(stat -c %s "$f")
    if ((size > max)); then
      { head -c "$half" "$f"; printf '\n\n[... %d bytes cut by run.sh ...]\n\n' $((size - 2 * half)); tail -c "$half" "$f"; } >"$f.cut"
      mv "$f.cut" "$f"
    fi
  done
}

cleanup() { rm -rf "$WORK"; }

# ---------------------------------------------------------------- setup
mkdir -p "$OUT" || exit 1
rm -rf "$WORK"
mkdir -p "$WORK" "$SUMDIR" || exit 1
trap cleanup EXIT
: >"$RUN_LOG"
: >"$TESTS_LOG"
: >"$DIGESTS_LOG"
: >"$BENCH_JSONL"
: >"$SANITIZER_LOG"
: >"$MODEL_LOG"

section_begin setup 120
log "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
log "repo: $ROOT   pack: $PACK   out: $OUT   dry run: $DRY_RUN"

# The pack: plain files, or one pack.tar.xz that build.sh made when the
# plain files were over the device tool's limit.
if [ -f "$PACK/pack.tar.xz" ]; then
  log "unpacking $PACK/pack.tar.xz"
  mkdir -p "$WORK/pack"
  if ! tar -xJf "$PACK/pack.tar.xz" -C "$WORK/pack" 2>>"$RUN_LOG"; then
    # No xz binary: Python's lzma can read it.
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
      "$PACK/pack.tar.xz" "$WORK/pack" 2>>"$RUN_LOG" || log "could not unpack $PACK/pack.tar.xz"
  fi
  cp "$PACK"/manifest.tsv "$PACK"/pack-info.txt "$WORK/pack/" 2>/dev/null
  PACK=$WORK/pack
fi
LOCKSTEP=$PACK/bin/lockstep
GEN=$PACK/bin/lockstep-gen-operands
[ -f "$PACK/pack-info.txt" ] && log "$(sed 's/^/pack /' "$PACK/pack-info.txt")"
if [ ! -x "$LOCKSTEP" ] || [ ! -x "$GEN" ]; then
  fail "the pack lacks bin/lockstep or bin/lockstep-gen-operands: run benches/gpu/build.sh here and carry target/gpu-pack"
  render_summary final
  echo "GPU CHECK: FAIL (no pack)"
  exit 1
fi

# Is there a GPU?
HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  HAVE_GPU=1
  log "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1)"
else
  if [ "$DRY_RUN" = 1 ]; then
    warn "no GPU here (nvidia-smi absent or failing): dry run, CUDA parts skipped"
  else
    fail "no GPU: nvidia-smi is absent or fails (set GPU_CHECK_DRY_RUN=1 on a machine without one)"
  fi
fi

# Vulkan loaders carried as .deb files (the device README's recipe), unpacked
# into / only on the lent machine, never in a dry run.
if compgen -G ".gl/*.deb" >/dev/null; then
  if [ "$DRY_RUN" = 1 ]; then
    log "dry run: not unpacking .gl/*.deb into /"
  else
    for f in .gl/*.deb; do dpkg -x "$f" / >>"$RUN_LOG" 2>&1 || warn "dpkg -x $f failed"; done
    ldconfig >>"$RUN_LOG" 2>&1
    debs=(.gl/*.deb)
    log "unpacked ${#debs[@]} Vulkan/GL loader packages from .gl/"
  fi
fi
# The linker cache, read once (grep -q in a pipe under pipefail can fail on SIGPIPE).
LDCACHE=$(ldconfig -p 2>/dev/null)
grep -q 'libvulkan\.so' <<<"$LDCACHE" || warn "no libvulkan in ldconfig: wgpu will find no device (carry .gl, see README)"
# Without an NVIDIA ICD in the standard folders, point the loader at the driver's.
NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
icds=$(find /usr/share/vulkan/icd.d /etc/vulkan/icd.d -name '*.json' -printf '%f ' 2>/dev/null)
if [ -z "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ] && [ -f "$NV_ICD" ] && [[ $icds != *nvidia* ]]; then
  export VK_DRIVER_FILES=$NV_ICD
fi
log "VK_DRIVER_FILES=${VK_DRIVER_FILES:-} (ICDs in /usr/share/vulkan/icd.d, /etc/vulkan/icd.d: ${icds:-none})"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$WORK/xdg}
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

# CUDA libraries (cudarc loads libcuda, libnvrtc and libcublas at run time).
# NEVER put a stubs/ folder on the path: its fake libcuda.so is found before
# the driver's libcuda.so.1 and every call fails with CUDA_ERROR_STUB_LIBRARY.
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
ld_dirs=()
for d in "$CUDA_HOME/targets/x86_64-linux/lib" "$CUDA_HOME/lib64"; do
  if [ -d "$d" ]; then ld_dirs+=("$d"); break; fi
done
[ -d "$PACK/cuda/lib" ] && ld_dirs+=("$PACK/cuda/lib")
# A dry run here may use ./dev's pinned NVRTC.
[ "$DRY_RUN" = 1 ] && [ -d "$ROOT/.tools/root/nvidia/cu13/lib" ] && ld_dirs+=("$ROOT/.tools/root/nvidia/cu13/lib")
# The driver's libcuda.so.1 is normally in ldconfig; if not, its folder.
if ! grep -q 'libcuda\.so\.1' <<<"$LDCACHE" && [ -e /usr/local/nvidia/lib64/libcuda.so.1 ]; then
  ld_dirs+=(/usr/local/nvidia/lib64)
fi
has_lib() { # name: in one of ld_dirs, or known to ldconfig
  local d
  for d in "${ld_dirs[@]}"; do compgen -G "$d/$1*" >/dev/null && return 0; done
  grep -qF "$1" <<<"$LDCACHE"
}
# Fallback: the pip wheels of the image's Python (nvidia-cuda-nvrtc, nvidia-cublas).
if ! has_lib libnvrtc.so || ! has_lib libcublas.so; then
  while IFS= read -r d; do ld_dirs+=("$d"); done < <(
    python3 -c 'import nvidia, os; print("\n".join(nvidia.__path__))' 2>/dev/null |
      while IFS= read -r p; do find "$p" -maxdepth 3 \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' \) -printf '%h\n' 2>/dev/null; done | sort -u)
fi
old_ld=()
IFS=: read -r -a old_ld <<<"${LD_LIBRARY_PATH:-}"
new_ld=""
for d in "${ld_dirs[@]}" "${old_ld[@]}"; do
  [ -n "$d" ] || continue
  case "$d" in *stubs*) log "dropping $d from LD_LIBRARY_PATH (stub libcuda)"; continue ;; esac
  case ":$new_ld:" in *":$d:"*) continue ;; esac
  new_ld=${new_ld:+$new_ld:}$d
done
export LD_LIBRARY_PATH=$new_ld
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
for lib in libcuda.so.1 libnvrtc.so libnvrtc-builtins.so libcublas.so libvulkan.so.1; do
  if has_lib "$lib"; then log "  $lib: found"; else log "  $lib: NOT FOUND"; fi
done
if has_lib libnvrtc.so || [ "$DRY_RUN" != 1 ]; then export LOCKSTEP_REQUIRE_NVRTC=1; fi
for p in "$CUDA_HOME/bin/ptxas" "$PACK/cuda/bin/ptxas" "$ROOT/.tools/root/nvidia/cu13/bin/ptxas" "$(command -v ptxas 2>/dev/null)"; do
  if [ -n "$p" ] && [ -x "$p" ]; then export LOCKSTEP_PTXAS=$p; break; fi
done
# A CUDA test that cannot open the device fails instead of skipping.
[ "$DRY_RUN" = 1 ] || export LOCKSTEP_REQUIRE_CUDA=1

# nats-server for the system tests.
for p in "${LOCKSTEP_NATS_SERVER:-}" "$PACK/bin/nats-server" "$ROOT/.tools/bin/nats-server" "$(command -v nats-server 2>/dev/null)"; do
  if [ -n "$p" ] && [ -x "$p" ]; then
    export LOCKSTEP_NATS_SERVER=$p LOCKSTEP_REQUIRE_NATS=1
    break
  fi
done
[ -n "${LOCKSTEP_NATS_SERVER:-}" ] || warn "no nats-server in the pack: the system tests skip"
log "LOCKSTEP_PTXAS=${LOCKSTEP_PTXAS:-} LOCKSTEP_REQUIRE_NVRTC=${LOCKSTEP_REQUIRE_NVRTC:-} LOCKSTEP_REQUIRE_CUDA=${LOCKSTEP_REQUIRE_CUDA:-} LOCKSTEP_NATS_SERVER=${LOCKSTEP_NATS_SERVER:-}"

# The machine, for the summary.
gpu_line=$( ((HAVE_GPU)) && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n1)
cuda_ver=$("$CUDA_HOME/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
cpu_line="$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n1), $(nproc) cores"
log "cpu: $cpu_line   kernel: $(uname -r)   CUDA toolkit: ${cuda_ver:-none}"
log "lockstep: $("$LOCKSTEP" --version 2>&1)"
backends_txt=$(timeout -k 5 120 "$LOCKSTEP" backends 2>&1)
log "$backends_txt"
{
  echo "## Machine"
  echo
  echo "- GPU: ${gpu_line:-none}"
  echo "- CPU: $cpu_line; kernel $(uname -r); CUDA toolkit ${cuda_ver:-none}"
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); dry run: $DRY_RUN"
  [ -f "$PACK/pack-info.txt" ] && sed 's/^/- pack /' "$PACK/pack-info.txt"
  echo
  echo "\`lockstep backends\`:"
  echo
  echo '```'
  echo "$backends_txt"
  echo '```'
  echo
} >"$SUMDIR/00-machine.md"
((HAVE_GPU)) && ! grep -q '^cuda: ' <<<"$backends_txt" && warn "lockstep backends printed no cuda line"
((HAVE_GPU)) && grep -q '^cuda: absent' <<<"$backends_txt" && fail "lockstep backends: cuda absent on a GPU machine"
grep -q '^wgpu: absent' <<<"$backends_txt" && gap "lockstep backends: wgpu absent"
section_end

# ---------------------------------------------------------------- tests
run_tests() {
  section_begin tests "$TESTS_BUDGET"
  local frag=$SUMDIR/10-tests.md manifest=$PACK/manifest.tsv
  {
    echo "## Tests"
    echo
    echo "Each test executable of the pack, run from its package folder with \`$TEST_ARGS\`; 'skipped' counts SKIPPED lines (a device absent)."
    echo
    echo "| executable | result | passed | failed | ignored | skipped | time |"
    echo "|---|---|---:|---:|---:|---:|---:|"
  } >"$frag"
  if [ ! -f "$manifest" ]; then
    fail "tests: no manifest.tsv in the pack"
    return
  fi
  # The executables that exercise a GPU first (TEST_FIRST order), then the
  # rest in the manifest's order, so a tight budget cuts the CPU-only ones.
  local name pkg kind target cwd _count first rank lines=()
  while IFS=$'\t' read -r name pkg kind target cwd _count; do
    [ -z "$name" ] || [[ $name == \#* ]] && continue
    if [ -n "$ONLY_TESTS" ] && [[ " $ONLY_TESTS " != *" $name "* ]]; then continue; fi
    rank=50
    local r=0
    for first in $TEST_FIRST; do
      r=$((r + 1))
      [ "$first" = "$name" ] && rank=$r
    done
    lines+=("$(printf '%02d\t%s\t%s %s %s\t%s' "$rank" "$name" "$pkg" "$kind" "$target" "$cwd")")
  done <"$manifest"
  local what
  while IFS=$'\t' read -r rank name what cwd <&3; do
    run_test_exe "$name" "$what" "$cwd" >>"$frag"
    render_summary running # what is done so far survives a cut-off
  done 3< <(printf '%s\n' "${lines[@]}" | sort -s -t$'\t' -k1,1n)
  echo >>"$frag"
}

# One test executable (a serial rerun if it times out); prints its table row.
run_test_exe() {
  local name=$1 what=$2 cwd=$3 exe=$PACK/deps/$1 t rc start result serial_note=""
  if [ ! -x "$exe" ]; then
    fail "tests: $name is missing from the pack"
    echo "| \`$name\` | MISSING | | | | | |"
    return
  fi
  if ! t=$(budget_timeout "$TEST_TIMEOUT"); then
    gap "tests: $name not run (time budget)"
    echo "| \`$name\` | not run (time) | | | | | |"
    return
  fi
  local log=$WORK/test-$name.log
  start=$(now_ms)
  # shellcheck disable=SC2086 # TEST_ARGS is a list of words
  (cd "$ROOT/$cwd" 2>/dev/null || cd "$ROOT" || exit; exec timeout -k 10 "$t" "$exe" $TEST_ARGS) </dev/null >"$log" 2>&1
  rc=$?
  local secs
  secs=$(secs_since "$start")
  {
    echo "===== $name ($what) in $cwd/: exit $rc after $secs s (timeout $t s) ====="
    cat "$log"
    echo
  } >>"$TESTS_LOG"
  if timed_out "$rc"; then
    # A hang with parallel test threads (WGSL tests sharing one device, say):
    # once more, one test at a time.
    local t2
    if t2=$(budget_timeout "$TEST_TIMEOUT"); then
      local start2 rc2
      start2=$(now_ms)
      # shellcheck disable=SC2086
      (cd "$ROOT/$cwd" 2>/dev/null || cd "$ROOT" || exit; exec timeout -k 10 "$t2" "$exe" $TEST_ARGS --test-threads 1) </dev/null >"$log" 2>&1
      rc2=$?
      {
        echo "===== $name again with --test-threads 1: exit $rc2 after $(secs_since "$start2") s (timeout $t2 s) ====="
        cat "$log"
        echo
      } >>"$TESTS_LOG"
      if [ "$rc2" = 0 ]; then
        serial_note=" (timed out after $t s in parallel; passed with --test-threads 1)"
        warn "tests: $name timed out with parallel test threads, passed with --test-threads 1"
        rc=0
      else
        serial_note=" (timed out in parallel; --test-threads 1: exit $rc2)"
        rc=$rc2
      fi
      secs="$secs + $(secs_since "$start2")"
    else
      serial_note=" (timed out; no time left for a serial rerun)"
    fi
  fi
  local passed failed ignored skipped
  read -r passed failed ignored < <(awk '/^test result:/ { for (i = 2; i <= NF; i++) {
      if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) g += $(i-1) } }
      END { print p + 0, f + 0, g + 0 }' "$log")
  skipped=$(grep -c 'SKIPPED' "$log")
  if [ "$rc" = 0 ]; then
    result="PASS$serial_note"
  elif timed_out "$rc"; then
    result="TIMEOUT$serial_note"
    fail "tests: $name timed out$serial_note"
  else
    result="FAIL (exit $rc)$serial_note"
    # Names listed under libtest's closing "failures:" heading.
    local names
    names=$(awk '/^failures:$/ { on = 1; next } on && /^    [A-Za-z0-9_:]+$/ { print $1 } on && /^test result:/ { on = 0 }' "$log" | sort -u | head -n 12 | tr '\n' ' ')
    fail "tests: $name failed (exit $rc): ${names:-see tests.log}"
  fi
  # A CUDA test that skipped on a GPU machine did not test anything.
  # ("SKIPPED Cuda: …" from tests/lib.rs, "SKIPPED cuda: …" from tests/tests/cli.rs.)
  if ((HAVE_GPU)) && grep -qiE 'SKIPPED:? *cuda' "$log"; then
    gap "tests: $name skipped CUDA tests on a GPU machine ($(grep -m1 -iE 'SKIPPED:? *cuda' "$log" | cut -c1-200))"
  fi
  if ((HAVE_GPU)) && grep -qiE 'SKIPPED:? *(wgpu|Wgpu)' "$log"; then
    gap "tests: $name skipped WGSL tests on a GPU machine ($(grep -m1 -iE 'SKIPPED:? *wgpu' "$log" | cut -c1-200))"
  fi
  log "  $name: $result, $passed passed, $failed failed, $skipped skipped, ${secs} s"
  echo "| \`$name\` | $result | $passed | $failed | $ignored | $skipped | ${secs} s |"
}

# ---------------------------------------------------------------- digests
run_digests() {
  section_begin digests "$DIGESTS_BUDGET"
  local frag=$SUMDIR/20-digests.md b header sep
  header="| M×K×N | values | GFLOP |"
  sep="|---|---|---:|"
  for b in $BACKENDS; do header+=" $b |"; sep+="---|"; done
  {
    echo "## Digests"
    echo
    echo "The same operands through \`lockstep matmul --backend B\`; each cell: digest prefix, compute time (lockstep's own), wall time of the whole command. Verdict AGREE when every digest is the same."
    echo
    echo "$header verdict |"
    echo "$sep---|"
  } >"$frag"
  local spec i=0
  for spec in $SHAPES; do
    i=$((i + 1))
    digest_shape "$spec" $((1000 + i)) >>"$frag"
    render_summary running
  done
  echo >>"$frag"
}

# One shape through every backend; prints its table row.
digest_shape() {
  local spec=$1 seed=$2 m k n values exp gf ab=$WORK/ab.safetensors t rc start
  if ! read -r m k n values exp < <(parse_shape "$spec"); then
    fail "digests: bad shape '$spec' (want MxKxN:values[:exp])"
    return
  fi
  gf=$(gflop "$m" "$k" "$n")
  local row="| ${m}×${k}×${n} | $values | $gf |"
  log "  ${m}x${k}x${n} $values ($gf GFLOP)"
  if ! t=$(budget_timeout 120); then
    gap "digests: ${m}x${k}x${n} not run (time budget)"
    for _ in $BACKENDS; do row+=" |"; done
    echo "$row not run (time) |"
    return
  fi
  echo "===== ${m}x${k}x${n} $values (exp range $exp, seed $seed) =====" >>"$DIGESTS_LOG"
  timeout -k 5 "$t" "$GEN" --m "$m" --k "$k" --n "$n" --values "$values" --exp-range "$exp" --seed "$seed" --out "$ab" \
    </dev/null >>"$DIGESTS_LOG" 2>&1
  rc=$?
  if [ "$rc" != 0 ]; then
    fail "digests: the generator failed on $spec (exit $rc)"
    for _ in $BACKENDS; do row+=" |"; done
    echo "$row generator failed |"
    rm -f "$ab"
    return
  fi

  local -A digest=()
  local b out mm=$WORK/matmul.log cell
  for b in $BACKENDS; do
    out=$WORK/c-$b.safetensors
    if [ "$b" = cuda ] && ! ((HAVE_GPU)) && [ "$DRY_RUN" = 1 ]; then
      row+=" no GPU |"
      continue
    fi
    if [ "$b" = wgpu ]; then
      # Exact soft-float WGSL is slow: skip products above the cap, or ones
      # that would not fit the time left at the expected speed.
      if awk -v g="$gf" -v c="$WGPU_MAX_GFLOP" 'BEGIN { exit !(g > c) }'; then
        row+=" skipped (> ${WGPU_MAX_GFLOP} GFLOP) |"
        continue
      fi
      local need left
      need=$(awk -v g="$gf" -v s="$WGPU_GFLOPS" 'BEGIN { printf "%d", g / s * 1.2 + 10 }')
      left=$((SECTION_END - SECONDS))
      if ((need > left)); then
        warn "digests: wgpu skipped on ${m}x${k}x${n} (needs ~${need} s at ${WGPU_GFLOPS} GFLOP/s, ${left} s left)"
        row+=" skipped (time) |"
        continue
      fi
    fi
    if ! t=$(budget_timeout "$MATMUL_TIMEOUT"); then
      gap "digests: $b on ${m}x${k}x${n} not run (time budget)"
      row+=" not run (time) |"
      continue
    fi
    start=$(now_ms)
    timeout -k 5 "$t" "$LOCKSTEP" matmul --backend "$b" --input "$ab" --output "$out" </dev/null >"$mm" 2>&1
    rc=$?
    local wall d ktime
    wall=$(secs_since "$start")
    { echo "--- $b: exit $rc, $wall s wall (timeout $t s)"; cat "$mm"; } >>"$DIGESTS_LOG"
    d=$(grep -E '^sha3-256:[0-9a-f]+$' "$mm" | tail -n1)
    ktime=$(sed -nE 's/.* in ([0-9.]+) s \(([0-9.]+) GFLOP\/s\).*/\1 s, \2 GFLOP\/s/p' "$mm" | tail -n1)
    if [ "$rc" = 0 ] && [ -n "$d" ]; then
      digest[$b]=$d
      cell="\`${d:9:12}\` ${ktime:+$ktime, }${wall} s"
    elif timed_out "$rc"; then
      cell="TIMEOUT (${t} s)"
      if [ "$b" = cuda ]; then fail "digests: cuda timed out on ${m}x${k}x${n}"; else warn "digests: $b timed out on ${m}x${k}x${n} after $t s"; fi
    elif grep -q 'not usable here' "$mm" && [ "$b" != cuda ] && [ "$b" != cpu ]; then
      cell="absent"
      gap "digests: $b is not usable here: $(grep -m1 'not usable' "$mm")"
    elif grep -q 'not usable here' "$mm" && [ "$b" = cuda ] && [ "$DRY_RUN" = 1 ]; then
      cell="absent"
    else
      cell="ERROR (exit $rc)"
      fail "digests: $b failed on ${m}x${k}x${n} $values: $(grep -m1 -i 'error' "$mm" | cut -c1-200)"
    fi
    row+=" $cell |"
    log "    $b: ${d:-no digest} (exit $rc, $wall s)"
  done

  # Verdict: the CPU's digest is the reference, else the first present.
  local ref="" refb="" verdict
  for b in $BACKENDS; do
    if [ -n "${digest[$b]:-}" ]; then ref=${digest[$b]}; refb=$b; break; fi
  done
  [ -n "${digest[cpu]:-}" ] && ref=${digest[cpu]} && refb=cpu
  local n_ok=0 differ=()
  for b in "${!digest[@]}"; do
    if [ "${digest[$b]}" = "$ref" ]; then n_ok=$((n_ok + 1)); else differ+=("$b"); fi
  done
  if [ ${#digest[@]} = 0 ]; then
    verdict="no digests"
  elif [ ${#differ[@]} -gt 0 ]; then
    verdict="**DIFFER** (${differ[*]} vs $refb)"
    fail "digests: ${m}x${k}x${n} $values: ${differ[*]} differ from $refb"
    for b in "${differ[@]}"; do
      echo "--- $b against $refb, element by element:" >>"$DIGESTS_LOG"
      timeout -k 5 120 python3 "$HERE/st.py" compare "$WORK/c-$refb.safetensors" "$WORK/c-$b.safetensors" c \
        >>"$DIGESTS_LOG" 2>&1
    done
  elif [ "$n_ok" = 1 ]; then
    verdict="only $refb"
  else
    verdict="AGREE ($n_ok)"
  fi
  log "    -> $verdict"
  echo "$row $verdict |"
  rm -f "$ab" "$WORK"/c-*.safetensors
}

# ---------------------------------------------------------------- bench
run_bench() {
  section_begin bench "$BENCH_BUDGET"
  local frag=$SUMDIR/30-bench.md b spec m k n values exp t rc json
  for b in $BENCH_BACKENDS; do
    for spec in $BENCH_SHAPES; do
      if ! read -r m k n values exp < <(parse_shape "$spec"); then
        fail "bench: bad shape '$spec'"
        continue
      fi
      if ! t=$(budget_timeout "$BENCH_TIMEOUT"); then
        gap "bench: $b ${m}x${k}x${n} not run (time budget)"
        continue
      fi
      echo "--- bench $b ${m}x${k}x${n} (timeout $t s)" >>"$RUN_LOG"
      timeout -k 5 "$t" "$LOCKSTEP" bench matmul --backend "$b" --m "$m" --n "$n" --k "$k" \
        --reps "$BENCH_REPS" --json </dev/null >"$WORK/bench.out" 2>>"$RUN_LOG"
      rc=$?
      json=$(grep '^{' "$WORK/bench.out" | tail -n1)
      if [ "$rc" = 0 ] && [ -n "$json" ]; then
        echo "$json" >>"$BENCH_JSONL"
        log "  $b ${m}x${k}x${n}: $json"
      elif timed_out "$rc"; then
        fail "bench: $b ${m}x${k}x${n} timed out after $t s"
      else
        cat "$WORK/bench.out" >>"$RUN_LOG"
        fail "bench: $b ${m}x${k}x${n} failed (exit $rc, see run.log)"
      fi
    done
  done
  nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv >>"$RUN_LOG" 2>&1
  # The table, from bench.jsonl (fields of worker/src/bench.rs MatmulReport).
  {
    echo "## Bench"
    echo
    echo "\`lockstep bench matmul --reps $BENCH_REPS --json\`: medians of interleaved runs, lockstep against the fastest baseline (cuBLAS SGEMM on CUDA). Raw lines in bench.jsonl."
    echo
    python3 - "$BENCH_JSONL" <<'PY' || echo "(python3 could not render bench.jsonl)"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| backend | M×K×N | device | lockstep GFLOP/s | baseline | baseline GFLOP/s | ratio | all baselines |")
print("|---|---|---|---:|---|---:|---:|---|")
for r in rows:
    g = lambda key: r.get(key, float("nan"))
    others = ", ".join(f"{n} {v:.0f}" for n, v in r.get("baselines", []))
    print(f"| {r.get('backend')} | {r.get('m')}×{r.get('k')}×{r.get('n')} | {r.get('device', '')} "
          f"| {g('lockstep_gflops'):.1f} | {r.get('baseline', '')} | {g('baseline_gflops'):.1f} | {g('ratio'):.3f} | {others} |")
if not rows:
    print("| (no results) | | | | | | | |")
PY
    echo
  } >"$frag"
}

# ---------------------------------------------------------------- model
# One generation per model, sampling and backend; each backend's JSON result
# (ids, token digest, trace root) and full trace compared with the CPU's.
run_model() {
  section_begin model "$MODEL_BUDGET"
  local frag=$SUMDIR/35-model.md models=() m shape_model=$WORK/model-shape.bin
  for m in "$PACK"/models/*.bin; do [ -f "$m" ] && models+=("$m"); done
  if [ -x "$PACK/bin/lockstep-gen-model" ]; then
    local shape=$MODEL_SHAPE
    [ "$DRY_RUN" = 1 ] && shape=${GPU_CHECK_MODEL_SHAPE:-64,172,4,4,2,512,256}
    if "$PACK/bin/lockstep-gen-model" --shape "$shape" --seed 1 --out "$shape_model" >>"$MODEL_LOG" 2>&1; then
      models+=("$shape_model")
    else
      fail "model: lockstep-gen-model --shape $shape failed (see model.log)"
    fi
  else
    gap "model: the pack has no lockstep-gen-model (rebuild it with build.sh)"
  fi
  local heads="" b
  for b in $MODEL_BACKENDS; do heads+=" $b |"; done
  {
    echo "## Model"
    echo
    echo "\`lockstep generate --tokens … --max-tokens $MODEL_TOKENS --json --trace\` per model, sampling and backend; AGREE when the ids, token digest, trace root and every trace line equal the CPU's."
    echo
    echo "| model | sampling |$heads verdict |"
    echo "|---|---|$(for _ in $MODEL_BACKENDS; do printf -- '---|'; done)---|"
  } >"$frag"
  local sampling name t rc row verdict ref_json ref_trace out
  for m in "${models[@]}"; do
    name=$(basename "$m" .bin)
    for sampling in greedy sampled; do
      local extra=()
      [ "$sampling" = sampled ] && extra=(--temperature 0.9 --top-k 40 --seed 7)
      row="| $name | $sampling |"
      verdict=AGREE
      ref_json="" ref_trace=""
      for b in $MODEL_BACKENDS; do
        if [ "$b" = cuda ] && ! ((HAVE_GPU)); then row+=" no GPU |"; continue; fi
        if ! t=$(budget_timeout 120); then row+=" not run (time) |"; gap "model: $name $sampling on $b not run (time budget)"; continue; fi
        out=$WORK/gen-$b.json
        echo "===== $name $sampling $b =====" >>"$MODEL_LOG"
        local start
        start=$(now_ms)
        timeout -k 5 "$t" "$LOCKSTEP" generate --backend "$b" --model "$m" --tokens "1 300 301 45 7 90" \
          --max-tokens "$MODEL_TOKENS" --json --trace "$WORK/trace-$b.jsonl" "${extra[@]}" </dev/null >"$out" 2>>"$MODEL_LOG"
        rc=$?
        cat "$out" >>"$MODEL_LOG"
        if [ "$rc" != 0 ]; then
          row+=" **exit $rc** |"
          fail "model: lockstep generate --backend $b on $name ($sampling) exited $rc"
          verdict=FAIL
          continue
        fi
        row+=" $(python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).read().splitlines()[0]); print(r["token_digest"][9:21], len(r["tokens"]), "tokens")' "$out" 2>/dev/null), $(secs_since "$start") s |"
        if [ -z "$ref_json" ]; then
          ref_json=$out.ref ref_trace=$WORK/trace-ref.jsonl
          cp "$out" "$ref_json"; cp "$WORK/trace-$b.jsonl" "$ref_trace"
        elif ! cmp -s "$out" "$ref_json" || ! cmp -s "$WORK/trace-$b.jsonl" "$ref_trace"; then
          verdict=DIFFER
          fail "model: $b differs from the first backend on $name ($sampling)"
          diff <(cat "$ref_trace") "$WORK/trace-$b.jsonl" | head -n 6 >>"$MODEL_LOG"
        fi
      done
      echo "$row $verdict |" >>"$frag"
    done
  done
  # Speed: the device engines at batch 1 and 32 against the CPU engine in the
  # same run (bench generate fails if any engine's tokens differ).
  {
    echo
    echo "\`lockstep bench generate --backend B --batch $MODEL_BENCH_BATCH\` on $(basename "$shape_model" .bin) ($MODEL_SHAPE shape, F32 weights): decode tok/s over the batch; bandwidth is the batch-1 decode step's weight reads ÷ a device-to-device copy measured in the same run."
    echo
    echo "| backend | batch | prefill tok/s | decode tok/s | CPU decode tok/s | ratio | trace cost | weight GB/s | copy GB/s | fraction |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  } >>"$frag"
  for b in $MODEL_BACKENDS; do
    [ "$b" = cpu ] && continue
    if [ "$b" = cuda ] && ! ((HAVE_GPU)); then continue; fi
    [ -f "$shape_model" ] || break
    if ! t=$(budget_timeout 150); then gap "model: bench generate on $b not run (time budget)"; continue; fi
    local batch=$MODEL_BENCH_BATCH ptok=32 ntok=32
    if [ "$DRY_RUN" = 1 ] || [ "$b" = wgpu ]; then ptok=8 ntok=8; fi
    [ "$DRY_RUN" = 1 ] && batch=1,4
    echo "===== bench generate $b =====" >>"$MODEL_LOG"
    timeout -k 5 "$t" "$LOCKSTEP" bench generate --backend "$b" --model "$shape_model" --batch "$batch" \
      --prompt-tokens "$ptok" --tokens "$ntok" --json </dev/null >"$WORK/bench-$b.json" 2>>"$MODEL_LOG"
    rc=$?
    cat "$WORK/bench-$b.json" >>"$MODEL_LOG"
    if [ "$rc" != 0 ]; then
      fail "model: bench generate --backend $b exited $rc (see model.log)"
      continue
    fi
    python3 - "$WORK/bench-$b.json" >>"$frag" <<'PY' || warn "model: could not render bench generate --backend $b"
import json, sys
r = json.load(open(sys.argv[1]))
for d, c in zip(r["device_points"], r["cpu_points"]):
    tc = d.get("trace_cost")
    first = d["batch"] == r["device_points"][0]["batch"]
    print(f"| {r['backend']} | {d['batch']} | {d['prefill_tok_s']:.1f} | {d['decode_tok_s']:.1f} | {c['decode_tok_s']:.1f} "
          f"| {d['decode_tok_s'] / c['decode_tok_s']:.2f} | {'' if tc is None else f'{tc:.2f}'} "
          f"| {r['decode_weight_gb_s']:.1f} | {r['copy_gb_s']:.1f} | {r['bandwidth_fraction']:.2f} |" if first else
          f"| {r['backend']} | {d['batch']} | {d['prefill_tok_s']:.1f} | {d['decode_tok_s']:.1f} | {c['decode_tok_s']:.1f} "
          f"| {d['decode_tok_s'] / c['decode_tok_s']:.2f} | | | | |")
PY
  done
  echo >>"$frag"
  rm -f "$shape_model"
}

# ---------------------------------------------------------------- sanitizer
run_sanitizer() {
  section_begin sanitizer "$SANITIZER_BUDGET"
  local frag=$SUMDIR/40-sanitizer.md san="" p
  for p in "$CUDA_HOME/bin/compute-sanitizer" "$(command -v compute-sanitizer 2>/dev/null)"; do
    if [ -n "$p" ] && [ -x "$p" ]; then san=$p; break; fi
  done
  {
    echo "## compute-sanitizer"
    echo
  } >"$frag"
  if [ -z "$san" ]; then
    ((HAVE_GPU)) && warn "sanitizer: no compute-sanitizer found"
    echo "No compute-sanitizer found." >>"$frag"
    return
  fi
  if ! ((HAVE_GPU)); then
    echo "No GPU: not run." >>"$frag"
    return
  fi
  local tools="" tool
  for tool in $SANITIZER_TOOLS; do tools+=" $tool |"; done
  {
    echo "\`$san --tool T lockstep matmul --backend cuda\`; each cell: the tool's summary, and whether the digest matches the CPU's."
    echo
    echo "| M×K×N | values |$tools"
    echo "|---|---|$(for _ in $SANITIZER_TOOLS; do printf -- '---|'; done)"
  } >>"$frag"
  local spec i=0 m k n values exp t rc ab=$WORK/san-ab.safetensors ref row
  for spec in $SANITIZER_SHAPES; do
    i=$((i + 1))
    if ! read -r m k n values exp < <(parse_shape "$spec"); then
      fail "sanitizer: bad shape '$spec'"
      continue
    fi
    row="| ${m}×${k}×${n} | $values |"
    if ! t=$(budget_timeout 60); then
      gap "sanitizer: ${m}x${k}x${n} not run (time budget)"
      echo "$row not run (time) |" >>"$frag"
      continue
    fi
    echo "===== ${m}x${k}x${n} $values =====" >>"$SANITIZER_LOG"
    "$GEN" --m "$m" --k "$k" --n "$n" --values "$values" --exp-range "$exp" --seed $((2000 + i)) --out "$ab" >>"$SANITIZER_LOG" 2>&1
    ref=$(timeout -k 5 "$t" "$LOCKSTEP" matmul --backend cpu --input "$ab" --output "$WORK/san-c.safetensors" 2>>"$SANITIZER_LOG" </dev/null |
      grep -E '^sha3-256:' | tail -n1)
    echo "cpu: ${ref:-no digest}" >>"$SANITIZER_LOG"
    for tool in $SANITIZER_TOOLS; do
      if ! t=$(budget_timeout "$SANITIZER_TIMEOUT"); then
        row+=" not run (time) |"
        continue
      fi
      local slog=$WORK/san.log cell summary d
      timeout -k 5 "$t" "$san" --tool "$tool" --print-limit 20 \
        "$LOCKSTEP" matmul --backend cuda --input "$ab" --output "$WORK/san-c.safetensors" </dev/null >"$slog" 2>&1
      rc=$?
      { echo "--- $tool: exit $rc"; cat "$slog"; } >>"$SANITIZER_LOG"
      # "ERROR SUMMARY: 0 errors" (memcheck, initcheck, synccheck);
      # "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)".
      summary=$(grep -E '(ERROR|RACECHECK) SUMMARY:' "$slog" | tail -n1 | sed 's/^=* *//')
      d=$(grep -E '^sha3-256:' "$slog" | tail -n1)
      if timed_out "$rc"; then
        cell="TIMEOUT (${t} s)"
        warn "sanitizer: $tool timed out on ${m}x${k}x${n}"
      elif [ -z "$summary" ]; then
        cell="no summary (exit $rc)"
        warn "sanitizer: $tool printed no summary on ${m}x${k}x${n} (exit $rc): $(grep -m1 -iE 'error|not supported' "$slog" | cut -c1-160)"
      else
        cell=$summary
        if ! grep -qE 'SUMMARY: 0 (errors|hazards)' <<<"$summary" || grep -qE '\([1-9][0-9]* errors' <<<"$summary"; then
          fail "sanitizer: $tool on ${m}x${k}x${n}: $summary"
        fi
      fi
      if [ -n "$d" ] && [ -n "$ref" ]; then
        if [ "$d" = "$ref" ]; then cell+=", digest = cpu"; else cell+=", **digest ≠ cpu**"; fail "sanitizer: cuda digest differs from cpu on ${m}x${k}x${n} under $tool"; fi
      fi
      [ "$rc" != 0 ] && ! timed_out "$rc" && [ -n "$summary" ] && cell+=" (exit $rc)" &&
        fail "sanitizer: lockstep exited $rc under $tool on ${m}x${k}x${n}"
      row+=" $cell |"
      log "  $tool ${m}x${k}x${n}: $cell"
    done
    echo "$row" >>"$frag"
    rm -f "$ab" "$WORK/san-c.safetensors"
  done
  # The model's kernels (qmatmul, rmsnorm, rope, attention, swiglu, residual)
  # under the same tools: a short generation on a tiny trained model.
  local model=$PACK/models/stories260K.bin
  if ((SANITIZER_MODEL)) && [ -f "$model" ]; then
    row="| generate stories260K (6 tokens) | model |"
    local gref
    gref=$(timeout -k 5 60 "$LOCKSTEP" generate --backend cpu --model "$model" --tokens "1 300 301" --max-tokens 6 --json </dev/null 2>>"$SANITIZER_LOG")
    echo "cpu generate: ${gref:-none}" >>"$SANITIZER_LOG"
    for tool in $SANITIZER_TOOLS; do
      if ! t=$(budget_timeout "$SANITIZER_TIMEOUT"); then
        row+=" not run (time) |"
        gap "sanitizer: generate under $tool not run (time budget)"
        continue
      fi
      local slog=$WORK/san.log cell summary gout=$WORK/san-gen.json
      timeout -k 5 "$t" "$san" --tool "$tool" --print-limit 20 \
        "$LOCKSTEP" generate --backend cuda --model "$model" --tokens "1 300 301" --max-tokens 6 --json </dev/null >"$slog" 2>&1
      rc=$?
      { echo "--- generate $tool: exit $rc"; cat "$slog"; } >>"$SANITIZER_LOG"
      summary=$(grep -E '(ERROR|RACECHECK) SUMMARY:' "$slog" | tail -n1 | sed 's/^=* *//')
      grep -E '^\{' "$slog" | head -n1 >"$gout"
      if timed_out "$rc"; then
        cell="TIMEOUT (${t} s)"
        warn "sanitizer: $tool timed out on generate"
      elif [ -z "$summary" ]; then
        cell="no summary (exit $rc)"
        warn "sanitizer: $tool printed no summary on generate (exit $rc)"
      else
        cell=$summary
        if ! grep -qE 'SUMMARY: 0 (errors|hazards)' <<<"$summary" || grep -qE '\([1-9][0-9]* errors' <<<"$summary"; then
          fail "sanitizer: $tool on generate: $summary"
        fi
      fi
      if [ -n "$gref" ] && [ -s "$gout" ]; then
        if [ "$(cat "$gout")" = "$(head -n1 <<<"$gref")" ]; then cell+=", tokens = cpu"; else cell+=", **tokens ≠ cpu**"; fail "sanitizer: cuda generate differs from cpu under $tool"; fi
      fi
      [ "$rc" != 0 ] && ! timed_out "$rc" && [ -n "$summary" ] && cell+=" (exit $rc)" &&
        fail "sanitizer: lockstep generate exited $rc under $tool"
      row+=" $cell |"
      log "  $tool generate: $cell"
    done
    echo "$row" >>"$frag"
  fi
  echo >>"$frag"
}

# ---------------------------------------------------------------- main
run_section() { # name skip-var function
  if [ "${!2:-0}" = 1 ]; then
    log ""
    log "=== $1 skipped ($2=1) ==="
    TIMES+=("$1: skipped")
    return
  fi
  if ((DEADLINE - SECONDS < 10)); then
    gap "$1: not run (the ${BUDGET} s budget is spent)"
    TIMES+=("$1: no time")
    return
  fi
  "$3"
  section_end
}

run_section tests GPU_CHECK_SKIP_TESTS run_tests
run_section digests GPU_CHECK_SKIP_DIGESTS run_digests
run_section model GPU_CHECK_SKIP_MODEL run_model
run_section bench GPU_CHECK_SKIP_BENCH run_bench
run_section sanitizer GPU_CHECK_SKIP_SANITIZER run_sanitizer

render_summary final
cap_outputs
echo
cat "$SUMMARY"
echo
if [ ${#FAILS[@]} -gt 0 ]; then
  echo "GPU CHECK: FAIL (${#FAILS[@]} failures, ${#WARNS[@]} warnings) in ${SECONDS} s; files in $OUT"
  exit 1
fi
echo "GPU CHECK: PASS$([ "$DRY_RUN" = 1 ] && echo ' (dry run: GPU parts not checked)') (${#WARNS[@]} warnings) in ${SECONDS} s; files in $OUT"
exit 0
