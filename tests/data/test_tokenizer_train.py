"""Tokenizer trainer: BPE/WordPiece on captions from text files and shards, atomic tokenizer.json, CLI."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from mmcl.cli import main as cli_main
from mmcl.config import TextTowerConfig
from mmcl.data.text import build_tokenizer
from mmcl.data.tokenizer_train import SPECIAL_TOKENS, iter_captions, train_tokenizer, train_tokenizer_file
from mmcl.utils import UserError

CAPTIONS = [
    "a small red circle in the top left corner",
    "two large blue squares along the bottom",
    "a picture of three green stars near the bottom",
    "a drawing of a yellow triangle in the middle",
    "there is one little purple cross on a gray background",
] * 20


def _write_shard(path: Path, captions: list[str], with_json: bool = False) -> None:
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            members = {f"{i:05d}.txt": caption.encode(), f"{i:05d}.jpg": b"\xff\xd8 not decoded"}
            if with_json:
                members[f"{i:05d}.json"] = json.dumps({"key": f"{i:05d}", "alt": [caption, caption.upper()]}).encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def caption_file(tmp_path: Path) -> Path:
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n\n")
    return path


def test_bpe_round_trip_and_specials(caption_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok" / "tokenizer.json"
    summary = train_tokenizer_file([str(caption_file)], out, vocab_size=120, min_frequency=1)
    assert out.is_file() and summary["vocab_size"] <= 120
    assert not [p for p in out.parent.iterdir() if p.name != "tokenizer.json"], "no temporary files left behind"
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(out))
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    for caption in CAPTIONS[:5]:
        ids = raw.encode(caption, add_special_tokens=False).ids
        assert raw.decode(ids) == caption  # Metaspace restores the spaces exactly
        assert raw.encode(caption).ids == [1, *ids, 2]  # the template wraps <s> ... </s>
    assert raw.decode(raw.encode("A Small RED Circle", add_special_tokens=False).ids) == "a small red circle"


def test_loads_through_mmcl_tokenizer(caption_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "tokenizer.json"
    train_tokenizer_file([str(caption_file)], out, vocab_size=100, min_frequency=1)
    tok = build_tokenizer(TextTowerConfig(tokenizer=str(out), context_length=16))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size <= 100
    ids, mask = tok(["a small red circle", "two large blue squares along the bottom"])
    assert ids.shape == (2, 16) and ids[0, 0] == 1 and mask[0].sum() == len(tok.encode("a small red circle")) + 2
    assert tok.decode(tok.encode("a small red circle")) == "a small red circle"


def test_wordpiece(caption_file: Path) -> None:
    tok = train_tokenizer(iter_captions([str(caption_file)]), vocab_size=90, kind="wordpiece", min_frequency=1)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    ids = tok.encode("two large blue squares", add_special_tokens=False).ids
    assert tok.decode(ids) == "two large blue squares"


def test_captions_from_shards_dir_and_json_key(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_shard(shards / "00000.tar", CAPTIONS[:3], with_json=True)
    _write_shard(shards / "00001.tar", CAPTIONS[3:5], with_json=True)
    assert list(iter_captions([str(shards)])) == CAPTIONS[:5]
    assert list(iter_captions([str(shards / "{00000..00001}.tar")], max_samples=4)) == CAPTIONS[:4]
    from_json = list(iter_captions([str(shards / "00000.tar")], caption_key="alt"))
    assert from_json == [c for caption in CAPTIONS[:3] for c in (caption, caption.upper())]
    out = tmp_path / "t.json"
    assert train_tokenizer_file([str(shards)], out, vocab_size=80, min_frequency=1)["vocab_size"] > len(SPECIAL_TOKENS)


def test_errors_keep_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "tokenizer.json"
    out.write_text("old")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no captions"):
        train_tokenizer_file([str(empty)], out, vocab_size=50)
    with pytest.raises(UserError, match="not found"):
        train_tokenizer_file([str(tmp_path / "missing.txt")], out, vocab_size=50)
    with pytest.raises(UserError, match="too small"):
        train_tokenizer_file([str(empty)], out, vocab_size=4)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(UserError, match="bad.tar"):
        list(iter_captions([str(bad)]))
    assert out.read_text() == "old", "a failed run must not touch the existing tokenizer"


def test_cli(caption_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli" / "tokenizer.json"
    rc = cli_main(
        ["tokenizer", "train", str(caption_file), "--vocab-size", "100", "--min-frequency", "1", "--out", str(out)]
    )
    assert rc == 0 and out.is_file()
    assert "tokens" in capsys.readouterr().out
    rc = cli_main(["tokenizer", "train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x.json")])
    assert rc == 2 and "not found" in capsys.readouterr().err
