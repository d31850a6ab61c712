"""The shared contract: preprocessing, metadata and atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from pouta.edge.contract.errors import ImageReadError, MetadataError
from pouta.edge.contract.fsutil import atomic_write_bytes, atomic_write_json
from pouta.edge.contract.geometry import Roi
from pouta.edge.contract.metadata import (
    InputSpec,
    ModelMetadata,
    Thresholds,
    check_io,
    check_request,
    load_for_model,
    metadata_path,
)
from pouta.edge.contract.preprocess import Preprocessor, read_image, read_mask


def test_gray_is_replicated_and_scaled() -> None:
    img = np.full((40, 60), 51, dtype=np.uint8)
    x = Preprocessor(32, 48)(img)
    assert x.shape == (3, 32, 48) and x.dtype == np.float32
    np.testing.assert_allclose(x, 0.2, atol=1e-6)


def test_bgr_becomes_rgb() -> None:
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    img[..., 0] = 255  # blue in BGR
    x = Preprocessor(16, 16)(img)
    assert x[2].min() == 1.0 and x[0].max() == 0.0
    x_rgb = Preprocessor(16, 16)(img, color_order="RGB")
    assert x_rgb[0].min() == 1.0


def test_bgra_and_16_bit_and_bit_depth() -> None:
    bgra = np.zeros((8, 8, 4), dtype=np.uint8)
    bgra[..., 1] = 255
    bgra[..., 3] = 7
    assert Preprocessor(8, 8)(bgra)[1].min() == 1.0
    u16 = np.full((8, 8), 65535, dtype=np.uint16)
    np.testing.assert_allclose(Preprocessor(8, 8)(u16), 1.0)
    mono12 = np.full((8, 8), 4095, dtype=np.uint16)
    np.testing.assert_allclose(Preprocessor(8, 8, bit_depth=12)(mono12), 1.0)
    np.testing.assert_allclose(Preprocessor(8, 8)(mono12), 4095 / 65535, rtol=1e-6)


def test_roi_crop_and_map_back() -> None:
    img = np.zeros((100, 200), dtype=np.uint8)
    img[10:30, 50:90] = 255
    pre = Preprocessor(20, 40, roi=Roi.parse("50,10,40,20"))
    x = pre(img)
    np.testing.assert_allclose(x, 1.0)
    back = pre.geometry(img.shape).to_source(np.ones((20, 40), np.float32))
    assert back.shape == (100, 200)
    assert back[10:30, 50:90].min() == 1.0 and back.sum() == 20 * 40


def test_roi_parse_errors() -> None:
    with pytest.raises(Exception, match="roi"):
        Roi.parse("1,2,3")
    with pytest.raises(Exception, match="roi"):
        Roi.parse([0, 0, -1, 5])


def test_mask_nearest_geometry() -> None:
    m = np.zeros((64, 64), dtype=np.uint8)
    m[:32] = 255
    out = Preprocessor(16, 8).mask(m)
    assert out.dtype == bool and out.shape == (16, 8)
    assert out[:8].all() and not out[8:].any()


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(bad)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty"):
        read_image(empty)
    with pytest.raises(ImageReadError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_read_image_and_mask_roundtrip(tmp_path: Path) -> None:
    img = (np.arange(48 * 32) % 256).astype(np.uint8).reshape(32, 48)
    p = tmp_path / "gray.png"
    cv2.imwrite(str(p), img)
    np.testing.assert_array_equal(read_image(p), img)
    m = np.zeros((8, 8), np.uint8)
    m[2, 3] = 255
    cv2.imwrite(str(tmp_path / "m.png"), m)
    assert read_mask(tmp_path / "m.png").sum() == 1


def _meta(**kw: object) -> ModelMetadata:
    base = dict(
        model_kind="pouta",
        input=InputSpec(height=64, width=96),
        thresholds=Thresholds(image=0.4, pixel=0.5, rule="normal-max-margin", n_normal=10),
    )
    base.update(kw)
    return ModelMetadata(**base)  # type: ignore[arg-type]


def test_metadata_roundtrip(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    meta = _meta(artifact_sha256="ab" * 32)
    meta.save(metadata_path(model))
    back = load_for_model(model)
    assert back.input.width == 96 and back.thresholds is not None
    assert back.thresholds.image == pytest.approx(0.4)
    assert back.versions["python"]
    assert back.model_id.startswith("pouta-full-fp32-abababab")
    derived = back.derive(precision="int8", parent_artifact="m.onnx")
    assert derived.precision == "int8" and derived.input.height == 64


def test_metadata_errors(tmp_path: Path) -> None:
    with pytest.raises(MetadataError, match="not found"):
        load_for_model(tmp_path / "none.onnx")
    p = tmp_path / "bad.onnx.json"
    p.write_text("{not json")
    with pytest.raises(MetadataError, match="bad.onnx.json: invalid JSON"):
        ModelMetadata.load(p)
    d = _meta().to_dict()
    d["schema_version"] = 99
    with pytest.raises(MetadataError, match="schema_version"):
        ModelMetadata.from_dict(d)
    d = _meta().to_dict()
    del d["input"]
    with pytest.raises(MetadataError, match="'input'"):
        ModelMetadata.from_dict(d)
    d = _meta().to_dict()
    d["input"]["color_order"] = "BGR"
    with pytest.raises(MetadataError, match="RGB"):
        ModelMetadata.from_dict(d)


def test_check_io_and_request() -> None:
    meta = _meta()
    check_io(meta, ("N", 3, 64, 96), ["anomaly_map", "score"], "m.onnx")
    with pytest.raises(MetadataError, match="axis 3: 128 != 96"):
        check_io(meta, ("N", 3, 64, 128), ["anomaly_map", "score"], "m.onnx")
    with pytest.raises(MetadataError, match="lack"):
        check_io(meta, ("N", 3, 64, 96), ["anomaly_map"], "m.onnx")
    check_request(meta, "m.onnx", model_kind="pouta", height=64)
    with pytest.raises(MetadataError, match="model_kind is 'pouta'.*'vanilla' was requested"):
        check_request(meta, "m.onnx", model_kind="vanilla")


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "result.json"
    atomic_write_json(target, {"v": 1})

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b'{"v": 2}')
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_shrink_area_antialiases_and_matches_inter_area() -> None:
    from pouta.edge.contract.preprocess import shrink_area

    # 1-px checkerboard: an anti-aliased shrink gives flat mid-grey, a bilinear one aliases.
    board = (np.indices((1080, 1920)).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = shrink_area(board, 224, 224)
    assert small.shape == (224, 224) and abs(float(small.mean()) - 127.5) < 2 and small.std() < 20
    smooth = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (1080, 1920, 3), np.uint8), (0, 0), 3)
    for src in (smooth, smooth[:256, :256], smooth[:384, :640]):
        h, w = (224, 224) if src.shape[0] < 1000 else (320, 480)
        ref = cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA).astype(int)
        got = shrink_area(src, w, h)
        assert got.shape == ref.shape and np.abs(got.astype(int) - ref).mean() < 0.5
    assert Preprocessor(224, 224)(smooth).shape == (3, 224, 224)
