"""The one shard reader and decoder: every consumer (training, eval, index, tokenizer trainer) lists and reads
through `mmcl.data.reader`, so a 0-byte, truncated or non-tar shard is skipped and counted the same way."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmcl.data.decode import MAX_PIXELS, SkipCounter, SkipSample, decode_image, load_image
from mmcl.data.reader import expand_shards, list_inputs, list_shards, read_samples
from mmcl.data.tokenizer_train import iter_captions
from mmcl.utils import UserError


class _Boom:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("unpickled",))


def png(colour: str = "red", size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="png")
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good_members(start: int, n: int, marker: Path) -> dict[str, bytes]:
    out = {}
    for i in range(start, start + n):
        out[f"{i:05d}.png"] = png()
        out[f"{i:05d}.txt"] = f"caption {i}\nsecond caption {i}".encode()
        out[f"{i:05d}.pkl"] = pickle.dumps(_Boom(str(marker)))
    return out


@pytest.fixture
def damaged(tmp_path: Path) -> tuple[Path, Path]:
    """A folder with two good shards (3 samples each) and a 0-byte, two truncated and a non-tar shard."""
    marker = tmp_path / "unpickled"
    folder = tmp_path / "shards"
    write_tar(folder / "000.tar", good_members(0, 3, marker))
    (folder / "001.tar").write_bytes(b"")
    full = write_tar(tmp_path / "full.tar", good_members(10, 3, marker)).read_bytes()
    (folder / "002.tar").write_bytes(full[: 3 * 512 + 10])  # cut inside the data of the 2nd member (00010.txt)
    (folder / "003.tar").write_bytes(b"not a tar " * 100)
    (folder / "0035.tar").write_bytes(full[: 6 * 512])  # cut at a block boundary: tarfile alone sees no damage
    write_tar(folder / "004.tar", good_members(20, 3, marker))
    return folder, marker


def test_read_samples_skips_and_counts_each_unreadable_tar_once(damaged):
    folder, marker = damaged
    counter = SkipCounter()
    samples = list(read_samples(expand_shards(str(folder)), counter))
    keys = [s["__key__"] for s in samples]
    assert {"00000", "00001", "00002", "00020", "00021", "00022"} <= set(keys)
    assert counter.counts == {"unreadable_tar": 4}  # 0-byte, 2 truncated, not a tar: once each
    assert all(not s.get("pkl") for s in samples) and not marker.exists()  # pickle bytes are never passed on


def test_index_and_tokenizer_trainer_read_through_the_same_reader(damaged, tmp_path):
    from mmcl.index import build_index

    folder, _ = damaged

    class Encoder:  # the Encoder protocol, embedding only what build_index needs
        can_encode, can_caption = True, False

        def encode_images(self, images):
            import torch

            return torch.nn.functional.normalize(torch.ones(len(images), 4), dim=-1)

    index = build_index(Encoder(), [str(folder)], tmp_path / "idx", progress=False)
    assert len(index) >= 6 and index.info["skipped"] == {"unreadable_tar": 4}
    assert index.metas[0]["caption"] == "caption 0\nsecond caption 0"  # every caption line, as eval reads them
    captions = list(iter_captions([str(folder)]))
    assert captions[:2] == ["caption 0", "second caption 0"] and "caption 22" in captions
    with pytest.raises(UserError, match=r"no captions read from .*001.tar: skipped 1 unreadable_tar"):
        list(iter_captions([str(folder / "001.tar")]))


def test_list_inputs_and_list_shards(tmp_path, damaged):
    folder, _ = damaged
    images = tmp_path / "images" / "sub"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(png())
    (images / "a.txt").write_text("sidecar")
    assert list_inputs([str(images / "a.png"), str(folder / "000.tar")]) == [
        ("file", str(images / "a.png")),
        ("shard", str(folder / "000.tar")),
    ]
    assert list_inputs([str(tmp_path / "images")]) == [("file", str(images / "a.png"))]
    with pytest.raises(UserError, match="no such shard, image or folder"):
        list_inputs([str(tmp_path / "missing.tar")])
    root = tmp_path / "cb"
    for i in range(2):
        write_tar(root / "test" / f"{i}.tar", {"0.png": png()})
    (root / "test" / "nshards.txt").write_text("2\n")
    assert list_shards([str(root), str(folder / "000.tar")]) == [
        str(root / "test" / "0.tar"),
        str(root / "test" / "1.tar"),
        str(folder / "000.tar"),
    ]


def test_one_decoder_one_pixel_limit_and_orientation(tmp_path):
    # EXIF orientation 6 (rotate 90 clockwise): every path decodes the image upright, 4 wide x 8 high
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 4), "blue").save(buf, format="jpeg", exif=exif)
    (tmp_path / "r.jpg").write_bytes(buf.getvalue())
    assert decode_image(buf.getvalue()).size == (4, 8)  # training and eval
    assert load_image(tmp_path / "r.jpg").size == (4, 8)  # index and app
    # the same default limit everywhere: training's SkipSample and the app's UserError refuse the same image
    side = int(MAX_PIXELS**0.5) + 1
    big = png(size=(side, side))
    with pytest.raises(SkipSample, match="too_many_pixels"):
        decode_image(big)
    with pytest.raises(UserError, match=f"{side}x{side} pixels, more than the {MAX_PIXELS:,} pixel limit"):
        load_image(big, name="big.png")
