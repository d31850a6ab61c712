set -e
cd /work/main
for p in p11 p12; do for c in aitex_02 bottle casting_impeller elpv_mono; do
  d=runs/quality-$p/quality/$c/pouta; o=runs/sq-refit/$p/$c; mkdir -p $o
  data=../shared/data/$c; [ $c = bottle ] && data=../shared/data/mvtec_ad/bottle
  .venv/bin/python benchmarks/reports/quality-10min-cpu-2core/cue_error_refit.py $d/model.pt squared $o/model.pt
  .venv/bin/pouta-eval --checkpoint $o/model.pt --data $data --out $o/eval --no-progress > $o/eval.log 2>&1
  python3 -c "import json,sys; m=json.load(open('$o/eval/report.json')); print('$p $c', {k: m.get(k) for k in ('image_auroc','pixel_auroc')})"
done; done
