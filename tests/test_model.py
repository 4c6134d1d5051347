"""The built-in GPT and the model factory. No Ray."""

from __future__ import annotations

import pytest
import torch

from common.errors import ConfigError
from orchestrator.config import ModelConfig
from orchestrator.gpt import GPT, build_model

torch.set_num_threads(1)


def small(**kw) -> GPT:
    torch.manual_seed(0)
    args = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, d_model=32) | kw
    return GPT(**args)


def test_logits_shape():
    model = small()
    idx = torch.randint(0, 256, (3, 16))
    assert model(idx).shape == (3, 16, 256)
    assert model(idx[:, :5]).shape == (3, 5, 256)


def test_causal_future_tokens_do_not_change_past_logits():
    model = small().eval()
    a = torch.randint(0, 256, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 7) % 256
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert torch.equal(la[0, :10], lb[0, :10])
    assert not torch.equal(la[0, 10:], lb[0, 10:])


def test_initial_loss_is_near_uniform():
    model = small()
    idx = torch.randint(0, 256, (4, 16))
    logits = model(idx)
    targets = torch.randint(0, 256, (4, 16))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        small()(torch.zeros(1, 17, dtype=torch.long))


def test_embeddings_are_tied_and_params_counted():
    model = small()
    assert model.head.weight is model.tok.weight
    n = sum(p.numel() for p in model.parameters())
    # tok 256*32 + pos 16*32 + 2 blocks * (2*2*32 LN + qkv 32*96+96 + proj 32*32+32 + mlp 32*128+128+128*32+32) + ln_f 64
    block = 4 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    assert n == 256 * 32 + 16 * 32 + 2 * block + 64


def test_same_seed_same_weights():
    assert all(torch.equal(a, b) for a, b in zip(small().parameters(), small().parameters(), strict=True))


def make_mlp(*, vocab_size: int, block_size: int, width: int = 8):
    return torch.nn.Sequential(torch.nn.Embedding(vocab_size, width), torch.nn.Linear(width, vocab_size))


def test_factory_builds_users_model():
    cfg = ModelConfig(factory="tests.test_model:make_mlp", kwargs={"width": 4})
    model = build_model(cfg, vocab_size=256, block_size=16)
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 256)


@pytest.mark.parametrize("spec, msg", [
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("tests.test_model:nothing_here", "has no callable 'nothing_here'"),
    ("tests.test_model:small_value", "has no callable"),
])
def test_factory_errors_are_clear(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        build_model(ModelConfig(factory=spec), vocab_size=256, block_size=16)


small_value = 3
