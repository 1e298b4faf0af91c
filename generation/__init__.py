"""Text-to-3D generation: Gaussians, rasteriser, SDS priors, the TCSD objective, layouts, the run.

``CriticGuidance`` (the critic term for a training loop of your own) is imported on first use, so
that importing a light module of this package (the layout planner) does not load torch.
"""


def __getattr__(name: str):
    if name == "CriticGuidance":
        from coherendream.generation.critic_guidance import CriticGuidance

        return CriticGuidance
    raise AttributeError(f"module 'coherendream.generation' has no attribute {name!r}")
