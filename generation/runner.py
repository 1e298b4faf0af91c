"""Text-to-3D generation with TCSD: prompt -> layout -> Gaussians -> optimisation -> PLY, views, GIF.

``generate(config)`` reads top to bottom:

1. build the swappable parts: the SDS prior (``prior: none`` allowed), the critic (a path, or any
   object with ``score(views [B, V, 3, H, W], prompts) -> .margin`` passed in), the layout planner;
2. plan the layout (or read it back when resuming), seed ``num_gaussians`` Gaussians inside the
   boxes with each object's colour, build Adam with one learning rate per parameter group;
3. loop: sample V orbit cameras, render ``[V, 3, H, W]``, compute the image gradient of
   ``L_SDS + lambda * L_critic`` (``coherendream.generation.tcsd``; or reward-weighted SDS),
   backpropagate it once into the Gaussians, step, log one JSONL record; a step whose loss or
   gradient is NaN/inf is skipped (no update) and logged as such; checkpoint every
   ``checkpoint_every`` steps (model, optimiser, step, RNG states; atomic);
4. write the outputs (3DGS PLY, PNG views from ``outputs.orbit``, turntable GIF and MP4 (through
   imageio-ffmpeg), the resolved config, the layout JSON, summary.json).

Re-running with the same ``output_dir`` resumes from the last checkpoint; all randomness comes from
one seeded ``torch.Generator`` (CPU) whose state is checkpointed, so an interrupted and resumed run
ends with the same Gaussians as an uninterrupted one (on CPU, bit for bit).

Output folder layout::

    config.yaml  layout.json  metrics.jsonl  summary.json  gaussians.ply  turntable.gif [turntable.mp4]
    views/az000.png views/az090.png views/az180.png views/az270.png  views/grid.png
    checkpoints/last.pt
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from coherendream.cameras import OrbitSpec, camera_tensors, ring_azimuths, scorer_orbit
from coherendream.config import dump_yaml, to_dict
from coherendream.devices import compute_record, log_compute, resolve_device
from coherendream.generation.camera_sampler import OrbitCameraSampler, sample_jittered_orbit
from coherendream.generation.gaussians import GaussianModel
from coherendream.generation.guidance import SDSConfig
from coherendream.generation.layout import colors_from_prompts, sample_points_in_layout, validate_layout
from coherendream.generation.run_logger import REPORT_TO, RunLogger
from coherendream.generation.tcsd import CriticTerm, ObjectCriticTerm, StepGradients, TCSDConfig, object_groups, reward_weighted_sds, tcsd_step
from coherendream.grid import GridLayout, tile
from coherendream.io import atomic_path, read_jsonl, write_json, write_jsonl, write_text
from coherendream.output_folder import OutputFolder

__all__ = [
    "LayoutSettings",
    "GaussianInit",
    "LearningRates",
    "CameraSettings",
    "CriticSettings",
    "OutputSettings",
    "GenerateConfig",
    "GenerationResult",
    "generate",
    "build_optimizer",
    "build_planner",
    "score_model",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoints/last.pt"
# Keys whose change does not alter the optimisation of steps already done: a run may be resumed
# with these changed (e.g. more steps, another device); anything else must match the checkpoint.
_RESUMABLE_CHANGES = {"steps", "max_steps_this_run", "checkpoint_every", "output_dir", "device", "progress", "outputs", "resume"}


# --------------------------------------------------------------------------------------------
# Config tree
# --------------------------------------------------------------------------------------------


@dataclass
class LayoutSettings:
    """Which planner turns the prompt into boxes, and how Gaussians are seeded in them.

    ``planner``: ``rules`` (offline, deterministic), ``none`` (no layout: one central box for the
    whole prompt, the ablation of layout initialisation), ``openai`` (an OpenAI-compatible endpoint,
    e.g. a local vLLM server: ``model``, ``base_url``, ``api_key_env``) or ``transformers`` (a local
    chat model: ``model`` is its hub id or folder, run on ``llm_device``). LLM planners fall back
    to the rules when their answer fails validation ``max_attempts`` times.
    """

    planner: Literal["rules", "none", "openai", "transformers"] = "rules"
    model: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_attempts: int = 3
    temperature: float = 0.0
    json_mode: bool = False
    timeout: float = 60.0
    llm_device: str = "cpu"
    max_new_tokens: int = 768
    point_shape: Literal["ellipsoid", "box"] = "ellipsoid"
    min_points_per_object: int = 64


@dataclass
class GaussianInit:
    """Initial Gaussians: isotropic std ``scale`` (world units; None = 3DGS's 3-NN rule), one opacity.

    ``colors``: ``"prompt"`` seeds each box with the colour word of its object's prompt (grey when
    there is none); ``"gray"`` starts every Gaussian grey, so that colours come from the guidance
    alone (the ablation that shows what the critic's feedback contributes).
    """

    scale: float | None = 0.02
    opacity: float = 0.1
    colors: Literal["prompt", "gray"] = "prompt"


@dataclass
class LearningRates:
    """Adam learning rates per parameter group (raw parameters, see ``GaussianModel``)."""

    means: float = 1.0e-3
    log_scales: float = 5.0e-3
    quats: float = 1.0e-3
    opacity_logits: float = 2.0e-2
    colors: float = 2.0e-2


@dataclass
class CameraSettings:
    """Orbit camera ranges (degrees, world units; the scene lives in the unit cube) and background RGB."""

    elevation_range: tuple[float, float] = (0.0, 30.0)
    distance_range: tuple[float, float] = (2.2, 2.8)
    fov_range: tuple[float, float] = (35.0, 45.0)
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass
class CriticSettings:
    """The critic checkpoint: ``path`` (a merged model or adapter folder, or a hub id) + optional
    ``adapter``; ``dtype`` default bf16 on CUDA, fp32 on CPU. ``path: null`` = the embedded procedural critic in modes tcsd and reward_weighted, none in mode sds."""

    path: str | None = None
    adapter: str | None = None
    dtype: str | None = None


@dataclass
class OutputSettings:
    """Final renders: the orbit of the saved views (``views/az<deg>.png`` and a grid; its
    elevation, distance and FoV also frame the turntable), their resolution (default: the
    training resolution), turntable frames and fps, and whether to write an MP4 besides the GIF
    (through imageio-ffmpeg; a codec that fails leaves a note and the other outputs)."""

    orbit: OrbitSpec = field(default_factory=OrbitSpec)
    resolution: int | None = None
    turntable_frames: int = 36
    turntable_fps: int = 12
    mp4: bool = True


@dataclass
class GenerateConfig:
    """Everything a generation run needs (YAML + ``key=value`` overrides via ``load_config``).

    ``mode``: ``sds`` (prior only; a critic, if given, is only used to score the result),
    ``tcsd`` (prior + critic term, or critic alone with ``prior: none``), ``reward_weighted``
    (reward-weighted SDS, needs both). ``prior``: an :class:`SDSConfig` mapping (with no
    ``pretrained_model_name_or_path``: the embedded prior on a CPU, SD 2.1-base on a GPU), or
    ``none`` for no prior at all.
    ``max_steps_this_run``: stop (with a checkpoint) after this many steps of this invocation;
    re-running continues. ``resume: false`` discards an existing checkpoint in ``output_dir``.
    ``device``: ``auto`` (cuda when available) | ``cpu`` | ``cuda``; ``backend``: rasteriser
    (``auto`` = gsplat on CUDA, else the PyTorch one). ``report_to``: ``none`` | ``tensorboard`` |
    ``wandb``: per-step losses, critic P(yes), lambda and gradient norms, and the step's views
    every ``log_images_every`` steps (:mod:`~coherendream.generation.run_logger`).
    """

    prompt: str = "a red cube to the left of a blue sphere"
    seed: int = 0
    steps: int = 300
    resolution: int = 64
    num_views: int = 4
    num_gaussians: int = 4096
    mode: Literal["sds", "tcsd", "reward_weighted"] = "tcsd"
    layout: LayoutSettings = field(default_factory=LayoutSettings)
    init: GaussianInit = field(default_factory=GaussianInit)
    lr: LearningRates = field(default_factory=LearningRates)
    cameras: CameraSettings = field(default_factory=CameraSettings)
    prior: SDSConfig | Literal["none"] | None = field(default_factory=SDSConfig)
    critic: CriticSettings = field(default_factory=CriticSettings)
    tcsd: TCSDConfig = field(default_factory=TCSDConfig)
    checkpoint_every: int = 100
    max_steps_this_run: int | None = None
    resume: bool = True
    output_dir: str = "outputs/generate"
    device: str = "auto"
    backend: Literal["auto", "torch", "gsplat"] = "auto"
    progress: bool = True
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    log_images_every: int = 50
    outputs: OutputSettings = field(default_factory=OutputSettings)

    def __post_init__(self) -> None:
        if self.prior == "none":
            self.prior = None
        if not self.prompt.strip():
            raise ValueError("prompt is empty")
        for name in ("steps", "resolution", "num_views", "num_gaussians", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps_this_run is not None and self.max_steps_this_run < 0:
            raise ValueError(f"max_steps_this_run must be >= 0 or null, got {self.max_steps_this_run}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.log_images_every < 0:
            raise ValueError(f"log_images_every must be >= 0, got {self.log_images_every}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:i], got {self.device!r}")

    @property
    def uses_critic(self) -> bool:
        """Whether a run loads a critic: its mode needs one, or one is named (to score the result)."""
        return self.critic.path is not None or self.mode in ("tcsd", "reward_weighted")


@dataclass
class GenerationResult:
    """What a call of :func:`generate` did.

    ``model``: the Gaussians at the end of this call. ``step``: optimisation steps done in total.
    ``finished``: ``step == config.steps`` (outputs written). ``resumed_from``: the checkpoint step
    this call started from (None: a fresh run). ``skipped_steps``: steps whose update was dropped
    for a non-finite loss/gradient (this call's and the resumed ones'). ``final_critic``:
    ``{"margin", "prob_yes", "azimuths", "elevation"}`` of the critic on its training orbit (None without a critic).
    ``paths``: output files by name.
    """

    output_dir: Path
    model: GaussianModel
    step: int
    finished: bool
    resumed_from: int | None
    skipped_steps: list[int]
    final_critic: dict[str, float] | None
    paths: dict[str, Path]
    seconds: float
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------


def build_planner(settings: LayoutSettings) -> Any:
    """The layout planner named by ``settings`` (anything with ``plan(prompt) -> LayoutResult``)."""
    from coherendream.generation.layout_rules import RuleBasedPlanner, WholePromptPlanner

    if settings.planner == "rules":
        return RuleBasedPlanner()
    if settings.planner == "none":
        return WholePromptPlanner()
    common = {"max_attempts": settings.max_attempts}
    if settings.planner == "openai":
        from coherendream.generation.layout_llm import OpenAIPlanner

        if not settings.model:
            raise ValueError("layout.planner=openai needs layout.model (the served model's name)")
        return OpenAIPlanner(
            settings.model, base_url=settings.base_url, api_key_env=settings.api_key_env, timeout=settings.timeout,
            temperature=settings.temperature, json_mode=settings.json_mode, **common,
        )  # fmt: skip
    from coherendream.generation.layout_llm import TransformersPlanner

    if not settings.model:
        raise ValueError("layout.planner=transformers needs layout.model (a hub id or local folder)")
    return TransformersPlanner(settings.model, device=settings.llm_device, max_new_tokens=settings.max_new_tokens, **common)


def build_optimizer(model: GaussianModel, lr: LearningRates) -> torch.optim.Adam:
    """Adam over the five raw parameter groups, each with its own learning rate (named groups,
    in a fixed order, so an optimiser state dict loads back onto a rebuilt optimiser)."""
    groups = [{"params": [getattr(model, name)], "lr": getattr(lr, name), "name": name} for name in ("means", "log_scales", "quats", "opacity_logits", "colors")]
    # eps 1e-15 as in 3DGS: raw Gaussian parameters can have tiny gradients that Adam should still follow.
    return torch.optim.Adam(groups, lr=lr.means, eps=1e-15)


@torch.no_grad()
def render_views(model: GaussianModel, orbit: OrbitSpec, resolution: int, background: torch.Tensor, backend: str, chunk: int = 8) -> torch.Tensor:
    """``[V, 3, R, R]`` renders in [0, 1] from the fixed cameras of ``orbit`` (its azimuths; not
    its random views), ``chunk`` cameras at a time."""
    cams = dataclasses.replace(orbit, random_views=0).cameras(resolution)
    out = []
    for i in range(0, len(cams), chunk):
        vm, ks = camera_tensors(cams[i : i + chunk], model.means.device)
        out.append(model.render(vm, ks, resolution, resolution, backgrounds=background, backend=backend).rgb.permute(0, 3, 1, 2))
    return torch.cat(out).clamp(0.0, 1.0)


@torch.no_grad()
def score_model(model: GaussianModel, critic: Any, prompt: str, resolution: int, background: torch.Tensor, backend: str = "auto") -> dict[str, Any]:
    """The critic's ``margin`` and ``prob_yes`` of the model seen from the critic's own training
    orbit (``coherendream.cameras.scorer_orbit``: the views it learned to judge), with that orbit."""
    orbit = scorer_orbit(critic)
    views = render_views(model, orbit, resolution, background, backend)
    out = critic.score(views[None], [prompt])
    margin = float(out.margin.float().reshape(-1)[0])
    prob = float(out.prob_yes.float().reshape(-1)[0]) if hasattr(out, "prob_yes") else 1.0 / (1.0 + math.exp(-margin))
    return {"margin": margin, "prob_yes": prob, "azimuths": list(orbit.azimuths), "elevation": orbit.elevation}


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[C, 3, H, W]`` in [0, 1] -> ``[C, H, W, 3]`` uint8."""
    return (images.permute(0, 2, 3, 1).clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def write_outputs(model: GaussianModel, config: GenerateConfig, out: Path, background: torch.Tensor, backend: str) -> tuple[dict[str, Path], list[str]]:
    """PLY, PNG views from ``outputs.orbit`` (+ a grid of them), turntable GIF (and MP4 when possible)."""
    import imageio.v3 as iio

    paths: dict[str, Path] = {}
    notes: list[str] = []
    res = config.outputs.resolution or config.resolution
    paths["ply"] = out / "gaussians.ply"
    model.export_ply(paths["ply"])
    orbit = config.outputs.orbit
    views = _to_uint8(render_views(model, orbit, res, background, backend))
    for az, img in zip(orbit.azimuths, views):
        key = f"view_{round(az) % 360:03d}"
        paths[key] = out / "views" / f"az{round(az) % 360:03d}.png"
        _save_png(paths[key], img)
    paths["grid"] = out / "views" / "grid.png"
    _save_png(paths["grid"], tile(views, GridLayout.for_views(len(views))))
    n = config.outputs.turntable_frames
    if n > 0:
        turntable = dataclasses.replace(orbit, azimuths=ring_azimuths(n), random_views=0)
        frames = _to_uint8(render_views(model, turntable, res, background, backend))
        paths["gif"] = out / "turntable.gif"
        with atomic_path(paths["gif"]) as tmp:
            iio.imwrite(tmp, list(frames), extension=".gif", duration=1000.0 / config.outputs.turntable_fps, loop=0)
        if config.outputs.mp4:
            try:
                with atomic_path(out / "turntable.mp4") as tmp:
                    # ffmpeg picks the container from the file name, and the temporary name ends in .tmp
                    iio.imwrite(tmp, frames, extension=".mp4", plugin="FFMPEG", fps=config.outputs.turntable_fps, output_params=["-f", "mp4"])
                paths["mp4"] = out / "turntable.mp4"
            except Exception as err:  # a broken codec install must not lose the run's other outputs
                notes.append(f"no MP4: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return paths, notes


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, step: int, model: GaussianModel, optimizer: torch.optim.Optimizer, generator: torch.Generator, config: GenerateConfig, skipped: list[int]) -> None:
    """Atomic ``torch.save`` of everything a resume needs (all tensors on CPU; weights_only-loadable)."""
    state = {
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "config": to_dict(config),
        "skipped": list(skipped),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def run_identity(config: GenerateConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it resumes (``coherendream_run.json``)."""
    return {k: v for k, v in to_dict(config).items() if k not in _RESUMABLE_CHANGES}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _check_parts(config: GenerateConfig, critic: Any, guidance: Any) -> None:
    has_prior = guidance is not None or config.prior is not None
    if config.mode in ("sds", "reward_weighted") and not has_prior:
        raise ValueError(f"mode {config.mode!r} needs a prior: set prior.pretrained_model_name_or_path (prior: none only works with mode tcsd)")
    if config.tcsd.critic.x0_straight_through and config.mode == "tcsd" and not has_prior:
        raise ValueError("tcsd.critic.x0_straight_through needs a prior (x0 is the prior's prediction); set it false with prior: none")


def _finite(step_out: StepGradients) -> bool:
    return math.isfinite(step_out.loss) and step_out.grad is not None and bool(torch.isfinite(step_out.grad).all())


def load_parts(config: GenerateConfig, *, prior: bool = True, critic: bool = True, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """The prior (``"guidance"``, an ``SDSGuidance``; absent with ``prior: none``) and the critic
    (``"critic"``; the embedded one where ``critic.path`` is unset) that ``config`` names, on its
    device; ``prior``/``critic`` False skips one.

    ``cache``: a dict kept by a caller that runs many generations (a benchmark): each prior and
    critic is loaded once and shared by the runs that name the same one, instead of once a run.
    """
    cache = {} if cache is None else cache
    device = resolve_device(config.device)
    parts: dict[str, Any] = {}
    if prior and config.prior is not None:
        key = "prior:" + json.dumps(to_dict(config.prior), sort_keys=True) + str(device)
        if key not in cache:
            from coherendream.generation.guidance import SDSGuidance

            cache[key] = SDSGuidance.from_pretrained(None, config.prior, device)
        parts["guidance"] = cache[key]
    if critic:
        key = f"critic:{config.critic.path}:{config.critic.adapter}:{config.critic.dtype}:{device}"
        if key not in cache:
            from coherendream.critic.model import Critic, default_critic_path

            # no critic named: the embedded procedural critic, as everywhere in the toolkit
            cache[key] = Critic.from_pretrained(config.critic.path or default_critic_path(), adapter=config.critic.adapter,
                                                dtype=config.critic.dtype, device=device)  # fmt: skip
        parts["critic"] = cache[key]
    return parts


def generate(config: GenerateConfig, *, critic: Any = None, guidance: Any = None) -> GenerationResult:
    """Run (or resume) a generation; see the module docstring.

    Args:
        config: The run's settings.
        critic: Optional ready critic (anything with ``score(views, prompts) -> .margin``); default
            loads ``config.critic.path``.
        guidance: Optional ready SDS prior (an ``SDSGuidance``); default loads ``config.prior``.
    """
    t_start = time.perf_counter()
    _check_parts(config, critic, guidance)
    RunLogger.check(config.report_to)  # before minutes of loading, not after
    device = resolve_device(config.device)
    out = Path(config.output_dir)
    ckpt_path = out / CHECKPOINT_NAME
    metrics_path = out / "metrics.jsonl"
    # before minutes of loading: a folder this run may not write is refused now
    folder = OutputFolder(out, "generate", run_identity(config), overwrite=not config.resume, overwrite_flag="resume=false")

    # ---- 1. parts
    loaded = load_parts(config, prior=guidance is None, critic=critic is None and config.uses_critic)
    guidance = guidance if guidance is not None else loaded.get("guidance")
    critic = critic if critic is not None else loaded.get("critic")
    prior_dtype = getattr(guidance, "dtype", torch.float32)
    text_warnings = []  # generated all the same, but that part's gradient ignores those words
    for part in (guidance, critic):
        note = part.unreadable_text(config.prompt) if hasattr(part, "unreadable_text") else None
        if note:
            text_warnings.append(note)
            logger.warning("%s: its term ignores what it cannot read", note)
    if guidance is not None:
        log_compute("prior", device, prior_dtype, config.prior.wanted_dtype())
    critic_config = getattr(critic, "config", None)  # None without a critic, or for a scorer without a CriticConfig
    critic_views = getattr(critic_config, "num_views", None)
    if critic_views is not None and critic_views != config.num_views:
        raise ValueError(f"the critic expects {critic_views} views per sample but num_views={config.num_views}")
    trained_at = getattr(critic_config, "view_distance", None)
    lo, hi = config.cameras.distance_range
    if trained_at is not None and not lo <= trained_at <= hi:
        # not an error: a user may mean it, but the critic then judges objects at a size it never saw
        warnings.warn(f"the critic's views were rendered from distance {trained_at:g}, outside cameras.distance_range "
                      f"[{lo:g}, {hi:g}]: its gradient comes from views off its training distribution", stacklevel=2)

    # ---- 2. layout, Gaussians, optimiser (or the checkpoint's)
    folder.take()  # only now: a prior or critic that does not load leaves no folder
    state = None
    if ckpt_path.is_file():
        if config.resume:  # the folder's record has these settings: the checkpoint is this run's
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            logger.info("resuming from %s (step %d of %d)", ckpt_path, int(state["step"]), config.steps)
        else:
            ckpt_path.unlink()
    generator = torch.Generator().manual_seed(config.seed)  # CPU: same draws on every device
    if state is not None:
        # The layout of the checkpointed run, not a new plan (an LLM planner need not repeat itself).
        layout = validate_layout(json.loads((out / "layout.json").read_text(encoding="utf-8"))["layout"], check_geometry=False)
    else:
        planned = build_planner(config.layout).plan(config.prompt)
        layout = planned.layout
        write_json(out / "layout.json", {"prompt": config.prompt, "source": planned.source, "errors": planned.errors,
                                         "repairs": planned.repairs, "layout": layout.to_dict()})  # fmt: skip
    points, object_ids = sample_points_in_layout(
        layout, config.num_gaussians, generator, min_per_object=config.layout.min_points_per_object, shape=config.layout.point_shape
    )
    if config.init.colors == "prompt":
        colors = colors_from_prompts(layout)[object_ids]
    else:
        colors = torch.full((len(points), 3), 0.5)
    model = GaussianModel.from_points(points, colors, scale=config.init.scale, opacity=config.init.opacity, object_ids=object_ids).to(device)
    optimizer = build_optimizer(model, config.lr)
    start, skipped = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer = build_optimizer(model, config.lr)  # over the loaded Parameters
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start, skipped = int(state["step"]), list(state["skipped"])
    write_text(out / "config.yaml", dump_yaml(config))
    # Metrics of steps after the checkpoint were lost with the interrupted run: they are redone.
    old = read_jsonl(metrics_path) if metrics_path.is_file() and state is not None else []
    write_jsonl(metrics_path, [r for r in old if r.get("step", -1) < start])

    # ---- 3. optimisation
    sampler = OrbitCameraSampler(config.num_views, config.resolution, None, config.cameras.elevation_range, config.cameras.distance_range, config.cameras.fov_range)
    background = torch.tensor(config.cameras.background, dtype=torch.float32, device=device)
    critic_term = CriticTerm(critic, config.tcsd.critic) if config.mode == "tcsd" else None
    tc = config.tcsd.critic
    object_term = ObjectCriticTerm(critic, tc, object_groups(layout)) if critic_term is not None and tc.per_object_weight > 0 else None
    # The steps where the critic judges the step's views (every step of reward-weighted SDS) are
    # seen from the critic's own orbit when tcsd.critic.views is "orbit".
    critic_views_from_orbit = tc.views == "orbit" and (critic_term is not None or config.mode == "reward_weighted")
    critic_orbit = scorer_orbit(critic) if critic_views_from_orbit else None
    stop = config.steps if config.max_steps_this_run is None else min(config.steps, start + config.max_steps_this_run)
    from tqdm.auto import tqdm

    bar = tqdm(range(start, stop), initial=start, total=config.steps, desc="generate", disable=not config.progress, dynamic_ncols=True)
    run_log = RunLogger(config.report_to, out, to_dict(config), config.log_images_every)
    with open(metrics_path, "a", encoding="utf-8") as log:
        for step in bar:
            t0 = time.perf_counter()
            if critic_views_from_orbit and (critic_term is None or critic_term.active(step)):
                cams = sample_jittered_orbit(critic_orbit, config.resolution, None, tc.azimuth_jitter, tc.elevation_jitter, generator, device)
            else:
                cams = sampler.sample(generator, device=device)
            rgb = model.render(cams.viewmats, cams.Ks, config.resolution, config.resolution, backgrounds=background, backend=config.backend)
            rgb = rgb.rgb.permute(0, 3, 1, 2)  # [V, 3, H, W]
            sds_prompts = None
            if guidance is not None:
                sds_prompts = guidance.prompts_for_views(config.prompt, cams.azimuths.tolist(), cams.elevations.tolist())
            if config.mode == "reward_weighted":
                g = reward_weighted_sds(rgb, config.prompt, step, guidance, critic, config.tcsd.reward_weighted, sds_prompts=sds_prompts, generator=generator)
            else:
                g = tcsd_step(rgb, config.prompt, step, guidance=guidance, critic_term=critic_term, sds_prompts=sds_prompts, generator=generator)

            optimizer.zero_grad(set_to_none=True)
            status = "ok"
            per_object = {}
            if object_term is not None and critic_term.active(step):
                # its own renders (each group framed alone), its gradient straight into the Gaussians
                per_object = object_term.backward(model, cams.viewmats, cams.Ks, config.resolution, background,
                                                  g.grad_norm_sds if guidance is not None else None, config.backend)  # fmt: skip
            if g.grad is None and not per_object:
                status = "idle"  # no term active this step (critic-only run between critic steps)
            elif g.grad is not None and not _finite(g):
                status = "skipped: non-finite loss or image gradient"
            else:
                if g.grad is not None:
                    rgb.backward(g.grad)  # one VJP through the rasteriser for all scene terms
                if not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
                    status = "skipped: non-finite parameter gradient"
                else:
                    optimizer.step()
            if status.startswith("skipped"):
                skipped.append(step)
                optimizer.zero_grad(set_to_none=True)  # nothing of the bad step survives
            record = {"step": step, "status": status, **g.log_record(), **per_object, "azimuth": float(cams.azimuths[0]), "elevation": float(cams.elevations[0]),
                      "seconds": time.perf_counter() - t0}  # fmt: skip
            log.write(json.dumps(record) + "\n")
            log.flush()
            run_log.log_step(step, record, rgb)
            bar.set_postfix({k: f"{v:.3g}" for k, v in (("loss", g.loss), ("sds", g.loss_sds), ("critic", g.loss_critic), ("lam", g.lam), ("P(yes)", g.prob_yes)) if v is not None})
            done = step + 1
            if done % config.checkpoint_every == 0 or done == stop:
                save_checkpoint(ckpt_path, done, model, optimizer, generator, config, skipped)
    bar.close()
    run_log.close()
    step = max(stop, start)

    # ---- 4. outputs (only once the run is complete)
    finished = step >= config.steps
    paths: dict[str, Path] = {"config": out / "config.yaml", "layout": out / "layout.json", "metrics": metrics_path, "checkpoint": ckpt_path}
    notes: list[str] = []
    final_critic = None
    if finished:
        if stop == start and not ckpt_path.is_file():
            save_checkpoint(ckpt_path, step, model, optimizer, generator, config, skipped)
        files, notes = write_outputs(model, config, out, background, config.backend)
        paths.update(files)
        if critic is not None:
            final_critic = score_model(model, critic, config.prompt, config.resolution, background, config.backend)
        summary = {
            "prompt": config.prompt, "mode": config.mode, "steps": step, "skipped_steps": skipped,
            "prior": getattr(getattr(guidance, "config", None), "pretrained_model_name_or_path", None),
            "final_critic": final_critic, "num_gaussians": model.num_gaussians, **compute_record(device, prior_dtype),
            "seconds_this_call": time.perf_counter() - t_start, "resumed_from": start if state is not None else None, "notes": notes,
            "text_warnings": text_warnings,
        }  # fmt: skip
        write_json(out / "summary.json", summary)
        paths["summary"] = out / "summary.json"
    return GenerationResult(
        output_dir=out, model=model, step=step, finished=finished, resumed_from=start if state is not None else None,
        skipped_steps=skipped, final_critic=final_critic, paths=paths, seconds=time.perf_counter() - t_start, notes=notes,
    )  # fmt: skip
