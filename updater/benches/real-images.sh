#!/usr/bin/env bash
# Issue 5's delta case on real images: two builds of images/host.toml where v2 adds one small
# Debian package (tree) to packages.include, then the apply bench's part 3 on them: the bytes
# caisson-update puts on the wire for 1.0.0 -> 2.0.0 against the full payload, and zsync and
# casync rebuilding the same v2 root from the same v1 root.
#
#   updater/benches/real-images.sh [WORK_DIR]    # default target/real-images
#
# WORK_DIR must be inside this checkout: the builder finds the workspace above a spec to build
# the image's own binaries.
# Too heavy for ci/bench (two image builds, a few minutes each on a warm package cache). Needs
# what `caisson build` needs (ci/deps) and zsync + casync (`apt-get install zsync casync`).
# The bench re-bundles the roots with the current bundle code, so the builds can be reused
# across changes to the chunking: APPLY_BENCH_REAL=WORK_DIR with APPLY_BENCH_THROUGHPUT=0
# APPLY_BENCH_DELTA=0 runs part 3 alone.
set -euo pipefail

ws="$(cd "$(dirname "$0")/../.." && pwd)"
work="${1:-$ws/target/real-images}"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1700000000}"
cd "$ws"
caisson="$(ci/build)/caisson"

mkdir -p "$work"
for v in v1 v2; do
  rm -rf "$work/spec-$v" "$work/$v"
  mkdir -p "$work/spec-$v"
  cp -r images/host.toml images/host.lock images/host "$work/spec-$v/"
done
sed -i 's/^include = \[\(.*\)\]$/include = [\1, "tree"]/' "$work/spec-v2/host.toml"
grep -q '"tree"\]$' "$work/spec-v2/host.toml" || { echo "could not add tree to packages.include" >&2; exit 1; }
"$caisson" lock "$work/spec-v2/host.toml"
# v2 must differ by the one package: every package v1 pins, v2 pins at the same version.
pins() { grep -E '^(name|version) = ' "$1" | paste -d' ' - - | sort; }
if [ -n "$(comm -23 <(pins "$work/spec-v1/host.lock") <(pins "$work/spec-v2/host.lock"))" ]; then
  echo "the mirror moved: v2's lock changes more than the added package:" >&2
  comm -3 <(pins "$work/spec-v1/host.lock") <(pins "$work/spec-v2/host.lock") >&2
  exit 1
fi
echo "v2 adds: $(comm -13 <(pins "$work/spec-v1/host.lock") <(pins "$work/spec-v2/host.lock") | tr '\n' ' ')"

"$caisson" build "$work/spec-v1/host.toml" --out "$work/v1" --locked --version 1.0.0
"$caisson" build "$work/spec-v2/host.toml" --out "$work/v2" --locked --version 2.0.0
uptime
APPLY_BENCH_REAL="$work" APPLY_BENCH_THROUGHPUT=0 APPLY_BENCH_DELTA=0 \
  cargo bench --locked -p caisson-update --bench apply
uptime
