"""SFT data: assistant-only loss mask, packing with document masking, zero gradient from
targets outside assistant turns."""

import json

import numpy as np
import torch

from flexmoe.config import ModelConfig
from flexmoe.data import ByteTokenizer
from flexmoe.data.sft import SFTWindows, encode_chat, masked_lm_loss, prepare_sft
from flexmoe.model import Transformer

CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another?"},
     {"role": "assistant", "content": "11"}],
] * 6


def test_mask_covers_exactly_the_assistant_text():
    tok = ByteTokenizer()
    ids, mask = encode_chat(CHATS[1], tok)
    trained = bytes(i for i, m in zip(ids, mask) if m and i < 256).decode()
    assert trained == "7\n11\n"
    assert ids[-1] == tok.eos_id and mask[-1] == 1
    assert sum(mask) == len("7\n11\n") + 1


def test_windows_and_zero_gradient_outside_assistant_turns(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps({"messages": m}) for m in CHATS) + "\n")
    man = prepare_sft([f], tmp_path / "sft", ByteTokenizer())
    assert man["num_examples"] == len(CHATS)
    w = SFTWindows(tmp_path / "sft", seq_len=64)
    item = w[1]
    assert item["tokens"].shape == (65,) and item["loss_mask"].shape == (64,) and item["doc_ids"].shape == (64,)

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, d_ff=48))
    tokens = torch.from_numpy(np.stack([w[i]["tokens"] for i in range(3)]))
    mask = torch.from_numpy(np.stack([w[i]["loss_mask"] for i in range(3)]))
    docs = torch.from_numpy(np.stack([w[i]["doc_ids"] for i in range(3)]))
    assert 0 < mask.sum() < mask.numel()

    def grads(targets):
        model.zero_grad()
        masked_lm_loss(model(tokens[:, :-1], doc_ids=docs).logits, targets, mask).backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = grads(tokens[:, 1:])
    perturbed = tokens[:, 1:].clone()
    off = mask == 0
    perturbed[off] = (perturbed[off] + 17) % 256  # change every target outside assistant turns
    for a, b in zip(ref, grads(perturbed)):
        assert torch.equal(a, b)
    # and a trained target does matter
    on = perturbed.clone()
    on[mask == 1] = (on[mask == 1] + 17) % 256
    assert any(not torch.equal(a, b) for a, b in zip(ref, grads(on)))


def test_document_masking_isolates_packed_examples():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, d_ff=48)).eval()
    a = torch.randint(0, 256, (1, 20))
    docs = torch.tensor([[0] * 8 + [1] * 12])
    b = a.clone()
    b[0, :8] = torch.randint(0, 256, (8,))  # change only the first example
    with torch.no_grad():
        la = model(a, doc_ids=docs).logits
        lb = model(b, doc_ids=docs).logits
        alone = model(a[:, 8:]).logits
    torch.testing.assert_close(la[:, 8:], lb[:, 8:], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(la[:, :8], lb[:, :8])
    # RoPE scores depend only on relative positions, so the packed example computes as if alone
    torch.testing.assert_close(la[:, 8:], alone, atol=1e-5, rtol=1e-5)
