# As run on a lent H200 on 2026-11-29 (torch 2.11 there). .whl/ held wheels of the project's pins that the
# machine's image lacks (diffusers 0.42.1, pydantic 2.14.4, pydantic-core, annotated-types, typing-inspection,
# peft 0.21.2, typing-extensions, importlib-metadata, lazy-importer); $OUT is the folder whose files came back here.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
timeout 200 python3 benchmarks/gpu_check.py --skip-sync --repeats 3 2>&1 | grep -v "should be kept in float32" | tee $OUT/gpu_check.log
