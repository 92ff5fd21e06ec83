"""Offline datasets: located beside the repository (``../shared/datasets``) or where the user says."""
from .copy_tasks import CopyTask, Curriculum, RepeatCopyTask, SequenceBatch, bits_per_step
from .mnist import MNIST, load_mnist
from .paths import DatasetError, default_data_root, resolve_dataset_dir
from .ptb import PTBChars, bits_per_character, load_ptb_chars

__all__ = [
    "DatasetError", "default_data_root", "resolve_dataset_dir",
    "MNIST", "load_mnist",
    "PTBChars", "load_ptb_chars", "bits_per_character",
    "CopyTask", "RepeatCopyTask", "SequenceBatch", "bits_per_step", "Curriculum",
]
