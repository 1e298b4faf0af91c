"""Export a built dataset to LLaVA's conversation JSON.

LLaVA's training scripts read ``[{"id", "image", "conversations": [{"from": "human", "value":
"<image>\\n<question>"}, {"from": "gpt", "value": "Yes"}]}]`` with image paths relative to an image
folder. Each distinct grid is written once (named by its content hash), since the positive and
negative rows of an asset share their views.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from coherendream.data.build import load_built_dataset
from coherendream.grid import GridLayout, tile
from coherendream.io import atomic_path, write_json
from coherendream.output_folder import OutputFolder


def export_llava(dataset_dir: str | Path, output_dir: str | Path, split: str = "train") -> Path:
    """Write ``output_dir/images/*.png`` and ``output_dir/<split>.json``; returns the JSON path."""
    from PIL import Image

    dsd = load_built_dataset(dataset_dir)
    if split not in dsd:
        raise ValueError(f"{dataset_dir}: no split {split!r} (have {sorted(dsd)})")
    ds = dsd[split].cast_column("images", dsd[split].features["images"]).with_format(None)
    out = OutputFolder(output_dir, "data export-llava", {"dataset": str(dataset_dir), "split": split}).take()
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for row in ds:
        images = row["images"]
        if len(images) == 1:
            grid = images[0]
        else:  # image_mode "views": LLaVA-1.5 takes one image, so tile the views
            views = np.stack([np.asarray(im.convert("RGB")) for im in images])
            grid = Image.fromarray(tile(views, GridLayout.for_views(len(views))))
        buf = io.BytesIO()
        grid.convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
        name = f"{hashlib.sha1(data).hexdigest()}.png"
        target = out / "images" / name
        if not target.exists():
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
        # the views become one image: one <image> where the first image part was, the text around it
        parts = row["prompt"][0]["content"]
        first_image = next((i for i, part in enumerate(parts) if part["type"] == "image"), 0)
        before = "".join(part["text"] for part in parts[:first_image] if part["type"] == "text")
        after = "".join(part["text"] for part in parts[first_image:] if part["type"] == "text")
        answer = row["completion"][0]["content"][0]["text"]
        records.append(
            {
                "id": row["id"],
                "image": f"images/{name}",
                "conversations": [{"from": "human", "value": f"{before}<image>\n{after}"}, {"from": "gpt", "value": answer}],
            }
        )
    path = out / f"{split}.json"
    write_json(path, records)
    return path
