"""Damaged checkpoints at random: every run ends in one clear message or a correct output.

Each seed damages a copy of a 3-shard checkpoint in one of the places a user's
download or a tool can break: a shard's header (its length field, or bytes of
its JSON), the index, or config.json, by flipped bytes, truncation or removed
keys. ptqflow's sequential pipeline then either refuses with a PtqflowError (no
other exception, no hang, and no config.json or index in DEST, so nothing
looks finished) or completes an output that verify accepts.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import struct
from pathlib import Path

import pytest

from storage.errors import PtqflowError
from tasks.core.schemes import resolve_config
from tasks.core.verify import verify
from tests.checkpoints import build_checkpoint
from tests.helpers import IGNORE, quantize_folder

INDEX = "model.safetensors.index.json"
SEEDS = range(200)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("fuzz") / "src", "llama", shards=3)


def damage(root: Path, rng: random.Random) -> str:
    """Damage one file of the checkpoint at `root`; say how."""
    shards = sorted(root.glob("*.safetensors"))
    target = rng.choice(["header-length", "header-bytes", "truncate", INDEX, "config.json"])
    if target in (INDEX, "config.json"):
        path = root / target
        text = path.read_bytes()
        how = rng.choice(["flip", "cut", "drop-key"])
        if how == "flip":
            data = bytearray(text)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(bytes(data))
        elif how == "cut":
            path.write_bytes(text[: rng.randrange(len(text))])
        else:
            obj = json.loads(text)
            victim = obj["weight_map"] if target == INDEX else obj
            victim.pop(rng.choice(sorted(victim)))
            path.write_text(json.dumps(obj))
        return f"{target}: {how}"
    path = rng.choice(shards)
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    if target == "header-length":
        value = rng.choice([0, 1, length - 1, length + 1, len(data), 2**63])
        data[:8] = struct.pack("<Q", value)
    elif target == "header-bytes":
        for _ in range(rng.randint(1, 4)):
            data[8 + rng.randrange(length)] = rng.randrange(32, 127)
    else:
        data = data[: rng.randrange(len(data))]
    path.write_bytes(bytes(data))
    return f"{path.name}: {target}"


def _timeout(signum, frame):
    raise TimeoutError("the run hung")


@pytest.mark.parametrize("seed", SEEDS)
def test_a_damaged_checkpoint_gets_one_message_or_a_good_output(pristine, tmp_path, seed):
    src = Path(shutil.copytree(pristine, tmp_path / "src"))
    how = damage(src, random.Random(seed))
    dest = tmp_path / "out"
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(60)
    try:
        quantize_folder(src, dest, resolve_config("W4A16", ignore=IGNORE))
    except PtqflowError as e:
        assert str(e).strip(), how
        assert not (dest / "config.json").exists() and not (dest / INDEX).exists(), how
        return
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    problems = verify(str(src), str(dest)).problems
    assert not problems, (how, problems)
