"""MNIST loading: the real files load and check out; missing or corrupt ones fail naming the file."""
import gzip
import shutil

import pytest
import torch

from fastdni.data import DatasetError, load_mnist, resolve_dataset_dir
from fastdni.data.mnist import FILES


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_loads_canonical_mnist(mnist):
    assert mnist.train_images.shape == (60000, 1, 28, 28) and mnist.test_images.shape == (10000, 1, 28, 28)
    assert mnist.train_labels.dtype == torch.int64
    assert torch.bincount(mnist.test_labels).tolist()[:3] == [980, 1135, 1032]  # canonical class counts
    assert abs(float(mnist.train_images.mean())) < 1e-3 and abs(float(mnist.train_images.std()) - 1) < 1e-2


def _copy_mnist(tmp_path):
    src = resolve_dataset_dir("mnist")
    dst = tmp_path / "mnist"
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        load_mnist(tmp_path / "nowhere")


def test_missing_file_is_named(tmp_path):
    folder = _copy_mnist(tmp_path)
    (folder / FILES["test_labels"][0]).unlink()
    with pytest.raises(DatasetError, match="missing dataset file .*t10k-labels"):
        load_mnist(tmp_path)


def test_corrupt_file_is_named(tmp_path):
    folder = _copy_mnist(tmp_path)
    path = folder / FILES["train_labels"][0]
    path.chmod(0o644)
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[100] ^= 1
    path.write_bytes(gzip.compress(bytes(data)))
    with pytest.raises(DatasetError, match="corrupt dataset file .*train-labels"):
        load_mnist(folder)  # the mnist folder itself is accepted too
