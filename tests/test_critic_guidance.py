"""`CriticGuidance`: the critic term for a training loop of one's own, through its public object only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from coherendream.critic.model import Critic, default_critic_path
from coherendream.generation import CriticGuidance
from coherendream.generation.tcsd import CriticTermConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "generation.md"


def _documented_loop() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## The critic term in a loop of your own", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_loop_runs_and_raises_the_critics_belief(capsys):
    code = _documented_loop()
    assert "CriticGuidance" in code and len(code.strip().splitlines()) <= 25
    scope = {"STEPS": 25}
    torch.manual_seed(0)
    exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102 -- the documentation's own example
    out, guidance = scope["out"], scope["guidance"]
    assert out["active"] and 0.0 < out["prob_yes"] < 1.0 and out["grad_norm"] > 0
    # the loop optimised the critic's own objective: its belief in the final renders is above the
    # grey start's (the same Gaussians before any step)
    final = guidance(scope["model"].render(scope["viewmats"], scope["Ks"], 32, 32, backgrounds=torch.ones(3)).rgb.detach(), "a red sphere")
    torch.manual_seed(0)
    scope_start: dict = {}
    exec(compile(code.split("for step")[0], str(DOC), "exec"), scope_start)  # noqa: S102 -- the same setup, no step
    start = guidance(scope_start["model"].render(scope["viewmats"], scope["Ks"], 32, 32, backgrounds=torch.ones(3)).rgb.detach(), "a red sphere")
    assert final["prob_yes"] > start["prob_yes"] + 0.1


def test_lambda_schedule_and_inputs():
    critic = Critic.from_pretrained(default_critic_path(), device="cpu")
    views = torch.rand(4, 32, 32, 3, requires_grad=True)
    fixed = CriticGuidance(critic, CriticTermConfig(weight=0.3, start_step=5, every_k=2))
    assert not fixed(views, "a red cube", step=4)["active"] and fixed(views, "a red cube", step=4)["lambda"] == 0.0
    on = fixed(views, "a red cube", step=7)
    assert on["active"] and on["lambda"] == pytest.approx(0.3)
    on["loss_critic"].backward()
    assert views.grad is not None and float(views.grad.norm()) == pytest.approx(on["grad_norm"], rel=1e-4)  # [V,H,W,3] in, gradient back
    matched = CriticGuidance(critic, CriticTermConfig(grad_ratio=0.5))(views, "a red cube", sds_grad_norm=10.0)
    assert matched["lambda"] * matched["grad_norm"] == pytest.approx(5.0, rel=1e-3)  # ||lambda g_critic|| = 0.5 ||g_sds||
    with pytest.raises(ValueError, match="4 views of one asset"):
        fixed(torch.rand(3, 32, 32, 3), "a red cube")
    with pytest.raises(ValueError, match="first view must face the front"):
        fixed(views, "a red cube", azimuth=torch.tensor([90.0, 180.0, 270.0, 0.0]))
