"""Train the embedded critic from scratch on procedural scenes, end to end, on CPU.

    python recipes/embedded_critic/train.py --work /tmp/emb                          # then copied to critic/embedded
    python recipes/embedded_critic/train.py --work /tmp/x --dest /tmp/x/final --dry-run   # the plan and its configs only

It reads top to bottom:

1. build the data of every stage and the held-out test set (``data.yaml`` beside this file) with
   the project's own ``data build``;
2. build a random tiny LLaVA (``train.yaml``'s ``tiny``: ``coherendream critic build-tiny``);
3. train the curriculum (``train.yaml``'s ``stages``): each stage is one ``coherendream critic
   train`` run, initialised from the stage before, as ``--nproc`` data-parallel torchrun processes
   (gloo on CPU) of ``--threads`` torch threads each. Every stage's resolved config is written to
   ``<work>/configs/<stage>.yaml`` first, so any stage can be rerun by hand with ``critic train -c``;
4. score the test set with the last stage and write ``metrics.json`` (accuracy per negative type,
   ROC-AUC, pairwise accuracy, data and training time);
5. copy what loading needs (weights, processor, tokenizer, chat template, ``critic_config.json``,
   ``metrics.json``) to ``--dest``.

Re-running keeps finished builds and stages (a stage is finished once its ``model.safetensors``
is written). About an hour on 2 idle cores (critic/embedded/README.md has the measured times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from coherendream.config import dump_yaml, from_dict, merge, read_yaml

HERE = Path(__file__).resolve().parent
# Files of a trained stage that loading needs (no checkpoints, optimiser states, training args).
CRITIC_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "processor_config.json", "preprocessor_config.json", "chat_template.jinja",
                "chat_template.json", "critic_config.json", "metrics.json")  # fmt: skip


def _drop_nulls(config: dict) -> dict:
    """A key of a data build set to null falls back to the builder's default: it is removed."""
    return {k: _drop_nulls(v) if isinstance(v, dict) else v for k, v in config.items() if v is not None}


def data_configs(work: Path, recipe: dict | None = None) -> dict:
    """``{build name: BuildConfig}`` of ``data.yaml``, each writing to ``work/<name>``."""
    from coherendream.data.build import BuildConfig

    recipe = recipe or read_yaml(HERE / "data.yaml")
    return {name: from_dict(BuildConfig, _drop_nulls(merge(merge(recipe["base"], build), {"output_dir": str(work / name)})))
            for name, build in recipe["builds"].items()}  # fmt: skip


def stage_configs(work: Path, recipe: dict | None = None) -> dict:
    """``{stage name: CriticTrainConfig}`` of ``train.yaml``: stage k reads ``work/<its data>`` and
    starts from stage k-1 (the first from ``work/tiny``), writing to ``work/<name>``."""
    from coherendream.critic.train import CriticTrainConfig

    recipe = recipe or read_yaml(HERE / "train.yaml")
    out, previous = {}, "tiny"
    for stage in recipe["stages"]:
        stage = dict(stage)
        name, data = stage.pop("name"), stage.pop("data")
        paths = {"model_name_or_path": str(work / previous), "dataset": str(work / data), "output_dir": str(work / name)}
        out[name] = from_dict(CriticTrainConfig, merge(merge(recipe["base"], stage), paths))
        previous = name
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/emb"), help="folder for the data, the stages and the scores")
    parser.add_argument("--dest", type=Path, default=HERE.parents[1] / "critic" / "embedded", help="where the final critic is copied")
    parser.add_argument("--nproc", type=int, default=2, help="data-parallel processes per stage (global batch = 12 x nproc)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--tiny-seed", type=int, default=None, help="random start of the tiny LLaVA (default: train.yaml's)")
    parser.add_argument("--dry-run", action="store_true", help="write every stage's config and print the plan; run nothing")
    args = parser.parse_args()

    for var, value in (("OMP_NUM_THREADS", args.threads), ("MKL_NUM_THREADS", args.threads), ("TOKENIZERS_PARALLELISM", "false"),
                       ("HF_HUB_OFFLINE", 1), ("TRANSFORMERS_OFFLINE", 1)):  # fmt: skip
        os.environ[var] = str(value)
    work = args.work.resolve()
    train_recipe = read_yaml(HERE / "train.yaml")
    builds, stages = data_configs(work), stage_configs(work, train_recipe)
    for name, cfg in stages.items():
        (work / "configs").mkdir(parents=True, exist_ok=True)
        (work / "configs" / f"{name}.yaml").write_text(dump_yaml(cfg))
    if args.dry_run:
        print(json.dumps({"builds": list(builds), "stages": {n: [c.model_name_or_path, c.dataset] for n, c in stages.items()}}, indent=1))
        return
    t0 = time.time()

    # 1. data (a finished build is kept)
    from coherendream.data.build import build_dataset

    for name, cfg in builds.items():
        print(f"data {name}: {cfg.source.num_scenes} scenes", flush=True)
        build_dataset(cfg)
    t1 = time.time()

    # 2. the random start
    from coherendream.critic.tiny import build_tiny_critic

    tiny = dict(train_recipe["tiny"])
    seed = tiny.pop("seed") if args.tiny_seed is None else args.tiny_seed
    tiny.pop("seed", None)
    if not (work / "tiny" / "model.safetensors").is_file():
        build_tiny_critic(work / "tiny", seed=seed, **tiny)

    # 3. the curriculum, one torchrun launch per stage
    for name in stages:
        if (work / name / "model.safetensors").is_file():
            print(f"{name}: already trained, kept", flush=True)
            continue
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                        "-m", "coherendream.cli", "critic", "train", "-c", str(work / "configs" / f"{name}.yaml")], check=True)  # fmt: skip
    t2 = time.time()

    # 4. held-out evaluation (test split, threshold 0.5)
    from coherendream.critic.batch import items_from_dataset, score_to_files
    from coherendream.critic.model import Critic
    from coherendream.eval.metrics import critic_report
    from coherendream.io import read_jsonl, write_json

    last = work / list(stages)[-1]
    evaluation = train_recipe["evaluation"]
    scores = work / "scores"
    score_to_files(Critic.from_pretrained(last, device="cpu"), items_from_dataset(work / evaluation["data"], "test"), scores,
                   batch_size=evaluation["batch_size"], metadata={"model": str(last)})  # fmt: skip
    rows = read_jsonl(scores / "scores.jsonl")
    rep = critic_report(rows, threshold=0.5)
    positives = [r for r in rows if r["label"] == 1]
    metrics = {
        "test_set": f"recipes/embedded_critic/data.yaml: {evaluation['data']} (seed {builds[evaluation['data']].seed}, split test)",
        "threshold": 0.5,
        "n": rep["n"],
        "overall_accuracy": rep["overall"]["accuracy"],
        "roc_auc": rep["overall"]["roc_auc"],
        "pairwise_accuracy": rep["overall"]["pairwise_accuracy"],
        "positive_accuracy": sum(r["prob_yes"] >= 0.5 for r in positives) / len(positives),
        "n_positive": len(positives),
        "per_negative_type": {k: {"n": v["n"], "accuracy": v["accuracy"], "pairwise_accuracy": v["pairwise_accuracy"]}
                              for k, v in rep["per_negative_type"].items()},  # fmt: skip
        "data_build_seconds": int(t1 - t0),
        "training_seconds": int(t2 - t1),
    }
    write_json(last / "metrics.json", metrics)
    print(json.dumps(metrics, indent=1))

    # 5. install
    args.dest.mkdir(parents=True, exist_ok=True)
    for f in CRITIC_FILES:
        if (last / f).is_file():
            shutil.copy2(last / f, args.dest / f)
    print(f"data build {int(t1 - t0)} s, training {int(t2 - t1)} s; critic in {args.dest}")


if __name__ == "__main__":
    main()
