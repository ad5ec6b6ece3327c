# QST design search for SST-2 on one GPU (issue 4), in one call: the frozen NF4 SmolLM2's states are computed once,
# PROCS processes train side networks on them (benchmarks/qst_explore.py, seconds a run) over the grid below with
# SEEDS seeds each until EXPLORE_SECS, then the TOP designs by mean dev accuracy run through the real pipeline
# (`python -m qft.bench.sst2 --methods qst`, benchmarks/sst2_gpu_runs.sh) once per seed in REAL_SEEDS.
# Run again on the same (warm) machine with GRID=none and other REAL_SEEDS: the same picks, more seeds.
# Expects the kit as sst2_gpu_runs.sh does (wheels in /tmp/site, /tmp/smollm2-a.part, /tmp/sst2, .kit/smollm2-b).
# Results: $OUT/qst-explore.tgz (the grid) and $OUT/sst2-runs.tgz (the real runs).
LIMIT=${LIMIT:-560}; PROCS=${PROCS:-6}; SEEDS=${SEEDS:-2}; TOP=${TOP:-4}; REAL_SEEDS=${REAL_SEEDS:-42,1}
EXPLORE_SECS=${EXPLORE_SECS:-260}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QFT_CACHE=/tmp/qftcache HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
export PYTHONFAULTHANDLER=1
Q=/tmp/qexplore; mkdir -p $Q /tmp/qftcache/gguf
G=/tmp/qftcache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s $G ] || cat /tmp/smollm2-a.part .kit/smollm2-b/part > $G
M=$(python3 -c "from qft.models import default_model_path; print(default_model_path())" 2>$Q/convert.log | tail -1)
E="python3 benchmarks/qst_explore.py --model $M --data /tmp/sst2 --cache /tmp/qst-states.pt"
B="lr=1e-3,gate_init=2"  # the CPU's best so far (84.2 over two seeds, against 83.4 at gate_init 0)
GRID=${GRID:-"
lr=1e-3 $B $B,gate_scale=10 lr=1e-3,gate_init=1 lr=5e-4,gate_init=2 lr=2e-3,gate_init=2 lr=1e-3,gate_init=3,gate_scale=10
lr=1e-3,readout=mean $B,readout=mean $B,gate_scale=10,readout=mean lr=5e-4,gate_init=2,readout=mean lr=2e-3,gate_init=2,readout=mean lr=1e-3,gate_init=1,readout=mean
lr=1e-3,readout=token+mean $B,readout=token+mean $B,gate_scale=10,readout=token+mean lr=5e-4,gate_init=2,readout=token+mean lr=2e-3,gate_init=2,readout=token+mean $B,readout=token+mean,uniform_attention=true
$B,input_norm=true $B,input_norm=true,readout=mean $B,input_norm=true,readout=token+mean lr=1e-3,input_norm=true $B,gate_scale=10,input_norm=true,readout=mean lr=5e-4,gate_init=2,input_norm=true,readout=mean
$B,readout=mean,dropout=0.1 $B,readout=mean,weight_decay=0.1 lr=2e-3,gate_init=2,readout=mean,dropout=0.1 $B,readout=mean,r=8 $B,readout=mean,r=32 $B,readout=mean,uniform_attention=true
$B,readout=mean,downsample=linear $B,readout=mean,downsample=pool lr=3e-3,gate_init=2,readout=mean,downsample=pool $B,readout=token+mean,dropout=0.1 $B,dropout=0.1 $B,readout=token+mean,r=8
"}
echo "model $M at $SECONDS s" >> $Q/main.log
$E > $Q/cache.log 2>&1  # the states, once
echo "states cached at $SECONDS s" >> $Q/main.log
if [ "$GRID" != none ]; then
  i=0
  while IFS= read -r line; do  # one process per grid line
    [ -n "$line" ] || continue
    timeout --preserve-status $((EXPLORE_SECS - SECONDS)) $E --runs "$line" --seeds $SEEDS --out $Q/explore-$i.json \
      > $Q/explore-$i.log 2>&1 &
    i=$((i + 1))
  done <<< "$GRID"
  wait
  echo "grid done at $SECONDS s" >> $Q/main.log
  python3 benchmarks/qst_explore.py --pick $TOP --merge $Q/explore-*.json > $Q/picked.txt
fi
tar czf $OUT/qst-explore.tgz -C $Q .
RUNS=$(python3 benchmarks/qst_explore.py --pick $TOP --merge $Q/explore-*.json --as-gpu-runs $REAL_SEEDS)
echo "real runs: $RUNS" >> $Q/main.log
RUNS="$RUNS" BENCH="" RUNS2="" GPU_TESTS="" LIMIT=$((LIMIT - SECONDS)) bash benchmarks/sst2_gpu_runs.sh
tar czf $OUT/qst-explore.tgz -C $Q .
