"""Building an index from image folders and webdataset shards with the fake colour pipeline."""

from __future__ import annotations

import json
import pickle

import pytest
from app_helpers import FakePipeline, bomb_png, coloured, png_bytes, write_shard

from mmcl.data.decode import load_image as open_image
from mmcl.index import EmbeddingIndex, build_index, iter_samples, read_manifest
from mmcl.utils import UserError


def test_build_from_folder_retrieves_by_colour(built_index, fake):
    index = EmbeddingIndex.load(built_index)
    assert len(index) == 9  # the corrupt file was skipped
    manifest = read_manifest(built_index)
    assert manifest["info"]["model"] == "fake" and manifest["structure"] == "flat"
    _, metas = index.search(fake.encode_texts(["red"]), k=3)
    assert {m["caption"].split()[1] for m in metas[0]} == {"red"}
    for m in metas[0]:  # thumbnails live inside the index folder and decode
        thumb = built_index / m["image"]
        assert thumb.is_file() and thumb.resolve().is_relative_to(built_index.resolve())
        assert max(open_image(thumb).size) <= 256
        assert m["source"].endswith(".png") and m["key"].startswith("red_")


class _Boom:
    """Unpickling this writes a marker file: proof that a shard's .pkl member was (wrongly) unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_build_from_shards_decodes_only_images_text_json(tmp_path):
    marker = tmp_path / "unpickled"
    items = []
    for i, colour in enumerate(["red", "green", "blue", "red"]):
        members = {"png": png_bytes(coloured(colour, seed=i))}
        if i % 2:
            members["json"] = json.dumps({"caption": f"json {colour} caption"}).encode()
        else:
            members["txt"] = f"a {colour} thing".encode()
        members["pkl"] = pickle.dumps(_Boom(str(marker)))
        items.append((f"s{i:04d}", members))
    items.append(("bomb", {"png": bomb_png(30_000, 30_000), "txt": b"a bomb"}))
    items.append(("corrupt", {"jpg": b"\xff\xd8\xff garbage", "txt": b"broken"}))
    items.append(("textonly", {"txt": b"no image here"}))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "000000.tar", items[:3])
    write_shard(shards / "000001.tar", items[3:])

    fake = FakePipeline()
    out = tmp_path / "idx"
    index = build_index(fake, [str(shards / "{000000..000001}.tar")], out, batch_size=2, progress=False)
    assert len(index) == 4 and not marker.exists()
    assert [m["key"] for m in index.metas] == ["s0000", "s0001", "s0002", "s0003"]
    assert index.metas[1]["caption"] == "json green caption" and index.metas[0]["caption"] == "a red thing"
    assert index.metas[2]["source"].endswith("000000.tar#s0002")
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:08d}.jpg" for i in range(4)]
    _, metas = index.search(fake.encode_texts(["red"]), k=2)
    assert {m["key"] for m in metas[0]} == {"s0000", "s0003"}

    # A folder of shards works too; --append adds, a plain rebuild refuses to clobber, --overwrite replaces.
    with pytest.raises(UserError, match="already holds an index"):
        build_index(fake, [str(shards)], out, progress=False)
    appended = build_index(fake, [str(shards / "000000.tar")], out, append=True, progress=False)
    assert len(appended) == 7 and appended.metas[-1]["id"] == 6 and (out / "images" / "00000006.jpg").is_file()
    replaced = build_index(fake, [str(shards / "000001.tar")], out, overwrite=True, progress=False)
    assert len(replaced) == 1 and sorted(p.name for p in (out / "images").iterdir()) == ["00000000.jpg"]
    assert len(EmbeddingIndex.load(out)) == 1


def test_build_errors(tmp_path, fake):
    with pytest.raises(UserError, match="no such shard"):
        build_index(fake, [str(tmp_path / "missing.tar")], tmp_path / "i", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .tar shards and no images"):
        build_index(fake, [str(tmp_path / "empty")], tmp_path / "i", progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="no readable images"):
        build_index(fake, [str(tmp_path / "bad")], tmp_path / "i", progress=False)


def test_max_samples_and_iter_samples(image_folder):
    samples = list(iter_samples([str(image_folder)]))
    assert len(samples) == 9 and all(im.mode == "RGB" for _, im in samples)
    assert samples[0][0]["caption"] == "a blue square number 0"


def test_open_image_guards(tmp_path):
    with pytest.raises(UserError, match="too large to decode safely"):
        open_image(bomb_png(100_000, 100_000), name="huge.png")  # past PIL's own limit
    with pytest.raises(UserError, match="8000x8000 pixels, more than the 40,000,000 pixel limit"):
        open_image(bomb_png(8000, 8000), name="big.png")  # under PIL's limit, over ours
    with pytest.raises(UserError, match="not a readable image"):
        open_image(b"hello world", name="notes.txt")
    png = png_bytes(coloured("red", size=64))
    with pytest.raises(UserError, match="cut.png: corrupt image data"):
        open_image(png[: len(png) // 2], name="cut.png")  # header fine, pixel data cut
    assert open_image(png_bytes(coloured("red"))).size == (32, 32)
