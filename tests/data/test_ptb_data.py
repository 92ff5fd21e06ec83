"""Character-level PTB: the real files load; missing or corrupt ones fail naming the file."""
import math
import shutil

import pytest

from fastdni.data import DatasetError, bits_per_character, load_ptb_chars, resolve_dataset_dir
from fastdni.data.ptb import CHAR_FILES


@pytest.fixture(scope="module")
def ptb():
    return load_ptb_chars()


def test_loads_the_three_splits(ptb):
    folder = resolve_dataset_dir("ptb")
    for split, (name, _) in CHAR_FILES.items():
        assert len(getattr(ptb, split)) * 2 == (folder / name).stat().st_size  # one char + one space each
    assert len(ptb.vocab) == 50 and "_" in ptb.vocab and "\n" in ptb.vocab and " " not in ptb.vocab
    assert "".join(ptb.vocab[i] for i in ptb.valid[:14]) == "consumers_may_"


def test_bits_per_character_of_a_uniform_model():
    assert bits_per_character(math.log(50)) == pytest.approx(math.log2(50))


def _copy_ptb(tmp_path, names):
    folder = tmp_path / "ptb"
    folder.mkdir()
    for name in names:
        shutil.copy(resolve_dataset_dir("ptb") / name, folder / name)
        (folder / name).chmod(0o644)
    return folder


def test_missing_file_is_named(tmp_path):
    _copy_ptb(tmp_path, [CHAR_FILES["train"][0], CHAR_FILES["valid"][0]])
    with pytest.raises(DatasetError, match="missing dataset file .*ptb.char.test.txt"):
        load_ptb_chars(tmp_path)


def test_corrupt_file_is_named(tmp_path):
    folder = _copy_ptb(tmp_path, [name for name, _ in CHAR_FILES.values()])
    path = folder / CHAR_FILES["valid"][0]
    path.write_text(path.read_text().replace("c o n s", "k o n s", 1))
    with pytest.raises(DatasetError, match="corrupt dataset file .*ptb.char.valid.txt"):
        load_ptb_chars(folder)
