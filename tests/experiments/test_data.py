"""Tests of the experiment-layer data sets.

Every loader is exercised on small files that the tests write in the real on-disk formats: IDX
(raw and gzipped, big-endian headers), CIFAR-10 pickle batches, and Tiny-ImageNet / ImageNet
folder trees of tiny JPEG/PNG images. Downloads are tested by swapping the URL opener for one
that serves local bytes; nothing here touches the network or the user's cache.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparselearn.experiments import data as D
from sparselearn.experiments.data import (
    DataSplits,
    TensorImageDataset,
    list_datasets,
    load_dataset,
    make_loader,
    split_indices,
)
from sparselearn.experiments.data import cifar as C
from sparselearn.experiments.data import download as DL
from sparselearn.experiments.data import mnist as M
from sparselearn.experiments.data import transforms as T

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Point the download cache into tmp_path so no test reads or writes ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPARSELEARN_DATA", str(cache))
    return cache


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# writers of the real on-disk formats


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool) -> Path:
    payload = idx_bytes(array, magic)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def make_idx_set(folder: Path, n_train=50, n_test=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        M.TRAIN_IMAGES: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        M.TRAIN_LABELS: rng.integers(0, 10, n_train, dtype=np.uint8),
        M.TEST_IMAGES: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        M.TEST_LABELS: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    paths = {}
    for base, arr in arrays.items():
        magic = M.IDX_IMAGES_MAGIC if arr.ndim == 3 else M.IDX_LABELS_MAGIC
        paths[base] = write_idx(folder / base, arr, magic, gz)
    return arrays, paths


def make_cifar_tree(root: Path, per_batch=4, n_test=6, seed=0):
    """Writes cifar-10-batches-py/ like the official files: dicts with bytes keys, protocol 2."""
    rng = np.random.default_rng(seed)
    folder = root / C.FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i, name in enumerate(C.TRAIN_BATCHES):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        d = {b"batch_label": f"training batch {i + 1} of 5".encode(), b"labels": y, b"data": x,
             b"filenames": [f"img{i}_{j}.png".encode() for j in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        xs.append(x)
        ys += y
    xt = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = [int(v) for v in rng.integers(0, 10, n_test)]
    with open(folder / C.TEST_BATCH, "wb") as f:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": yt, b"data": xt}, f, protocol=2)
    with open(folder / C.META, "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in C.CLASSES], b"num_vis": 3072}, f, protocol=2)
    return np.concatenate(xs), np.array(ys), xt, np.array(yt)


def save_image(path: Path, rgb, size=(64, 64), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rgb))
    # A black stripe on the left gives crops and flips something to move, so augmented and plain
    # samples differ (a uniform image looks the same however it is cropped or flipped).
    img.paste((0, 0, 0), (0, 0, stripe_width(w), h))
    if mode != "RGB":
        img = img.convert(mode)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    img.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def stripe_width(width: int) -> int:
    return width // 8


def make_tiny_tree(root: Path, per_class=5, val_per_class=2):
    folder = root / "tiny-imagenet-200"
    wnids = ["n03000000", "n01000000", "n02000000"]  # deliberately unsorted in wnids.txt
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        colour = COLOURS[sorted(wnids).index(w)]
        for j in range(per_class):
            ext = ".png" if j == 0 else ".JPEG"
            mode = "L" if j == 1 else "RGB"
            save_image(folder / "train" / w / "images" / f"{w}_{j}{ext}", colour, mode=mode)
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")  # present in the real tree
    lines = []
    k = 0
    for w in wnids:
        for _ in range(val_per_class):
            name = f"val_{k}.png"
            save_image(folder / "val" / "images" / name, COLOURS[sorted(wnids).index(w)])
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
            k += 1
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (folder / "test" / "images").mkdir(parents=True)
    return folder, sorted(wnids)


def make_imagenet_tree(root: Path, classes=("n02", "n01"), per_class=5, val_per_class=2):
    for i, c in enumerate(sorted(classes)):
        for j in range(per_class):
            ext = ".png" if j % 2 else ".JPEG"
            save_image(root / "train" / c / f"{c}_{j}{ext}", COLOURS[i], size=(48, 40))
        for j in range(val_per_class):
            save_image(root / "val" / c / f"val_{c}_{j}.png", COLOURS[i], size=(300, 260))
    return sorted(classes)


class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fake_urlopen(files: dict[str, bytes], calls: list[str]):
    def opener(url, timeout=None):
        calls.append(url)
        return FakeResponse(files[url.rsplit("/", 1)[-1]])

    return opener


# ------------------------------------------------------------------------------------------------
# registry and splits


def test_registry_lists_all_and_rejects_unknown():
    assert set(list_datasets()) == {"digits", "mnist", "fashion-mnist", "cifar10", "tiny-imagenet", "tiny-imagenet-224",
                                    "imagenet", "stdlib-text"}
    with pytest.raises(ValueError, match="valid names: cifar10, digits"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.0)


def test_load_dataset_accepts_a_callable():
    seen = {}

    def custom(**kwargs):
        seen.update(kwargs)
        return load_dataset("digits", **kwargs)

    s = load_dataset(custom, seed=4, val_fraction=0.2, augment=False)
    assert seen == {"root": None, "download": False, "val_fraction": 0.2, "seed": 4, "augment": False}
    assert s.name == "digits"


def test_split_indices_fixed_ten_percent_per_seed():
    tr, va = split_indices(1000, 0.1, seed=3)
    assert len(va) == 100 and len(tr) == 900
    assert set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(1000))
    tr2, va2 = split_indices(1000, 0.1, seed=3)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    _, va_other = split_indices(1000, 0.1, seed=4)
    assert not torch.equal(va, va_other)
    # Independent of the global RNG.
    torch.manual_seed(123)
    assert torch.equal(split_indices(1000, 0.1, seed=3)[1], va)
    assert len(split_indices(1000, 0.0, seed=3)[1]) == 0


def test_digits_embedded_default():
    s = load_dataset("digits", seed=1)
    assert isinstance(s, DataSplits) and s.name == "digits"
    assert s.num_classes == 10 and s.input_shape == (1, 8, 8)
    assert len(s.test) == 360  # fixed stratified 20% of 1797
    assert len(s.train) + len(s.val) == 1797 - 360
    assert len(s.val) == round(0.1 * (1797 - 360))
    tr, va, te = (set(d.indices.tolist()) for d in (s.train, s.val, s.test))
    assert tr.isdisjoint(va) and tr.isdisjoint(te) and va.isdisjoint(te)
    assert tr | va | te == set(range(1797))
    assert set(s.test.targets.tolist()) == set(range(10))
    x, y = s.train.get_batch(torch.arange(len(s.train)))
    assert x.shape == (len(s.train), 1, 8, 8)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2
    # Test split fixed across seeds; validation split follows the seed.
    s2 = load_dataset("digits", seed=2)
    assert torch.equal(s.test.indices, s2.test.indices)
    assert not torch.equal(s.val.indices, s2.val.indices)
    assert load_dataset("digits", val_fraction=0).val is None


# ------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_idx_round_trip(tmp_path, gz):
    arrays, _ = make_idx_set(tmp_path / "mnist", gz=gz)
    s = load_dataset("mnist", root=tmp_path, seed=5)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (45, 5, 10)
    tr_x, tr_y = arrays[M.TRAIN_IMAGES], arrays[M.TRAIN_LABELS]
    for part in (s.train, s.val):
        idx = part.indices.numpy()
        assert np.array_equal(part.data[:, 0].numpy(), tr_x[idx])
        assert np.array_equal(part.targets.numpy(), tr_y[idx])
        x, y = part.get_batch(torch.arange(len(part)))
        assert torch.allclose(x[:, 0] * 0.3081 + 0.1307, torch.from_numpy(tr_x[idx]).float() / 255, atol=1e-5)
    assert set(s.train.indices.tolist()).isdisjoint(s.val.indices.tolist())
    assert np.array_equal(s.test.data[:, 0].numpy(), arrays[M.TEST_IMAGES])
    assert np.array_equal(s.test.targets.numpy(), arrays[M.TEST_LABELS])
    # Split depends only on the seed.
    assert torch.equal(load_dataset("mnist", root=tmp_path, seed=5).val.indices, s.val.indices)
    assert not torch.equal(load_dataset("mnist", root=tmp_path, seed=6).val.indices, s.val.indices)


def test_fashion_mnist_from_root_itself_uses_fashion_stats(tmp_path):
    arrays, _ = make_idx_set(tmp_path, gz=True, n_train=20, n_test=4)
    s = load_dataset("fashion_mnist", root=tmp_path, val_fraction=0.0)
    assert s.val is None and len(s.train) == 20 and s.class_names[0] == "T-shirt/top"
    x, _ = s.test.get_batch(torch.arange(4))
    expected = (torch.from_numpy(arrays[M.TEST_IMAGES]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[:, 0], expected, atol=1e-5)


def _expect_named_error(path: Path, magic: int):
    with pytest.raises(ValueError) as e:
        M.read_idx(path, magic)
    assert str(path) in str(e.value)
    return str(e.value)


def test_idx_corrupt_files_name_the_file(tmp_path):
    imgs = np.zeros((3, 28, 28), np.uint8)
    good = idx_bytes(imgs, M.IDX_IMAGES_MAGIC)

    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(struct.pack(">I", 0x00000802) + good[4:])
    assert "magic" in _expect_named_error(bad_magic, M.IDX_IMAGES_MAGIC)

    labels_as_images = tmp_path / "labels"
    labels_as_images.write_bytes(idx_bytes(np.zeros(3, np.uint8), M.IDX_LABELS_MAGIC))
    assert "magic" in _expect_named_error(labels_as_images, M.IDX_IMAGES_MAGIC)

    short = tmp_path / "short-payload"
    short.write_bytes(good[:-10])
    assert "truncated" in _expect_named_error(short, M.IDX_IMAGES_MAGIC)

    long_ = tmp_path / "long-payload"
    long_.write_bytes(good + b"\0")
    _expect_named_error(long_, M.IDX_IMAGES_MAGIC)

    short_header = tmp_path / "short-header"
    short_header.write_bytes(good[:9])
    _expect_named_error(short_header, M.IDX_IMAGES_MAGIC)

    truncated_gz = tmp_path / "trunc.gz"
    truncated_gz.write_bytes(gzip.compress(good)[:-20])
    _expect_named_error(truncated_gz, M.IDX_IMAGES_MAGIC)

    not_gz = tmp_path / "garbage.gz"
    not_gz.write_bytes(b"this is not gzip data at all")
    _expect_named_error(not_gz, M.IDX_IMAGES_MAGIC)


def test_idx_count_mismatch_and_corrupt_file_via_load_dataset(tmp_path):
    _, paths = make_idx_set(tmp_path, n_train=10)
    write_idx(tmp_path / M.TRAIN_LABELS, np.zeros(9, np.uint8), M.IDX_LABELS_MAGIC, gz=False)
    with pytest.raises(ValueError, match="10 images.*9 labels"):
        load_dataset("mnist", root=tmp_path)
    paths[M.TEST_IMAGES].write_bytes(paths[M.TEST_IMAGES].read_bytes()[:100])
    write_idx(tmp_path / M.TRAIN_LABELS, np.zeros(10, np.uint8), M.IDX_LABELS_MAGIC, gz=False)
    with pytest.raises(ValueError, match=str(paths[M.TEST_IMAGES])):
        load_dataset("mnist", root=tmp_path)


def test_mnist_missing_says_where_and_how(tmp_path, _isolated_cache):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist", root=tmp_path / "nowhere")
    msg = str(e.value)
    assert "--download" in msg and "--data-root" in msg and "\n" not in msg
    assert str(tmp_path / "nowhere") in msg and str(_isolated_cache) not in msg  # only the given root
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("mnist")
    assert str(_isolated_cache / "mnist") in str(e.value)


def test_a_data_root_without_the_files_never_falls_back_to_the_system_copy(tmp_path):
    with pytest.raises(FileNotFoundError, match="fashion-mnist: .* not in --data-root"):
        load_dataset("fashion-mnist", root=tmp_path / "empty")


def test_mnist_download_verifies_md5(tmp_path, monkeypatch, _isolated_cache):
    served = tmp_path / "served"
    arrays, paths = make_idx_set(served, gz=True)
    files = {p.name: p.read_bytes() for p in paths.values()}
    md5s = {base: hashlib.md5(files[f"{base}.gz"]).hexdigest() for base in M.IDX_FILES}
    monkeypatch.setitem(M._SPECS["mnist"], "md5", md5s)
    calls: list[str] = []
    monkeypatch.setattr(DL, "urlopen", fake_urlopen(files, calls))

    s = load_dataset("mnist", download=True)
    assert len(calls) == 4 and all(u.startswith("https://ossci-datasets.s3.amazonaws.com/mnist/") for u in calls)
    assert len(s.train) + len(s.val) == 50
    assert sorted(os.listdir(_isolated_cache / "mnist")) == sorted(files)
    assert np.array_equal(s.test.data[:, 0].numpy(), arrays[M.TEST_IMAGES])
    load_dataset("mnist", download=True)  # found in the cache now: no new request
    assert len(calls) == 4


def test_download_md5_mismatch_raises_and_leaves_nothing(tmp_path, monkeypatch, _isolated_cache):
    # Serve bytes whose MD5 is not the published one (the real sums are kept).
    _, paths = make_idx_set(tmp_path / "served", gz=True)
    files = {p.name: p.read_bytes() for p in paths.values()}
    monkeypatch.setattr(DL, "urlopen", fake_urlopen(files, []))
    with pytest.raises(DL.ChecksumError, match="MD5 mismatch"):
        load_dataset("mnist", download=True)
    target = _isolated_cache / "mnist"
    assert not target.exists() or os.listdir(target) == []


def test_download_url_atomic_on_error(tmp_path, monkeypatch):
    class Broken(FakeResponse):
        def read(self, n=-1):
            chunk = super().read(4)
            if not chunk:
                raise ConnectionResetError("connection dropped")
            return chunk

    monkeypatch.setattr(DL, "urlopen", lambda url, timeout=None: Broken(b"0123456789"))
    with pytest.raises(OSError, match="cannot download http://example.invalid/f.bin .connection dropped.; check the network"):
        DL.download_url("http://example.invalid/f.bin", tmp_path / "f.bin")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(DL, "urlopen", lambda url, timeout=None: FakeResponse(b"abc"))
    out = DL.download_url("http://example.invalid/f.bin", tmp_path / "f.bin", md5=hashlib.md5(b"abc").hexdigest())
    assert out.read_bytes() == b"abc" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.skipif(not FASHION_SYSTEM_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_from_debian_package():
    s = load_dataset("fashion-mnist")
    assert len(s.train) + len(s.val) == 60000 and len(s.val) == 6000
    assert len(s.test) == 10000
    assert s.input_shape == (1, 28, 28)
    assert sorted(torch.unique(s.test.targets).tolist()) == list(range(10))


# ------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_batches_round_trip(tmp_path):
    x, y, xt, yt = make_cifar_tree(tmp_path)
    s = load_dataset("cifar10", root=tmp_path, seed=0, augment=False)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (18, 2, 6)
    imgs = x.reshape(-1, 3, 32, 32)
    for part in (s.train, s.val):
        idx = part.indices.numpy()
        assert np.array_equal(part.data.numpy(), imgs[idx])
        assert np.array_equal(part.targets.numpy(), y[idx])
    assert np.array_equal(s.test.data.numpy(), xt.reshape(-1, 3, 32, 32))
    # Row layout: the first 1024 values are the red plane, row-major.
    assert s.test.data[0, 0, 0, 1] == xt[0, 1] and s.test.data[0, 1, 0, 0] == xt[0, 1024]
    xb, _ = s.test.get_batch(torch.arange(6))
    mean = torch.tensor(C.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(C.STD).view(1, 3, 1, 1)
    assert torch.allclose(xb * std + mean, torch.from_numpy(xt.reshape(-1, 3, 32, 32)).float() / 255, atol=1e-5)


def test_cifar10_augmented_train_only(tmp_path):
    make_cifar_tree(tmp_path)
    s = load_dataset("cifar10", root=tmp_path)
    assert s.train.transform is not None and s.val.transform is None and s.test.transform is None
    batches = list(make_loader(s.train, 8, True, gen(0)))
    assert [b[0].shape for b in batches] == [(8, 3, 32, 32), (8, 3, 32, 32), (2, 3, 32, 32)]


def test_cifar10_corrupt_batches_name_the_file(tmp_path):
    make_cifar_tree(tmp_path)
    folder = tmp_path / C.FOLDER
    good = (folder / "data_batch_2").read_bytes()

    (folder / "data_batch_2").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="data_batch_2"):
        load_dataset("cifar10", root=tmp_path)

    (folder / "data_batch_2").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="data_batch_2"):
        load_dataset("cifar10", root=tmp_path)

    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f, protocol=2)
    with pytest.raises(ValueError, match=r"data_batch_2.*\(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path)

    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_2"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil_batch"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match="evil_batch"):
        C.read_batch(path)
    assert not (tmp_path / "pwned").exists()


def _tar_of(folder: Path, arcroot: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcroot)
    return buf.getvalue()


def test_cifar10_download_and_extract(tmp_path, monkeypatch, _isolated_cache):
    x, *_ = make_cifar_tree(tmp_path / "src")
    archive = _tar_of(tmp_path / "src" / C.FOLDER, C.FOLDER)
    monkeypatch.setattr(C, "ARCHIVE_MD5", hashlib.md5(archive).hexdigest())
    calls: list[str] = []
    monkeypatch.setattr(DL, "urlopen", fake_urlopen({"cifar-10-python.tar.gz": archive}, calls))
    s = load_dataset("cifar10", download=True, augment=False)
    assert calls == [C.URL]
    assert len(s.train) + len(s.val) == 20
    assert os.listdir(_isolated_cache / "cifar10") == [C.FOLDER]  # archive and temp dirs gone

    # Wrong checksum: error, and nothing left behind.
    other = tmp_path / "cache2"
    monkeypatch.setenv("SPARSELEARN_DATA", str(other))
    monkeypatch.setattr(C, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(DL.ChecksumError):
        load_dataset("cifar10", download=True)
    assert os.listdir(other / "cifar10") == []


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_safe_extract_rejects_escaping_members(tmp_path, kind):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo({"dotdot": "a/../../evil", "absolute": "/tmp/evil", "symlink": "link"}[kind])
        if kind == "symlink":
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="a.tar.gz"):
        DL.safe_extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and list((tmp_path / "out").iterdir()) == []


# ------------------------------------------------------------------------------------------------
# tensor transforms


def test_random_crop_reflect_known_tensor():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    # Reflection (not replication or zeros): the row above row 0 is row 1.
    assert padded[0, 0, 0].tolist() == [5.0, 4.0, 5.0, 6.0, 7.0, 6.0]
    windows = {(i, j): padded[0, 0, i : i + 4, j : j + 4] for i in range(3) for j in range(3)}
    out = T.RandomCropReflect(1)(x.expand(300, 1, 4, 4).contiguous(), gen(0))
    assert out.shape == (300, 1, 4, 4)
    seen = set()
    for img in out:
        hits = [k for k, w in windows.items() if torch.equal(img[0], w)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == set(windows)  # every offset, including the extreme ones, is drawn
    top_left = torch.tensor([[5.0, 4, 5, 6], [1, 0, 1, 2], [5, 4, 5, 6], [9, 8, 9, 10]])
    assert torch.equal(windows[(0, 0)], top_left)
    # Channels share the offset of their image.
    rgb = torch.randn(16, 3, 8, 8)
    out = T.RandomCropReflect(2)(rgb, gen(1))
    pad = F.pad(rgb, (2, 2, 2, 2), mode="reflect")
    for n in range(16):
        assert any(torch.equal(out[n], pad[n, :, i : i + 8, j : j + 8]) for i in range(5) for j in range(5))


def test_random_flip_and_determinism():
    x = torch.randn(1000, 3, 5, 7)
    assert torch.equal(T.RandomHorizontalFlip(1.0)(x, gen(0)), x.flip(-1))
    assert torch.equal(T.RandomHorizontalFlip(0.0)(x, gen(0)), x)
    out = T.RandomHorizontalFlip(0.5)(x, gen(0))
    flipped = torch.tensor([torch.equal(o, f) for o, f in zip(out, x.flip(-1))])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert torch.all(flipped ^ kept) and 400 < int(flipped.sum()) < 600
    aug = T.Compose([T.RandomCropReflect(4), T.RandomHorizontalFlip()])
    c = torch.randn(8, 3, 32, 32)
    assert torch.equal(aug(c, gen(7)), aug(c, gen(7)))
    assert not torch.equal(aug(c, gen(7)), aug(c, gen(8)))


def test_imagenet_style_transforms_shapes_and_geometry():
    rrc = T.RandomResizedCrop(224)
    g = gen(0)
    for _ in range(200):
        top, left, h, w = rrc.window(300, 400, g)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.08 * 0.99 <= h * w / (300 * 400) <= 1.0
        assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
    assert rrc(torch.rand(2, 3, 40, 30), g).shape == (2, 3, 224, 224)
    const = torch.full((1, 3, 300, 400), 0.25)
    assert torch.allclose(rrc(const, g), torch.full((1, 3, 224, 224), 0.25), atol=1e-6)
    r = T.ResizeShorter(256)(torch.rand(1, 3, 300, 400))
    assert r.shape == (1, 3, 256, 341)
    assert T.ResizeShorter(256)(torch.rand(1, 3, 500, 200)).shape == (1, 3, 640, 256)
    ramp = torch.arange(10.0).view(1, 1, 1, 10).expand(1, 1, 6, 10)
    assert T.CenterCrop(4)(ramp)[0, 0, 0].tolist() == [3.0, 4.0, 5.0, 6.0]


# ------------------------------------------------------------------------------------------------
# loaders


def test_make_loader_tensor_batches_deterministic():
    n = 103
    ds = TensorImageDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous(),
                            torch.arange(n) % 10, [0.0], [1.0], scale=1.0)
    loader = make_loader(ds, 10, shuffle=False, generator=None)
    assert len(loader) == 11 and len(make_loader(ds, 10, False, None, drop_last=True)) == 10
    ys = torch.cat([y for _, y in loader])
    assert torch.equal(ys, torch.arange(n) % 10)
    def epoch(seed):
        return torch.cat([x[:, 0, 0, 0] for x, _ in make_loader(ds, 10, True, gen(seed))])
    e1 = epoch(1)
    assert sorted(e1.long().tolist()) == list(range(n))  # a permutation: every sample once
    assert torch.equal(e1, epoch(1)) and not torch.equal(e1, epoch(2))
    # One generator across epochs gives different orders per epoch.
    g = gen(1)
    loader = make_loader(ds, 10, True, g)
    first = torch.cat([x[:, 0, 0, 0] for x, _ in loader])
    second = torch.cat([x[:, 0, 0, 0] for x, _ in loader])
    assert torch.equal(first, e1) and not torch.equal(first, second)
    with pytest.raises(ValueError):
        make_loader(ds, 0, True, None)


# ------------------------------------------------------------------------------------------------
# Tiny-ImageNet and ImageNet folder trees


def test_tiny_imagenet_tree(tmp_path):
    folder, classes = make_tiny_tree(tmp_path)
    s = load_dataset("tiny-imagenet", root=tmp_path, seed=0, augment=False)
    assert s.num_classes == 3 and s.input_shape == (3, 64, 64) and s.class_names == classes
    assert (len(s.train), len(s.val), len(s.test)) == (13, 2, 6)
    assert set(s.train.indices.tolist()).isdisjoint(s.val.indices.tolist())
    # Labels follow the sorted wnids; every colour belongs to one class.
    mean = torch.tensor(D.imagefolder.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(D.imagefolder.IMAGENET_STD).view(3, 1, 1)
    for part in (s.train, s.test):
        for i in range(len(part)):
            x, y = part[i]
            assert x.shape == (3, 64, 64)
            rgb = (x * std + mean).mean(dim=(1, 2))
            if Path(part.samples[i][0]).suffix == ".png":
                lit = 1 - stripe_width(64) / 64
                assert torch.allclose(rgb, torch.tensor(COLOURS[y], dtype=torch.float) / 255 * lit, atol=1e-5)
                assert torch.all(x[:, :, : stripe_width(64)] * std + mean < 1e-5)  # stripe on the left
            elif "_1." not in part.samples[i][0]:  # the grey-scale JPEG loses its colour
                assert int(rgb.argmax()) == COLOURS[y].index(255)
    assert [y for _, y in s.test.samples] == [2, 2, 0, 0, 1, 1]  # from val_annotations.txt


def test_tiny_imagenet_loader_augmented_and_reproducible(tmp_path):
    make_tiny_tree(tmp_path)
    s = load_dataset("tiny-imagenet", root=tmp_path, seed=1)
    batches = list(make_loader(s.train, 4, True, gen(3)))
    assert [tuple(b[0].shape) for b in batches] == [(4, 3, 64, 64)] * 3 + [(1, 3, 64, 64)]
    again = list(make_loader(s.train, 4, True, gen(3)))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    # Augmentation is on: the same images in the same order come out differently per seed.
    e1 = torch.cat([x for x, _ in make_loader(s.train, 4, False, gen(3))])
    e2 = torch.cat([x for x, _ in make_loader(s.train, 4, False, gen(4))])
    assert not torch.equal(e1, e2)
    plain = load_dataset("tiny-imagenet", root=tmp_path, seed=1, augment=False)
    p1 = torch.cat([x for x, _ in make_loader(plain.train, 4, False, gen(3))])
    assert torch.equal(p1, torch.cat([x for x, _ in make_loader(plain.train, 4, False, gen(4))]))
    assert len(make_loader(s.val, 4, False, None)) == 1


def test_tiny_imagenet_loader_workers_reproducible(tmp_path):
    make_tiny_tree(tmp_path, per_class=3)
    s = load_dataset("tiny-imagenet", root=tmp_path, val_fraction=0)

    def run(seed):
        return list(make_loader(s.train, 3, False, gen(seed), num_workers=2))

    a, b = run(5), run(5)
    assert len(a) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    c = run(6)
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_tiny_imagenet_bad_annotations_and_images(tmp_path):
    folder, _ = make_tiny_tree(tmp_path)
    ann = folder / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.png\tn09999999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt:7: class 'n09999999'"):
        load_dataset("tiny-imagenet", root=tmp_path)
    ann.write_text("val_0.png n01000000\n")
    with pytest.raises(ValueError, match="val_annotations.txt:1"):
        load_dataset("tiny-imagenet", root=tmp_path)
    make_tiny_tree(tmp_path / "fresh")
    bad = tmp_path / "fresh" / "tiny-imagenet-200" / "val" / "images" / "val_0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    s = load_dataset("tiny-imagenet", root=tmp_path / "fresh")
    with pytest.raises(ValueError, match="val_0.png"):
        s.test[0]


def test_imagenet_tree_transforms(tmp_path):
    classes = make_imagenet_tree(tmp_path / "imagenet")
    s = load_dataset("imagenet", root=tmp_path, seed=0)
    assert s.num_classes == 2 and s.input_shape == (3, 224, 224) and s.class_names == classes
    assert (len(s.train), len(s.val), len(s.test)) == (9, 1, 4)
    mean = torch.tensor(D.imagefolder.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(D.imagefolder.IMAGENET_STD).view(3, 1, 1)
    for part in (s.train, s.val, s.test):
        x, y = part[0]
        assert x.shape == (3, 224, 224)
        rgb = (x * std + mean).mean(dim=(1, 2))
        assert int(rgb.argmax()) == COLOURS[y].index(255)
    assert [y for _, y in s.test.samples] == [0, 0, 1, 1]
    xb, yb = next(iter(make_loader(s.train, 4, True, gen(0))))
    assert xb.shape == (4, 3, 224, 224) and yb.dtype == torch.int64
    plain = load_dataset("imagenet", root=tmp_path / "imagenet", augment=False)
    assert isinstance(plain.train.transform.transforms[0], T.ResizeShorter)


def test_imagenet_layout_errors(tmp_path):
    make_imagenet_tree(tmp_path)
    (tmp_path / "val" / "n03").mkdir()
    with pytest.raises(ValueError, match="'n03' has no folder"):
        load_dataset("imagenet", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="not downloaded automatically"):
        load_dataset("imagenet", root=tmp_path / "missing", download=True)
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200/wnids.txt"):
        load_dataset("tiny-imagenet", root=tmp_path / "missing")
    flat = tmp_path / "flat"
    save_image(flat / "train" / "n01" / "a.png", (1, 2, 3))
    save_image(flat / "val" / "ILSVRC2012_val_00000001.JPEG", (1, 2, 3))
    with pytest.raises(ValueError, match="one folder per class"):
        load_dataset("imagenet", root=flat)


def test_tiny_imagenet_224_uses_the_imagenet_transforms(tmp_path):
    # Starfire App. 7.2.1: "We apply the same image transforms as on full Imagenet"
    make_tiny_tree(tmp_path)
    s = load_dataset("tiny-imagenet-224", root=tmp_path, seed=0, augment=True)
    assert s.num_classes == 3 and s.input_shape == (3, 224, 224)
    assert s.train[0][0].shape == (3, 224, 224) and s.test[0][0].shape == (3, 224, 224)
