"""Critic fine-tuning end to end on CPU: LoRA SFT, merge, DPO, resume after a kill, logging."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from coherendream.config import from_dict
from coherendream.critic.model import Critic
from coherendream.critic.tiny import build_tiny_critic
from coherendream.critic.train import CriticTrainConfig, merge_adapter, train_critic
from coherendream.data.build import BuildConfig, build_dataset, load_built_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "procedural"
    build_dataset(from_dict(BuildConfig, {
        "output_dir": str(out),
        "source": {"kind": "procedural", "num_scenes": 40},
        "render": {"resolution": 32},
        "splits": {"train": 0.8, "validation": 0.2},
        "progress": False,
    }))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_critic(tmp_path_factory.mktemp("tiny") / "critic", image_size=64, patch_size=8)


def train_config(tiny, dataset, out, **training) -> CriticTrainConfig:
    base = {
        "per_device_train_batch_size": 8,
        "max_steps": 24,
        "logging_steps": 1,
        "learning_rate": 3e-3,
        "warmup_steps": 0,
        "activation_checkpointing": False,
        "save_steps": 12,
        "use_cpu": True,
        "eval_strategy": "no",
    }
    return from_dict(CriticTrainConfig, {
        "model_name_or_path": str(tiny),
        "dataset": str(dataset),
        "output_dir": str(out),
        "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
        "training": {**base, **training},
    })


def losses(out: Path) -> list[float]:
    return [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]


def sample_inputs(dataset, n=6):
    rows = load_built_dataset(dataset)["validation"].select(range(n))
    return [list(r["views"]) for r in rows], list(rows["caption"])


def test_lora_sft_trains_merges_and_scores_the_same(tmp_path, tiny, dataset):
    out = train_critic(train_config(tiny, dataset, tmp_path / "lora"))
    history = losses(out)
    assert len(history) == 24
    assert sum(history[-6:]) / 6 < sum(history[:6]) / 6 - 0.3  # the loss falls

    # LoRA sits on the language model only; the projector is trained in full (modules_to_save)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    lora_keys = [k for k in keys if "lora_" in k]
    assert lora_keys and all("language_model" in k for k in lora_keys)
    assert not any("vision_tower" in k for k in keys)
    assert any("multi_modal_projector" in k for k in keys)

    critic_cfg = json.loads((out / "critic_config.json").read_text())
    assert critic_cfg["num_views"] == 4 and critic_cfg["image_mode"] == "grid" and critic_cfg["add_special_tokens"] is False

    merged_dir = merge_adapter(str(tiny), str(out), str(tmp_path / "merged"))
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "model.safetensors").exists()
    views, captions = sample_inputs(dataset)
    with torch.no_grad():
        adapter_scores = Critic.from_pretrained(out).score(views, captions)
        merged_scores = Critic.from_pretrained(merged_dir).score(views, captions)
        base_scores = Critic.from_pretrained(tiny, config=Critic.from_pretrained(out).config).score(views, captions)
    torch.testing.assert_close(merged_scores.margin, adapter_scores.margin, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(base_scores.margin, adapter_scores.margin, atol=1e-3)  # training changed the critic


def learning_rates(model, optimizer) -> dict[str, float]:
    """Each parameter in ``optimizer``, by its name in ``model``: the learning rate of its group."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}


def test_projector_gets_its_own_learning_rate(tmp_path, tiny, dataset):
    from coherendream.critic.train import make_trainer

    cfg = train_config(tiny, dataset, tmp_path / "opt")
    trainer = make_trainer(cfg)
    optimizer = trainer.create_optimizer()
    lrs = learning_rates(trainer.model, optimizer)
    projector = [lr for n, lr in lrs.items() if "multi_modal_projector" in n]
    others = [lr for n, lr in lrs.items() if "multi_modal_projector" not in n]
    assert projector and set(projector) == {2e-5}
    assert others and set(others) == {3e-3}
    assert not any("vision_tower" in n for n in lrs)  # frozen: not in the optimizer at all


def test_trained_vision_tower_gets_its_own_learning_rate(tmp_path, tiny, dataset):
    from coherendream.critic.train import make_trainer

    cfg = train_config(tiny, dataset, tmp_path / "opt", max_steps=10, warmup_steps=0, lr_scheduler_type="cosine")
    cfg.use_lora, cfg.freeze_vision_tower, cfg.vision_tower_lr = False, False, 1e-4
    trainer = make_trainer(cfg)
    optimizer = trainer.create_optimizer()
    lrs = learning_rates(trainer.model, optimizer)
    assert set(lrs) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}  # every trained weight, once
    by_module = {}
    for n, lr in lrs.items():
        key = "vision_tower" if "vision_tower" in n else "multi_modal_projector" if "multi_modal_projector" in n else "other"
        by_module.setdefault(key, set()).add(lr)
    assert by_module == {"vision_tower": {1e-4}, "multi_modal_projector": {2e-5}, "other": {3e-3}}
    # the schedule scales every group alike: halfway through the cosine each rate is half its own
    scheduler = trainer.create_scheduler(num_training_steps=10, optimizer=optimizer)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    halfway = {round(g["lr"] / 1e-6, 6) for g in optimizer.param_groups}  # groups split by weight decay too
    assert halfway == {round(0.5 * lr / 1e-6, 6) for lr in (1e-4, 2e-5, 3e-3)}


def test_caption_rows_add_one_description_per_asset(tiny, dataset):
    from coherendream.critic.train import load_rows
    from coherendream.prompts import format_describe

    plain, _ = load_rows(CriticTrainConfig(dataset=str(dataset), eval_split=None))
    mixed, _ = load_rows(CriticTrainConfig(dataset=str(dataset), eval_split=None, caption_rows=True))
    rows = load_built_dataset(dataset)["train"]
    assets = sorted(set(rows["asset_id"]))
    assert len(mixed) == len(plain) + len(assets)
    added = mixed.select(range(len(plain), len(mixed)))
    first_positive = {}
    for r in rows.select_columns(["asset_id", "label", "true_caption", "images"]):
        if r["label"] == 1:
            first_positive.setdefault(r["asset_id"], r)
    questions = {r["prompt"][0]["content"][-1]["text"] for r in added}
    assert questions == {format_describe(4)}
    answers = [r["completion"][0]["content"][0]["text"] for r in added]
    assert sorted(answers) == sorted(r["true_caption"] for r in first_positive.values())
    # the description is asked about the asset's own views
    first = added[0]
    match = next(r for r in first_positive.values() if r["true_caption"] == first["completion"][0]["content"][0]["text"])
    assert np.array_equal(np.asarray(first["images"][0]), np.asarray(match["images"][0]))
    with pytest.raises(ValueError, match="caption_rows"):
        load_rows(CriticTrainConfig(dataset=str(dataset), eval_split=None, caption_rows=True, mode="dpo"))


def test_presence_rows_ask_the_critics_question_about_one_word(tiny, dataset):
    from coherendream.critic.model import CriticConfig
    from coherendream.critic.train import critic_config_for, load_rows
    from coherendream.vocabulary import PALETTE, SHAPES
    from coherendream.prompts import format_question

    plain, _ = load_rows(CriticTrainConfig(dataset=str(dataset), eval_split=None))
    cfg = CriticTrainConfig(dataset=str(dataset), eval_split=None, presence_rows=3)
    mixed, _ = load_rows(cfg)
    rows = load_built_dataset(dataset)["train"]
    layouts = {}
    for r in rows.select_columns(["asset_id", "label", "layout", "images"]):
        if r["label"] == 1:
            layouts.setdefault(r["asset_id"], r)
    assert len(mixed) == len(plain) + 3 * len(layouts)
    added = mixed.select(range(len(plain), len(mixed)))
    critic_config = critic_config_for(cfg)
    template = critic_config.question_template
    orbit = json.loads((dataset / "build_info.json").read_text())["config"]["render"]["orbit"]
    assert (critic_config.view_elevation, critic_config.view_distance, critic_config.view_fov_y) == (orbit["elevation"], orbit["distance"], orbit["fov_y"])
    by_grid = {np.asarray(r["images"][0]).tobytes(): json.loads(r["layout"]) for r in layouts.values()}
    answers = []
    for r in added:
        layout = by_grid[np.asarray(r["images"][0]).tobytes()]  # the asset's own views
        attributes = {o["color"] for o in layout["objects"]} | {o["shape"] for o in layout["objects"]}
        question = "".join(part["text"] or "" for part in r["prompt"][0]["content"])
        word = next(w for w in [*PALETTE, *SHAPES] if question == format_question(w, 4, template))
        answer = r["completion"][0]["content"][0]["text"]
        assert answer == ("Yes" if word in attributes else "No")
        answers.append(answer)
    assert set(answers) == {"Yes", "No"}
    # same rows again for the same seed; training a critic whose dataset has no layout is refused
    again, _ = load_rows(cfg)
    assert again.select(range(len(plain), len(again)))["completion"] == added["completion"]
    no_layout = rows.remove_columns("layout")
    from coherendream.critic.train import presence_rows

    with pytest.raises(ValueError, match="layout"):
        presence_rows(no_layout, 1, CriticConfig())
    with pytest.raises(ValueError, match="presence_rows"):
        load_rows(CriticTrainConfig(dataset=str(dataset), eval_split=None, presence_rows=1, mode="dpo"))


def test_correction_answers_name_the_true_caption_on_negatives(tiny, dataset):
    from coherendream.critic.train import load_rows

    plain, _ = load_rows(CriticTrainConfig(dataset=str(dataset), eval_split=None))
    corrected, _ = load_rows(CriticTrainConfig(dataset=str(dataset), eval_split=None, correction_answers=True))
    rows = load_built_dataset(dataset)["train"].select_columns(["label", "negative_type", "true_caption", "caption"])
    assert len(corrected) == len(plain) == len(rows)
    answers = [r["completion"][0]["content"][0]["text"] for r in corrected.select_columns(["completion"])]
    kinds = set()
    for meta, answer in zip(rows, answers):
        if meta["label"] == 1:
            assert answer == "Yes"
        elif meta["negative_type"] == "multiview_mix":  # views of two assets: no single true caption
            assert answer == "No"
        else:
            kinds.add(meta["negative_type"])
            assert answer == f"No, {meta['true_caption']}" and meta["true_caption"] != meta["caption"]
    assert {"color", "object"} <= kinds
    # prompts and images untouched
    assert corrected[0]["prompt"] == plain[0]["prompt"]
    assert np.array_equal(np.asarray(corrected[0]["images"][0]), np.asarray(plain[0]["images"][0]))
    with pytest.raises(ValueError, match="correction_answers"):
        load_rows(CriticTrainConfig(dataset=str(dataset), eval_split=None, correction_answers=True, mode="dpo"))


def test_correction_answers_train_on_the_whole_answer(tmp_path, tiny, dataset):
    from coherendream.critic.train import make_trainer

    cfg = train_config(tiny, dataset, tmp_path / "correct", max_steps=1)
    cfg.correction_answers = True
    trainer = make_trainer(cfg)
    batch = next(iter(trainer.get_train_dataloader()))
    tok = trainer.processing_class.tokenizer
    answers = [tok.decode(ids[labels != -100]) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    # the loss covers "No, <caption>" on negatives (more than the answer word and end of turn)
    long = [a for a in answers if a.startswith("No,")]
    assert long and all(len(a.split()) > 4 for a in long), answers


@pytest.mark.parametrize("use_lora", [False, True])
def test_unfrozen_vision_tower_trains(tmp_path, tiny, dataset, use_lora):
    from coherendream.critic.train import make_trainer

    cfg = train_config(tiny, dataset, tmp_path / "vision", max_steps=3)
    cfg.use_lora, cfg.freeze_vision_tower, cfg.caption_rows = use_lora, False, True
    trainer = make_trainer(cfg)
    vision = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "vision_tower" in n and p.requires_grad}
    assert vision
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(after[n].detach(), before) for n, before in vision.items())


def test_dpo_mode_fits_answer_preferences(tmp_path, tiny, dataset):
    # Half the preferences favour "Yes", half "No": unlike SFT there is no answer prior to pick up,
    # so a falling loss means the (image, caption) -> answer preferences are being learnt. A random
    # tiny model cannot generalise that in a few steps; it can fit 8 of them.
    cfg = train_config(tiny, dataset, tmp_path / "dpo", max_steps=40, learning_rate=1e-2, beta=1.0, logging_steps=4)
    cfg.mode = "dpo"
    cfg.max_train_samples = 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = train_critic(cfg)
    # PEFT and TRL read a deprecated transformers alias; the user cannot act on that warning
    assert not [w for w in caught if "gradient_checkpointing" in str(w.message)]
    history = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert history[0]["loss"] > 0.6  # near -log sigmoid(0): policy == reference at the start
    assert history[-1]["loss"] < 0.3
    assert history[-1]["rewards/accuracies"] >= 0.75  # most of the 8 preferences are fitted
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] + 1.0


def test_resume_after_kill_continues_step_and_optimizer(tmp_path, tiny, dataset):
    out = tmp_path / "resume"
    args = [
        sys.executable, "-m", "coherendream.cli", "critic", "train",
        "--model", str(tiny), "--dataset", str(dataset), "-o", str(out),
        "lora.r=8", "lora.lora_alpha=16", "training.per_device_train_batch_size=4", "training.max_steps=400",
        "training.save_steps=10", "training.save_total_limit=null", "training.logging_steps=10", "training.use_cpu=true",
        "training.activation_checkpointing=false", "training.eval_strategy=no", "training.learning_rate=1e-3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "first_run.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out / "checkpoint-20" / "trainer_state.json").exists():
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    log.close()
    assert checkpoints and checkpoints[-1] < 400, "training must have been killed midway:\n" + (tmp_path / "first_run.log").read_text()[-3000:]
    resumed_from = checkpoints[-1]

    args[args.index("training.max_steps=400")] = f"training.max_steps={resumed_from + 20}"
    second = subprocess.run(args, capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    final = out / f"checkpoint-{resumed_from + 20}"
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["global_step"] == resumed_from + 20
    # AdamW's per-parameter step count includes the steps before the kill: the optimizer state was restored
    opt = torch.load(final / "optimizer.pt", map_location="cpu", weights_only=True)
    steps = {float(s["step"]) for s in opt["state"].values()}
    assert steps == {float(resumed_from + 20)}


def test_auto_resume_skips_a_checkpoint_cut_short_by_a_kill(tmp_path):
    from coherendream.critic.train import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path) is None
    for step, state in ((10, '{"global_step": 10}'), (20, '{"global_step": 20}'), (30, ""), (40, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:  # 30: killed while writing trainer_state.json; 40: killed before it
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-99-old").mkdir()
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")


def test_tensorboard_logging(tmp_path, tiny, dataset):
    out = train_critic(train_config(tiny, dataset, tmp_path / "tb", max_steps=4, report_to="tensorboard"))
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_cli_scores_a_split_with_a_trained_adapter(tmp_path, tiny, dataset):
    from typer.testing import CliRunner

    from coherendream.cli import app

    out = train_critic(train_config(tiny, dataset, tmp_path / "adapter", max_steps=2))
    res = CliRunner().invoke(app, ["critic", "score", "-i", str(dataset), "--split", "validation", "-o", str(tmp_path / "scores"), "--critic", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "scores" / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == len(load_built_dataset(dataset)["validation"])
    views, captions = sample_inputs(dataset, n=2)
    with torch.no_grad():
        direct = Critic.from_pretrained(out).score(views, captions).prob_yes
    assert rows[0]["prob_yes"] == pytest.approx(float(direct[0]), abs=1e-5)
    res = CliRunner().invoke(app, ["critic", "score", "-i", str(tmp_path / "missing"), "-o", str(tmp_path / "s2"), "--critic", str(out)])
    assert res.exit_code == 2 and "missing" in res.output


def test_cli_score_defaults_to_the_embedded_critic(tmp_path, dataset):
    from typer.testing import CliRunner

    from coherendream.cli import app
    from coherendream.critic.model import default_critic_path

    res = CliRunner().invoke(app, ["critic", "score", "-i", str(dataset), "--split", "validation", "-o", str(tmp_path / "scores")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["metadata"]["model"] == str(default_critic_path())
    rows = [json.loads(line) for line in (tmp_path / "scores" / "scores.jsonl").read_text().splitlines()]
    views, captions = sample_inputs(dataset, n=1)
    with torch.no_grad():
        direct = Critic.from_pretrained(default_critic_path()).score(views, captions).prob_yes
    assert rows[0]["prob_yes"] == pytest.approx(float(direct[0]), abs=1e-5)


DEEPSPEED_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from coherendream.config import from_dict
from coherendream.critic.train import CriticTrainConfig, make_trainer
cfg = from_dict(CriticTrainConfig, json.loads(sys.argv[1]))
trainer = make_trainer(cfg)
trainer.train()
engine = trainer.model_wrapped
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("RESULT", json.dumps({"engine": type(engine).__name__, "stage": engine.zero_optimization_stage(),
      "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__,
      "losses": losses}))
"""


def test_deepspeed_zero2_trains_on_cpu(tmp_path, tiny, dataset):
    """DeepSpeed runs its ZeRO optimizer on the CPU accelerator with the gloo backend, one process."""
    import socket

    cfg = train_config(tiny, dataset, tmp_path / "ds", max_steps=12, deepspeed="zero2", save_strategy="no")
    from coherendream.config import to_dict

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, json.dumps(to_dict(cfg))], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["engine"] == "DeepSpeedEngine" and result["stage"] == 2
    assert "Zero" in result["optimizer"] or "ZeRO" in result["optimizer"], result["optimizer"]
    losses = result["losses"]
    assert len(losses) == 12 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


def test_torchrun_two_cpu_processes_match_one_process(tmp_path, tiny, dataset):
    # Data parallel on the gloo backend (what `torchrun --nproc_per_node 2` gives on a CPU machine):
    # 2 processes x batch 4 see the same global batches as 1 process x batch 8, so the logged
    # losses agree; only rank 0 writes the model, processor and critic config, and says so.
    common = [
        "--model", str(tiny), "--dataset", str(dataset), "use_lora=false", "eval_split=null", "projector_lr=null",
        "training.max_steps=6", "training.logging_steps=1", "training.use_cpu=true", "training.learning_rate=1e-3",
        "training.activation_checkpointing=false", "training.save_strategy=no", "training.seed=3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "coherendream.cli", "critic", "train", "-o", str(tmp_path / "one"), *common,
                             "training.per_device_train_batch_size=8"], capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    ddp = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "coherendream.cli", "critic", "train",
                          "-o", str(tmp_path / "two"), *common, "training.per_device_train_batch_size=4"],
                         capture_output=True, text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("critic written to") == 1, ddp.stdout[-2000:]  # said by rank 0 only
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two, one, rtol=2e-2, atol=2e-3)
    assert (tmp_path / "two" / "model.safetensors").is_file() and (tmp_path / "two" / "critic_config.json").is_file()
    views, captions = sample_inputs(dataset)
    with torch.no_grad():
        a = Critic.from_pretrained(tmp_path / "one").score(views, captions).margin
        b = Critic.from_pretrained(tmp_path / "two").score(views, captions).margin
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-2)


def test_shipped_configs_follow_the_machine_and_the_cpu_one_trains(tmp_path, tiny, dataset):
    from coherendream.config import load_config
    from coherendream.critic.train import training_arguments

    repo = Path(__file__).resolve().parents[1] / "configs" / "critic"
    gpu = training_arguments(load_config(CriticTrainConfig, repo / "llava15_lora.yaml", [f"output_dir={tmp_path / 'g'}"]))
    assert gpu.per_device_train_batch_size == 16  # the LLaVA-1.5 recipe as written...
    if not torch.cuda.is_available():  # ...in float32 on a CPU with no override
        assert not gpu.bf16 and not gpu.fp16 and gpu.use_cpu
    assert gpu.activation_checkpointing
    # transformers 4's name for it still overrides the recipe's default (it would be ignored behind the new name)
    old_name = training_arguments(load_config(CriticTrainConfig, repo / "llava15_lora.yaml",
                                              [f"output_dir={tmp_path / 'g2'}", "training.gradient_checkpointing=false"]))  # fmt: skip
    assert not old_name.activation_checkpointing
    cfg = load_config(CriticTrainConfig, repo / "cpu_lora.yaml", [f"model_name_or_path={tiny}", f"dataset={dataset}",
                                                                 f"output_dir={tmp_path / 'c'}", "training.max_steps=12"])  # fmt: skip
    out = train_critic(cfg)
    assert len(losses(out)) >= 2 and (out / "adapter_model.safetensors").is_file()


def test_a_base_model_that_is_not_there_is_named_in_one_line(tmp_path, dataset, monkeypatch):
    from typer.testing import CliRunner

    from coherendream.cli import app

    monkeypatch.chdir(tmp_path)
    for name in ("nobody/nonexistent", "mymodel"):
        res = CliRunner().invoke(app, ["critic", "train", "-c", str(Path(__file__).resolve().parents[1] / "configs" / "critic" / "cpu_lora.yaml"), "--model", name,
                                       "--dataset", str(dataset), "-o", str(tmp_path / "out")])  # fmt: skip
        assert res.exit_code == 2 and f"model '{name}': no such folder here" in res.output and "Traceback" not in res.output
        assert res.output.strip().splitlines()[-1].startswith("error:") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, why", [
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size must be >= 1, got 0"),
    ("training.learning_rate=-1", "training.learning_rate must be > 0, got -1"),
    ("training.bogus_key=1", "training: SFTConfig.__init__() got an unexpected keyword argument 'bogus_key'"),
    ("lora.r=0", "lora.r must be >= 1, got 0"),
])  # fmt: skip
def test_bad_training_settings_are_refused_before_the_model_loads(tmp_path, dataset, override, why):
    from typer.testing import CliRunner

    from coherendream.cli import app

    # the base model does not exist: a refusal that names the setting came before any loading
    res = CliRunner().invoke(app, ["critic", "train", "-c", str(Path(__file__).resolve().parents[1] / "configs" / "critic" / "cpu_lora.yaml"),
                                   "--model", str(tmp_path / "none"), "--dataset", str(dataset), "-o", str(tmp_path / "out"), override])  # fmt: skip
    assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_guidance_options_change_the_views_and_the_loss_they_should(tiny, dataset, tmp_path):
    """Adversarial views raise the batch's loss within their budget; noised and blurred views change
    the pixels and so the loss; a share of 0 changes nothing."""
    from coherendream.config import ConfigError
    from coherendream.critic.train import GuidanceTraining, make_trainer, perturb_pixels

    trainer = make_trainer(train_config(tiny, dataset, tmp_path / "g"))
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in trainer.pixel_stats)

    def pixels(inputs):  # back to [0, 1]
        return inputs["pixel_values"] * std + mean

    def loss(inputs):
        with torch.no_grad():
            return float(model(**inputs).loss)

    clean = loss(batch)
    same = perturb_pixels(model, batch, GuidanceTraining(), trainer.pixel_stats)
    assert torch.allclose(same["pixel_values"], batch["pixel_values"], atol=1e-5)
    for norm, eps in (("l2", 0.5), ("linf", 4 / 255)):
        attacked = perturb_pixels(model, batch, GuidanceTraining(adversarial_share=1.0, adversarial_norm=norm, adversarial_eps=eps,
                                                                 adversarial_steps=3), trainer.pixel_stats)  # fmt: skip
        delta = (pixels(attacked) - pixels(batch)).flatten(1)
        size = delta.norm(dim=1) if norm == "l2" else delta.abs().max(dim=1).values
        assert float(size.max()) <= eps * 1.001 and float(size.min()) > 0  # inside the ball, not at its centre
        assert loss(attacked) > clean + 1e-4, norm  # gradient ascent on the loss
        assert torch.equal(attacked["input_ids"], batch["input_ids"]) and torch.equal(attacked["labels"], batch["labels"])
    g = torch.Generator().manual_seed(0)
    noised = perturb_pixels(model, batch, GuidanceTraining(noise_share=1.0, noise_std=0.1), trainer.pixel_stats, generator=g)
    assert 0.02 < float((pixels(noised) - pixels(batch)).abs().mean()) < 0.1 and loss(noised) != clean
    blurred = perturb_pixels(model, batch, GuidanceTraining(blur_share=1.0, blur_sigma=1.0), trainer.pixel_stats)
    # a blur keeps each image's mean and lowers its high frequencies
    assert torch.allclose(pixels(blurred).mean(dim=(2, 3)), pixels(batch).mean(dim=(2, 3)), atol=0.02)
    assert pixels(blurred).diff(dim=3).abs().mean() < pixels(batch).diff(dim=3).abs().mean()
    with pytest.raises(ConfigError, match="guidance.noise_share"):
        make_trainer(from_dict(CriticTrainConfig, {**_as_dict(train_config(tiny, dataset, tmp_path / "x")), "guidance": {"noise_share": 2.0}}))


def _as_dict(config: CriticTrainConfig) -> dict:
    from coherendream.config import to_dict

    return to_dict(config)


def test_guidance_training_runs_and_learns(tiny, dataset, tmp_path):
    """A short run with adversarial and noised views trains (its loss falls) through `critic train`."""
    out = tmp_path / "guided"
    cfg = from_dict(CriticTrainConfig, {**_as_dict(train_config(tiny, dataset, out, max_steps=16, save_steps=16)),
                                        "guidance": {"adversarial_share": 0.5, "adversarial_steps": 2, "noise_share": 0.5, "blur_share": 0.25}})  # fmt: skip
    train_critic(cfg)
    history = losses(out)
    assert np.mean(history[-4:]) < np.mean(history[:4])
