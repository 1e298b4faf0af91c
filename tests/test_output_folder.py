"""Output folders belong to the command that wrote them (coherendream.output_folder), for every
command that writes a folder: another command's folder, a folder of files no command recorded (a
shipped critic), a file, or a run with other settings is refused before anything is written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coherendream.cli import app
from coherendream.critic.model import default_critic_path
from coherendream.output_folder import RECORD_NAME, FolderTaken, OutputFolder, read_record

runner = CliRunner()


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes: what must not change."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_claims_resume_refuse_and_replace(tmp_path):
    out = tmp_path / "run"
    first = OutputFolder(out, "eval critic", {"split": "test"})
    assert first.state == "new" and not out.exists()  # checking writes nothing
    first.take()
    record = read_record(out)
    assert record["command"] == "eval critic" and record["settings"] == {"split": "test"} and record["toolkit_version"]
    (out / "metrics.json").write_text("{}")
    assert OutputFolder(out, "eval critic", {"split": "test"}).resuming
    with pytest.raises(FolderTaken, match=r"other settings \(split \"test\" -> \"validation\"\).*--overwrite"):
        OutputFolder(out, "eval critic", {"split": "validation"})
    with pytest.raises(FolderTaken, match="written by `coherendream eval critic`, not `coherendream eval assets`"):
        OutputFolder(out, "eval assets", {"split": "test"}, overwrite=True)  # overwrite never takes another command's folder
    replaced = OutputFolder(out, "eval critic", {"split": "validation"}, overwrite=True)
    assert replaced.state == "replace" and (out / "metrics.json").exists()  # nothing removed before take()
    replaced.take()
    assert sorted(p.name for p in out.iterdir()) == [RECORD_NAME] and read_record(out)["settings"] == {"split": "validation"}
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FolderTaken, match="is a file, not a folder"):
        OutputFolder(tmp_path / "file.txt", "generate", {})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(FolderTaken, match=r"no coherendream command recorded writing \(notes.txt\)"):
        OutputFolder(tmp_path / "mine", "generate", {}, overwrite=True)


def test_an_unwritable_place_is_one_line():
    with pytest.raises(FolderTaken, match="cannot write"):
        OutputFolder("/proc/coherendream-out", "eval critic", {})
    # a file output too, before any model loads (permission bits would not tell: tests may run as root)
    result = runner.invoke(app, ["prior", "sample", "-p", "a red cube", "-o", "/proc/coherendream-out/grid.png"])
    assert result.exit_code == 2 and "cannot write in /proc" in result.output


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small procedural dataset built by `data build` (so its folder has that command's record)."""
    out = tmp_path_factory.mktemp("ds") / "procedural"
    result = runner.invoke(app, ["data", "build", "--procedural", "6", "-o", str(out), "render.resolution=32", "negatives.pairs_per_asset=1", "progress=false"])
    assert result.exit_code == 0, result.output
    return out


def test_no_command_writes_into_the_shipped_critic(tmp_path, dataset):
    """Every command that writes a folder refuses the shipped critic's folder, before anything loads."""
    shipped = Path(default_critic_path())
    before = _tree(shipped)
    adapter = tmp_path / "adapter"  # what `critic merge` checks before it loads anything
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(shipped)}))
    commands = [
        ["eval", "critic", "--dataset", str(dataset), "-o", str(shipped)],
        ["eval", "tifa", str(tmp_path / "p.txt"), "--generations", str(tmp_path), "-o", str(shipped)],
        ["eval", "procedural", "-o", str(shipped), "--limit", "1", "--steps", "2"],
        ["critic", "score", "--input", str(dataset), "-o", str(shipped)],
        ["data", "build", "--procedural", "2", "-o", str(shipped), "--overwrite"],
        ["data", "export-llava", str(dataset), "-o", str(shipped)],
        ["generate", "-c", "configs/generate/cpu_tiny.yaml", "-o", str(shipped), "--steps", "1"],
        ["critic", "build-tiny", "-o", str(shipped)],
        ["demo", "-o", str(shipped), "--steps", "1"],
        ["critic", "train", "-c", "configs/critic/cpu_lora.yaml", "--dataset", str(dataset), "-o", str(shipped)],
        ["critic", "merge", "--adapter", str(adapter), "-o", str(shipped)],
        ["eval", "assets", "--manifest", str(tmp_path / "m.csv"), "-o", str(shipped)],
        ["eval", "t3bench", str(tmp_path / "p.txt"), "--generations", str(tmp_path), "-o", str(shipped)],
        ["eval", "judge", str(tmp_path / "p.txt"), "--method", f"a={tmp_path}", "--method", f"b={tmp_path}", "-o", str(shipped)],
        ["eval", "prior", "-o", str(shipped)],
        ["eval", "steering", "-o", str(shipped), "--scenes", "1", "--steps", "1"],
    ]
    (tmp_path / "p.txt").write_text("a red cube\n")
    (tmp_path / "m.csv").write_text("id,path,prompt\na,a.obj,a red cube\n")
    for args in commands:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert "no coherendream command recorded writing" in result.output, (args, result.output)
    assert _tree(shipped) == before


def test_a_command_refuses_another_commands_folder(tmp_path, dataset):
    before = _tree(dataset)
    for args in (["eval", "critic", "--dataset", str(dataset), "-o", str(dataset)],
                 ["critic", "score", "--input", str(dataset), "-o", str(dataset), "--overwrite"],
                 ["generate", "-c", "configs/generate/cpu_tiny.yaml", "-o", str(dataset), "--steps", "1"]):  # fmt: skip
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "written by `coherendream data build`" in result.output, (args, result.output)
    assert _tree(dataset) == before


def test_eval_critic_owns_its_folder_and_its_report_says_what_produced_it(tmp_path, dataset):
    out = tmp_path / "eval"
    ok = runner.invoke(app, ["eval", "critic", "--dataset", str(dataset), "--split", "train", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    record = read_record(out)
    assert record["command"] == "eval critic" and record["settings"]["split"] == "train"
    assert record["settings"]["critic"]["critic"] == str(default_critic_path())
    page = (out / "report.html").read_text()
    assert "What produced this report" in page and "coherendream eval critic" in page and record["toolkit_version"] in page
    metrics = json.loads((out / "metrics.json").read_text())
    other = runner.invoke(app, ["eval", "critic", "--dataset", str(dataset), "--split", "test", "-o", str(out)])
    assert other.exit_code == 2 and "other settings (split" in other.output and "--overwrite" in other.output
    assert json.loads((out / "metrics.json").read_text()) == metrics  # nothing replaced
    replaced = runner.invoke(app, ["eval", "critic", "--dataset", str(dataset), "--split", "test", "-o", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert read_record(out)["settings"]["split"] == "test"


def test_data_build_refuses_other_settings_and_export_claims_its_folder(tmp_path, dataset):
    other = runner.invoke(app, ["data", "build", "--procedural", "7", "-o", str(dataset), "render.resolution=32", "negatives.pairs_per_asset=1", "progress=false"])
    assert other.exit_code == 2 and "other settings" in other.output and "source.num_scenes 6 -> 7" in other.output
    export = tmp_path / "llava"
    assert runner.invoke(app, ["data", "export-llava", str(dataset), "-o", str(export)]).exit_code == 0
    assert read_record(export)["command"] == "data export-llava"
    positional = runner.invoke(app, ["data", "export-llava", str(dataset), str(tmp_path / "llava2")])  # the older form still works
    assert positional.exit_code == 0 and read_record(tmp_path / "llava2")["command"] == "data export-llava"
    file_out = tmp_path / "out.txt"
    file_out.write_text("keep me")
    result = runner.invoke(app, ["data", "build", "--procedural", "2", "-o", str(file_out)])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output and file_out.read_text() == "keep me"
