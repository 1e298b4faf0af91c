"""CoherenDream: multimodal-LLM critics of text-to-3D alignment.

Subpackages: ``coherendream.data`` (multiview alignment datasets), ``coherendream.critic``
(LLaVA critic training and scoring), ``coherendream.generation`` (TCSD text-to-3D) and
``coherendream.eval`` (evaluation). This package itself holds the CLI, config loading and the
utilities all of them share (cameras, image grids, atomic file writes).
"""

__version__ = "0.1.0"
