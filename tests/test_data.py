"""kanfarm.data: every loader on small files written here in the real formats; no network."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kanfarm import data
from kanfarm.data import DatasetFormatError, DatasetUnavailable, dataset_shape, load_dataset
from kanfarm.data import download, imdb, sources

MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any download attempt that a test did not arrange fails loudly instead of using the network."""
    def refuse(url, timeout=None):
        raise OSError(f"network disabled in tests ({url})")
    monkeypatch.setattr(download, "opener", refuse)
    monkeypatch.delenv("KANFARM_OFFLINE", raising=False)


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> None:
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(folder: Path, n_train=20, n_test=10, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / MNIST_FILES[split][0], images)
        write_idx(folder / MNIST_FILES[split][1], labels)
        arrays[split] = (images, labels)
    return arrays


def add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_cifar(folder: Path, per_batch=3, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = {}
    with tarfile.open(folder / "cifar-10-binary.tar.gz", "w:gz") as tar:
        add_member(tar, "cifar-10-batches-bin/batches.meta.txt", b"airplane\nautomobile\n")
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = rng.integers(0, 256, size=(per_batch, 3073), dtype=np.uint8)
            batch[:, 0] = rng.integers(0, 10, size=per_batch)
            add_member(tar, f"cifar-10-batches-bin/{name}.bin", batch.tobytes())
            records[name] = batch
    return records


IMDB_REVIEWS = {
    # train: "movie" 6x, "good" 4x, "bad" 3x, "plot" 1x ... test words never enter the vocabulary
    ("train", "pos", "0_9.txt"): "Good movie, GOOD movie!<br />Good plot.",
    ("train", "pos", "1_8.txt"): "movie movie good",
    ("train", "neg", "0_2.txt"): "Bad movie.<br /><br />bad, bad acting",
    ("train", "neg", "1_1.txt"): "movie",
    ("train", "unsup", "0_0.txt"): "zzz zzz zzz zzz zzz zzz zzz zzz",  # unlabelled: must be ignored
    ("test", "pos", "0_10.txt"): "good",
    ("test", "neg", "0_3.txt"): "terrible terrible terrible terrible terrible terrible terrible",
    ("test", "neg", "1_4.txt"): "a bad movie",
    ("train", "pos", "._0_9.txt"): "\x00\x05\x16\x07 Mac OS X attributes",  # AppleDouble, re-tarred on macOS: not a review
}


def write_imdb(folder: Path, reviews=IMDB_REVIEWS):
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "aclImdb_v1.tar.gz", "w:gz") as tar:
        add_member(tar, "aclImdb/README", b"readme readme readme readme readme readme readme")
        for (split, label, name), text in reviews.items():
            add_member(tar, f"aclImdb/{split}/{label}/{name}", text.encode())


def write_higgs(folder: Path, n_rows=30, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n_rows)
    features = rng.normal(size=(n_rows, 28)) * 5 + 2
    features[3, 0] = 1e6  # an outlier that must be clipped into the range
    write_higgs_rows(folder, labels, features)
    return labels, features


def write_higgs_rows(folder: Path, labels, features):
    with gzip.open(folder / "HIGGS.csv.gz", "wt") as f:
        for label, row in zip(labels, features):
            f.write(",".join(f"{v:.18e}" for v in [float(label), *row]) + "\n")


def check_tensors(ds, n_train, n_test, n_features, n_classes):
    assert ds.x_train.shape == (n_train, n_features) and ds.x_test.shape == (n_test, n_features)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    for x in (ds.x_train, ds.x_test):
        assert x.min() >= -1.0 and x.max() <= 1.0
    assert ds.n_classes == n_classes
    assert (n_features, n_classes) == dataset_shape(ds.name)


# ---- digits


def test_digits_split_is_deterministic_stratified_and_scaled(tmp_path):
    a = load_dataset("digits", data_dir=tmp_path / "a")
    b = load_dataset("digits", data_dir=tmp_path / "b")
    check_tensors(a, 1347, 450, 64, 10)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    # stratified: each class has ~25% of its images in the test split
    for c in range(10):
        n_test, n_all = int((a.y_test == c).sum()), int((a.y_train == c).sum() + (a.y_test == c).sum())
        assert abs(n_test / n_all - 0.25) < 0.02
    # pixel 0..16 -> p/16*2-1: exactly 17 grid values, both ends reached
    values = torch.unique(torch.cat([a.x_train, a.x_test]))
    assert torch.allclose(values, torch.arange(17, dtype=torch.float32) / 16 * 2 - 1)


def test_digits_pixels_match_sklearn(tmp_path):
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", data_dir=tmp_path)
    x, _ = load_digits(return_X_y=True)
    expected = torch.from_numpy(x / 16 * 2 - 1).float()
    # every training row is one of sklearn's images (as a set of rows)
    rows = {tuple(r.tolist()) for r in expected}
    assert all(tuple(r.tolist()) in rows for r in ds.x_train[:50])


# ---- MNIST family


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_family_loads_idx_files(tmp_path, name):
    arrays = write_mnist(tmp_path / name)
    ds = load_dataset(name, data_dir=tmp_path, download=False)
    check_tensors(ds, 20, 10, 784, 10)
    images, labels = arrays["train"]
    assert ds.y_train.tolist() == labels.tolist()
    assert ds.y_test.tolist() == arrays["test"][1].tolist()
    # exact pixel mapping: row r, col c of image i is feature r*28 + c
    i, r, c = 7, 13, 5
    assert ds.x_train[i, r * 28 + c].item() == pytest.approx(images[i, r, c] / 255 * 2 - 1, abs=1e-6)
    assert torch.allclose(ds.x_train, torch.from_numpy(images.reshape(20, -1) / 255 * 2 - 1).float(), atol=1e-6)


def test_mnist_extreme_pixels_map_to_grid_ends(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder)
    images = np.zeros((20, 28, 28), np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 255, 0
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    ds = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert ds.x_train[0, 0].item() == 1.0 and ds.x_train[0, 1].item() == -1.0


def test_cache_is_used_on_second_load(tmp_path):
    write_mnist(tmp_path / "mnist")
    first = load_dataset("mnist", data_dir=tmp_path, download=False)
    caches = list((tmp_path / "mnist").glob("cache-*.pt"))
    assert len(caches) == 1
    for f in (tmp_path / "mnist").glob("*.gz"):
        f.unlink()  # raw files gone: only the cache can serve the second load
    second = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert torch.equal(first.x_train, second.x_train) and torch.equal(first.y_test, second.y_test)


def test_bad_idx_magic_is_a_clear_error(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(20, np.uint8), magic=b"\x00\x00\x0d\x01")
    with pytest.raises(DatasetFormatError, match=r"train-labels-idx1-ubyte\.gz.*magic"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_idx_size_and_count_mismatches_are_rejected(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:  # header says 10 images, holds 9
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 10, 28, 28) + bytes(9 * 784))
    with pytest.raises(DatasetFormatError, match="t10k-images"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    write_mnist(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(DatasetFormatError, match="11 labels"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_idx_larger_than_declared_or_declaring_too_much_is_refused_unread(tmp_path):
    """A 600 MB run of zeros gzips to 600 KB: the header's size is checked before any data is
    decompressed, and no more than it declares is read."""
    from kanfarm.data import idx

    folder = tmp_path / "mnist"
    write_mnist(folder)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:  # one byte more than declared
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(11))
    with pytest.raises(DatasetFormatError, match="t10k-labels.*file has more"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    write_mnist(folder)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 100_000_000, 28, 28) + bytes(784))
    with pytest.raises(DatasetFormatError, match="t10k-images.*declare 78400000000 bytes"):
        load_dataset("mnist", data_dir=tmp_path, download=False)
    with pytest.raises(DatasetFormatError, match="declare 15680 bytes"):  # 20 training images
        idx.read_idx(folder / "train-images-idx3-ubyte.gz", 3, max_bytes=15679)
    assert idx.read_idx(folder / "train-images-idx3-ubyte.gz", 3, max_bytes=15680).shape == (20, 28, 28)
    # dims whose product wraps to -2 in int64 (the size check passed and the whole stream was read)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 649657 * 49 * 127, 92737 * 337 * 73, 2) + bytes(784))
    with pytest.raises(DatasetFormatError, match="t10k-images.*declare"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_an_empty_mnist_split_is_a_format_error(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    with pytest.raises(DatasetFormatError, match="t10k-images.*no images"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


# ---- CIFAR-10


def test_cifar10_binary_archive(tmp_path):
    records = write_cifar(tmp_path / "cifar10", per_batch=3)
    ds = load_dataset("cifar10", data_dir=tmp_path, download=False)
    check_tensors(ds, 15, 3, 3072, 10)
    train = np.concatenate([records[f"data_batch_{i}"] for i in range(1, 6)])
    assert ds.y_train.tolist() == train[:, 0].tolist()
    assert ds.y_test.tolist() == records["test_batch"][:, 0].tolist()
    # channel-major: green plane, row 4, col 9 of record 1 of data_batch_2 (train row 4)
    pixel = records["data_batch_2"][1, 1 + 1024 + 4 * 32 + 9]
    assert ds.x_train[4, 1024 + 4 * 32 + 9].item() == pytest.approx(pixel / 255 * 2 - 1, abs=1e-6)


def test_cifar10_truncated_batch_is_rejected(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    with tarfile.open(folder / "cifar-10-binary.tar.gz", "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            add_member(tar, f"cifar-10-batches-bin/{name}.bin", bytes(3073 + (name == "test_batch")))
    with pytest.raises(DatasetFormatError, match="test_batch.bin"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_archive_members_beyond_the_datasets_sizes_are_refused_unread(tmp_path):
    """A GNU sparse member is a few bytes in the archive that declare gigabytes; members larger
    than the dataset's files, or adding up to more, are refused before they are read."""
    import shutil
    import subprocess

    from kanfarm.data.archive import read_files

    members = tmp_path / "members"
    members.mkdir()
    (members / "a.bin").write_bytes(bytes(10))
    (members / "b.bin").write_bytes(bytes(10))
    plain = tmp_path / "plain.tar.gz"
    with tarfile.open(plain, "w:gz") as tar:
        for name in ("a.bin", "b.bin"):
            tar.add(members / name, arcname=name)
    assert read_files(plain, lambda n: True, max_member_bytes=10, max_total_bytes=20, max_members=100) == {
        "a.bin": bytes(10), "b.bin": bytes(10)}
    with pytest.raises(DatasetFormatError, match="a.bin declares 10 bytes"):
        read_files(plain, lambda n: True, max_member_bytes=9, max_total_bytes=100, max_members=100)
    with pytest.raises(DatasetFormatError, match="b.bin declares 10 bytes"):
        read_files(plain, lambda n: True, max_member_bytes=10, max_total_bytes=19, max_members=100)
    assert shutil.which("tar"), "GNU tar builds the sparse archive"
    with open(members / "holes.bin", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB of holes
    sparse = tmp_path / "sparse.tar.gz"
    # old GNU sparse and pax sparse 1.0 keep their maps in blocks that tarfile reads whole into a
    # list (200,000 blocks gzip to 0.4 MB): refused at the header; pax 0.0 at the member
    for args, refused in ((["--format=gnu"], "is a sparse file"),
                          (["--format=posix", "--sparse-version=1.0"], "is a sparse file"),
                          (["--format=posix", "--sparse-version=0.0"], r"declares 1073741824 bytes \(sparse\)")):
        subprocess.run(["tar", "--sparse", *args, "-czf", str(sparse), "-C", str(members), "holes.bin"], check=True)
        assert sparse.stat().st_size < 10_000
        with pytest.raises(DatasetFormatError, match=f"member holes.bin {refused}"):
            read_files(sparse, lambda n: True, max_member_bytes=1 << 31, max_total_bytes=1 << 31, max_members=100)


def test_archive_of_many_members_is_refused_and_not_remembered(tmp_path, monkeypatch):
    """Empty members cost a few bytes of archive each: an IMDB of 80,000 empty reviews (376 KB)
    became 1.6 GB of features, and tarfile kept a record of every member passed (a 3 MB archive of
    500,000 unwanted ones: +250 MB)."""
    from kanfarm.data.archive import read_files

    path = tmp_path / "many.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for i in range(50):
            add_member(tar, f"skip/{i}.bin", b"")
        for i in range(4):
            add_member(tar, f"keep/{i}.bin", b"x")
    listed = []
    original = tarfile.TarFile.next
    monkeypatch.setattr(tarfile.TarFile, "next", lambda self: listed.append(len(self.members)) or original(self))
    keep = lambda name: name.startswith("keep/")
    assert len(read_files(path, keep, max_member_bytes=1, max_total_bytes=4, max_members=4)) == 4
    assert len(listed) > 54 and max(listed) <= 1  # every member was read, none kept
    with pytest.raises(DatasetFormatError, match="many.tar.gz: more than 3 files of this dataset"):
        read_files(path, keep, max_member_bytes=1, max_total_bytes=4, max_members=3)


def test_archive_of_chained_long_name_headers_is_a_format_error(tmp_path):
    """tarfile recurses once per long-name header that precedes a member: a few thousand chained
    ones raised RecursionError through the loader, a traceback instead of one line."""
    from kanfarm.data.archive import read_files

    long_name = tarfile.TarInfo("a" * 200).tobuf(tarfile.GNU_FORMAT)[:-tarfile.BLOCKSIZE]  # without its member
    member = tarfile.TarInfo("b.bin")
    path = tmp_path / "chained.tar.gz"
    path.write_bytes(gzip.compress(long_name * 5000 + member.tobuf(tarfile.GNU_FORMAT) + bytes(2 * tarfile.BLOCKSIZE)))
    with pytest.raises(DatasetFormatError, match="chained.tar.gz.*too many chained headers"):
        read_files(path, lambda n: True, max_member_bytes=100, max_total_bytes=100, max_members=100)


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_archive_extended_header_larger_than_a_long_name_is_refused(tmp_path, tar_format):
    """tarfile reads a GNU long-name or pax header into memory whole, before any member limit
    applies: a long member name loads, a header declaring far more is refused."""
    from kanfarm.data.archive import read_files

    path = tmp_path / "names.tar.gz"
    long_name = "d/" + "n" * 300 + ".bin"  # over 100 characters: written as an extended header
    with tarfile.open(path, "w:gz", format=tar_format) as tar:
        add_member(tar, long_name, b"data")
    loaded = read_files(path, lambda n: True, max_member_bytes=10, max_total_bytes=10, max_members=100)
    assert loaded == {long_name: b"data"}
    with tarfile.open(path, "w:gz", format=tar_format) as tar:
        add_member(tar, "n" * (1 << 20), b"data")
    with pytest.raises(DatasetFormatError, match=r"names.tar.gz.*extended tar header declares \d+ bytes"):
        read_files(path, lambda n: True, max_member_bytes=10, max_total_bytes=10, max_members=100)


@pytest.mark.parametrize("extra", [0, 100], ids=["at a member boundary", "inside a header"])
def test_archive_cut_before_its_end_block_is_rejected(tmp_path, extra):
    """A tar cut short and then gzipped whole is a valid gzip stream: tarfile would end the member
    list where the data ends, and the archive would load with members missing."""
    from kanfarm.data.archive import read_files

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        add_member(tar, "a.bin", b"a")
        cut = buf.tell()
        add_member(tar, "b.bin", b"b")
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(gzip.compress(buf.getvalue()))
    loaded = read_files(path, lambda n: True, max_member_bytes=1, max_total_bytes=2, max_members=100)
    assert loaded == {"a.bin": b"a", "b.bin": b"b"}
    path.write_bytes(gzip.compress(buf.getvalue()[:cut + extra]))
    with pytest.raises(DatasetFormatError, match="cut.tar.gz.*without its end-of-archive block"):
        read_files(path, lambda n: True, max_member_bytes=1, max_total_bytes=2, max_members=100)


# ---- IMDB


def test_imdb_vocabulary_picks_most_frequent_training_words(tmp_path):
    write_imdb(tmp_path / "imdb")
    ds = load_dataset("imdb", data_dir=tmp_path, vocab_size=3, download=False)
    assert ds.x_train.shape == (4, 3) and ds.x_test.shape == (3, 3)
    assert dataset_shape("imdb", vocab_size=3) == (3, 2)
    counts = {}
    for (split, label, name), text in IMDB_REVIEWS.items():
        if split == "train" and label != "unsup" and not name.startswith("._"):
            for t in imdb.tokenize(text):
                counts[t] = counts.get(t, 0) + 1
    expected = sorted(counts, key=lambda w: (-counts[w], w))[:3]
    assert expected == ["movie", "good", "bad"]  # 6, 4, 3 uses; "zzz" (unsup) and "terrible" (test) never enter
    # rows are ordered neg then pos, by file name: neg/0_2, neg/1_1, pos/0_9, pos/1_8
    assert ds.y_train.tolist() == [0, 0, 1, 1] and ds.y_test.tolist() == [0, 0, 1]
    presence = (ds.x_train > 0).int().tolist()
    assert presence == [[1, 0, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert set(torch.unique(ds.x_train).tolist()) == {-1.0, 1.0}
    # test rows: "terrible..." has no vocabulary word; "a bad movie"; "good"
    assert (ds.x_test > 0).int().tolist() == [[0, 0, 0], [1, 0, 1], [0, 1, 0]]


def test_imdb_tokenizer_strips_markup_and_punctuation():
    assert imdb.tokenize("Great<br />film... Don't MISS it!") == ["great", "film", "don't", "miss", "it"]


def test_imdb_vocab_size_is_part_of_cache_key_and_pads(tmp_path):
    write_imdb(tmp_path / "imdb")
    small = load_dataset("imdb", data_dir=tmp_path, vocab_size=2, download=False)
    large = load_dataset("imdb", data_dir=tmp_path, vocab_size=50, download=False)
    assert small.n_features == 2 and large.n_features == 50
    assert len(list((tmp_path / "imdb").glob("cache-*.pt"))) == 2
    assert torch.equal(large.x_train[:, :2], small.x_train)
    assert (large.x_train[:, 20:] == -1).all()  # fewer distinct words than columns: padding is absent


# ---- HIGGS


def test_higgs_reads_split_rows_and_squashes_with_train_statistics(tmp_path):
    labels, features = write_higgs(tmp_path / "higgs", n_rows=30)
    ds = load_dataset("higgs", data_dir=tmp_path, n_train=20, n_test=8, download=False)
    check_tensors(ds, 20, 8, 28, 2)
    assert ds.y_train.tolist() == labels[:20].tolist() and ds.y_test.tolist() == labels[20:28].tolist()
    mean, std = features[:20].mean(0), features[:20].std(0)
    expected = np.clip((features[:28] - mean) / std, -3, 3) / 3
    assert np.allclose(ds.x_train.numpy(), expected[:20], atol=1e-5)
    assert np.allclose(ds.x_test.numpy(), expected[20:], atol=1e-5)
    assert ds.x_train[3, 0].item() == 1.0  # the outlier is clipped to the grid end


def test_higgs_feature_constant_over_the_training_rows_is_zero_not_nan(tmp_path):
    """A feature with standard deviation 0 over the training rows divides by 1, not 0: training
    rows sit at 0 and test rows keep their offset from the training value (clipped), not NaN."""
    labels, features = write_higgs(tmp_path / "higgs", n_rows=30)
    features[:20, 5] = 7.0
    features[20:, 5] = [7.0, 7.6, 6.7, 8.5, 100.0, -50.0, 7.0, 7.3, 0.0, 0.0]
    write_higgs_rows(tmp_path / "higgs", labels, features)
    ds = load_dataset("higgs", data_dir=tmp_path, n_train=20, n_test=8, download=False)
    assert (ds.x_train[:, 5] == 0).all()
    expected = np.clip(features[20:28, 5] - 7.0, -3, 3) / 3
    assert np.allclose(ds.x_test[:, 5].numpy(), expected, atol=1e-6)
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_test).all()


def test_higgs_split_sizes_are_part_of_cache_key(tmp_path):
    write_higgs(tmp_path / "higgs", n_rows=30)
    a = load_dataset("higgs", data_dir=tmp_path, n_train=10, n_test=5, download=False)
    b = load_dataset("higgs", data_dir=tmp_path, n_train=20, n_test=10, download=False)
    assert (len(a.y_train), len(a.y_test), len(b.y_train), len(b.y_test)) == (10, 5, 20, 10)
    assert len(list((tmp_path / "higgs").glob("cache-*.pt"))) == 2


def test_higgs_too_few_rows_is_a_clear_error(tmp_path):
    write_higgs(tmp_path / "higgs", n_rows=30)
    with pytest.raises(DatasetFormatError, match="31 rows"):
        load_dataset("higgs", data_dir=tmp_path, n_train=21, n_test=10, download=False)


def test_higgs_names_the_row_it_cannot_parse_counted_over_the_whole_file(tmp_path, monkeypatch):
    """numpy counts from 0 within each chunk of PARSE_ROWS rows: line 12 read as "row 1"."""
    from kanfarm.data import higgs

    monkeypatch.setattr(higgs, "PARSE_ROWS", 10)
    write_higgs(tmp_path / "higgs", n_rows=30)
    path = tmp_path / "higgs" / "HIGGS.csv.gz"
    lines = gzip.open(path, "rt").read().splitlines()
    lines[11] = ",".join(["1"] + ["abc"] * 28)
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=r"row 12 is unparsable \(could not convert string 'abc'"):
        load_dataset("higgs", data_dir=tmp_path, n_train=20, n_test=10, download=False)


# ---- missing files, downloads, options


@pytest.mark.parametrize("name, filename", [("mnist", "t10k-labels-idx1-ubyte.gz"),
                                            ("cifar10", "cifar-10-binary.tar.gz"),
                                            ("imdb", "aclImdb_v1.tar.gz"), ("higgs", "HIGGS.csv.gz")])
def test_missing_file_names_file_folder_and_source(tmp_path, name, filename):
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset(name, data_dir=tmp_path, download=False)
    message = str(err.value)
    assert filename in message and str(tmp_path / name) in message and "http" in message


def test_offline_env_skips_download(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(download, "opener", lambda url, timeout=None: calls.append(url))
    monkeypatch.setenv("KANFARM_OFFLINE", "1")
    with pytest.raises(DatasetUnavailable, match="disabled"):
        load_dataset("higgs", data_dir=tmp_path)
    assert calls == []


def test_failed_download_names_files_and_leaves_no_partial_file(tmp_path):
    with pytest.raises(DatasetUnavailable) as err:
        load_dataset("cifar10", data_dir=tmp_path)  # the autouse fixture makes every request fail
    assert "cifar-10-binary.tar.gz" in str(err.value) and "network disabled" in str(err.value)
    assert list((tmp_path / "cifar10").glob("*")) == []


def _serve_from(tmp_path, monkeypatch, name, checksums):
    """Point the dataset's sources at local file:// URLs and use the real urllib opener."""
    import urllib.request

    remote_dir = tmp_path / "remote"
    files = tuple(sources.RemoteFile(f.filename, (remote_dir / f.filename).as_uri(), checksums(remote_dir / f.filename))
                  for f in sources.SOURCES[name])
    monkeypatch.setitem(sources.SOURCES, name, files)
    monkeypatch.setattr(download, "opener", urllib.request.urlopen)
    return remote_dir


def test_download_from_file_url_verifies_checksum(tmp_path, monkeypatch):
    import os
    import time

    from kanfarm.atomic import LEFTOVER_AGE_S

    write_higgs(tmp_path / "remote", n_rows=30)
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    _serve_from(tmp_path, monkeypatch, "higgs", sha)
    killed = tmp_path / "data/higgs/.HIGGS.csv.gz.x1y2z3.part"  # what a download killed an hour ago left
    killed.parent.mkdir(parents=True)
    killed.write_bytes(b"x" * 1000)
    os.utime(killed, (time.time() - LEFTOVER_AGE_S - 60,) * 2)
    ds = load_dataset("higgs", data_dir=tmp_path / "data", n_train=20, n_test=10)
    assert len(ds.y_train) == 20
    assert (tmp_path / "data/higgs/HIGGS.csv.gz").read_bytes() == (tmp_path / "remote/HIGGS.csv.gz").read_bytes()
    assert not list((tmp_path / "data/higgs").glob("*.part"))


def test_a_download_tells_its_progress_and_the_cli_draws_it(tmp_path, monkeypatch):
    """HIGGS is 2.6 GB: `run grid` shows a bar per file instead of minutes of silence."""
    from cli.main import download_progress

    write_higgs(tmp_path / "remote", n_rows=3000)
    remote = _serve_from(tmp_path, monkeypatch, "higgs", lambda p: None)
    monkeypatch.setattr(download, "CHUNK", 4096)
    size = (remote / "HIGGS.csv.gz").stat().st_size
    told = []
    monkeypatch.setattr(download, "on_progress", lambda *args: told.append(args))
    download.fetch(sources.SOURCES["higgs"][0], tmp_path / "data")
    assert len(told) == -(-size // 4096) > 1 and told[-1] == ("HIGGS.csv.gz", size, size)
    assert [done for _, done, _ in told] == sorted(done for _, done, _ in told)
    monkeypatch.setattr(download, "on_progress", None)
    with download_progress():
        assert download.on_progress is not None
        download.on_progress("HIGGS.csv.gz", 10, None)  # no Content-Length: a bar without an end
        download.on_progress("HIGGS.csv.gz", 20, None)
    assert download.on_progress is None


def test_download_with_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    write_higgs(tmp_path / "remote", n_rows=30)
    _serve_from(tmp_path, monkeypatch, "higgs", lambda p: "0" * 64)
    with pytest.raises(DatasetUnavailable, match="checksum mismatch"):
        load_dataset("higgs", data_dir=tmp_path / "data", n_train=20, n_test=10)
    assert list((tmp_path / "data/higgs").glob("*")) == []  # no partial or unverified file left


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_download_cut_short_is_rejected_and_leaves_no_file(tmp_path, monkeypatch, framing):
    """A server closing the connection half-way: with a Content-Length, urllib's reads just return
    nothing; a cut chunked body raises http.client.IncompleteRead, which is no OSError."""
    import http.server
    import threading
    import urllib.request

    write_higgs(tmp_path / "remote", n_rows=200)
    body = (tmp_path / "remote/HIGGS.csv.gz").read_bytes()
    half = body[:len(body) // 2]  # holds more rows than the load below needs

    class HalfBody(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            if framing == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(half), half))  # no final zero-size chunk
            else:
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(half)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), HalfBody)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/HIGGS.csv.gz"
    monkeypatch.setitem(sources.SOURCES, "higgs", (sources.RemoteFile("HIGGS.csv.gz", url, None),))
    monkeypatch.setattr(download, "opener", urllib.request.build_opener(urllib.request.ProxyHandler({})).open)
    try:
        with pytest.raises(DatasetUnavailable, match="HIGGS.csv.gz"):
            load_dataset("higgs", data_dir=tmp_path / "data", n_train=10, n_test=5)
    finally:
        server.shutdown()
        server.server_close()
    assert list((tmp_path / "data/higgs").glob("*")) == []


def test_data_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("KANFARM_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    write_mnist(tmp_path / "mnist")
    assert load_dataset("mnist", download=False).x_train.shape == (20, 784)
    monkeypatch.delenv("KANFARM_DATA_DIR")
    assert data.data_dir() == Path("~/.cache/kanfarm/data").expanduser()


def test_registry_names_shapes_and_option_checks():
    assert set(data.DATASETS) == {"digits", "mnist", "fashion-mnist", "cifar10", "imdb", "higgs"}
    assert dataset_shape("imdb") == (5000, 2) and dataset_shape("imdb", vocab_size=100) == (100, 2)
    assert dataset_shape("cifar10") == (3072, 10) and dataset_shape("higgs", n_train=10) == (28, 2)
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_shape("svhn")
    with pytest.raises(ValueError, match="vocab_size"):
        dataset_shape("mnist", vocab_size=10)
    with pytest.raises(ValueError, match="positive integer"):
        dataset_shape("imdb", vocab_size=0)


def test_corrupt_cache_is_rebuilt(tmp_path):
    write_mnist(tmp_path / "mnist")
    first = load_dataset("mnist", data_dir=tmp_path, download=False)
    (cache_file,) = (tmp_path / "mnist").glob("cache-*.pt")
    cache_file.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        again = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert torch.equal(first.x_test, again.x_test)


@pytest.mark.parametrize("damage", ["bytes", "shapes", "labels"])
def test_a_cache_with_damaged_contents_is_rebuilt(tmp_path, damage):
    """A mapped cache's zip CRCs are never checked: a disk's flipped bytes (a float of 3.4e38),
    or tensors of another shape or labels, were served as they were."""
    from kanfarm.data.cache import SOURCES_KEY

    write_mnist(tmp_path / "mnist")
    first = load_dataset("mnist", data_dir=tmp_path, download=False)
    (cache_file,) = (tmp_path / "mnist").glob("cache-*.pt")
    tensors = {k: v.clone() for k, v in torch.load(cache_file, weights_only=True).items() if k != SOURCES_KEY}
    stamps = torch.load(cache_file, weights_only=True)[SOURCES_KEY]
    if damage == "bytes":
        tensors["x_train"][3, 100] = 3.4e38
    elif damage == "shapes":
        tensors["x_test"] = tensors["x_test"][:, :10].contiguous()
    else:
        tensors["y_train"][0] = 99
    torch.save({**tensors, SOURCES_KEY: stamps}, cache_file)
    with pytest.warns(UserWarning, match="ignoring dataset cache"):
        again = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_train, again.y_train)
    assert torch.equal(first.x_test, again.x_test)


def test_a_cache_that_cannot_be_written_costs_only_the_cache(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError: the load failed, leaving its temporary file."""
    from kanfarm.data import cache

    def disk_full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    write_mnist(tmp_path / "mnist")
    monkeypatch.setattr(cache.torch, "save", disk_full)
    with pytest.warns(UserWarning, match=r"cannot write dataset cache .*unexpected pos \([0-9.]+ MiB free there\)"):
        ds = load_dataset("mnist", data_dir=tmp_path, download=False)
    check_tensors(ds, 20, 10, 784, 10)
    assert [p.name for p in (tmp_path / "mnist").iterdir() if not p.name.endswith(".gz")] == []


def test_temporary_files_of_killed_cache_writes_are_removed(tmp_path):
    import os
    import time

    from kanfarm.atomic import LEFTOVER_AGE_S

    folder = tmp_path / "mnist"
    write_mnist(folder)
    load_dataset("mnist", data_dir=tmp_path, download=False)
    (cache_file,) = folder.glob("cache-*.pt")
    cache_file.unlink()  # the next load writes it again
    old, recent = folder / f".{cache_file.name}.old.tmp", folder / f".{cache_file.name}.recent.tmp"
    for path in (old, recent):  # recent: maybe a live write
        path.write_bytes(b"x" * 100)
    os.utime(old, (time.time() - LEFTOVER_AGE_S - 60,) * 2)
    load_dataset("mnist", data_dir=tmp_path, download=False)
    assert not old.exists() and recent.exists() and cache_file.exists()


def test_a_dataset_built_empty_is_a_format_error(tmp_path):
    """CIFAR-10 batches of no records were "ready (0 training rows)"; the run then diverged."""
    folder = tmp_path / "cifar10"
    write_cifar(folder, per_batch=0)
    with pytest.raises(DatasetFormatError, match="train split has no rows"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


# ---- damaged raw files and replaced raw files


def _flip(path: Path, n=40) -> None:
    """Invert ``n`` bytes a third into a file, as a bad disk or transfer would."""
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _higgs_lines(n_rows=8):
    return [",".join(["1.0"] + [f"{0.1 * j + i:.3f}" for j in range(28)]) + "\n" for i in range(n_rows)]


@pytest.mark.parametrize("damage", ["deflate", "utf8", "nan", "inf", "blank", "comment", "long", "huge", "wide",
                                    "label 2.0", "label -1.0", "label 0.5"])
def test_higgs_damaged_file_is_a_format_error_naming_it(tmp_path, damage):
    """A blank or "#" line was skipped by loadtxt (the test split came out a row short); a line
    without end was read whole (1 GiB of one digit gzips to 1 MB); 1e200 made its column 0; a
    label other than 0 or 1 (0.5 truncates to class 0) is refused at load, naming the file."""
    path = tmp_path / "higgs" / "HIGGS.csv.gz"
    path.parent.mkdir()
    lines = _higgs_lines()
    if damage == "deflate":
        path.write_bytes(gzip.compress("".join(lines * 50).encode()))
        _flip(path)  # an invalid deflate code within the first rows
    elif damage == "utf8":
        path.write_bytes(gzip.compress(b"\xff\xfe\x00\x80" * 400))
    elif damage in ("blank", "comment"):
        lines.insert(4, "\n" if damage == "blank" else "# a note\n")
        path.write_bytes(gzip.compress("".join(lines).encode()))
    elif damage == "long":
        path.write_bytes(gzip.compress("".join(lines[:4]).encode() + b"0" * (1 << 20)))
    elif damage == "wide":  # 100,000 rows of 2,048 columns gzip to 2 MB and were all parsed (2.5 GB)
        lines[4] = ",".join(["1.0"] + ["0"] * 39) + "\n"
        path.write_bytes(gzip.compress("".join(lines).encode()))
    elif damage.startswith("label "):
        lines[5] = ",".join([damage.split()[1]] + lines[5].split(",")[1:])  # a test row
        path.write_bytes(gzip.compress("".join(lines).encode()))
    elif damage == "huge":
        lines[1] = ",".join(["1.0", "1e200"] + lines[1].split(",")[2:])  # a training row, feature 1
        path.write_bytes(gzip.compress("".join(lines).encode()))
    else:
        fields = lines[4].split(",")
        fields[2] = damage  # row 5, feature 2
        lines[4] = ",".join(fields)
        path.write_bytes(gzip.compress("".join(lines).encode()))
    with pytest.raises(DatasetFormatError, match=re.escape(str(path))) as err:
        load_dataset("higgs", data_dir=tmp_path, n_train=4, n_test=4, download=False)
    if damage in ("nan", "inf", "blank", "long", "wide"):
        assert "row 5" in str(err.value)
    if damage == "huge":
        assert "feature 1 has values too large" in str(err.value)
    if damage.startswith("label "):
        assert "labels must be 0 or 1" in str(err.value)


def test_idx_with_damaged_deflate_stream_is_a_format_error(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder)
    write_idx(folder / "train-images-idx3-ubyte.gz", (np.arange(20 * 784) % 7).reshape(20, 28, 28))  # compressible
    _flip(folder / "train-images-idx3-ubyte.gz")
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_tar_gz_with_damaged_bytes_is_rejected(tmp_path):
    # CIFAR pixels are random, so deflate stores them: flipped bytes change pixels, only the CRC tells
    write_cifar(tmp_path / "cifar10", per_batch=3)
    _flip(tmp_path / "cifar10" / "cifar-10-binary.tar.gz", n=8)
    with pytest.raises(DatasetFormatError, match="cifar-10-binary.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    # IMDB text is compressed: damage breaks the deflate stream itself
    write_imdb(tmp_path / "imdb", {**IMDB_REVIEWS, **{("train", "pos", f"{k}_7.txt"): f"review {k} " * 200
                                                      for k in range(2, 40)}})
    _flip(tmp_path / "imdb" / "aclImdb_v1.tar.gz")
    with pytest.raises(DatasetFormatError, match="aclImdb_v1.tar.gz"):
        load_dataset("imdb", data_dir=tmp_path, vocab_size=3, download=False)


def test_imdb_damaged_tar_header_is_rejected(tmp_path):
    """tarfile ends the member list silently at a bad header: the last test review would be lost."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for (split, label, name), text in IMDB_REVIEWS.items():
            add_member(tar, f"aclImdb/{split}/{label}/{name}", text.encode())
    raw = bytearray(buf.getvalue())
    at = raw.find(b"aclImdb/test/neg/1_4.txt")
    raw[at + 148:at + 156] = b"XXXXXXXX"  # the header checksum field
    (tmp_path / "imdb").mkdir()
    (tmp_path / "imdb" / "aclImdb_v1.tar.gz").write_bytes(gzip.compress(bytes(raw)))  # a valid gzip stream
    with pytest.raises(DatasetFormatError, match="aclImdb_v1.tar.gz.*damaged tar header"):
        load_dataset("imdb", data_dir=tmp_path, vocab_size=3, download=False)


def test_imdb_split_without_one_label_is_rejected(tmp_path):
    reviews = {key: text for key, text in IMDB_REVIEWS.items() if key[:2] != ("train", "pos")}
    write_imdb(tmp_path / "imdb", reviews)
    with pytest.raises(DatasetFormatError, match="aclImdb/train/pos"):
        load_dataset("imdb", data_dir=tmp_path, vocab_size=3, download=False)


def test_cifar10_batches_of_unequal_size_are_rejected(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    with tarfile.open(folder / "cifar-10-binary.tar.gz", "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            add_member(tar, f"cifar-10-batches-bin/{name}.bin", bytes(3073 * (2 if name == "data_batch_4" else 3)))
    with pytest.raises(DatasetFormatError, match="data_batch_4.bin.*2 records"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_replaced_raw_files_rebuild_the_cache(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist(folder, seed=0)
    old = load_dataset("mnist", data_dir=tmp_path, download=False)
    new = write_mnist(folder, seed=1)
    for f in folder.glob("*.gz"):  # a coarse file-system clock could give the new files the old mtime
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert again.y_train.tolist() == new["train"][1].tolist() != old.y_train.tolist()
    assert len(list(folder.glob("cache-*.pt"))) == 1  # the stale cache was replaced, not kept beside


def test_raw_file_replaced_with_the_same_size_and_mtime_rebuilds_the_cache(tmp_path):
    """A copy that keeps size and mtime (``cp -p``) still differs in ctime."""
    folder = tmp_path / "mnist"
    old_raw = write_mnist(folder, seed=0)
    old = load_dataset("mnist", data_dir=tmp_path, download=False)
    stats = {f.name: f.stat() for f in folder.glob("*.gz")}
    new_raw = write_mnist(tmp_path / "other", seed=1)  # same shapes, so the same file sizes
    for name, st in stats.items():
        replacement = tmp_path / "other" / name
        assert replacement.stat().st_size == st.st_size
        os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(replacement, folder / name)
    assert old.y_train.tolist() == old_raw["train"][1].tolist()
    again = load_dataset("mnist", data_dir=tmp_path, download=False)
    assert again.y_train.tolist() == new_raw["train"][1].tolist() != old.y_train.tolist()
