"""Multiview text-alignment datasets from 3D assets (``coherendream.data``).

Assets (meshes, folders of pre-rendered views, procedural scenes) are rendered into V views,
paired with their captions and with hard negatives, and written as a Hugging Face dataset whose
prompt/completion rows TRL's ``SFTTrainer`` takes as they are. Entry point: :func:`build_dataset`.
"""
