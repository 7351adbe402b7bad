python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
F='registered at|backend fallback|_fbgemm_torch_compat|cannot determine|\[0m|\[33m|WARNING:root|^ *$|is_fx_tracing|replacing the metrics'
nvidia-smi --query-gpu=name --format=csv,noheader

timeout 300 python3 benchmarks/train_e2e.py --device cuda --sources synthetic-torch,columnar --steps 300 --rounds 2 --json > $OUT/new.json 2> $OUT/new.err; echo new rc=$?; cat $OUT/new.json; echo; grep -Ev "$F" $OUT/new.err | tail -5

cd .ab2 && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 benchmarks/train_e2e.py --device cuda --sources synthetic-torch,columnar --steps 300 --json > $OUT/old.json 2> $OUT/old.err; echo old rc=$?; cat $OUT/old.json; echo; grep -Ev "$F" $OUT/old.err | tail -5
