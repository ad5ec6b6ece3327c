# SST-2 quality runs on one GPU (SmolLM2-135M-Instruct, ../shared/DATA.md protocol) in parallel processes,
# plus the optimizer-state benchmark (memory only, so parallel runs do not disturb it). Expects the kit laid
# out as in ../shared/gpu (wheels in /tmp/site, /tmp/smollm2-a.part, /tmp/sst2). RUNS picks the jobs:
#   qst spiel peqa3 peqa2 (300 steps), mezo1 mezo5 smezo1 smezo5 (MeZO / Sparse-MeZO curves, label-word
#   objective, lr 1e-6 / 5e-6, as many steps as fit in LIMIT seconds), optim.
# The ZO jobs keep checkpoints in /tmp/work: the same command again, while the machine is still warm, continues
# them from where the time limit stopped them (the curve so far is read back from /tmp/res).
# Results (JSON + logs) end up in $OUT/sst2-runs.tgz. Each process gets 2 CPU threads: nine processes with
# torch's default (all cores each) starved one another on the first try.
RUNS=${RUNS:-"qst spiel peqa3 peqa2 mezo1 mezo5 smezo1 smezo5 optim"}
LIMIT=${LIMIT:-470}
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QFT_CACHE=/tmp/qftcache HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
G=/tmp/qftcache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/qftcache/gguf /tmp/res /tmp/work
[ -s $G ] || cat /tmp/smollm2-a.part .kit/smollm2-b/part > $G
M=$(python3 -c "from qft.models import default_model_path; print(default_model_path())" 2>/tmp/res/convert.log | tail -1)
echo "model $M at $SECONDS s" > /tmp/res/main.log
R="timeout $LIMIT python3 -m qft.bench.sst2 --model $M --data /tmp/sst2 --steps"
Z="20000 --curve-every 500 --zo-objective label-words --work /tmp/work"
for job in $RUNS; do
  case $job in
    qst) $R 300 --methods qst --out /tmp/res/qst.json > /tmp/res/qst.log 2>&1 & ;;
    spiel) $R 300 --methods spiel --option spiel:density=lora:8 --out /tmp/res/spiel.json > /tmp/res/spiel.log 2>&1 & ;;
    peqa3) $R 300 --methods peqa --option peqa:bits=3 --out /tmp/res/peqa3.json > /tmp/res/peqa3.log 2>&1 & ;;
    peqa2) $R 300 --methods peqa --option peqa:bits=2 --out /tmp/res/peqa2.json > /tmp/res/peqa2.log 2>&1 & ;;
    mezo1) $R $Z --methods mezo --lr mezo=1e-6 --out /tmp/res/mezo-1e-6.json > /tmp/res/mezo-1e-6.log 2>&1 & ;;
    mezo5) $R $Z --methods mezo --lr mezo=5e-6 --out /tmp/res/mezo-5e-6.json > /tmp/res/mezo-5e-6.log 2>&1 & ;;
    smezo1) $R $Z --methods sparse-mezo --lr sparse-mezo=1e-6 --out /tmp/res/smezo-1e-6.json > /tmp/res/smezo-1e-6.log 2>&1 & ;;
    smezo5) $R $Z --methods sparse-mezo --lr sparse-mezo=5e-6 --out /tmp/res/smezo-5e-6.json > /tmp/res/smezo-5e-6.log 2>&1 & ;;
    optim) QFT_BENCH_DIR=/tmp timeout 400 python3 -m qft.cli bench optim --shape tinyllama-1.1b \
             --out /tmp/res/optim-tinyllama-1.1b.json > /tmp/res/optim-1.1b.log 2>&1 & ;;
  esac
done
wait
echo "done at $SECONDS s" >> /tmp/res/main.log
nvidia-smi --query-gpu=name --format=csv >> /tmp/res/main.log
tar czf $OUT/sst2-runs.tgz -C /tmp/res .
