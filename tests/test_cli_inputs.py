"""Bad inputs a new user hits: one line naming the input and the reason, before any model loads
where the check does not need it; text a model cannot read is warned about and marked; the
command line's conventions (help that fits, required options marked, Ctrl-C)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from coherendream.cli import app
from coherendream.critic.model import Critic, default_critic_path
from coherendream.data.manifest import check_manifest, manifest_rows

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def truncated_critic(tmp_path_factory):
    """The embedded critic with its weights file cut in half."""
    path = tmp_path_factory.mktemp("truncated") / "critic"
    shutil.copytree(default_critic_path(), path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """A render folder of one asset (4 white views and a caption)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("renders")
    (root / "a").mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), "white").save(root / "a" / f"{i}.png")
    (root / "a" / "caption.txt").write_text("a red cube")
    return root


def test_a_truncated_critic_is_named_as_such(tmp_path, truncated_critic, views):
    data = tmp_path / "d"
    assert runner.invoke(app, ["data", "build", "--procedural", "2", "-o", str(data), "render.resolution=32", "progress=false"]).exit_code == 0
    for args in (["critic", "score", "--input", str(views), "-o", str(tmp_path / "s"), "--critic", str(truncated_critic)],
                 ["eval", "critic", "--dataset", str(data), "--split", "train", "-o", str(tmp_path / "e"), "--critic", str(truncated_critic)],
                 ["generate", "-c", "configs/generate/cpu_tiny.yaml", "-o", str(tmp_path / "g"), "--steps", "1", "--critic", str(truncated_critic)]):  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "model.safetensors is truncated or corrupt" in result.output and "Traceback" not in result.output
    assert not any((tmp_path / name).exists() for name in ("s", "e", "g"))  # nothing written


def test_a_truncated_prior_is_named_as_such(tmp_path):
    prior = tmp_path / "prior"
    shutil.copytree(ROOT / "generation" / "embedded", prior)
    weights = prior / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = runner.invoke(app, ["generate", "-c", "configs/generate/cpu_tiny.yaml", "-o", str(tmp_path / "g"), "--steps", "1", "--prior", str(prior)])
    assert result.exit_code == 2 and "unet/diffusion_pytorch_model.safetensors is truncated or corrupt" in result.output


def test_critic_train_settings_and_datasets_it_cannot_use(tmp_path):
    bad_rate = runner.invoke(app, ["critic", "train", "-c", "configs/critic/cpu_lora.yaml", "training.learning_rate=abc", "-o", str(tmp_path / "t1")])
    assert bad_rate.exit_code == 2 and "training.learning_rate must be a number, got 'abc'" in bad_rate.output
    text_rate = runner.invoke(app, ["critic", "train", "-c", "configs/critic/cpu_lora.yaml", "training.learning_rate=2e-4",
                                    "--dataset", str(tmp_path / "missing"), "-o", str(tmp_path / "t2")])  # fmt: skip
    assert text_rate.exit_code == 2 and "learning_rate" not in text_rate.output  # "2e-4" (a YAML string) is a number: the dataset is what fails
    not_a_dataset = tmp_path / "notes"
    not_a_dataset.mkdir()
    (not_a_dataset / "notes.txt").write_text("hello\n")
    result = runner.invoke(app, ["critic", "train", "-c", "configs/critic/cpu_lora.yaml", "--dataset", str(not_a_dataset), "-o", str(tmp_path / "t3")])
    assert result.exit_code == 2 and "not a critic dataset" in result.output and "Traceback" not in result.output
    assert not any((tmp_path / t).exists() for t in ("t1", "t2", "t3"))


def test_duplicate_manifest_columns_are_refused(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("uid,path,caption,Caption\na,a.obj,a red cube,a blue cone\n")
    with pytest.raises(ValueError, match="'caption' more than once"):
        check_manifest(csv)
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"uid": "a", "path": "a.obj", "caption": "a red cube", "caption": "a blue cone"}\n')
    (row,) = list(manifest_rows(jsonl))
    assert row["reason"] == "invalid_row" and "'caption' appears more than once" in row["error"]
    result = runner.invoke(app, ["data", "build", "--manifest", str(csv), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "more than once" in result.output and not (tmp_path / "out").exists()


def test_text_the_embedded_models_cannot_read_is_warned_about_and_marked(tmp_path, views, caplog):
    critic = Critic.from_pretrained(default_critic_path(), device="cpu")
    assert critic.unreadable_text("a red cube to the left of a blue sphere") is None
    note = critic.unreadable_text("a zorblax 🙂")
    assert "'zorblax'" in note and "'🙂'" in note and "vocabulary" in note
    long = "a red cube " * 1000
    assert "tokens, more than the" in critic.unreadable_text(long)
    from transformers.utils import logging as hf_logging

    fresh = Critic.from_pretrained(default_critic_path(), device="cpu")  # its tokenizer has warned of nothing yet
    hf_logging.enable_propagation()  # transformers' records reach caplog (they do not by default)
    try:
        with caplog.at_level("WARNING"):
            fresh.unreadable_text(long)
            fresh.score(torch.zeros(1, 4, 3, 32, 32), [long])  # the tokenizer's own "indexing errors" line is ours now
    finally:
        hf_logging.disable_propagation()
    assert "indexing errors" not in caplog.text
    (views / "a" / "caption.txt").write_text("a zorblax 🙂")
    try:
        result = runner.invoke(app, ["critic", "score", "--input", str(views), "-o", str(tmp_path / "s")])
    finally:
        (views / "a" / "caption.txt").write_text("a red cube")
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "s" / "scores.jsonl").read_text().splitlines()[0])
    assert "zorblax" in row["text_warning"]  # scored, and marked


def test_eval_critic_prints_positives_and_eval_tifa_writes_a_report(tmp_path):
    data = tmp_path / "data"
    assert runner.invoke(app, ["data", "build", "--procedural", "4", "-o", str(data), "render.resolution=32", "progress=false"]).exit_code == 0
    result = runner.invoke(app, ["eval", "critic", "--dataset", str(data), "--split", "train", "-o", str(tmp_path / "e")])
    assert result.exit_code == 0 and "(positives): accuracy" in result.output
    page = (tmp_path / "e" / "report.html").read_text()
    assert "ECE (expected calibration error)" in page and "Pairwise accuracy" in page


def test_help_fits_80_columns_without_cutting_names_and_marks_required():
    for args in (["eval", "prior"], ["eval", "t3bench"], ["eval", "tifa"], ["eval", "procedural"], ["data", "build"], ["generate"]):
        result = runner.invoke(app, [*args, "--help"], terminal_width=80, env={"COLUMNS": "80"})
        assert result.exit_code == 0 and "…" not in result.output, (args, result.output)
        assert max(len(line) for line in result.output.splitlines()) <= 80
    prior = runner.invoke(app, ["eval", "prior", "--help"], terminal_width=80, env={"COLUMNS": "80"}).output
    assert "--samples-per-relation-prompt" in prior
    tifa = runner.invoke(app, ["eval", "tifa", "--help"], terminal_width=80, env={"COLUMNS": "80"}).output
    assert "output folder works) [required]" in " ".join(tifa.split())  # --generations


def test_ctrl_c_says_how_to_resume(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "coherendream.cli", "generate", "-c", "configs/generate/cpu_tiny.yaml", "-o", str(tmp_path / "g"), "--steps", "2000",
           "checkpoint_every=5", "progress=false"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "g" / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: finished work is kept; run the same command again to resume" in err
    again = subprocess.run([*cmd[:-2], "max_steps_this_run=1", "progress=false"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "resuming from" in again.stderr, again.stderr
