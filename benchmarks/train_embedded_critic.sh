#!/usr/bin/env bash
# Train the embedded default critic from scratch on procedural scenes, end to end, on CPU:
# build the data of every stage and the held-out test set, build a random tiny LLaVA, train
# stage 1 (single objects, colour/shape negatives), stage 2 (all scene kinds and negative types,
# initialised from stage 1), stage 3 (a second, lower-lr cosine cycle on the stage 2 data),
# stage 4 (colour/shape-weighted negatives on mostly multi-object scenes), stage 5 (the same
# data with the vision tower trained too) and stage 6 (a second stage-5 cycle), evaluate on the
# test set per negative type, and copy the
# critic (weights, processor, tokenizer, chat template, critic_config.json, metrics.json) to $DEST.
#
#   bash benchmarks/train_embedded_critic.sh                 # work in /tmp/emb, install to critic/embedded
#   WORK=/tmp/x DEST=/tmp/x/final bash benchmarks/train_embedded_critic.sh
#   TEXT_HIDDEN=192 WORK=/tmp/emb192 DEST=/tmp/emb192/final bash benchmarks/train_embedded_critic.sh
#
# THREADS torch threads (default 2, the 2-core budget; THREADS=1 keeps a core free, ~1.8x slower).
# TEXT_HIDDEN is the text model's width (default 96, the shipped critic; 192 is the wider variant
# in critic/embedded/README.md: better on negatives, over an hour of training).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CD=${CD:-.venv/bin/coherendream}
WORK=${WORK:-/tmp/emb}
DEST=${DEST:-critic/embedded}
THREADS=${THREADS:-2}
TEXT_HIDDEN=${TEXT_HIDDEN:-96}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$WORK"
t0=$(date +%s)

# 1. data (re-running resumes/keeps finished builds)
$CD data build -c configs/data/embedded_stage1.yaml -o "$WORK/stage1"
$CD data build -c configs/data/embedded_stage2.yaml -o "$WORK/stage2"
$CD data build -c configs/data/embedded_stage4.yaml -o "$WORK/stage4"
$CD data build -c configs/data/embedded_test.yaml -o "$WORK/test"
t1=$(date +%s)

# 2. random tiny critic: text $TEXT_HIDDEN (default 96) x 3 layers, vision 192 x 1 layer (frozen in stages 1-4, trained in stages 5-6),
#    image tokens = its patch embeddings (feature layer -2 of 2: its random layer blurred the colours),
#    64 px, patch 8, initializer_range 0.1 (at the default 0.02 training sat at chance in every run we tried)
$CD critic build-tiny "$WORK/tiny" --image-size 64 --patch-size 8 --text-hidden "$TEXT_HIDDEN" --text-layers 3 \
    --vision-hidden 192 --vision-layers 1 --vision-feature-layer -2 --initializer-range 0.1 --seed 0

# 3. curriculum
$CD critic train -c configs/critic/embedded_stage1.yaml model_name_or_path="$WORK/tiny" dataset="$WORK/stage1" output_dir="$WORK/s1"
$CD critic train -c configs/critic/embedded_stage2.yaml model_name_or_path="$WORK/s1" dataset="$WORK/stage2" output_dir="$WORK/s2"
$CD critic train -c configs/critic/embedded_stage3.yaml model_name_or_path="$WORK/s2" dataset="$WORK/stage2" output_dir="$WORK/s3"
$CD critic train -c configs/critic/embedded_stage4.yaml model_name_or_path="$WORK/s3" dataset="$WORK/stage4" output_dir="$WORK/s4"
$CD critic train -c configs/critic/embedded_stage5.yaml model_name_or_path="$WORK/s4" dataset="$WORK/stage4" output_dir="$WORK/s5"
$CD critic train -c configs/critic/embedded_stage6.yaml model_name_or_path="$WORK/s5" dataset="$WORK/stage4" output_dir="$WORK/s6"
t2=$(date +%s)

# 4. held-out evaluation (test split, threshold 0.5)
$CD critic score -i "$WORK/test" --split test -o "$WORK/scores" --model "$WORK/s6" --batch-size 64 --device cpu
$PY - "$WORK/scores/scores.jsonl" "$WORK/s6/metrics.json" "$((t1 - t0))" "$((t2 - t1))" <<'PYEOF'
import json, sys
from coherendream.eval.metrics import critic_report
rows = [json.loads(line) for line in open(sys.argv[1])]
rep = critic_report(rows, threshold=0.5)
pos = [r for r in rows if r["label"] == 1]
metrics = {
    "test_set": "configs/data/embedded_test.yaml (seed 90210, split test)",
    "threshold": 0.5,
    "n": rep["n"],
    "overall_accuracy": rep["overall"]["accuracy"],
    "roc_auc": rep["overall"]["roc_auc"],
    "pairwise_accuracy": rep["overall"]["pairwise_accuracy"],
    "positive_accuracy": sum(r["prob_yes"] >= 0.5 for r in pos) / len(pos),
    "n_positive": len(pos),
    "per_negative_type": {k: {"n": v["n"], "accuracy": v["accuracy"], "pairwise_accuracy": v["pairwise_accuracy"]}
                          for k, v in rep["per_negative_type"].items()},
    "data_build_seconds": int(sys.argv[3]),
    "training_seconds": int(sys.argv[4]),
}
json.dump(metrics, open(sys.argv[2], "w"), indent=1)
print(json.dumps(metrics, indent=1))
PYEOF

# 5. install: only what loading needs (no checkpoints, optimizer states, training_args.bin)
mkdir -p "$DEST"
for f in model.safetensors config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json \
         processor_config.json preprocessor_config.json chat_template.jinja chat_template.json critic_config.json metrics.json; do
  [ -f "$WORK/s6/$f" ] && cp "$WORK/s6/$f" "$DEST/"
done
echo "data build $((t1 - t0)) s, training $((t2 - t1)) s; critic in $DEST"
