#!/usr/bin/env bash
# The fair method comparison on the bundled task (issue 15), resumable at every stage (interrupt it and run it
# again): 1) learning-rate probes of every method on the dev split (benchmarks/method_tuning.sh); 2) each method
# at its best probe setting for the same example-forward budget, 2 seeds, dev and test curves
# (sweeps/final_<method>.yaml, written by `method_comparison.py plan`); 3) the report:
# benchmarks/results/method_comparison.{json,png} and the final sweeps' summaries under benchmarks/results/sweeps/.
set -uo pipefail
cd "$(dirname "$0")/.."
bash benchmarks/method_tuning.sh
rc=$?; [ $rc -eq 143 ] && exit 143
[ $rc -eq 0 ] || echo "[method_comparison] some probes failed; planning from the finished ones" >&2
.venv/bin/python benchmarks/method_comparison.py plan
# Two passes: the first seed of every method, then the rest, so that an interrupted chain leaves a complete
# one-seed comparison rather than two seeds of the first methods only.
# Between them, `settle`: a method whose first run diverged runs both seeds again at a third of its learning rate
# (sweeps/final_<m>_stable.yaml; the same rule for every method).
#   bash benchmarks/method_comparison.sh [first] [all]     (both passes when no argument is given)
METHOD_LIST=${METHODS:-zo_act mezo lozo agzo first_order lozo_m}
PASSES=${*:-first all}
for pass in $PASSES; do
  [ "$pass" = all ] && .venv/bin/python benchmarks/method_comparison.py settle
  for m in $METHOD_LIST; do
    name=final_$m
    [ "$pass" = all ] && [ -f "sweeps/final_${m}_stable.yaml" ] && name=final_${m}_stable
    [ -f "sweeps/$name.yaml" ] || continue
    if [ "$pass" = first ]; then point=(--point 0); else point=(); fi
    HF_HUB_OFFLINE=1 .venv/bin/python -m dszo sweep "sweeps/$name.yaml" "${point[@]}" --kept "benchmarks/results/sweeps/$name"
    [ $? -eq 143 ] && exit 143   # interrupted (Ctrl-C, SIGTERM): stop here; running it again resumes
    mkdir -p "benchmarks/results/sweeps/$name"
    cp runs/sweeps/$name/summary.* "benchmarks/results/sweeps/$name/" 2>/dev/null
    .venv/bin/python benchmarks/method_comparison.py report   # the comparison so far, after every run
  done
done
