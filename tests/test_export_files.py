"""export/files.py: published files are replaced by new files, never rewritten in place,
so a hard link (a model repository) or an open memory map keeps the old bytes."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.files import new_file, publish_tree, replace_bytes, save_onnx, write_json


def _graph(n: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(n, dtype=np.float32).reshape(1, n), "w")
    node = helper.make_node("Add", ["x", "w"], ["y"])
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_hard_link_keeps_the_old_bytes(tmp_path):
    path, link = tmp_path / "embeddings.npy", tmp_path / "repo-link.npy"
    np.save(path, np.ones(1000, np.float32))
    os.link(path, link)
    mapped = np.load(link, mmap_mode="r")  # a running server's view
    replace_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert np.load(link).sum() == 1000 and mapped.sum() == 1000
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(link.stat().st_mode)


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "manifest.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError), new_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_save_onnx_external_data_and_links(tmp_path):
    path = tmp_path / "decoder.onnx"
    assert save_onnx(_graph(512), path, threshold=0) == {
        "decoder.onnx": "graph",
        "decoder.onnx.data": "external_data",
    }
    os.link(path, tmp_path / "old.onnx")
    os.link(tmp_path / "decoder.onnx.data", tmp_path / "old.onnx.data")
    old = [(tmp_path / f).read_bytes() for f in ("old.onnx", "old.onnx.data")]
    # A smaller graph: no external data; the stale .data goes, the linked copies stay.
    assert save_onnx(_graph(8), path) == {"decoder.onnx": "graph"}
    assert not (tmp_path / "decoder.onnx.data").exists()
    assert [(tmp_path / f).read_bytes() for f in ("old.onnx", "old.onnx.data")] == old
    assert onnx.load(str(path)).graph.initializer[0].dims == [1, 8]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_publish_tree_replaces_files(tmp_path):
    out, stage = tmp_path / "out", tmp_path / "out" / ".stage"
    (stage / "clip_vision").mkdir(parents=True)
    (out / "config.json").write_text("old")
    os.link(out / "config.json", tmp_path / "link")
    (stage / "config.json").write_text("new")
    (stage / "clip_vision" / "config.json").write_text("clip")
    assert publish_tree(stage, out) == ["clip_vision/config.json", "config.json"]
    assert (out / "config.json").read_text() == "new"
    assert (tmp_path / "link").read_text() == "old"


def test_export_cleans_up_its_staging(tiny_ckpt, tmp_path):
    from export.onnx_export import STAGING_PREFIX, export_onnx

    out = tmp_path / "art"
    (out / f"{STAGING_PREFIX}killed").mkdir(parents=True)  # what a killed export leaves
    (out / f"{STAGING_PREFIX}killed" / "decoder.onnx").write_bytes(b"partial")
    export_onnx(tiny_ckpt, out, progress=False)
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
    with pytest.raises(Exception, match="checkpoint directory not found"):
        export_onnx(tmp_path / "nope", tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()
