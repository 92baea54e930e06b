# As run on a lent H200 on 2026-11-29 (torch 2.11 there). .whl/ held wheels of the project's pins that the
# machine's image lacks (diffusers 0.42.1, pydantic 2.14.4, pydantic-core, annotated-types, typing-inspection,
# peft 0.21.2, typing-extensions, importlib-metadata, lazy-importer); $OUT is the folder whose files came back here.
# One device session: gpu_check (FLUX-size sampler, LoRA + FSDP learner, gradient-noise buffer), the gloo weight
# sync of FLUX.1-dev's transformer, and the tiny task's throughput on the GPU. Each part has its own timeout.
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
python3 -c "import torch, diffusers, pydantic, peft, transformers; print('versions', torch.__version__, diffusers.__version__, pydantic.__version__, peft.__version__, transformers.__version__)"
echo "== gpu_check"; date +%s
timeout ${GPU_CHECK_S:-240} python3 benchmarks/gpu_check.py --skip-sync --repeats 3 2>&1 | grep -v "should be kept in float32" | tee $OUT/gpu_check.log
echo "== weight sync (gloo)"; date +%s
timeout ${SYNC_S:-90} python3 -c "
import json, sys, torch
sys.path.insert(0, 'benchmarks')
import gpu_check as g
print(json.dumps({'phase': 'weight_sync_gloo', **g.weight_sync_two_processes(g.FLUX_DEV, torch.device('cuda'), 'gloo')}))
" 2>&1 | tee $OUT/weight_sync.log
echo "== tiny task throughput"; date +%s
timeout ${TP_S:-100} python3 benchmarks/compare_strategies.py run --out /tmp/tp --device cuda --workers 16 --budget 6000 \
    --seeds 8 --lrs 1e-5 --only egrpo --draws 1 2>&1 | tee $OUT/throughput.log
date +%s
