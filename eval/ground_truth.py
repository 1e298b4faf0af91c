"""Ground truth for generated procedural prompts, without humans.

For a prompt of the procedural grammar ("a red cube to the left of a blue sphere"), the layout
planner gives one box per object and the Gaussians carry the index of the box they were seeded
in (``GaussianModel.object_ids``). After generation:

* **colour**: each object's Gaussians are rendered alone from the orbit views (over black, so that
  ``sum(rgb) / sum(alpha)`` is their mean visible colour) and the nearest palette colour is
  compared with the colour word of the object's prompt;
* **position**: the opacity-weighted centroid of each object's Gaussians is checked against every
  relation of the layout by ``coherendream.vocabulary.relation_holds``, each centroid a point (x
  for left/right, z for in front/behind, y for on top/above/below).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from coherendream.cameras import OrbitSpec, camera_tensors
from coherendream.vocabulary import EXTRA_COLORS, PALETTE, first_color_word, relation_holds


# The palette leaves out achromatic colours (the background is white), but a generated object can
# be grey or white: without these references an untouched grey object would be read as "purple".
_REFERENCES = {**PALETTE, "gray": EXTRA_COLORS["gray"], "white": EXTRA_COLORS["white"]}


def nearest_palette_color(rgb: np.ndarray) -> str:
    """Name of the palette colour (or gray/white) closest to an RGB colour in [0, 1], Euclidean in RGB."""
    names = list(_REFERENCES)
    dist = [float(np.linalg.norm(np.asarray(_REFERENCES[n]) - rgb)) for n in names]
    return names[int(np.argmin(dist))]


# Relations a pair of centroids can be read for (``inside`` and ``with`` need the boxes).
CENTROID_RELATIONS = frozenset({"left_of", "right_of", "in_front_of", "behind", "on_top_of", "above", "below", "next_to"})


def object_colors(model: Any, num_objects: int, resolution: int = 96, orbit: OrbitSpec | None = None) -> list[dict]:
    """Each object's Gaussians (``model.object_ids == k``) rendered alone from ``orbit`` over black:
    ``sum(rgb) / sum(alpha)`` is their mean visible colour, named by the nearest palette colour.

    Returns, per object ``k < num_objects``: ``{"gaussians", "centroid" (opacity-weighted, or None),
    "mean_rgb" (or None when nothing is visible), "color" (palette name or None)}``.
    """
    from coherendream.generation.rasterize import rasterize_gaussians

    orbit = orbit or OrbitSpec()
    cams = orbit.cameras(resolution, rng=np.random.default_rng(0))
    viewmats, Ks = camera_tensors(cams)
    out = []
    with torch.no_grad():
        inputs = model.render_inputs()
        for k in range(num_objects):
            mask = model.object_ids == k
            if not bool(mask.any()):
                out.append({"gaussians": 0, "centroid": None, "mean_rgb": None, "color": None})
                continue
            opac = inputs["opacities"] * mask.to(inputs["opacities"].dtype)
            w = opac / opac.sum().clamp_min(1e-12)
            centre = (inputs["means"] * w[:, None]).sum(0).double().numpy()
            ras = rasterize_gaussians(**{**inputs, "opacities": opac}, viewmats=viewmats, Ks=Ks, width=resolution, height=resolution)
            alpha = ras.alpha.sum().item()
            color = (ras.rgb.sum(dim=(0, 1, 2)) / max(alpha, 1e-9)).clamp(0, 1).double().numpy() if alpha > 1e-6 else None
            out.append({"gaussians": int(mask.sum()), "centroid": centre, "mean_rgb": None if color is None else [round(float(c), 3) for c in color],
                        "color": nearest_palette_color(color) if color is not None else None})  # fmt: skip
    return out


def check_generation(model: Any, layout: Any, resolution: int = 96, orbit: OrbitSpec | None = None) -> dict:
    """Colours and relations of a generated scene against its layout's object prompts.

    Args:
        model: a ``GaussianModel`` whose ``object_ids`` index ``layout.objects``.
        layout: the ``Layout`` the model was seeded from.

    Returns:
        ``{"objects": [{index, prompt, expected_color, rendered_color, color_ok, centroid,
        gaussians}], "relations": [{subject, relation, object, ok}], "color_accuracy",
        "relation_accuracy", "passed"}``; accuracies are None where nothing could be checked.
    """
    objects, centroids = [], {}
    for k, (obj, seen) in enumerate(zip(layout.objects, object_colors(model, len(layout.objects), resolution, orbit))):
        expected = first_color_word(obj.prompt)
        entry = {"index": k, "prompt": obj.prompt, "expected_color": expected, "gaussians": seen["gaussians"]}
        if seen["centroid"] is None:
            objects.append({**entry, "rendered_color": None, "color_ok": False, "centroid": None})
            continue
        centroids[k] = seen["centroid"]
        rendered = seen["color"]
        objects.append({**entry, "rendered_color": rendered, "color_ok": expected is not None and rendered == expected,
                        "centroid": [round(float(c), 4) for c in seen["centroid"]], "mean_rgb": seen["mean_rgb"]})  # fmt: skip
    relations = []
    for rel in layout.relations:
        a, b = centroids.get(rel.subject), centroids.get(rel.object)
        if a is None or b is None:
            ok = False  # an object with no Gaussians left cannot satisfy anything
        elif rel.relation not in CENTROID_RELATIONS:
            continue  # a relation with no test on centroids ("inside", "with")
        else:  # each centroid is a point: a box with lo == hi, read with no tolerance
            ok = relation_holds(rel.relation, a, a, b, b)
        relations.append({"subject": rel.subject, "relation": rel.relation, "object": rel.object, "ok": ok})
    colour_checks = [o["color_ok"] for o in objects if o["expected_color"] is not None]
    rel_checks = [r["ok"] for r in relations]
    color_acc = float(np.mean(colour_checks)) if colour_checks else None
    rel_acc = float(np.mean(rel_checks)) if rel_checks else None
    return {
        "objects": objects,
        "relations": relations,
        "color_accuracy": color_acc,
        "relation_accuracy": rel_acc,
        "passed": bool(colour_checks + rel_checks) and all(colour_checks + rel_checks),
    }
