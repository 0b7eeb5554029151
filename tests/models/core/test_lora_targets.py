"""The one table of block linears and their shapes (torch-free: tests/test_layering.py imports it so)."""

from __future__ import annotations

import pytest

from polymorphd.models.core.lora_targets import TARGETS, target_dims


def test_targets_in_forward_order():
    assert TARGETS == ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def test_dims_in_terms_of_width_and_mlp_hidden():
    assert [target_dims(t, 48, 192) for t in TARGETS] == [(48, 144), (48, 48), (48, 192), (192, 48)]


def test_unknown_target_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"LoRA target 'attn.kv' unknown: valid targets are \['attn.qkv'"):
        target_dims("attn.kv", 48, 192)
