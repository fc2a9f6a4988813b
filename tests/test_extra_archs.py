"""Architectures in the table beyond tests/tiny.py's ARCHS: the load-time mapping check passes and
permuting the intermediate neurons leaves the logits unchanged (the two facts NA relies on)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from editor.model.arch import check_mapping, decoder_layers, permute_neurons, spec_for

EXTRA = {
    "gemma3_text": dict(head_dim=8),
    "olmo": {},
    "olmo2": {},
    "granite": {},
}


def _model(arch):
    torch.manual_seed(0)
    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0, **EXTRA[arch])
    cfg = AutoConfig.for_model(arch, **kw)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return m


@pytest.mark.parametrize("arch", sorted(EXTRA))
def test_mapping_check_and_permutation_invariance(arch):
    m = _model(arch)
    spec = spec_for(m.config)
    check_mapping(m, spec, arch)
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        before = m(input_ids=ids).logits
        g = torch.Generator().manual_seed(1)
        for i in range(len(decoder_layers(m, spec))):
            permute_neurons(m, spec, i, torch.randperm(48, generator=g))
        after = m(input_ids=ids).logits
    assert (before - after).abs().max() < 1e-5
