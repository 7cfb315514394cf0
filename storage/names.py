"""File names every layer agrees on: the index, config.json, the model card, and unfinished
files."""

from pathlib import Path

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
README = "README.md"  # the model card
PARTIAL = ".partial"


def partial_path(path: Path) -> Path:
    """Where `path` is written before it is complete: `.NAME.partial` beside it.

    A rename to `path` is the last step, so a file under its final name is whole.
    """
    return path.with_name(f".{path.name}{PARTIAL}")
