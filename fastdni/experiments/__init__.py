"""Experiments reproducing the paper; each module is a CLI (``python -m fastdni.experiments.<name>``)."""
