"""Reading a source checkpoint: its files, config.json and every shard header, checked
against the index; and the weights each source file holds, as byte ranges."""

from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from storage.errors import PtqflowError
from storage.names import CONFIG, INDEX
from storage.safetensors import Header, read_header
from storage.source import Folder
from tasks.core.layouts import split
from tasks.core.records import Read, Weight

__all__ = [
    "OTHER_WEIGHT_SUFFIXES",
    "Source",
    "check_index",
    "load_source",
    "other_files",
    "read_headers",
    "source_weights",
    "weight_files",
]

OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")


def read_headers(folder: Folder, files: list[str], workers: int = 8) -> dict[str, Header]:
    def one(name: str) -> Header:
        with folder.open_unbuffered(name) as f:
            return read_header(f, folder.size(name), name)

    with ThreadPoolExecutor(max(1, min(workers, len(files)))) as pool:
        return dict(zip(files, pool.map(one, files), strict=True))


def weight_files(folder: Folder, files: list[str]) -> tuple[list[str], dict[str, str] | None]:
    """The safetensors files of the checkpoint and the index's weight map, if any."""
    if INDEX in files:
        try:
            weight_map = json.loads(folder.read_text(INDEX))["weight_map"]
            if not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map values must be file names")
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON, UTF-8, shape
            raise PtqflowError(f"{INDEX} is not a valid index ({e}); fix or delete it") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in files]
        if missing:
            raise PtqflowError(
                f"{INDEX} names shard(s) that are not in {folder.url}: {', '.join(missing)}. "
                "Download the missing files (or fix the index) and run again."
            )
        return shards, weight_map
    shards = [f for f in files if f.endswith(".safetensors") and "/" not in f]
    if not shards:
        raise PtqflowError(f"no *.safetensors files in {folder.url}")
    return shards, None


def check_index(weight_map: dict[str, str], headers: dict[str, Header]) -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for file, header in headers.items():
        for name in header.tensors:
            where[name].append(file)
    dupes = [f"{n} ({', '.join(fs)})" for n, fs in where.items() if len(fs) > 1]
    if dupes:
        raise PtqflowError("tensors stored in more than one shard: " + "; ".join(dupes[:10]))
    wrong = []
    for name, file in weight_map.items():
        if name not in headers[file].tensors:
            actual = where.get(name)
            found = f"found in {actual[0]}" if actual else "found nowhere"
            wrong.append(f"{name}: index says {file}, {found}")
    if wrong:
        raise PtqflowError(
            f"{INDEX} disagrees with the shards ({len(wrong)} tensor(s)):\n  "
            + "\n  ".join(wrong[:20])
            + "\nRegenerate the index or re-download the checkpoint."
        )


def other_files(files: list[str], shards: list[str], include_weights: bool) -> list[str]:
    """Non-weight files to copy unchanged (tokenizer, templates, code, ...)."""
    out = []
    for f in files:
        parts = f.split("/")
        if f in shards or f in (INDEX, CONFIG) or any(p.startswith(".") for p in parts):
            continue
        if not include_weights and (parts[0] == "original" or f.endswith(OTHER_WEIGHT_SUFFIXES)):
            continue
        out.append(f)
    return out


@dataclass
class Source:
    """A checkpoint folder after its headers were read and checked."""

    folder: Folder
    files: list[str]
    model_config: dict
    shards: list[str]
    headers: dict[str, Header]


def load_source(folder: Folder) -> Source:
    """List SOURCE, read config.json and every shard header, check the index against them."""
    if not folder.exists():
        raise PtqflowError(f"source {folder.url} does not exist")
    files = folder.files()
    if CONFIG not in files:
        raise PtqflowError(f"{folder.url} has no config.json; is it a model folder?")
    try:
        model_config = json.loads(folder.read_text(CONFIG))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PtqflowError(
            f"{folder.path(CONFIG)} is not valid JSON ({e}); fix it or download it again"
        ) from None
    if not isinstance(model_config, dict):
        raise PtqflowError(
            f"{folder.path(CONFIG)} holds no JSON object; fix it or download it again"
        )
    shards, weight_map = weight_files(folder, files)
    headers = read_headers(folder, shards)
    if weight_map is not None:
        check_index(weight_map, headers)
    return Source(folder, files, model_config, shards, headers)


def source_weights(
    headers: dict[str, Header], model_config: dict | None = None
) -> dict[str, list[Weight]]:
    """Per source file, its output weights in file order; with `model_config`, each 3-D
    tensor of fused experts of a known layout cut into one weight per expert and projection
    (tasks/core/layouts.py)."""
    out: dict[str, list[Weight]] = {}
    for file, header in headers.items():
        weights = []
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
            base = header.data_start + info.start
            cuts = split(model_config, name, info.shape) if model_config is not None else None
            if cuts is None:
                read = Read(file, name, base, base + info.nbytes, info.dtype, info.shape)
                weights.append(Weight(name, read))
                continue
            row_bytes = info.nbytes // (info.shape[0] * info.shape[1])
            cols = info.shape[2]
            for c in cuts:
                start, stop = base + c.start * row_bytes, base + c.stop * row_bytes
                read = Read(file, name, start, stop, info.dtype, (c.stop - c.start, cols))
                skip = c.layout.skip if c.out else ()
                weights.append(Weight(c.name, read, view=c.view, out=c.out, skip=skip))
        out[file] = weights
    return out
