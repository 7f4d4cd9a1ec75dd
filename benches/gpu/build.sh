#!/usr/bin/env bash
# benches/gpu/build.sh: build, HERE (no GPU needed), everything that
# benches/gpu/run.sh runs on the lent GPU machine, into target/gpu-pack/.
# run.sh builds nothing, so the pack must hold every executable it needs.
#
#   bash benches/gpu/build.sh
#
# Pack layout (what tests/lib.rs lockstep_bin() expects: a test executable at
# <dir>/deps/<exe> finds the CLI at <dir>/lockstep-e2e):
#   target/gpu-pack/bin/lockstep                 the CLI
#   target/gpu-pack/bin/lockstep-gen-operands    the operand generator
#   target/gpu-pack/bin/lockstep-gen-model       random-weight models of a given shape
#   target/gpu-pack/models/*.bin                 the tiny trained models from ../shared
#   target/gpu-pack/bin/nats-server              if .tools/bin/nats-server exists
#   target/gpu-pack/lockstep-e2e                 the CLI as the tests call it
#   target/gpu-pack/deps/<name>                  one test executable per test target
#   target/gpu-pack/manifest.tsv                 name, package, kind, target, cwd, tests
#   target/gpu-pack/pack-info.txt                commit, date, toolchain
#   target/gpu-pack/cuda/{bin,lib}/              only if GPU_PACK_CUDA asks for it
# When the stripped files exceed the limit, they go into one
# target/gpu-pack/pack.tar.xz instead (manifest and info stay beside it);
# run.sh unpacks it to /tmp on the GPU machine.
#
# Environment:
#   GPU_PACK_LIMIT_MIB=60       the most the pack may weigh (the device tool
#                               carries 64 MiB, working tree and .gl included)
#   GPU_PACK_COMPRESS=auto      auto: tar.xz only when over the limit; always; never
#   GPU_PACK_CUDA=              space-separated extras from .tools/root/nvidia/cu13:
#                               "ptxas" and/or "nvrtc" (large: ptxas ~36 MiB,
#                               libnvrtc ~105 MiB; the GPU machine has its own CUDA)
#   GPU_PACK_KEEP_EMPTY=0       1: also pack test executables that hold no tests
#   GPU_PACK_EXCLUDE=           test executables to leave out, by pack name ("system cli")
#   GPU_PACK_NATS=1             0: leave nats-server out (18 MiB; only the CPU-only system tests use it)
#   CARGO=cargo
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
PACK=$ROOT/target/gpu-pack
STAGE=$ROOT/target/gpu-pack.stage
LIMIT_MIB=${GPU_PACK_LIMIT_MIB:-60}
COMPRESS=${GPU_PACK_COMPRESS:-auto}
CUDA_EXTRAS=${GPU_PACK_CUDA:-}
KEEP_EMPTY=${GPU_PACK_KEEP_EMPTY:-0}
EXCLUDE=${GPU_PACK_EXCLUDE:-}
WITH_NATS=${GPU_PACK_NATS:-1}
CARGO=${CARGO:-cargo}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'build.sh: %s\n' "$*" >&2; exit 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

for tool in python3 strip; do
  command -v "$tool" >/dev/null || die "$tool is required"
done

rm -rf "$STAGE"
mkdir -p "$STAGE/bin" "$STAGE/deps"
# Cargo's output folder (CARGO_TARGET_DIR or build.target-dir may move it).
TARGET_DIR=$("$CARGO" metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

# 1. The CLI and the operand generator.
say "cargo build --release -p lockstep --bin lockstep"
"$CARGO" build --release -p lockstep --bin lockstep
say "cargo build --release -p lockstep-benches --bin lockstep-gen-operands --bin lockstep-gen-model"
"$CARGO" build --release -p lockstep-benches --bin lockstep-gen-operands --bin lockstep-gen-model
cp "$TARGET_DIR/release/lockstep" "$TARGET_DIR/release/lockstep-gen-operands" "$TARGET_DIR/release/lockstep-gen-model" "$STAGE/bin/"
# The tiny trained models (about 1 MiB each) for the model section.
mkdir -p "$STAGE/models"
for m in stories260K.bin aidreams260K.bin; do
  if [ -f "$ROOT/../shared/models/$m" ]; then cp "$ROOT/../shared/models/$m" "$STAGE/models/"; else echo "  no ../shared/models/$m: the model section will lack it"; fi
done

# 2. Every test executable of the workspace. Cargo prints one JSON object per
# artifact on stdout (progress and diagnostics go to stderr); fresh artifacts
# are reported too, so a second run of this script lists the same files.
say "cargo test --workspace --release --no-run"
artifacts=$STAGE/artifacts.jsonl
"$CARGO" test --workspace --release --no-run --message-format=json-render-diagnostics >"$artifacts"

# Picks the test executables (profile.test) and the lockstep-e2e binary; names
# each executable after its target ("system", "lockstep_kernels-lib",
# "lockstep-bin"...), and records the package folder, which cargo test uses as
# the working directory.
python3 - "$artifacts" "$ROOT" >"$STAGE/artifacts.tsv" <<'PY'
import json, os, sys
path, root = sys.argv[1], sys.argv[2]
seen, names = set(), set()
for line in open(path):
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    exe, t = m["executable"], m["target"]
    if exe in seen:
        continue
    seen.add(exe)
    cwd = os.path.relpath(os.path.dirname(m["manifest_path"]), root)
    # "path+file:///w/tests#lockstep-tests@0.1.0" (cargo >= 1.77) or "lockstep-tests 0.1.0 (path+...)".
    pid = m["package_id"]
    pkg = pid.rsplit("#", 1)[-1].split("@")[0] if "#" in pid else pid.split(" ")[0]
    kind = t["kind"][0]
    if m["profile"]["test"]:
        name = t["name"] if kind == "test" else f"{t['name']}-{kind}"
        if name in names:
            name = f"{pkg}-{name}"
        names.add(name)
        print("\t".join(["test", name, pkg, kind, t["name"], cwd, exe]))
    elif t["name"] == "lockstep-e2e":
        print("\t".join(["e2e", "lockstep-e2e", pkg, kind, t["name"], cwd, exe]))
PY

grep -q "^e2e" "$STAGE/artifacts.tsv" || die "cargo test built no lockstep-e2e binary (tests/Cargo.toml [[bin]])"
printf '# name\tpackage\tkind\ttarget\tcwd\ttests\n' >"$STAGE/manifest.tsv"
while IFS=$'\t' read -r what name pkg kind target cwd exe; do
  if [ "$what" = e2e ]; then
    cp "$exe" "$STAGE/lockstep-e2e"
    continue
  fi
  # `--list` prints one "<name>: test" line per test and runs nothing.
  count=$("$exe" --list 2>/dev/null | grep -c ': test$' || true)
  if [ "$count" = 0 ] && [ "$KEEP_EMPTY" != 1 ]; then
    echo "  skipping $name ($pkg $kind $target): no tests"
    continue
  fi
  if [[ " $EXCLUDE " == *" $name "* ]]; then
    echo "  leaving out $name ($pkg $kind $target, $count tests): GPU_PACK_EXCLUDE"
    continue
  fi
  cp "$exe" "$STAGE/deps/$name"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$pkg" "$kind" "$target" "$cwd" "$count" >>"$STAGE/manifest.tsv"
  echo "  $name: $count tests ($pkg $kind $target, runs in $cwd/)"
done <"$STAGE/artifacts.tsv"
rm -f "$STAGE/artifacts.jsonl" "$STAGE/artifacts.tsv"

# 3. Strip debug info and symbols (the release profile keeps line tables).
say "strip"
strip "$STAGE"/bin/* "$STAGE"/lockstep-e2e "$STAGE"/deps/*

# 4. nats-server for the system tests (a static Go binary: not stripped).
if [ "$WITH_NATS" != 1 ]; then
  echo "  nats-server left out (GPU_PACK_NATS=0): the system tests will skip there"
elif [ -x .tools/bin/nats-server ]; then
  cp .tools/bin/nats-server "$STAGE/bin/"
else
  echo "  no .tools/bin/nats-server (./dev setup fetches it): the system tests will skip there"
fi

# 5. Optional CUDA pieces. The GPU machine has CUDA 13 under /usr/local/cuda
# (libnvrtc in targets/x86_64-linux/lib, ptxas in bin/), which run.sh prefers.
cu=.tools/root/nvidia/cu13
for extra in $CUDA_EXTRAS; do
  [ -d "$cu" ] || die "GPU_PACK_CUDA=$CUDA_EXTRAS but $cu is missing (./dev setup)"
  case "$extra" in
    ptxas) mkdir -p "$STAGE/cuda/bin" && cp "$cu/bin/ptxas" "$STAGE/cuda/bin/" ;;
    nvrtc) mkdir -p "$STAGE/cuda/lib" && cp -P "$cu"/lib/libnvrtc.so* "$cu"/lib/libnvrtc-builtins.so* "$STAGE/cuda/lib/" ;;
    *) die "GPU_PACK_CUDA: unknown piece '$extra' (ptxas, nvrtc)" ;;
  esac
done

{
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -n) ($(uname -m))"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' + uncommitted changes')"
  echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
  echo "glibc: $(ldd --version 2>/dev/null | head -n1)"
} >"$STAGE/pack-info.txt"

# 6. Size check, compressing when needed.
raw=$(du -sb "$STAGE" | cut -f1)
limit=$((LIMIT_MIB * 1048576))
say "pack: $(mib "$raw") MiB stripped, limit $LIMIT_MIB MiB"
(cd "$STAGE" && find . -type f -printf '%s\t%p\n' | sort -rn | awk -F'\t' '{ printf "  %8.1f MiB  %s\n", $1 / 1048576, $2 }')

rm -rf "$PACK"
if [ "$COMPRESS" = always ] || { [ "$COMPRESS" = auto ] && [ "$raw" -gt "$limit" ]; }; then
  say "compressing into pack.tar.xz (xz -9, one stream: the executables share most of their code)"
  mkdir -p "$PACK"
  HAS_CUDA=""
  if [ -d "$STAGE/cuda" ]; then HAS_CUDA=1; fi
  # The two builds of the CLI first, side by side, then the test executables:
  # near-identical files within xz's 64 MiB window cost little.
  (cd "$STAGE" && { echo bin/lockstep; echo lockstep-e2e; find bin deps models ${HAS_CUDA:+cuda} -type f | grep -vx bin/lockstep | sort; } |
    tar -cf - --owner=0 --group=0 -T - | xz -9 -T0 >"$PACK/pack.tar.xz")
  cp "$STAGE/manifest.tsv" "$STAGE/pack-info.txt" "$PACK/"
  rm -rf "$STAGE"
else
  mv "$STAGE" "$PACK"
fi
total=$(du -sb "$PACK" | cut -f1)
say "target/gpu-pack: $(mib "$total") MiB"
extra=0
[ -d .gl ] && extra=$(du -sb .gl | cut -f1) && echo "  plus .gl (Vulkan loaders): $(mib "$extra") MiB"
if [ "$total" -gt "$limit" ]; then
  die "the pack is $(mib "$total") MiB, over GPU_PACK_LIMIT_MIB=$LIMIT_MIB (drop GPU_PACK_CUDA pieces, or set GPU_PACK_COMPRESS=always)"
fi
if [ $((total + extra)) -gt $((63 * 1048576)) ]; then
  echo "  warning: pack + .gl = $(mib $((total + extra))) MiB; the device tool carries at most 64 MiB with the working tree" >&2
fi
echo
echo "Next, one device call from the repo root:"
echo "  command: bash benches/gpu/run.sh    carry: [\"target/gpu-pack\", \".gl\"]    timeout_s: 600"
