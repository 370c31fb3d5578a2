#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no Ray there): carried wheels, the GPU tests, the
# throughput check. Usage: bash benchmarks/gpu_check.sh [--compile] [gpu_check.py options]
set -uo pipefail
cd "$(dirname "$0")/.."
# The device tool returns only the output's tail: the whole log also lands in $OUT when it is set.
if [[ -n "${OUT:-}" && -d "$OUT" && -w "$OUT" ]]; then
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
    tee_pid=$!
    trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT  # the log is whole before the files go back
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
wheels=${PIQA_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    # `make gpu-wheels`: open_clip, its ftfy and wcwidth, timm 1.0.31 and retinaface-pytorch travel as
    # wheels (installed without deps).
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
        && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, timm, open_clip, retinaface.network; print('torch', torch.__version__, 'timm', timm.__version__, 'open_clip', open_clip.__version__)" \
    || { echo "== missing packages: run make gpu-wheels here and carry .whl"; exit 1; }
echo "== GPU tests"
timeout 300 python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_scorer.py tests/test_gpu_prep.py tests/test_actors.py
tests=$?
((tests == 0)) || echo "== GPU tests FAILED (exit ${tests}); the throughput check runs all the same"
# The whole run must end within 8 minutes: the throughput step gets what is left of 470 s. Its rows are
# printed flushed (PYTHONUNBUFFERED), so the figures measured before a stop stay in the log.
left=$((470 - SECONDS))
echo "== throughput (${left} s left)"
if ((left < 30)); then
    echo "== throughput skipped: only ${left} s left of 470"
    exit 1
fi
timeout --signal=INT --kill-after=15 "$left" python3 benchmarks/gpu_check.py "$@"
rc=$?
if ((rc == 124 || rc == 137)); then
    echo "== throughput stopped at the time limit (${left} s): the figures above are partial"
fi
((rc != 0 || tests == 0)) || rc=1  # pytest's own codes (124: its timeout) would read as something else here
echo "== gpu_check.sh exit ${rc} after ${SECONDS} s"
exit "$rc"
