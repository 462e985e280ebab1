"""Hugging Face checkpoint I/O (placeholder until the loader lands)."""


def load_pretrained(path, *, dtype=None, mesh=None):
    raise NotImplementedError


def save_pretrained(model, config, path):
    raise NotImplementedError
