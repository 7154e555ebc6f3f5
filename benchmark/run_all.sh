#!/usr/bin/env bash
# Run every performance benchmark in benchmark/perf/ one after the other, each printing its figures
# side by side with the peer its issue names, and keep the full output of each under $OUT.
#
#   benchmark/run_all.sh            # full sizes (tens of minutes on 2 cores)
#   benchmark/run_all.sh --quick    # small sizes (a few minutes)
#
# Benchmarks share the machine's cores: run this on an otherwise idle machine, or the ratios (which
# are measured within one run of each script) stay valid but the absolute figures do not.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-.bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
status=0
for script in benchmark/perf/bench_*.py; do
  name="$(basename "$script" .py)"
  echo "=== $name $* (output: $OUT/$name.txt)"
  start=$(date +%s)
  if "$PY" "$script" "$@" >"$OUT/$name.txt" 2>&1; then
    echo "    ok in $(( $(date +%s) - start )) s"
  else
    echo "    FAILED (exit $?) in $(( $(date +%s) - start )) s; see $OUT/$name.txt"
    status=1
  fi
  tail -n 25 "$OUT/$name.txt" | sed 's/^/    /'
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime)"
exit $status
