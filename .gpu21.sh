python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PWD
timeout 400 python3 .diag/e2e_variants.py 2> $OUT/err.txt; echo rc=$?; grep -v "replacing the metrics" $OUT/err.txt | grep -Ev 'registered at|backend fallback|_fbgemm_torch_compat|cannot determine|\[0m|\[33m|WARNING:root|^ *$|is_fx_tracing' | tail -5
