export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv
timeout -k 5 200 python3 -m pytest -v -m gpu -p no:cacheprovider --durations=12 --timeout 120 tests/test_engine_gpu.py 2>&1 | tee $OUT/engine.log | grep -v "^$" | tail -45
timeout -k 5 150 python3 -m pytest -v -m gpu -p no:cacheprovider --durations=5 --timeout 60 $(cat gpu_ids.txt) 2>&1 | tee $OUT/kernels.log | grep -E "PASS|FAIL|ERROR|passed|failed|Error" | tail -40
