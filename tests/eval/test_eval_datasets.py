import io
import logging
import pickle

import pytest
from eval_helpers import image_index, index_image, labelled_members, png_bytes, write_tar
from PIL import Image

from mmcl.data.reader import list_shards as expand_shards
from mmcl.eval.datasets import ImageFolderDataset, ShardDataset, open_eval_dataset
from mmcl.eval.runner import iterate_batches
from mmcl.utils import UserError


class Boom:
    """Unpickling this writes a marker file: proof that a reader unpickled a member."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_mmcl_shards_json_and_cls_labels_with_sidecar_classnames(tmp_path):
    (tmp_path / "classnames.txt").write_text("cat\ndog\nred fox\n")
    write_tar(tmp_path / "000000.tar", labelled_members([0, 1, 2], [0, "red fox", 1], how="json"))
    write_tar(tmp_path / "000001.tar", labelled_members([3, 4], [2, 0], how="cls"))
    ds = open_eval_dataset(str(tmp_path / "{000000..000001}.tar"))
    assert isinstance(ds, ShardDataset) and ds.classnames == ["cat", "dog", "red fox"]
    samples = list(ds)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(5)]
    assert [s.label for s in samples] == [0, 2, 1, 2, 0]
    assert [image_index(s.image) for s in samples] == list(range(5))
    assert samples[1].captions == ["caption of image 1"] and samples[1].image.mode == "RGB"


def test_pickles_and_torch_files_are_never_read(tmp_path):
    marker = tmp_path / "unpickled"
    members = labelled_members([0], [0], how="cls")
    members["000000000.pyd"] = pickle.dumps(Boom(str(marker)))
    members["000000000.pth"] = pickle.dumps(Boom(str(marker)))
    write_tar(tmp_path / "s.tar", members)
    assert pickle.loads(members["000000000.pyd"]) and marker.exists()  # the payload really works
    marker.unlink()
    samples = list(ShardDataset(str(tmp_path / "s.tar"), classnames=["a"]))
    assert len(samples) == 1 and not marker.exists()


def test_bad_images_are_skipped_and_counted(tmp_path, caplog):
    members = labelled_members([0, 1, 2], [0, 0, 0], how="cls")
    members["000000001.png"] = b"<html>not an image</html>"
    big = io.BytesIO()
    Image.new("RGB", (64, 64)).save(big, format="png")
    members["000000002.png"] = big.getvalue()
    write_tar(tmp_path / "s.tar", members)
    with caplog.at_level(logging.WARNING, logger="mmcl.eval"):
        samples = list(ShardDataset(str(tmp_path / "s.tar"), classnames=["a"], max_pixels=32 * 32))
    assert [s.key for s in samples] == ["000000000"]
    assert "not_an_image" in caplog.text and "64x64 pixels" in caplog.text


@pytest.mark.parametrize(
    "label, how, message",
    [
        (3, "cls", "label 3 is outside the 2 class names"),
        ("zebra", "json", "'zebra' is not in the class names"),
        ("x", "cls", "not an integer"),
    ],
)
def test_label_errors_name_the_sample(tmp_path, label, how, message):
    write_tar(tmp_path / "s.tar", labelled_members([7], [label], how=how))
    with pytest.raises(UserError, match=message) as e:
        list(ShardDataset(str(tmp_path / "s.tar"), classnames=["a", "b"]))
    assert "s.tar:000000007" in str(e.value)


def test_expand_shards(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"{i:02d}.tar", {"x.cls": "0"})
    expected = [str(tmp_path / f"{i:02d}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path)) == expected
    assert expand_shards(str(tmp_path / "*.tar")) == expected
    assert expand_shards(str(tmp_path / "{00..02}.tar")) == expected
    assert expand_shards([expected[2], expected[0]]) == [expected[2], expected[0]]
    with pytest.raises(UserError, match="no shard found"):
        expand_shards(str(tmp_path / "{00..03}.tar"))
    with pytest.raises(UserError, match="no shard found"):
        expand_shards(str(tmp_path / "nothing*.tar"))


def test_image_folder(tmp_path):
    for i, cls in enumerate(["red_fox", "cat", "cat", "dog"]):
        (tmp_path / cls).mkdir(exist_ok=True)
        index_image(i).save(tmp_path / cls / f"{i}.PNG")
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    ds = open_eval_dataset(str(tmp_path))
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 4
    assert ds.classnames == ["cat", "dog", "red fox"]
    assert [(image_index(s.image), s.label) for s in ds] == [(1, 0), (2, 0), (3, 1), (0, 2)]
    with pytest.raises(UserError, match="2 class names given for 3 folders"):
        open_eval_dataset(str(tmp_path), classnames=["a", "b"])


def _clip_benchmark_root(root, retrieval=False):
    """The layout `clip_benchmark.webdataset_builder.convert_dataset` / `convert_retrieval_dataset` write."""
    (root / "test").mkdir(parents=True)
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
        members = {}
        for i in range(4):
            members[f"s{i:07d}.webp"] = png_bytes(index_image(i), "webp")
            members[f"s{i:07d}.txt"] = "\n".join(f"caption {j} of {i}" for j in range(1 + i % 2))
    else:
        (root / "classnames.txt").write_text("airplane\nautomobile\nbird\n")
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na blurry photo of a {c}.\n")
        members = {}
        for i in range(4):
            members[f"s{i:07d}.webp"] = png_bytes(index_image(i), "webp")
            members[f"s{i:07d}.cls"] = str(i % 3)
    write_tar(root / "test" / "0.tar", dict(list(members.items())[:4]))
    write_tar(root / "test" / "1.tar", dict(list(members.items())[4:]))
    (root / "test" / "nshards.txt").write_text("2\n")


def test_clip_benchmark_classification_layout(tmp_path):
    _clip_benchmark_root(tmp_path)
    ds = open_eval_dataset(str(tmp_path))
    assert ds.classnames == ["airplane", "automobile", "bird"]
    assert ds.templates == ["a photo of a {}.", "a blurry photo of a {}."]
    samples = list(ds)
    assert [(image_index(s.image), s.label) for s in samples] == [(0, 0), (1, 1), (2, 2), (3, 0)]


def test_clip_benchmark_retrieval_layout(tmp_path):
    _clip_benchmark_root(tmp_path, retrieval=True)
    samples = list(open_eval_dataset(str(tmp_path)))
    assert [s.captions for s in samples[:2]] == [["caption 0 of 0"], ["caption 0 of 1", "caption 1 of 1"]]
    assert all(s.label is None for s in samples)


def test_loader_workers_see_every_sample_once(tmp_path):
    for shard in range(2):
        idx = list(range(shard * 5, shard * 5 + 5))
        write_tar(tmp_path / f"{shard}.tar", labelled_members(idx, [0] * 5, how="cls"))
    ds = ShardDataset(str(tmp_path), classnames=["a"])
    seen = [image_index(s.image) for b in iterate_batches(ds, batch_size=3, num_workers=2) for s in b]
    assert sorted(seen) == list(range(10))
    first = [s.key for b in iterate_batches(ds, batch_size=3, max_samples=4) for s in b]
    assert first == [f"{i:09d}" for i in range(4)]
