#!/bin/bash
# The GPU check on the device machine; DEVELOPERS.md gives each device call (command, carry, timeout).
#   bash benchmarks/gpu_check.sh 1         stage 1: gpu_check.py --stage 1 (install fastdino, kernel tests, the
#                                          train-step table, loss / head / EMA, then GPU tests, quality run, ...)
#   bash benchmarks/gpu_check.sh part K    stage 2, calls 1..: append DALI part K (carried .gpu_data/dali/cK) to
#                                          /tmp/dali.tar (K = 0 starts it)
#   bash benchmarks/gpu_check.sh 2 K       stage 2, last call: append the last part K, check and install DALI into
#                                          /tmp/site, then gpu_check.py --stage 2 (DALI tests, pipeline, end to end
#                                          from JPEG)
# /tmp lasts only while the machine stays warm (30 s after a call): the part calls go back to back, each checks
# that the parts before it are all there. Results go to $OUT (gpu_check.md, .json, .log); the table prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

append_part() {  # K: append .gpu_data/dali/cK/part if /tmp/dali.tar holds exactly the parts before it
  local k=$1 dir=.gpu_data/dali/c$1 have
  [ -f "$dir/part" ] || { echo "DALI part $k: $dir/part was not carried"; return 1; }
  [ "$k" = 0 ] && rm -f /tmp/dali.tar
  have=$(stat -c %s /tmp/dali.tar 2>/dev/null || echo 0)
  if [ "$have" != "$(cat "$dir/offset")" ]; then
    echo "DALI part $k: /tmp/dali.tar holds $have bytes, not the $(cat "$dir/offset") of parts 0..$((k - 1))" \
         "(the machine was given back between calls): start stage 2 again from part 0"
    return 1
  fi
  cat "$dir/part" >> /tmp/dali.tar && echo "DALI part $k appended: $(stat -c %s /tmp/dali.tar) bytes"
}

case "${1:-}" in
  1)
    exec python3 benchmarks/gpu_check.py --stage 1 ;;  # into $OUT (else a temporary folder)
  part)
    append_part "${2:?part number}" ;;
  2)
    k=${2:?number of the last part}
    if append_part "$k" && echo "$(cat ".gpu_data/dali/c$k/SHA256")  /tmp/dali.tar" | sha256sum -c --quiet; then
      rm -rf /tmp/wheels /tmp/site && tar -C /tmp -xf /tmp/dali.tar &&
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      python3 -c "import nvidia.dali as d; print('DALI', d.__version__)"
    else
      echo "DALI is incomplete in /tmp/dali.tar: stage 2 runs without it, and its DALI steps fail"
    fi
    exec python3 benchmarks/gpu_check.py --stage 2 ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh 1 | part K | 2 K" >&2; exit 2 ;;
esac
