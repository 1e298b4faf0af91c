#!/usr/bin/env bash
# Train the embedded default critic from scratch on procedural scenes, end to end, on CPU:
# build the data of every stage and the held-out test set, build a random tiny LLaVA, train the
# twelve-stage curriculum (critic/embedded/README.md: single objects; all scene kinds and negative
# types, twice; colour/shape-weighted multi-object scenes; then eight cycles with the vision tower
# trained too, two on each of four sets of multi-object scenes), every stage with two attribute-presence rows
# per scene, evaluate on the test set per negative type, and copy the critic (weights, processor,
# tokenizer, chat template, critic_config.json, metrics.json) to $DEST.
#
#   bash benchmarks/train_embedded_critic.sh                 # work in /tmp/emb, install to critic/embedded
#   WORK=/tmp/x DEST=/tmp/x/final bash benchmarks/train_embedded_critic.sh
#
# About 58 min on 2 idle cores (3220 s of training, 202 s of data, ~30 s of evaluation; measured);
# other runs took 61 min (3488 s + 176 s) and 91 min (5176 s + 301 s, an idle but slower day):
# stage times vary by up to about 2x between days on the same machine (critic/embedded/README.md).
#
# Each stage runs as NPROC data-parallel processes (torchrun, gloo backend, default 2: one per core
# of the 2-core budget) of THREADS torch threads each (default 1); the configs' batch of 12 per
# process makes a global batch of 24. One process of 2 threads with a batch of 24 is as fast
# (benchmarks/critic_train_ddp.py: 1.02x) and gives the same losses (tests/test_critic_train.py).
# TEXT_HIDDEN is the text model's width (default 96, the shipped critic), TEXT_HEADS its number of attention
# heads (default 4, the shipped critic; the one-layer vision tower gets as many, though its output is unused).
# TINY_SEED draws the random start (default 0, the shipped critic); the data and the stages' seeds stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CD=${CD:-.venv/bin/coherendream}
WORK=${WORK:-/tmp/emb}
DEST=${DEST:-critic/embedded}
THREADS=${THREADS:-1}
NPROC=${NPROC:-2}
TEXT_HIDDEN=${TEXT_HIDDEN:-96}
TEXT_HEADS=${TEXT_HEADS:-4}
TINY_SEED=${TINY_SEED:-0}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$WORK"
t0=$(date +%s)

# 1. data (re-running resumes/keeps finished builds)
$CD data build -c configs/data/embedded_stage1.yaml -o "$WORK/stage1" --num-workers 2
$CD data build -c configs/data/embedded_stage2.yaml -o "$WORK/stage2" --num-workers 2
$CD data build -c configs/data/embedded_stage4.yaml -o "$WORK/stage4" --num-workers 2
$CD data build -c configs/data/embedded_stage7.yaml -o "$WORK/stage7" --num-workers 2
$CD data build -c configs/data/embedded_stage9.yaml -o "$WORK/stage9" --num-workers 2
$CD data build -c configs/data/embedded_stage11.yaml -o "$WORK/stage11" --num-workers 2
$CD data build -c configs/data/embedded_test.yaml -o "$WORK/test" --num-workers 2
t1=$(date +%s)

# 2. random tiny critic: text $TEXT_HIDDEN (default 96) x 3 layers, vision 192 x 1 layer (frozen in stages 1-4, trained from stage 5 on),
#    image tokens = its patch embeddings (feature layer -2 of 2: its random layer blurred the colours),
#    64 px, patch 8, initializer_range 0.1 (at the default 0.02 the measured runs sat at chance: critic/embedded/README.md)
[ -f "$WORK/tiny/model.safetensors" ] || $CD critic build-tiny "$WORK/tiny" --image-size 64 --patch-size 8 --text-hidden "$TEXT_HIDDEN" --text-layers 3 --text-heads "$TEXT_HEADS" \
    --vision-hidden 192 --vision-layers 1 --vision-feature-layer -2 --initializer-range 0.1 --seed "$TINY_SEED"

# 3. curriculum (re-running keeps finished stages: a stage is finished once its model.safetensors is
#    written; training_seconds then counts only the stages run this time)
TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m coherendream.cli critic train)
stage() {  # stage CONFIG FROM DATA TO [overrides...]
  local config=$1 from=$2 data=$3 to=$4
  shift 4
  if [ -f "$WORK/$to/model.safetensors" ]; then echo "$to: already trained, kept"; return; fi
  "${TRAIN[@]}" -c "configs/critic/$config.yaml" model_name_or_path="$WORK/$from" dataset="$WORK/$data" output_dir="$WORK/$to" "$@"
}
stage embedded_stage1 tiny stage1 s1
stage embedded_stage2 s1 stage2 s2
stage embedded_stage3 s2 stage2 s3
stage embedded_stage4 s3 stage4 s4
stage embedded_stage5 s4 stage4 s5
stage embedded_stage6 s5 stage4 s6
stage embedded_cycle s6 stage7 s7 training.seed=7
stage embedded_cycle s7 stage7 s8 training.seed=8
stage embedded_cycle s8 stage9 s9 training.seed=9
stage embedded_cycle s9 stage9 s10 training.seed=10
stage embedded_cycle s10 stage11 s11 training.seed=11
stage embedded_cycle s11 stage11 s12 training.seed=12
t2=$(date +%s)

# 4. held-out evaluation (test split, threshold 0.5)
$CD critic score -i "$WORK/test" --split test -o "$WORK/scores" --model "$WORK/s12" --batch-size 64 --device cpu
$PY - "$WORK/scores/scores.jsonl" "$WORK/s12/metrics.json" "$((t1 - t0))" "$((t2 - t1))" <<'PYEOF'
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
  [ -f "$WORK/s12/$f" ] && cp "$WORK/s12/$f" "$DEST/"
done
echo "data build $((t1 - t0)) s, training $((t2 - t1)) s; critic in $DEST"
