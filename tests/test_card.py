"""The model card written with every output (README.md), the serve line, and ignore typos."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from flows.cli import main
from storage.errors import PtqflowError
from tasks.core.card import CardRequest
from tasks.core.planner import plan_checkpoint
from tasks.core.schemes import resolve_config
from tasks.core.verify import verify
from tests.checkpoints import build_checkpoint
from tests.helpers import IGNORE, quantize_folder, run, run_cli

STAGES = ("download ", "quantize ", "upload ")  # named by stage and shard
SOURCE_CARD = """---
license: other
license_name: tiny-license
license_link: https://example.com/LICENSE
language:
- en
- fr
pipeline_tag: text-generation
library_name: transformers
base_model: someone/its-own-base
tags:
- chat
---

# Tiny DeepSeek

It answers questions. MMLU 99.9 (source's claim).
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = build_checkpoint(tmp_path_factory.mktemp("card") / "src", "deepseek_v3_mtp", shards=2)
    (src / "README.md").write_text(SOURCE_CARD)
    return src


def card_of(folder) -> ModelCard:
    return ModelCard((folder / "README.md").read_text())


def test_the_card_says_what_was_done_and_carries_the_sources_metadata(tmp_path, source):
    out = tmp_path / "out"
    quantize_folder(source, out, resolve_config("NVFP4A16", ignore=IGNORE))
    card = card_of(out)
    # a local SOURCE names no Hub model to link to; the source's own base_model is not ours
    assert card.data.to_dict() == {
        "license": "other",
        "license_name": "tiny-license",
        "license_link": "https://example.com/LICENSE",
        "language": ["en", "fr"],
        "pipeline_tag": "text-generation",
        "library_name": "transformers",
        "tags": ["compressed-tensors", "nvfp4", "ptqflow"],
    }
    text = card.text
    assert "`NVFP4A16` (nvfp4-pack-quantized): float 4-bit weights, groups of 16" in text
    for entry in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]:
        assert f"  {entry}\n" in text  # the ignore list, whole
    assert "`model.layers.2.eh_proj`" in text  # the MTP modules kept in BF16
    assert f"ptqflow quantize {source} {out} --config config.json" in text
    spec = json.dumps({"method": "mtp", "num_speculative_tokens": 1})
    assert f"vllm serve {out} --speculative-config '{spec}'" in text
    assert f'AutoModelForCausalLM.from_pretrained("{out}", dtype="auto")' in text
    # the source's card follows under its own heading, without its front matter
    original = text.split("## Original model card\n", 1)[1]
    assert original.strip() == SOURCE_CARD.split("---\n", 2)[2].strip()
    assert "tiny-license" not in text
    assert verify(str(source), str(out)).ok


def test_the_card_is_the_same_bytes_when_written_again(tmp_path, source):
    out = tmp_path / "out"
    config = resolve_config("FP8_BLOCK", ignore=IGNORE)
    quantize_folder(source, out, config)
    first = (out / "README.md").read_bytes()
    (out / "README.md").unlink()
    quantize_folder(source, out, config)
    assert (out / "README.md").read_bytes() == first


def test_own_card_or_the_sources(tmp_path, source):
    config = resolve_config("W4A16", ignore=IGNORE)
    own = "# my card\n"
    quantize_folder(source, tmp_path / "own", config, card=CardRequest("own", own))
    assert (tmp_path / "own" / "README.md").read_text() == own
    quantize_folder(source, tmp_path / "copy", config, card=CardRequest("source"))
    assert (tmp_path / "copy" / "README.md").read_text() == SOURCE_CARD


def test_verify_fails_on_a_card_naming_another_scheme(tmp_path, source):
    out = tmp_path / "out"
    quantize_folder(source, out, resolve_config("NVFP4A16", ignore=IGNORE))
    card = (out / "README.md").read_text()
    (out / "README.md").write_text(card.replace("- nvfp4\n", "- fp8\n"))
    result = verify(str(source), str(out))
    assert not result.ok
    assert any("names scheme(s) fp8, but config.json" in p for p in result.failures())
    (out / "README.md").unlink()
    assert any("no model card" in p for p in verify(str(source), str(out)).failures())


def test_an_ignore_or_target_that_matches_nothing_is_warned_with_the_closest_names(source):
    _, report = plan_checkpoint(
        source, resolve_config("FP8_BLOCK", ignore=["lm-head", "re:.*mlp\\.gaet$"]), strict=False
    )
    (lm,) = [c for c in report.callouts if "'lm-head'" in c]
    assert "matches no module of SOURCE; closest: lm_head" in lm
    (gate,) = [c for c in report.callouts if "gaet" in c]
    assert "mlp.gate" in gate.partition("closest: ")[2]
    config = {"config_groups": {"g": {"targets": ["re:.*q_projj$"], "weights": {"num_bits": 8}}}}
    _, report = plan_checkpoint(source, resolve_config(config=config), strict=False)
    (target,) = [c for c in report.callouts if "q_projj" in c]
    assert target.startswith("config group 'g''s targets: 're:.*q_projj$' matches no module")


def test_a_group_with_no_targets_is_refused_naming_it():
    config = {"config_groups": {"mine": {"targets": [], "weights": {"num_bits": 8}}}}
    with pytest.raises(PtqflowError, match="config group 'mine' has an empty targets list"):
        resolve_config(config=config)


def test_plan_prints_the_typo_warning(capsys, source):
    assert main(["plan", str(source), "--scheme", "FP8_DYNAMIC", "--ignore", "lm-head"]) == 0
    printed = capsys.readouterr().out.splitlines()
    (line,) = [line for line in printed if "lm-head" in line]
    assert line.startswith(
        "warning: --ignore (the config's ignore list): 'lm-head' matches no module of SOURCE; "
        "closest: lm_head"
    )


@pytest.mark.slow
def test_cli_run_writes_the_card_with_verify_and_ends_with_the_serve_line(tmp_path, source):
    out = tmp_path / "out"
    args = ["quantize", str(source), str(out), "--scheme", "NVFP4A16", "--device", "cpu"]
    args += [a for i in IGNORE for a in ("--ignore", i)]
    proc = run_cli(*args, "--verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = json.dumps({"method": "mtp", "num_speculative_tokens": 1})
    assert proc.stdout.splitlines()[-1] == (
        f"serve it with: vllm serve {out} --speculative-config '{spec}'"
    )
    text = card_of(out).text
    command = (
        f"ptqflow quantize {source} {out} --scheme NVFP4A16 --ignore lm_head "
        "--ignore 're:.*mlp.gate$' --ignore model.embed_tokens"
    )
    assert f"```bash\n{command}\n```" in text
    verified = text.split("## Verified\n", 1)[1].split("\n## ", 1)[0]
    assert "| NVFP4A16 |" in verified and "complete" in verified


@pytest.mark.slow
def test_the_flow_names_its_plan_task_plan_and_reads_its_own_card(tmp_path, source, prefect_server):
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client

    started = datetime.now(timezone.utc)
    card = tmp_path / "CARD.md"
    card.write_text("# mine\n")
    summary = run(str(source), str(tmp_path / "own"), "FP8_DYNAMIC", model_card=str(card))
    assert (tmp_path / "own" / "README.md").read_text() == "# mine\n"
    run(str(source), str(tmp_path / "copy"), "FP8_DYNAMIC", no_model_card=True)
    assert (tmp_path / "copy" / "README.md").read_text() == SOURCE_CARD
    with pytest.raises(PtqflowError, match="not both"):
        both = {"model_card": str(card), "no_model_card": True}
        run(str(source), str(tmp_path / "x"), "FP8_DYNAMIC", **both)
    assert summary.serve.startswith(f"vllm serve {tmp_path / 'own'}")
    with get_client(sync_client=True) as client:
        runs = [t for t in client.read_task_runs(limit=200) if t.created >= started]
    named = {t.name.rpartition("-")[0] for t in runs if not t.name.startswith(STAGES)}
    assert named == {"plan", "finalize"}, named  # not "reindex-fused-weights"
