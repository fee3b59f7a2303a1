#!/usr/bin/env bash
# Every GPU check the open issues ask for, as one `device` run of under 10 minutes (issue 13: block
# sampler and flex on CUDA, bf16; issue 15: owt_* memory and batch sizes, step cost, bf16/flash;
# last, whether a block model's σ per block saves on a GPU what it saves on the CPU).
# Prepare here once: `bash scripts/device_wheels.sh`; then call the device tool with
#     command: bash benchmarks/gpu_session.sh     carry: [".whl"]     timeout_s: 600
# Most important first; each part has its own time limit. After each part everything so far is
# packed into $OUT/gpu_session.tgz (the device returns at most 8 files), so a run cut short keeps
# what finished: <part>.log and <part>/ (the results folder it wrote). Unpack into benchmarks/results/.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_session_out}
RES=/tmp/gpu_session
mkdir -p "$OUT" "$RES"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
rm -rf /tmp/site  # pip --target keeps an existing package: a rerun on a warm machine must not run old code
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site  # before the build: it uses the carried setuptools
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . || exit 1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning; print(torch.__version__, lightning.__version__, torch.cuda.get_device_name())"
} > "$RES/env.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run, log to NAME.log, copy the results folder it made, pack
    local name=$1 seconds=$2; shift 2
    local before; before=$(ls benchmarks/results)
    echo "== $name ($(date +%T))"
    timeout "$seconds" "$@" > "$RES/$name.log" 2>&1; echo "   exit $? ($(date +%T))"
    for made in $(comm -13 <(echo "$before") <(ls benchmarks/results)); do
        mkdir -p "$RES/$name" && cp -r benchmarks/results/"$made"/. "$RES/$name/"
        cat "$RES/$name/results.md" "$RES/$name/gpu_check.md" 2>/dev/null
    done
    tail -n 3 "$RES/$name.log"
    tar czf "$OUT/gpu_session.tgz" -C "$RES" .
}

part owt_fit 240 python3 benchmarks/owt_fit_check.py --doublings 0
part step_cost 100 python3 benchmarks/step_cost.py --device cuda --precision bf16-mixed --attn auto \
    --hidden 768 --layers 12 --heads 12 --length 1024 --batch 8 --steps 8 --repeats 2
part block_bf16 50 python3 benchmarks/block_sampler_speed.py --device cuda --bf16 --attn auto --without-plain \
    --steps 4 --batch 1 --repeats 2
part block_fp32 50 python3 benchmarks/block_sampler_speed.py --device cuda --without-plain --steps 4 --batch 1 --repeats 2
part gpu_check 60 python3 benchmarks/gpu_check.py --out benchmarks/results/gpu_check_session --batch 8 --repeats 5
part block_sigma 30 python3 benchmarks/block_sigma_cost.py --device cuda --bf16 --repeats 6
ls -R "$RES"
