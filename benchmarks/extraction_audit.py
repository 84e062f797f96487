"""Is the extraction audit strong enough that its low numbers mean something?

    PYTHONPATH=src python benchmarks/extraction_audit.py [--workdir /tmp] [--threads 1] [--keep]

The whole owner lifecycle on real news text (AG News from ../shared/corpora, items cut to 80
bytes): a byte-level public model pretrained on Python's pydoc topics; two owners, each branching
it, training an expert (expert_anchor) with `flexmoe train`'s trainer and packaging it; one merge
of both. Owner `memorised` trains on 50 items for 600 epochs, each epoch in a new order
(deliberate memorisation); owner `one-epoch` trains once over 5,000 others. Each owner's
documents are then audited (32-token prefixes at random offsets, greedy + 4 samples at
T=0.7/top-k 40/top-p 0.95, similarity >= 0.9) against the public model, the owner's expert, the
merged model, the merged model with that owner opted out and with the other owner opted out.
Prints one table; the attack must score high on `memorised` before its low score on `one-epoch`
is believed. About 20 minutes on one CPU thread of a busy machine (most of it generation); exits
1 if the attack misses the memorised expert.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from flexmoe.config.train import RunConfig
from flexmoe.train.load import load_model
from flexmoe.data import ByteTokenizer, TokenWindows, load_shared_corpora, prepare_data
from flexmoe.eval.extraction import AuditConfig, audit_models, documents_from_texts
from flexmoe.flex.branch import branch
from flexmoe.flex.consent import load_for_use
from flexmoe.flex.merge import merge
from flexmoe.flex.optout import expert_mask
from flexmoe.flex.package import make_package
from flexmoe.flex.router_init import attach_public_embedding, compute_router_embedding
from flexmoe.train.trainer import train


def news_documents(path: Path, max_bytes: int) -> list[str]:
    """AG News rows as `title. description`, cut to `max_bytes` (short news items)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [f"{title}. {desc}".replace("\\n", " ").replace("\\", " ") for _, title, desc in csv.reader(f)]
    return [r.encode("utf-8")[:max_bytes].decode("utf-8", "ignore") for r in rows]


def public_documents() -> list[str]:
    from pydoc_data import topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def run_cfg(out: Path, a, **over) -> object:
    cfg = OmegaConf.structured(RunConfig)
    cfg.out_dir = str(out)
    cfg.model.update(vocab_size=258, d_model=a.d_model, num_layers=a.layers, num_heads=4, d_ff=a.d_ff,
                     max_seq_len=1024, eos_token_id=256, pad_token_id=257)
    cfg.data.update(seq_len=a.seq_len, batch_size=a.batch_size)
    cfg.trainer.update(log_every=50, threads=a.threads, resume=False)
    cfg.optim.update(lr=a.lr, warmup_steps=20)
    cfg.tokenizer = "bytes"
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a shared 2-core machine, 2 threads lost 20x to oversubscription)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--doc-bytes", type=int, default=80, help="documents are news items cut to this many bytes")
    p.add_argument("--public-steps", type=int, default=300)
    p.add_argument("--memorise-docs", type=int, default=50)
    p.add_argument("--memorise-epochs", type=int, default=600)
    p.add_argument("--one-epoch-docs", type=int, default=5000)
    p.add_argument("--audit-docs", type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    news = load_shared_corpora().get("news")
    if news is None:
        print("skipped: ../shared/corpora/agnews_7600.csv is absent (this benchmark audits real news text)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="flexmoe-extraction-", dir=a.workdir))
    t_start = time.perf_counter()
    try:
        docs = [d for d in news_documents(news, a.doc_bytes) if len(d.encode()) >= 64]
        owners = {"memorised": docs[:a.memorise_docs],
                  "one-epoch": docs[a.memorise_docs:a.memorise_docs + a.one_epoch_docs]}
        tok = ByteTokenizer()
        data = {"public": work / "data-public"}
        prepare_data([write_jsonl(work / "public.jsonl", public_documents())], data["public"], tok, domain="public",
                     progress=False)
        rng = random.Random(0)
        for name, ds in owners.items():
            epochs = a.memorise_epochs if name == "memorised" else 1
            # Each epoch visits the documents in a new order, as a shuffling data pipeline does: a
            # stream that repeated one order would put every document in the same context every
            # time, and the expert would learn those contexts rather than the documents.
            stream = [d for _ in range(epochs) for d in rng.sample(ds, len(ds))]
            data[name] = work / f"data-{name}"
            prepare_data([write_jsonl(work / f"{name}.jsonl", stream)], data[name], tok, domain=name, progress=False)

        # 1. The public model: pretrained, with its router row computed from public data.
        t = time.perf_counter()
        pub = train(run_cfg(work / "public", a, **{"data.train": {"public": str(data["public"])},
                                                  "trainer.steps": a.public_steps}))
        public = Path(pub["final"])
        compute_router_embedding(public, data["public"], work / "public-rows.safetensors", seq_len=a.seq_len)
        attach_public_embedding(public, work / "public-rows.safetensors")
        times = {"public": time.perf_counter() - t}

        # 2. Each owner alone: router row, branch, expert training, package.
        from safetensors.torch import load_file

        pkgs, experts, steps = {}, {}, {}
        for name in owners:
            t = time.perf_counter()
            rows_file = work / f"rows-{name}.safetensors"
            compute_router_embedding(public, data[name], rows_file, seq_len=a.seq_len)
            anchor = branch(public, work / f"anchor-{name}", load_file(str(rows_file))["router_embedding"])
            steps[name] = max(1, len(TokenWindows(data[name], a.seq_len)) // a.batch_size)  # one pass over the stream
            out = train(run_cfg(work / f"expert-{name}", a, **{
                "init_from": str(anchor), "data.train": {name: str(data[name])}, "stage.name": "expert_anchor",
                "stage.freeze": "expert_anchor", "trainer.steps": steps[name], "meta.owner": name,
                "meta.domain": name}))
            experts[name] = Path(out["final"])
            pkgs[name] = make_package(experts[name], work / f"pkg-{name}", owner=name, domain=name,
                                      allowed_uses=["research"])
            times[name] = time.perf_counter() - t
        merged_dir = merge(public, list(pkgs.values()), work / "merged")

        # 3. The audit of each owner's own documents, the same prefixes for every model.
        merged, _, meta, _ = load_for_use(merged_dir)
        public_model = load_model(public)[0]
        results = {}
        for name in owners:
            others = [o for o in owners if o != name]
            # merged-without-others is, by opt-out exactness, the owner's expert beside the public one
            # alone: what the release carries of this owner whatever the other experts do to routing.
            models = {"public": (public_model, None), "expert": (load_model(experts[name])[0], None),
                      "merged": (merged, None), "merged-without-owner": (merged, expert_mask(meta["experts"], [name])),
                      "merged-without-others": (merged, expert_mask(meta["experts"], others))}
            docs_tok = documents_from_texts(owners[name], tok)
            results[name] = audit_models(models, docs_tok, AuditConfig(max_docs=a.audit_docs))
        total = time.perf_counter() - t_start

        print(f"\nExtraction audit, AG News owners (byte-level d_model {a.d_model}, {a.layers} layers, d_ff {a.d_ff}); "
              f"{total / 60:.1f} min on {a.threads} thread(s)\n")
        print("| owner (training) | audited docs | model | extracted | 95% CI | exact | mean best similarity |")
        print("|---|---|---|---|---|---|---|")
        for name, rep in results.items():
            how = (f"{len(owners[name])} docs, {a.memorise_epochs} epochs ({steps[name]} steps)" if name == "memorised"
                   else f"{len(owners[name])} docs, 1 epoch ({steps[name]} steps)")
            for label, r in rep["models"].items():
                e, x = r["extracted"], r["exact"]
                print(f"| {name} ({how}) | {r['documents']} | {label} | {e['rate']:.1%} | "
                      f"{e['ci95'][0]:.1%}-{e['ci95'][1]:.1%} | {x['rate']:.1%} | {r['mean_best_similarity']:.3f} |")
        strong = results["memorised"]["models"]["expert"]["extracted"]["rate"]
        weak = results["one-epoch"]["models"]["expert"]["extracted"]["rate"]
        print(f"\nattack strong on the memorising expert: {strong:.1%} > 50%: {strong > 0.5}; "
              f"one epoch over 5,000 documents: {weak:.1%}")
        out = {"results": results, "seconds": times | {"total": total}, "settings": vars(a), "steps": steps}
        (Path(a.workdir) / "extraction_audit.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
        return 0 if strong > 0.5 else 1
    finally:
        if a.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
