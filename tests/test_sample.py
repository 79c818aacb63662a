"""vqpipe.sample: the built-in sample WebDataset is readable, varied, decodable and deterministic."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from webdataset import tariterators

from vqpipe.preprocess import IMAGE_EXTENSIONS, preprocess
from vqpipe.sample import SOURCES, write_sample_dataset

pytest.importorskip("skimage", reason="the sample dataset needs scikit-image (pip install 'vqpipe[sample]')")


def _read(path: str) -> list[dict]:
    with open(path, "rb") as stream:
        return list(
            tariterators.group_by_keys(tariterators.tar_file_expander([{"stream": stream, "url": path}]))
        )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[str]:
    return write_sample_dataset(tmp_path_factory.mktemp("sample"))  # the defaults: 4 shards x 16 samples


@pytest.fixture(scope="module")
def samples(dataset) -> list[dict]:
    return [s for path in dataset for s in _read(path)]


def test_layout(dataset):
    assert [Path(p).name for p in dataset] == [f"sample-{i:06d}.tar" for i in range(4)]
    assert not list(Path(dataset[0]).parent.glob("*.tmp"))


def test_members_contiguous_sorted_and_deterministic_metadata(dataset):
    for path in dataset:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        keys = [n.split(".", 1)[0] for n in names]
        runs = [k for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
        assert len(runs) == len(set(runs)) == 16, "members of one sample must be contiguous"
        assert names == sorted(names)
        assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {
            (0, 0, "", "", members[0].mtime)
        }


def test_samples_have_expected_members(samples):
    assert len(samples) == 64
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 64 and keys[0] == "000000_000000" and keys[-1] == "000003_000015"
    for s in samples:
        members = {k for k in s if not k.startswith("__")}
        images = members & set(IMAGE_EXTENSIONS)
        assert len(images) == 1 and members == images | {"cls", "json"}, members


def test_labels_and_metadata_parse_and_agree(samples):
    for s in samples:
        label = int(s["cls"].decode("ascii"))
        meta = json.loads(s["json"])
        assert meta["label"] == label and 0 <= label < len(SOURCES)
        assert SOURCES[label].removeprefix("sklearn:") == meta["source"]
        left, top, right, bottom = meta["crop_box"]
        width, height = meta["original_size"]
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        image = s[meta["format"]]
        with Image.open(io.BytesIO(image)) as img:
            assert img.size == (right - left, bottom - top)
            assert img.mode == meta["mode"]


def test_every_image_preprocesses(samples):
    for s in samples:
        (suffix,) = {k for k in s if k in IMAGE_EXTENSIONS}
        out = preprocess(s[suffix], 256)
        assert out.shape == (3, 256, 256) and out.dtype == np.uint8
        assert out.std() > 0  # a real picture, not a flat fill


def test_variety(samples):
    metas = [json.loads(s["json"]) for s in samples]
    sizes = [(m["crop_box"][2] - m["crop_box"][0], m["crop_box"][3] - m["crop_box"][1]) for m in metas]
    assert any(w < 256 and h < 256 for w, h in sizes)
    assert any(h >= 2 * w for w, h in sizes) and any(w >= 2 * h for w, h in sizes)
    encodings = {(m["format"], m["mode"]) for m in metas}
    assert {("jpg", "RGB"), ("png", "RGB"), ("png", "L"), ("png", "P")} <= encodings
    assert any(mode == "RGBA" for _, mode in encodings)
    assert len({m["quality"] for m in metas if m["format"] == "jpg"}) > 5
    assert len({m["source"] for m in metas}) > 8


def test_deterministic_for_a_seed(tmp_path, dataset):
    again = write_sample_dataset(tmp_path / "a")
    assert [Path(p).read_bytes() for p in again] == [Path(p).read_bytes() for p in dataset]
    other = write_sample_dataset(tmp_path / "b", shards=1, samples_per_shard=4, seed=1)
    assert Path(other[0]).read_bytes() != Path(dataset[0]).read_bytes()
    assert len(_read(other[0])) == 4


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_sample_dataset(tmp_path, shards=0)


def test_missing_optional_dependency_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage...` raise ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match=r"pip install 'vqpipe\[sample\]'"):
        write_sample_dataset(tmp_path)
    assert not list(tmp_path.iterdir())
