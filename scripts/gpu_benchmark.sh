#!/bin/bash
# The accelerator measurements of the README's "Accelerator step" section, on one GPU:
#   bash scripts/gpu_benchmark.sh [--dry_run] [--extra] OUTDIR [steps]
# The issue's set, each run under a time limit so that the whole set stays under 8 minutes
# (100 + 100 + 200 + 60 s at most): the paper's "1B" and Llama-3.2-1B at 16 x 2048 in bf16
# (float32 parameters and AdamW state) with cuDNN flash attention (the configs' default on
# a GPU); the replay, A-GEM, Reptile and MER step-time ratios against plain training on the
# "560M" model at 8 x 2048 (all five methods' states must fit at once); greedy decode
# tokens/s of the 1B model. --extra adds the README table's other rows (XLA attention at 8
# rows with remat dots_no_batch: with dots it keeps the [B, H, L, L] scores and runs out of
# memory; the 64-row batch in 4 microbatches), 300 s each.
# Each run writes OUTDIR/<name>.json and .log; a failing run (out of memory, a time limit)
# is reported and the others go on. Last, OUTDIR/gpu_benchmark.json holds every run's
# result (or its failure) and a summary is printed.
#
# --dry_run checks the script on a CPU without running anything heavy: the script's bash
# syntax, every run's benchmark.py arguments exactly as a run passes them (parsed by
# benchmark.py's own parser, the config file loaded with its --config.KEY=VALUE overrides,
# the model config resolved, the --methods names known), and the summary's Python; it
# exits non-zero naming the first run whose arguments fail.
set -u
cd "$(dirname "$0")/.." || exit 1
dry_run=0; extra=0
while [ $# -gt 0 ]; do
  case $1 in
    --dry_run) dry_run=1; shift ;;
    --extra) extra=1; shift ;;
    *) break ;;
  esac
done
out=${1:?usage: gpu_benchmark.sh [--dry_run] [--extra] OUTDIR [steps]}; steps=${2:-5}
mkdir -p "$out"
failed=0

check() {  # every recorded run's benchmark.py arguments, parsed as benchmark.py would
  python - "$1" <<'PY'
import importlib.util, os, pathlib, sys
spec = importlib.util.spec_from_file_location("benchmark", os.path.join("scripts", "benchmark.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
from cpt_jax import pretrained
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.args")):
    name, *argv = f.read_bytes().decode().split("\0")[:-1]
    try:
        args = bench.parse_args(argv)  # argparse, the config file and its overrides
        mcfg = pretrained.model_config(args.config)
        for m in args.methods:
            bench.method_config(args.config, m, args.replay_rate, args.reptile_every)
        c = args.config
        if c.global_batch % c.microbatches:
            raise ValueError(f"global_batch {c.global_batch} not divisible by microbatches "
                             f"{c.microbatches}")
    except (Exception, SystemExit) as e:
        sys.exit(f"{name}: arguments rejected: {type(e).__name__}: {e}")
    what = "decode" if args.generate else ("methods " + ",".join(args.methods) if args.methods
                                           else "step")
    print(f"ok {name}: {what}, {mcfg.num_params() / 1e9:.2f}B params, {c.global_batch} x "
          f"{c.seq_len}, microbatches {c.microbatches}, attention {mcfg.attention}, "
          f"remat {mcfg.remat}, dtype {mcfg.dtype}")
PY
}

runs=0
checks=$(mktemp -d)
run() {  # name, time limit (s), then benchmark.py arguments
  local name=$1 limit=$2; shift 2
  local args=("$@" --steps "$steps" --warmup 2 --json "$out/$name.json")
  runs=$((runs + 1))
  if [ "$dry_run" = 1 ]; then  # recorded, checked at the end in one process
    printf '%s\0' "$name" "${args[@]}" >"$checks/$(printf %02d $runs).args"
    return
  fi
  timeout "$limit" python scripts/benchmark.py "${args[@]}" >"$out/$name.log" 2>&1 \
      || echo "$name failed: $(tail -1 "$out/$name.log")"
}

if [ "$dry_run" = 1 ]; then
  bash -n "$0" || exit 1
  echo "ok bash syntax of $0"
fi
run 1b_flash_b16 100 --config configs/llama_1b.py --config.global_batch=16 --config.microbatches=1
run l32_flash_b16 100 --config configs/llama_3_2_1b.py --config.global_batch=16 --config.microbatches=1
run 560m_methods_b8 200 --config configs/llama_560m.py --config.global_batch=8 --config.microbatches=1 --methods plain,replay,agem,reptile,mer
run 1b_decode 60 --config configs/llama_1b.py --generate --decode_batch 8 --prompt_len 128 --new_tokens 128
if [ "$extra" = 1 ]; then
  run 1b_xla_b8 300 --config configs/llama_1b.py --config.global_batch=8 --config.microbatches=1 --config.model.attention=xla --config.model.remat=dots_no_batch
  run 1b_flash_b64_mb4 300 --config configs/llama_1b.py --config.global_batch=64 --config.microbatches=4
  run l32_xla_b8 300 --config configs/llama_3_2_1b.py --config.global_batch=8 --config.microbatches=1 --config.model.attention=xla --config.model.remat=dots_no_batch
fi

summary() {
  python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
every = {}
for f in sorted(out.glob("*.json")):
    if f.name == "gpu_benchmark.json":
        continue
    r = every[f.stem] = json.loads(f.read_text())
    if "tokens_per_s" in r:
        print(f"{f.stem:<18} {r['tokens_per_s']:>7.0f} tok/s  step {r['step_s_median']:.3f} s  "
              f"MFU {r.get('mfu_datasheet_bf16', float('nan')):.3f} of the datasheet bf16 peak, "
              f"{r['mfu']:.3f} of the measured {r['matmul_peak_tflops_per_s']:.0f} TFLOP/s  "
              f"peak {r.get('device_peak_bytes', 0) / 2**30:.1f} GiB  {r['attention']} {r['remat']}")
    elif "ours" in r and "new_tokens_per_s" in r["ours"]:
        print(f"{f.stem:<18} {r['ours']['new_tokens_per_s']:>7.0f} new tok/s  prefill "
              f"{r['ours']['prefill_s']:.3f} s  batch {r['batch']}")
    else:
        for m, v in r.items():
            print(f"{f.stem:<18} {m:<8} step {v['step_s_median']:.4f} s  time ratio "
                  f"{v['time_ratio']:.3f}  extra parameter copies {v['extra_param_copies']:.2f}"
                  f"  dot ops {v.get('dot_ops', '?')} (log step {v.get('dot_ops_log_step', '?')})")
for f in sorted(out.glob("*.log")):  # runs that left a log but no result
    if f.stem not in every:
        lines = f.read_text().strip().splitlines()
        every[f.stem] = {"failed": lines[-1] if lines else "no output"}
        print(f"{f.stem:<18} failed: {every[f.stem]['failed']}")
(out / "gpu_benchmark.json").write_text(json.dumps(every, indent=1))
PY
}

if [ "$dry_run" = 1 ]; then
  check "$checks" || failed=1
  rm -rf "$checks"
  # the summary's Python, over an empty folder (nothing was run)
  summary_dir=$(mktemp -d); out_saved=$out; out=$summary_dir
  summary >/dev/null || failed=1
  [ -f "$summary_dir/gpu_benchmark.json" ] && echo "ok summary" || failed=1
  rm -rf "$summary_dir"; out=$out_saved
  exit $failed
fi
rm -rf "$checks"
summary
