#!/usr/bin/env bash
# Profile the driver and the actor while bench_small_shards.py runs its small-shard set (docs/scale.md,
# "Where the rest of the gap goes"). Needs py-spy (`pip install py-spy`, not a project dependency) and the
# permission to attach to processes (ptrace). Extra arguments go to bench_small_shards.py.
#
#   benchmarks/profile_small_shards.sh OUTDIR [--idle]     # then read OUTDIR/actor.txt, OUTDIR/driver.txt
#
# The profiles are py-spy's raw format (collapsed stacks, one line per stack with its sample count): e.g.
# `grep -c` a function, or feed them to a flamegraph tool. With --idle they include threads that wait.
set -euo pipefail
out=$1
shift
idle=()
if [[ ${1:-} == --idle ]]; then
    idle=(--idle)
    shift
fi
mkdir -p "$out"
: >"$out/bench.txt"
python benchmarks/bench_small_shards.py --preset tiny --images 512 --big 256 --small 2 "$@" >"$out/bench.txt" 2>&1 &
bench=$!
# the big-shard set runs first: wait for its result line, then for an actor that was not there before
while kill -0 "$bench" 2>/dev/null && ! grep -q "256-image shards" "$out/bench.txt"; do sleep 0.2; done
before=" $(pgrep -f '^ray::EncoderActor' | tr '\n' ' ' || true) "
while kill -0 "$bench" 2>/dev/null; do
    for pid in $(pgrep -f '^ray::EncoderActor' || true); do
        if [[ $before != *" $pid "* ]]; then
            py-spy record -p "$pid" -r 100 -f raw "${idle[@]}" -o "$out/actor.txt" -d 600 --nonblocking >/dev/null 2>&1 &
            py-spy record -p "$bench" -r 100 -f raw "${idle[@]}" -o "$out/driver.txt" -d 600 --nonblocking >/dev/null 2>&1 &
            wait
            cat "$out/bench.txt"
            exit 0
        fi
    done
    sleep 0.1
done
cat "$out/bench.txt"
echo "no small-shard actor seen" >&2
exit 1
