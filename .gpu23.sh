python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
F='registered at|backend fallback|_fbgemm_torch_compat|cannot determine|\[0m|\[33m|WARNING:root|^ *$|is_fx_tracing|replacing the metrics'
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/data/test_synthetic_torch.py::test_cuda_graph_replays_the_eager_samples tests/data/test_columnar.py::test_cuda_device_gets_batches_on_the_gpu tests/trainer/test_synthetic_torch_training.py 2>&1 | tail -2
timeout 330 python3 benchmarks/train_e2e.py --device cuda --sources synthetic-torch,columnar --steps 300 --rounds 2 --json > $OUT/new.json 2> $OUT/new.err; echo new rc=$?; cat $OUT/new.json; echo; grep -Ev "$F" $OUT/new.err | tail -5
