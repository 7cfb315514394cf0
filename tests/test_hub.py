"""Hub sources and hf:// destinations.

The Hugging Face Hub is unreachable here, so it is faked at its HTTP boundary: `tests.fakehub`
serves the Hub's HTTP API on 127.0.0.1 and the real huggingface_hub client talks to it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from tasks.core.schemes import resolve_config
from tests import fakehub
from tests.checkpoints import build_checkpoint
from tests.helpers import IGNORE, files, quantize_folder

pytestmark = pytest.mark.slow  # Prefect servers, workers, subprocesses

fake_hub = fakehub.fake_hub


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def run(source, dest, scheme="NVFP4A16", **kw):
    from flows.quantize import run_quantize

    return run_quantize(
        source=source, destination=dest, scheme=scheme, ignore=IGNORE, device="cpu", **kw
    )


@pytest.fixture
def hub_model(tmp_path, fake_hub):
    src = build_checkpoint(tmp_path / "src", "deepseek_v3", shards=3)
    sha = fake_hub.add_repo("org/tiny-ds", folder_bytes(src))
    return src, sha


def test_hub_source_downloads_per_shard_and_resumes_from_cache(
    tmp_path, prefect_server, fake_hub, hub_model
):
    src, _ = hub_model
    quantize_folder(src, tmp_path / "want", resolve_config("NVFP4A16", ignore=IGNORE))
    fake_hub.fail_next(".safetensors", times=1, kind="drop", method="GET")  # retried
    first = run("org/tiny-ds", str(tmp_path / "out"), max_workers=2, delete_source=True)
    assert first.quantized == 3
    assert files(tmp_path / "out") == files(tmp_path / "want")
    fake_hub.clear_log()
    again = run("org/tiny-ds", str(tmp_path / "out"))
    assert (again.quantized, again.cached) == (0, 3)
    # only the headers were read again (planning), not a byte of tensor data
    for (method, path), headers in zip(fake_hub.requests, fake_hub.request_headers, strict=True):
        if method == "GET" and path.endswith(".safetensors"):
            start, _, end = headers["range"].removeprefix("bytes=").partition("-")
            assert int(end) < 64 * 1024, (path, headers["range"])


def test_a_hub_sources_card_links_its_base_model_at_the_commit_read(
    tmp_path, prefect_server, fake_hub, hub_model
):
    _, first = hub_model
    head = fake_hub.add_repo("org/tiny-ds", {"README.md": b"---\nlicense: mit\n---\n# Tiny DS\n"})
    run("org/tiny-ds", str(tmp_path / "out"))
    card = ModelCard((tmp_path / "out" / "README.md").read_text())
    assert card.data.to_dict() == {
        "base_model": "org/tiny-ds",
        "base_model_relation": "quantized",
        "license": "mit",
        "tags": ["compressed-tensors", "nvfp4", "ptqflow"],
    }
    assert f"--revision {head}" in card.text and head != first
    assert "[org/tiny-ds](https://huggingface.co/org/tiny-ds) quantized" in card.text
    assert card.text.endswith("## Original model card\n\n# Tiny DS\n")


def test_revision_pins_the_source(tmp_path, prefect_server, fake_hub, hub_model):
    src, first_sha = hub_model
    changed = build_checkpoint(tmp_path / "src2", "deepseek_v3", shards=3, seed=7)
    fake_hub.add_repo("org/tiny-ds", folder_bytes(changed))  # a newer commit on main
    run("org/tiny-ds", str(tmp_path / "old"), revision=first_sha)
    quantize_folder(src, tmp_path / "want", resolve_config("NVFP4A16", ignore=IGNORE))
    assert files(tmp_path / "old") == files(tmp_path / "want")
    run("org/tiny-ds", str(tmp_path / "new"))
    quantize_folder(changed, tmp_path / "want2", resolve_config("NVFP4A16", ignore=IGNORE))
    assert files(tmp_path / "new") == files(tmp_path / "want2")


def test_hf_destination(tmp_path, prefect_server, fake_hub):

    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=3)
    result = run(str(src), "hf://me/tiny-moe-fp8", "FP8_BLOCK", private=True)
    assert result.quantized == 3
    quantize_folder(src, tmp_path / "want", resolve_config("FP8_BLOCK", ignore=IGNORE))
    got = {k: v for k, v in fake_hub.files("me/tiny-moe-fp8").items() if not k.startswith(".")}
    card = ModelCard(got.pop("README.md").decode())
    assert got == files(tmp_path / "want")
    assert HfApi().model_info("me/tiny-moe-fp8").private
    # a local SOURCE: no base model to link; the card serves the repo by its id
    assert card.data.to_dict() == {"tags": ["compressed-tensors", "fp8", "ptqflow"]}
    assert "vllm serve me/tiny-moe-fp8\n" in card.text
    assert result.serve == "vllm serve me/tiny-moe-fp8"
    # the repo's creation, ptqflow's marker, then one commit with every shard, config.json and
    # the card in it: the repo never looked complete before, and 3 shards did not make 3 commits
    api = HfApi()
    commits = api.list_repo_commits("me/tiny-moe-fp8")
    assert len(commits) == 3, [c.title for c in commits]
    before_last = api.list_repo_files("me/tiny-moe-fp8", revision=commits[1].commit_id)
    assert not [f for f in before_last if not f.startswith(".")], before_last
    again = run(str(src), "hf://me/tiny-moe-fp8", "FP8_BLOCK")
    assert (again.quantized, again.cached) == (0, 3)
    # config.json and the index leave while it runs, and come back with the final commit
    assert len(api.list_repo_commits("me/tiny-moe-fp8")) == 5


def test_hf_destination_resumes_uploads_without_sending_them_again(
    tmp_path, prefect_server, fake_hub
):
    """The final commit fails: the shards were already uploaded to the LFS store, so the rerun
    sends none of them again and commits them all at once."""

    from storage.errors import PtqflowError

    src = build_checkpoint(tmp_path / "src", "qwen3_moe", shards=3)
    fake_hub.fail_next("/commit/", times=10, method="POST", body_contains=b"config.json")
    with pytest.raises(PtqflowError, match="me/tiny"):
        run(str(src), "hf://me/tiny-moe-fp8", "FP8_BLOCK")
    fake_hub._failures.clear()
    assert not [f for f in fake_hub.files("me/tiny-moe-fp8") if f.endswith(".safetensors")]
    fake_hub.clear_log()
    again = run(str(src), "hf://me/tiny-moe-fp8", "FP8_BLOCK")
    assert (again.quantized, again.cached) == (0, 3)
    assert not [r for r in fake_hub.requests if "lfs-upload" in r[1]], fake_hub.requests
    quantize_folder(src, tmp_path / "want", resolve_config("FP8_BLOCK", ignore=IGNORE))
    got = {k: v for k, v in fake_hub.files("me/tiny-moe-fp8").items() if not k.startswith(".")}
    assert b"vllm serve me/tiny-moe-fp8" in got.pop("README.md")
    assert got == files(tmp_path / "want")
    commits = HfApi().list_repo_commits("me/tiny-moe-fp8")
    assert len(commits) == 3, [c.title for c in commits]
