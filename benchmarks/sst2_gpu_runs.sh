# SST-2 quality runs on one GPU (SmolLM2-135M-Instruct, ../shared/DATA.md protocol), all in parallel processes:
# QST, SpIEL at LoRA r8 count, PEQA 3/2-bit (300 steps) and MeZO / Sparse-MeZO curves (label-word objective,
# two learning rates each, as many steps as fit in the time limit). Expects the kit laid out as in ../shared/gpu.
# Also the optimizer-state benchmark (memory only, so parallel runs do not disturb it).
# Results (JSON + logs) end up in $OUT/sst2-runs.tgz.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QFT_CACHE=/tmp/qftcache HF_HUB_OFFLINE=1
mkdir -p /tmp/qftcache/gguf /tmp/res && cat /tmp/smollm2-a.part .kit/smollm2-b/part > /tmp/qftcache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
M=$(python3 -c "from qft.models import default_model_path; print(default_model_path())" 2>/tmp/res/convert.log | tail -1)
echo "model $M at $SECONDS s" > /tmp/res/main.log
R="python3 -m qft.bench.sst2 --model $M --data /tmp/sst2 --steps"
Z="20000 --curve-every 1000 --zo-objective label-words"
timeout 470 $R 300 --methods qst --out /tmp/res/qst.json > /tmp/res/qst.log 2>&1 &
timeout 470 $R 300 --methods spiel --option spiel:density=lora:8 --out /tmp/res/spiel.json > /tmp/res/spiel.log 2>&1 &
timeout 470 $R 300 --methods peqa --option peqa:bits=3 --out /tmp/res/peqa3.json > /tmp/res/peqa3.log 2>&1 &
timeout 470 $R 300 --methods peqa --option peqa:bits=2 --out /tmp/res/peqa2.json > /tmp/res/peqa2.log 2>&1 &
timeout 470 $R $Z --methods mezo --lr mezo=1e-6 --out /tmp/res/mezo-1e-6.json > /tmp/res/mezo-1e-6.log 2>&1 &
timeout 470 $R $Z --methods mezo --lr mezo=5e-6 --out /tmp/res/mezo-5e-6.json > /tmp/res/mezo-5e-6.log 2>&1 &
timeout 470 $R $Z --methods sparse-mezo --lr sparse-mezo=1e-6 --out /tmp/res/smezo-1e-6.json > /tmp/res/smezo-1e-6.log 2>&1 &
QFT_BENCH_DIR=/tmp timeout 400 python3 -m qft.cli bench optim --shape tinyllama-1.1b --out /tmp/res/optim-tinyllama-1.1b.json > /tmp/res/optim-1.1b.log 2>&1 &
timeout 470 $R $Z --methods sparse-mezo --lr sparse-mezo=5e-6 --out /tmp/res/smezo-5e-6.json > /tmp/res/smezo-5e-6.log 2>&1 &
wait
echo "done at $SECONDS s" >> /tmp/res/main.log
nvidia-smi --query-gpu=name --format=csv >> /tmp/res/main.log
tar czf $OUT/sst2-runs.tgz -C /tmp/res .
