set -u; OUT=$1; export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1; unset TRITON_INTERPRET
python3 -m pip install -q --no-deps --no-build-isolation -e . > $OUT/install.log 2>&1 || echo "install failed"
cd bench && timeout -s INT 150 python3 probe_h200.py $OUT/probe.jsonl --n 20000 > $OUT/probe.log 2>&1; echo "probe rc=$?"
cut -c1-400 $OUT/probe.jsonl
