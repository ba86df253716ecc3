#!/bin/bash
# The accelerator measurements of the README's "Accelerator step" table, on one GPU:
#   bash scripts/gpu_benchmark.sh OUTDIR [steps]
# The paper's "1B" and Llama-3.2-1B at seq 2048 in bf16 (float32 parameters and AdamW
# state), with cuDNN flash attention (the configs' default on a GPU) and with the XLA
# attention (8 rows and remat dots_no_batch: with dots it keeps the [B, H, L, L] scores and
# runs out of memory), one microbatch and the microbatched global batch; then replay/MER overheads
# on the "560M" model (all five methods' states must fit at once). Each run writes
# OUTDIR/<name>.json and .log; a failing run (out of memory, say) is reported and the
# others go on. Prints a summary last.
set -u
out=${1:?usage: gpu_benchmark.sh OUTDIR [steps]}; steps=${2:-5}
mkdir -p "$out"
run() {  # name, then benchmark.py arguments
  local name=$1; shift
  timeout 300 python scripts/benchmark.py "$@" --steps "$steps" --warmup 2 \
      --json "$out/$name.json" >"$out/$name.log" 2>&1 || echo "$name failed: $(tail -1 "$out/$name.log")"
}
run 1b_flash_b16 --config configs/llama_1b.py --config.global_batch=16 --config.microbatches=1
run 1b_xla_b8 --config configs/llama_1b.py --config.global_batch=8 --config.microbatches=1 --config.model.attention=xla --config.model.remat=dots_no_batch
run 1b_flash_b64_mb4 --config configs/llama_1b.py --config.global_batch=64 --config.microbatches=4
run l32_flash_b16 --config configs/llama_3_2_1b.py --config.global_batch=16 --config.microbatches=1
run l32_xla_b8 --config configs/llama_3_2_1b.py --config.global_batch=8 --config.microbatches=1 --config.model.attention=xla --config.model.remat=dots_no_batch
run 560m_methods_b8 --config configs/llama_560m.py --config.global_batch=8 --methods plain,replay,agem,reptile,mer
python - "$out" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    if "tokens_per_s" in r:
        print(f"{f.stem:<18} {r['tokens_per_s']:>7.0f} tok/s  step {r['step_s_median']:.3f} s  "
              f"MFU {r.get('mfu_datasheet_bf16', float('nan')):.3f} of the datasheet bf16 peak, "
              f"{r['mfu']:.3f} of the measured {r['matmul_peak_tflops_per_s']:.0f} TFLOP/s  "
              f"peak {r.get('device_peak_bytes', 0) / 2**30:.1f} GiB  {r['attention']} {r['remat']}")
    else:
        for m, v in r.items():
            print(f"{f.stem:<18} {m:<8} step {v['step_s_median']:.4f} s  time ratio "
                  f"{v['time_ratio']:.3f}  extra parameter copies {v['extra_param_copies']:.2f}")
PY
