"""Real third-party assets from Debian's assimp-testmodels: valid ones render, broken ones are rejected."""

import json
from pathlib import Path

import numpy as np
import pytest

from coherendream.cameras import OrbitSpec
from coherendream.data.assets import AssetError, load_mesh
from coherendream.data.build import BuildConfig, build_dataset, load_built_dataset
from coherendream.config import from_dict
from coherendream.data.render import MeshRenderer

ROOT = Path("/usr/share/assimp/models")
if not ROOT.is_dir():
    raise RuntimeError("these tests need Debian's assimp-testmodels (make system-deps installs it)")

VALID = [
    "glTF2/BoxTextured-glTF/BoxTextured.gltf",
    "glTF2/BoxTextured-glTF-Binary/BoxTextured.glb",
    "OBJ/spider.obj",
    "OBJ/box.obj",
    "PLY/Wuson.ply",
    "PLY/cube_binary.ply",
    "STL/Spider_binary.stl",
    "STL/Spider_ascii.stl",
    "OFF/Cube.off",
]
# One file per format that renders in all four views (benchmarks/asset_corpus.py lists them all):
# everything but glTF 2/OBJ/PLY/STL/OFF goes through assimp.
FORMAT_SAMPLE = [
    "3D/box.uc",
    "3D/box_a.3d",
    "3DS/CameraRollAnim.3ds",
    "3MF/box.3mf",
    "AC/SphereWithLight.ac",
    "AC/Wuson.acc",
    "AMF/test1.amf",
    "ASE/CameraRollAnim.ase",
    "B3D/WusonBlitz.b3d",
    "BLEND/4Cubes4Mats_248.blend",
    "COB/dwarf.cob",
    "CSM/ThomasFechten.csm",
    "Collada/COLLADA.dae",
    "Collada/duck.zae",
    "DXF/PinkEggFromLW.dxf",
    "FBX/animation_with_skeleton.fbx",
    "HMP/terrain.hmp",
    "IFC/AC14-FZK-Haus.ifc",
    "IQM/mrfixit.iqm",
    "LWO/LWO2/MappingModes/earth_cylindrical_x.lwo",
    "LWO/LXOB_Modo/CrazyEngine.lxo",
    "LWS/move_x.lws",
    "MD2/faerie.md2",
    "MD5/SimpleCube.md5mesh",
    "MDC/spider.mdc",
    "MDL/MDL (HL1)/alpha_test.mdl",
    "MS3D/Wuson.ms3d",
    "NFF/NFF/ManyEarthsNotJustOne.nff",
    "OBJ/WusonOBJ.obj",
    "OFF/Cube.off",
    "OpenGEX/Example.ogex",
    "PLY/Wuson.ply",
    "Q3D/E-AT-AT.q3o",
    "Q3D/WusonOrange.q3s",
    "RAW/Wuson.raw",
    "SIB/heffalump.sib",
    "SMD/WusonSMD.smd",
    "STL/3DSMaxExport.STL",
    "X/BCN_Epileptic.X",
    "X3D/ComputerKeyboard.x3d",
    "XGL/BCN_Epileptic.zgl",
    "XGL/sample_official.xgl",
    "glTF2/2CylinderEngine-glTF-Binary/2CylinderEngine.glb",
    "glTF2/BoxTexcoords-glTF/boxTexcoords.gltf",
]
BROKEN = {
    "invalid/empty.obj": "empty_file",
    "invalid/empty.ply": "empty_file",
    "invalid/OutOfMemory.off": "corrupt",
    "glTF2/IndexOutOfRange/IndexOutOfRange.gltf": "index_out_of_range",
    "glTF2/BoxWithInfinites-glTF-Binary/BoxWithInfinites.glb": "non_finite",
    "glTF2/MissingBin/BoxTextured.gltf": "corrupt",
    "OBJ/point_cloud.obj": "no_triangles",
    "invalid/empty.x": "empty_file",
    "invalid/malformed.obj": "index_out_of_range",
    "does/not/exist.obj": "missing_file",
}


@pytest.fixture(scope="module")
def renderer():
    r = MeshRenderer(64)
    yield r
    r.release()


@pytest.mark.parametrize("rel", VALID)
def test_valid_models_render_non_empty_views(rel, renderer):
    asset = load_mesh(ROOT / rel)
    lo, hi = asset.bounds
    assert np.isclose(np.max(hi - lo), 1.0, atol=1e-5) and np.allclose((lo + hi) / 2, 0, atol=1e-5)
    out = renderer.render(asset, OrbitSpec().cameras(64))
    coverage = (out.rgba[..., 3] > 0).mean(axis=(1, 2))
    assert np.all(coverage > 0.01), coverage
    assert np.all(coverage < 0.95)


@pytest.mark.parametrize("rel, reason", sorted(BROKEN.items()))
def test_broken_models_raise_with_reason(rel, reason):
    with pytest.raises(AssetError) as info:
        load_mesh(ROOT / rel)
    assert info.value.reason == reason
    assert rel.split("/")[-1] in str(info.value)


def test_one_file_of_every_format_renders(renderer):
    for rel in FORMAT_SAMPLE:
        asset = load_mesh(ROOT / rel)
        coverage = (renderer.render(asset, OrbitSpec().cameras(64)).rgba[..., 3] > 0).mean(axis=(1, 2))
        assert np.all(coverage > 0), (rel, coverage)


def test_assimp_keeps_textures_fans_and_draco(renderer):
    duck = load_mesh(ROOT / "Collada/duck.dae")  # COLLADA with a diffuse texture
    assert any(p.texture is not None and p.uv is not None for p in duck.parts)
    fan = load_mesh(ROOT / "glTF2/glTF-Asset-Generator/Mesh_PrimitiveMode/Mesh_PrimitiveMode_05.gltf")  # a triangle fan
    assert fan.num_faces == 2
    # the Draco-compressed engine is decoded (by assimp's libdraco) to the silhouette of the uncompressed one
    cams = OrbitSpec().cameras(64)
    draco = renderer.render(load_mesh(ROOT / "glTF2/draco/2CylinderEngine.gltf"), cams).rgba[..., 3] > 0
    plain = renderer.render(load_mesh(ROOT / "glTF2/2CylinderEngine-glTF-Binary/2CylinderEngine.glb"), cams).rgba[..., 3] > 0
    assert draco.any() and (draco & plain).sum() / (draco | plain).sum() > 0.95


def test_a_crash_inside_assimp_is_one_rejected_file(monkeypatch, tmp_path):
    import os

    from coherendream.data import assets

    monkeypatch.setattr(assets, "_assimp_read", lambda path: os.abort())  # what assimp's failed assertions do
    with pytest.raises(AssetError, match="assimp crashed") as info:
        load_mesh(ROOT / "FBX/spider.fbx")
    assert info.value.reason == "corrupt"
    (tmp_path / "points.xyz").write_text("0 0 0\n")
    with pytest.raises(AssetError, match="not one of") as info:
        load_mesh(tmp_path / "points.xyz")
    assert info.value.reason == "unsupported_format"


def test_sweep_of_the_whole_package(tmp_path):
    files = sorted(p for p in ROOT.rglob("*") if p.is_file())
    assert len(files) > 500
    manifest = tmp_path / "all.jsonl"
    with manifest.open("w") as fh:
        for i, p in enumerate(files):
            fh.write(json.dumps({"uid": f"m{i:04d}", "path": str(p.relative_to(ROOT)), "caption": f"test model number {i}"}) + "\n")
    cfg = from_dict(BuildConfig, {
        "output_dir": str(tmp_path / "out"),
        "source": {"kind": "manifest", "path": str(manifest), "root": str(ROOT)},
        "render": {"resolution": 32},
        "chunk_size": 64,
        "progress": False,
    })
    result = build_dataset(cfg)
    assert result.finalized
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    built = set()
    for split in load_built_dataset(tmp_path / "out").values():
        built |= set(split["asset_id"])
    # every file is accounted for exactly once: rows or a rejection with a reason
    assert len(built) + len(rejected) == len(files)
    assert not built & {r["uid"] for r in rejected}
    assert all(r["reason"] and r["message"] for r in rejected)
    reasons = {r["reason"] for r in rejected}
    assert {"unsupported_format", "empty_file", "corrupt", "no_triangles", "index_out_of_range", "non_finite"} <= reasons
    uid_of = {str(p.relative_to(ROOT)): f"m{i:04d}" for i, p in enumerate(files)}
    assert {uid_of[v] for v in VALID} <= built
    assert len(built) >= 50


@pytest.mark.parametrize("index, shown", [(-5, "-5"), (7, "7")])
def test_a_face_index_outside_the_vertices_is_named(tmp_path, index, shown):
    header = "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
    header += "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
    (tmp_path / "bad.ply").write_text(header + f"0 0 0\n1 0 0\n0 1 0\n3 0 1 {index}\n")
    with pytest.raises(AssetError, match=f"face index {shown} outside the 3 vertices"):
        load_mesh(tmp_path / "bad.ply")


def test_assimp_formats_build_in_worker_processes(tmp_path):
    # the builder's workers are daemonic processes, which multiprocessing forbids children: the
    # assimp reader must still run there
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"uid": u, "path": p, "caption": f"model {u}"}) + "\n"
                                for u, p in (("spider", "FBX/spider.fbx"), ("duck", "Collada/duck.dae"), ("box", "OBJ/box.obj"))))  # fmt: skip
    cfg = from_dict(BuildConfig, {"output_dir": str(tmp_path / "out"), "source": {"kind": "manifest", "path": str(manifest), "root": str(ROOT)},
                                  "render": {"resolution": 32}, "chunk_size": 1, "num_workers": 2, "splits": {"train": 1.0}, "progress": False})  # fmt: skip
    assert build_dataset(cfg).finalized
    assert set(load_built_dataset(tmp_path / "out")["train"]["asset_id"]) == {"spider", "duck", "box"}
