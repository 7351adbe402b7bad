python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
F='registered at|backend fallback|_fbgemm_torch_compat|cannot determine|\[0m|\[33m|WARNING:root|^ *$|is_fx_tracing'
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 benchmarks/train_e2e.py --device cuda --breakdown --sources synthetic-torch,columnar --steps 200 --json > $OUT/e2e.json 2> $OUT/e2e.err; echo e2e rc=$?; cat $OUT/e2e.json; echo; grep -Ev "$F" $OUT/e2e.err | tail -5
timeout 150 python3 .diag/e2e_prof.py 150 > $OUT/prof.txt 2> $OUT/prof.err; echo prof rc=$?; grep -Ev "$F" $OUT/prof.err | tail -5
timeout 45 python3 benchmarks/ps_device_bench.py --parts tables --table-rounds 3 --json > $OUT/tables.json 2>$OUT/tables.err; echo tables rc=$?; cat $OUT/tables.json; echo; grep -Ev "$F" $OUT/tables.err | tail -3
for i in 1 2; do
timeout 40 python3 benchmarks/ps_device_bench.py --parts step --json > $OUT/step_new$i.json 2>/dev/null; echo new$i; cat $OUT/step_new$i.json; echo
PYTHONPATH=/tmp/site:$PWD/.old timeout 40 python3 .old/benchmarks/ps_device_bench.py --parts step --json > $OUT/step_old$i.json 2>/dev/null; echo old$i; cat $OUT/step_old$i.json; echo
done
