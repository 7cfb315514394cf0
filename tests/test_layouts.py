"""Fused experts cut by the layout their architecture stores, and what vLLM's loader needs.

The expected slices are written here from each architecture's own forward pass in
transformers (gpt-oss: `gate_up[..., ::2]` is gate; Llama-4: the first half of the columns;
GraniteMoE: the first half of the rows), not from tasks/core/layouts.py.
"""

from __future__ import annotations

import pytest
import torch

from storage.errors import PtqflowError
from tasks.core.layouts import split
from tasks.core.loaders import aliases, experts_names, fp8_block_problems, partitions, routers

E, H, I = 3, 8, 6  # noqa: E741 - the usual names: experts, hidden, intermediate


def cut(tensor: torch.Tensor, c) -> torch.Tensor:
    """What a Cut gives from the 3-D tensor, the way the shard writer reads it."""
    flat = tensor.reshape(-1, tensor.shape[-1])[c.start : c.stop]
    if c.view is None:
        return flat
    flat = flat[:, c.view.start : c.view.stop]
    return flat.T if c.view.transpose else flat


def test_gpt_oss_experts_keep_gate_and_up_interleaved_in_vllms_names():
    config = {"model_type": "gpt_oss", "hidden_size": H, "intermediate_size": I,
              "num_local_experts": E}  # fmt: skip
    gate_up = torch.randn(E, H, 2 * I)
    down = torch.randn(E, I, H)
    cuts = split(config, "model.layers.0.mlp.experts.gate_up_proj", tuple(gate_up.shape))
    assert [c.name for c in cuts] == [
        f"model.layers.0.mlp.experts.{e}.gate_up_proj.weight" for e in range(E)
    ]
    assert [c.out for c in cuts] == [f"model.layers.0.mlp.experts.{e}.w13_" for e in range(E)]
    for e, c in enumerate(cuts):
        w13 = cut(gate_up, c)
        assert w13.shape == (2 * I, H)
        # transformers' GptOssExperts: gate = gate_up[..., ::2], up = gate_up[..., 1::2]
        assert torch.equal(w13[0::2], gate_up[e][:, ::2].T)
        assert torch.equal(w13[1::2], gate_up[e][:, 1::2].T)
    cuts = split(config, "model.layers.0.mlp.experts.down_proj", tuple(down.shape))
    for e, c in enumerate(cuts):
        assert torch.equal(cut(down, c), down[e].T)
        assert c.out == f"model.layers.0.mlp.experts.{e}.w2_"


def test_llama4_experts_split_gate_and_up_columns_when_hidden_equals_intermediate():
    config = {"model_type": "llama4_text", "hidden_size": H, "intermediate_size": H,
              "num_local_experts": E}  # fmt: skip
    gate_up = torch.randn(E, H, 2 * H)
    cuts = split(config, "model.layers.1.feed_forward.experts.gate_up_proj", (E, H, 2 * H))
    names = [c.name.removeprefix("model.layers.1.feed_forward.experts.") for c in cuts]
    assert names[:2] == ["0.gate_proj.weight", "0.up_proj.weight"]
    for e in range(E):
        gate, up = cut(gate_up, cuts[2 * e]), cut(gate_up, cuts[2 * e + 1])
        # transformers' Llama4TextExperts: x @ gate_up -> chunk(2, dim=-1): gate first
        assert torch.equal(gate, gate_up[e][:, :H].T)
        assert torch.equal(up, gate_up[e][:, H:].T)


def test_granite_input_linear_splits_rows_gate_first():
    config = {"model_type": "granitemoe", "hidden_size": H, "intermediate_size": I,
              "num_local_experts": E}  # fmt: skip
    w = torch.randn(E, 2 * I, H)
    cuts = split(config, "model.layers.0.block_sparse_moe.input_linear.weight", tuple(w.shape))
    assert cuts[0].name == "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight"
    assert all(c.view is None for c in cuts)  # contiguous rows: read in place
    for e in range(E):
        assert torch.equal(cut(w, cuts[2 * e]), w[e, :I])
        assert torch.equal(cut(w, cuts[2 * e + 1]), w[e, I:])


def test_transformers_fused_layout_comes_from_its_conversion():
    config = {"model_type": "qwen3_moe", "hidden_size": H, "moe_intermediate_size": I,
              "num_experts": E}  # fmt: skip
    cuts = split(config, "model.layers.0.mlp.experts.gate_up_proj", (E, 2 * I, H))
    assert [c.name for c in cuts[:2]] == [
        "model.layers.0.mlp.experts.0.gate_proj.weight",
        "model.layers.0.mlp.experts.0.up_proj.weight",
    ]
    mixtral = {"model_type": "mixtral", "hidden_size": H, "num_local_experts": E}
    cuts = split(mixtral, "model.layers.0.mlp.experts.gate_up_proj", (E, 2 * I, H))
    assert cuts[0].name == "model.layers.0.mlp.experts.0.w1.weight"


def test_a_shape_config_json_does_not_give_is_refused_naming_the_tensor():
    config = {"model_type": "gpt_oss", "hidden_size": H, "intermediate_size": I,
              "num_local_experts": E}  # fmt: skip
    with pytest.raises(PtqflowError, match=r"experts\.gate_up_proj has shape \[3, 12, 8\]"):
        split(config, "model.layers.0.mlp.experts.gate_up_proj", (E, 2 * I, H))


def test_unknown_model_types_are_never_split():
    config = {"model_type": "brand_new", "hidden_size": H, "num_experts": E}
    assert split(config, "model.layers.0.mlp.experts.gate_up_proj", (E, 2 * I, H)) is None


def test_routers_are_found_by_rule_under_any_name():
    config = {"model_type": "x", "num_experts": 4}
    shapes = {
        "model.layers.0.mlp.gate.weight": (4, 16),  # Qwen, DeepSeek
        "model.layers.0.mlp.shared_expert_gate.weight": (1, 16),  # Qwen2-MoE
        "model.layers.0.mlp.gate.wg.weight": (4, 16),  # Hunyuan
        "model.layers.0.mlp.experts.0.gate_proj.weight": (8, 16),
        "model.layers.0.mlp.shared_expert.gate_proj.weight": (8, 16),
        "model.layers.1.block_sparse_moe.router.layer.weight": (4, 16),  # GraniteMoE
        "model.layers.1.block_sparse_moe.input_linear.weight": (4, 16, 16),
        "model.layers.2.self_attn.q_proj.weight": (4, 16),  # 4 rows, but no experts beside
    }
    assert routers(config, shapes) == [
        "model.layers.0.mlp.gate",
        "model.layers.0.mlp.gate.wg",
        "model.layers.0.mlp.shared_expert_gate",
        "model.layers.1.block_sparse_moe.router.layer",
    ]


def test_partitions_of_layers_vllm_builds_from_one_tensor():
    config = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
              "head_dim": 16, "linear_num_key_heads": 2, "linear_key_head_dim": 8,
              "linear_num_value_heads": 4, "linear_value_head_dim": 8, "mamba_n_heads": 8,
              "mamba_d_ssm": 32, "mamba_n_groups": 1, "mamba_d_state": 16}  # fmt: skip
    assert partitions(config, "model.layers.0.self_attn.qkv_proj", 96) == [64, 16, 16]
    assert partitions(config, "model.layers.0.linear_attn.in_proj_qkv", 64) == [16, 16, 32]
    assert partitions(config, "model.layers.0.mamba.in_proj", 104) == [32, 32, 16, 16, 8]
    assert partitions(config, "model.layers.0.mlp.down_proj", 64) == [64]


def test_fp8_blocks_must_fill_every_merged_partition_but_the_last():
    config = {"hidden_size": 256}
    ba = {"l.in_proj_b": [("l.in_proj_b", 32), ("l.in_proj_a", 32)]}
    assert "partitions of [32, 32] rows" in fp8_block_problems(config, ba, 128)["l.in_proj_b"]
    qkv = {"l.q_proj": [("l.q_proj", 256), ("l.k_proj", 128), ("l.v_proj", 64)]}
    assert fp8_block_problems(config, qkv, 128) == {}  # the last may be partial


def test_ignored_modules_get_every_name_the_loaders_use():
    phimoe = {"model_type": "phimoe"}
    got = aliases(phimoe, ["model.layers.0.block_sparse_moe.gate"])
    assert "model.layers.0.mlp.router" in got  # transformers 5's conversion renames it
    deepseek = {"model_type": "deepseek_v3"}
    mla = ["model.layers.3.self_attn.q_a_proj", "model.layers.3.self_attn.kv_a_proj_with_mqa"]
    assert "model.layers.3.self_attn.fused_qkv_a_proj" in aliases(deepseek, mla)
    # vLLM's MiniMax-M2 checks its experts under `mlp`, not `block_sparse_moe`
    minimax = {"model_type": "minimax_m2"}
    assert experts_names(minimax, "model.layers.0.block_sparse_moe") == [
        "model.layers.0.block_sparse_moe.experts",
        "model.layers.0.mlp.experts",
    ]
