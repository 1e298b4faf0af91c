"""Test-wide settings: nothing reaches a model hub, wandb stays off, GL runs headless."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread: the test models are tiny, where more threads only add hand-offs, and
    on a 2-core machine shared with other work extra threads thrash (measured 20x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_if_prior_dir(tmp_path_factory):
    """An IF-shaped pixel-space prior at test size, random weights, saved like any diffusers folder:
    T5 text encoder, no VAE, a UNet whose 6 output channels are noise + learned variance (IF
    stage I's layout), 32 px like the latent tiny prior."""
    from coherendream.generation.pixel_prior import PixelPriorShapes, build_pixel_prior

    shapes = PixelPriorShapes(sample_size=32, block_out_channels=(16, 32), attention_head_dim=2, text_hidden=32,
                              text_layers=1, text_heads=2, text_ff=64, learned_variance=True)  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_if")
    build_pixel_prior(shapes, seed=0).save_pretrained(path)
    return path


#: Benchmark prompt sets live outside the repository (``../shared/bench``; never copied into it).
#: COHERENDREAM_BENCH points to that folder; when it is set (as `.ci/run` does), tests that read it
#: fail if it is missing instead of skipping.
BENCH_VARIABLE = "COHERENDREAM_BENCH"


@pytest.fixture(scope="session")
def t3bench_dir():
    """The folder of T3Bench's prompt files (``prompt_single/surr/multi.txt``)."""
    from pathlib import Path

    given = os.environ.get(BENCH_VARIABLE)
    root = Path(given) if given else Path(__file__).resolve().parents[2] / "shared" / "bench"
    path = root / "t3bench"
    if not (path / "prompt_multi.txt").is_file():
        if given:
            pytest.fail(f"{BENCH_VARIABLE}={given}: no t3bench/prompt_multi.txt under it")
        pytest.skip(f"T3Bench prompt files not found at {path}; set {BENCH_VARIABLE} to the folder holding t3bench/ to run this test")
    return path
