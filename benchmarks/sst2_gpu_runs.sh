# SST-2 quality runs on one GPU (SmolLM2-135M-Instruct, ../shared/DATA.md protocol) in parallel processes,
# plus, optionally, the 8B-shape speed benchmarks on another GPU. Expects the kit laid out as in ../shared/gpu
# (wheels in /tmp/site, /tmp/smollm2-a.part, /tmp/sst2). RUNS picks the jobs, each NAME or NAME:LR:
#   qst spiel peqa3 peqa2 (300 steps), mezo smezo (MeZO / Sparse-MeZO curves, label-word objective,
#   ZSTEPS-step cosine schedule, as many steps as fit in LIMIT seconds), optim (optimizer-state benchmark).
#   e.g. RUNS="qst spiel:1e-3 mezo:1e-5 smezo:2e-5"
# Carrying the kit (session 10: the working tree plus .kit/wheels and .kit/smollm2-a passed the 64 MiB limit):
# .kit/wheels with .kit/sst2 in the first call, .kit/smollm2-a alone in a second, .kit/smollm2-b with this script.
# Session 12: the tree had grown past what a 47 MB half leaves room for; benchmarks/kit_chunks.sh cuts the model into
# .kit/zc1..zc3 instead: carry zc1 and zc2 alone (`cp .kit/zcN/part /tmp/zcN.part`), zc3 with this script.
# BENCH="qst peqa mezo" runs `qft bench SUITE --shape llama3-8b` one after another on GPU BENCH_GPU while the
# SST-2 jobs use GPU SST2_GPU (give both the same number on a one-GPU machine; the speed ratios then suffer);
# SUITE:PATH,PATH runs only those paths. RUNS2 jobs start on BENCH_GPU once the benchmarks are done.
# GPU_TESTS="tests/x.py ..." runs those tests on BENCH_GPU first (log: gpu-tests.log).
# qst|mezo|smezo:LR:KEY=VALUE,KEY=VALUE passes finetune options to the job (e.g. qst:3e-3:downsample=pool,seed=1,
# mezo:1e-5:zo_distribution=rank1,zo_paired=true). max_steps=N gives one ZO run its own schedule (ZSTEPS is the
# default): session 11 continued an 8,000-step run beside new 5,000- and 3,000-step ones in the same calls.
# The ZO jobs keep checkpoints in /tmp/work: the same command again, while the machine is still warm, continues
# them from where the time limit stopped them (the curve so far is read back from /tmp/res).
# The machine stays warm only 30 s after a call: send the continuing call at once (in session 6 a later one found a
# fresh machine and every checkpoint was gone). Five processes ran about 5-7 steps/s each on the H200; in
# session 7, four with zo_paired=true: MeZO about 9 steps/s, Sparse-MeZO about 5.
# Session 11, rank1 paired: four processes 5-6 steps/s each (q = 2: 4), two about 7 (a 3,000-step run took ~470 s).
# Session 13, rank1 paired, six processes: 2,000 steps each in 360-420 s (MeZO 5.5 steps/s, Sparse-MeZO 5), all
# six done 475 s into the call (LIMIT=540, the call's timeout 570; the model's conversion took 35-55 s of it).
# RESTORE=DIR (an extracted sst2-runs.tgz, carried, or one committed: benchmarks/results/session7/sst2) continues
# its ZO runs on a fresh machine: each run's newest checkpoint is kept in the results without its weights (light/),
# and `--resume auto` rebuilds them by replaying the run's seeds and projected gradients (bit-exact on the same
# kind of GPU).
# LIMIT counts from the script's start (the model conversion included): keep it 30 s under the call's limit.
# Results (JSON + logs) end up in $OUT/sst2-runs.tgz. Each process gets 2 CPU threads: nine processes with
# torch's default (all cores each) starved one another on the first try.
RUNS=${RUNS:-"qst spiel peqa3 peqa2 mezo:1e-6 mezo:5e-6 smezo:1e-6 smezo:5e-6 optim"}
LIMIT=${LIMIT:-470}
ZSTEPS=${ZSTEPS:-20000}
SST2_GPU=${SST2_GPU:-0}
BENCH_GPU=${BENCH_GPU:-0}
# PYTHONFAULTHANDLER: a crash (segfault, abort) leaves its traceback in the job's log. In sessions 5-7 a MeZO process
# now and then ended at the time limit's SIGTERM without saving or printing anything (Sparse-MeZO ones never did);
# each job's exit status now goes into main.log too
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QFT_CACHE=/tmp/qftcache HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
export PYTHONFAULTHANDLER=1
G=/tmp/qftcache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/qftcache/gguf /tmp/res /tmp/work
if [ -n "$RESTORE" ]; then  # an extracted sst2-runs.tgz of an earlier machine: its ZO runs continue from there
  [ -d "$RESTORE/light" ] && cp -rn "$RESTORE"/light/. /tmp/work/  # weightless checkpoints: rebuilt by replay
  for f in "$RESTORE"/*.json; do [ -e "$f" ] && cp -n "$f" /tmp/res/; done  # their curves so far
fi
for c in .kit/zc[0-9]/part; do [ -e "$c" ] && cp "$c" /tmp/$(basename "$(dirname "$c")").part; done
if [ ! -s $G ]; then  # the model's chunks (kit_chunks.sh) in order, or the kit's two halves
  if [ -e /tmp/zc1.part ]; then cat /tmp/zc[0-9].part > $G; else cat /tmp/smollm2-a.part .kit/smollm2-b/part > $G; fi ||
    { rm -f $G; echo "sst2_gpu_runs: the model's parts are missing (/tmp/zc1.part... or /tmp/smollm2-a.part);" \
        "fix: carry each chunk in a call of its own first (benchmarks/kit_chunks.sh)" >&2; exit 1; }
fi
M=$(python3 -c "from qft.models import default_model_path; print(default_model_path())" 2>/tmp/res/convert.log | tail -1)
echo "model $M at $SECONDS s" >> /tmp/res/main.log
P="python3 -m qft.bench.sst2 --model $M --data /tmp/sst2 --steps"
# ZO runs also save a checkpoint every 1,000 steps: twice on the H200 a MeZO process ended at the time limit's SIGTERM
# without saving (or printing) anything, where the Sparse-MeZO processes beside it saved as they should
Z="$ZSTEPS --curve-every 500 --zo-objective label-words --option mezo:save_steps=1000 --option sparse-mezo:save_steps=1000"
opts() { for kv in ${opt//,/ }; do printf -- '--option %s:%s ' "$1" "$kv"; done; }  # mezo:LR:K=V,K=V options
job() {  # job RUN GPU: start one SST-2 job (NAME, NAME:LR or qst:LR:KEY=VALUE) in the background on GPU GPU
  local job=${1%%:*} lr=${1#*:} opt=""; [ "$lr" = "$1" ] && lr=""
  case $lr in *:*) opt=${lr#*:}; lr=${lr%%:*} ;; esac
  # --foreground: the job alone gets the SIGTERM, not its process group a second time (session 9: three of six
  # processes ended silently at the SIGTERM; each now also logs "qft: SIGTERM received" when its handler runs)
  local name=$job${lr:+-$lr}${opt:+-$opt} R="timeout --foreground --preserve-status $((LIMIT - SECONDS)) $P"
  export CUDA_VISIBLE_DEVICES=$2
  case $job in
    qst) $R 300 --methods qst ${lr:+--lr qst=$lr} $(opts qst) --out /tmp/res/$name.json \
           > /tmp/res/$name.log 2>&1 & ;;
    spiel) $R 300 --methods spiel ${lr:+--lr spiel=$lr} --option spiel:density=lora:8 --out /tmp/res/$name.json \
             > /tmp/res/$name.log 2>&1 & ;;
    peqa3) $R 300 --methods peqa --option peqa:bits=3 --out /tmp/res/$name.json > /tmp/res/$name.log 2>&1 & ;;
    peqa2) $R 300 --methods peqa --option peqa:bits=2 --out /tmp/res/$name.json > /tmp/res/$name.log 2>&1 & ;;
    mezo) $R $Z --work /tmp/work/$name --methods mezo --lr mezo=${lr:-5e-6} $(opts mezo) --out /tmp/res/$name.json > /tmp/res/$name.log 2>&1 & ;;
    smezo) $R $Z --work /tmp/work/$name --methods sparse-mezo --lr sparse-mezo=${lr:-5e-6} \
             $(opts sparse-mezo) --out /tmp/res/$name.json \
             > /tmp/res/$name.log 2>&1 & ;;
    optim) QFT_BENCH_DIR=/tmp timeout 400 python3 -m qft.cli bench optim --shape tinyllama-1.1b \
             --out /tmp/res/optim-tinyllama-1.1b.json > /tmp/res/optim-1.1b.log 2>&1 & ;;
    *) return ;;
  esac
  PIDS+=("$!:$name")
}
PIDS=()
for run in $RUNS; do job $run $SST2_GPU; done
for entry in "${PIDS[@]}"; do  # 0: finished, or stopped and saved (its log says which); 143: killed by the SIGTERM
  # without handling it; 139 or 134: crashed (PYTHONFAULTHANDLER put the traceback in its log)
  wait "${entry%%:*}"; echo "${entry#*:} exit $? at $SECONDS s" >> /tmp/res/main.log
done
if [ -n "$BENCH$RUNS2$GPU_TESTS" ]; then
  (export CUDA_VISIBLE_DEVICES=$BENCH_GPU QFT_BENCH_DIR=/tmp
   [ -n "$GPU_TESTS" ] && timeout 200 python3 -m pytest -q -p no:cacheprovider $GPU_TESTS > /tmp/res/gpu-tests.log 2>&1
   for spec in $BENCH; do  # SUITE or SUITE:PATH,PATH
     suite=${spec%%:*}; paths=${spec#*:}; [ "$paths" = "$spec" ] && paths=""
     [ -s /tmp/res/$suite-llama3-8b.json ] && continue  # done in an earlier call
     timeout $((LIMIT - SECONDS)) python3 -m qft.cli bench $suite --shape llama3-8b ${paths:+--paths $paths} \
       --out /tmp/res/$suite-llama3-8b.json > /tmp/res/$suite-8b.log 2>&1
   done
   for run in $RUNS2; do job $run $BENCH_GPU; done  # after the benchmarks, on their GPU
   wait) &
fi
wait
# each ZO run's newest checkpoint without its weights (under 1 MB for 8,000 steps: optimizer.pt holds every step's
# seeds, projected gradients and rates, from which ZoSGD.replay rebuilds the weights on the same kind of GPU)
for c in /tmp/work/*/*/checkpoints; do
  last=$(ls -d $c/checkpoint-* 2>/dev/null | awk -F'checkpoint-' '{print $NF" "$0}' | sort -n | tail -1 | cut -d' ' -f2)
  [ -n "$last" ] || continue
  d=/tmp/res/light/${c#/tmp/work/}/$(basename "$last"); mkdir -p "$d"  # light/NAME/METHOD/checkpoints/checkpoint-N
  cp "$last"/optimizer.pt "$last"/trainer_state.json "$last"/scheduler.pt "$last"/rng_state*.pth "$d"/ 2>/dev/null
done
echo "done at $SECONDS s" >> /tmp/res/main.log
nvidia-smi --query-gpu=name --format=csv >> /tmp/res/main.log
tar czf $OUT/sst2-runs.tgz -C /tmp/res .
