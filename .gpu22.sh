python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
F='registered at|backend fallback|_fbgemm_torch_compat|cannot determine|\[0m|\[33m|WARNING:root|^ *$|is_fx_tracing|replacing the metrics'
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/data/test_synthetic_torch.py tests/data/test_columnar.py tests/trainer/test_synthetic_torch_training.py tests/trainer/test_pipeline.py -k "cuda or graph or gpu" 2>&1 | tail -3
timeout 150 python3 .diag/e2e_variants.py 2> $OUT/v.err; echo rc=$?; grep -Ev "$F" $OUT/v.err | tail -5
timeout 300 python3 benchmarks/train_e2e.py --device cuda --sources synthetic-torch,columnar --steps 300 --rounds 2 --json > $OUT/new.json 2> $OUT/new.err; echo new rc=$?; cat $OUT/new.json; echo; grep -Ev "$F" $OUT/new.err | tail -5
