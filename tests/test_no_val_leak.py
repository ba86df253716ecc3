"""End to end, by content: training batches never hold validation text.

Three small domains of distinct, unique documents go through what a run does before
training (``prepare_run``: tokenizer, prepare, sampler) and the loader the loop builds
(``BatchLoader(sampler, parts.train_sources, mesh)``), for every step of every task with
replay rate 0.5 over several epochs. Documents are identified by their token content (the
run's tokenizer applied to the source text), never by the row ids or split decisions the
code reports: a training batch must hold only pieces of training documents, no token
4-gram that only a validation document has, and, over the run, every training document.
"""

import collections
import json
import os
import sys

import numpy as np
import pytest
from test_data_prepare import _wrapped_documents

from cpt_jax.data.loader import BatchLoader
from cpt_jax.train import setup as loop_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_GRAM = 4
VOCABS = {"en": ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "home",
                 "red", "big", "sun"],
          "num": [str(i) for i in range(10, 40)],
          "sym": ["<", ">", "=", "+", "{", "}", "(", ")", ";", "[", "]", "*", "&", "|"]}
N_DOCS = {"en": 24, "num": 36, "sym": 30}


def _documents():
    """{domain: [unique texts]}: random word sequences, 6 to 10 words, all distinct."""
    rng = np.random.default_rng(0)
    out = {}
    for name, vocab in VOCABS.items():
        docs = set()
        while len(docs) < N_DOCS[name]:
            docs.add(" ".join(rng.choice(vocab, size=rng.integers(6, 11))))
        out[name] = sorted(docs)
    return out


def _config(tmp_path, docs):
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import tiny  # configs/tiny.py
    c = tiny.get_config()
    c.model.vocab_size = 320
    c.seq_len, c.global_batch = 32, 8
    domains = []
    for name, texts in docs.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        domains.append({"name": name, "kind": "jsonl", "pattern": str(path), "field": "text"})
    c.data.domains = domains
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.val_fraction = 0.2
    c.replay.rate = 0.5
    # budgets in replay-free steps of 8 rows; additive accounting at rate 0.5 doubles the
    # steps, keeping 8 * steps new rows per task: several epochs of these domains
    c.tasks = [{"domain": "en", "steps": 6}, {"domain": "num", "steps": 8},
               {"domain": "sym", "steps": 7}]
    return c


def _pieces(rows_tokens, rows_segs, bos, eos):
    """Split each row's content ([BOS] doc [EOS] streams cut into rows) at BOS tokens.

    Returns (complete, prefixes, suffixes) per row: complete wrapped documents, the start
    of a document running into the next row, the end of one begun in the previous row.
    """
    out = []
    for tokens, segs in zip(rows_tokens, rows_segs):
        content = [int(t) for t in tokens[segs > 0]]  # segment 0 = padding
        starts = [i for i, t in enumerate(content) if t == bos]
        complete, prefixes, suffixes = [], [], []
        head = content[:starts[0]] if starts else content
        if head:
            suffixes.append(tuple(head))
        for a, b in zip(starts, starts[1:] + [len(content)]):
            piece = tuple(content[a:b])
            (complete if piece[-1] == eos and len(piece) > 1 else prefixes).append(piece)
        out.append((complete, prefixes, suffixes))
    return out


def _ngrams(seq, n=N_GRAM):
    return {tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)}


def _split_documents(rows, bos, eos):
    """All complete wrapped documents of a prepared split, read in file order."""
    tokens, segs = rows.read(np.arange(len(rows)))
    return _wrapped_documents(tokens, segs, bos, eos)


@pytest.fixture(scope="module")
def run_parts(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("leak")
    docs = _documents()
    config = _config(tmp_path, docs)
    parts = loop_setup.prepare_run(config, str(tmp_path / "work"))
    tok = loop_setup.load_tokenizer(config, [dict(d) for d in config.data.domains],
                              config.data.cache_dir)
    wrapped = {name: [tuple([tok.bos_id, *tok.encode(t), tok.eos_id]) for t in texts]
               for name, texts in docs.items()}
    return config, parts, tok, wrapped


def test_fixture_documents_are_distinct_and_fit_two_rows(run_parts):
    config, _, _, wrapped = run_parts
    every = [w for ws in wrapped.values() for w in ws]
    assert len(set(every)) == len(every)  # unique by token content
    # a wrapped document spans at most two rows, so each row's pieces identify it
    assert max(len(w) for w in every) <= config.seq_len + 1


def test_validation_and_training_documents_partition_each_domain(run_parts):
    _, parts, tok, wrapped = run_parts
    for name, docs in wrapped.items():
        train = _split_documents(parts.prepared[name]["train"], tok.bos_id, tok.eos_id)
        val = _split_documents(parts.prepared[name]["val"], tok.bos_id, tok.eos_id)
        assert val, f"{name}: empty validation split"
        assert train, f"{name}: empty training split"
        assert not set(train) & set(val), name
        assert collections.Counter(train) + collections.Counter(val) == \
            collections.Counter(docs), name


def test_loader_never_yields_validation_text(run_parts):
    config, parts, tok, wrapped = run_parts
    bos, eos = tok.bos_id, tok.eos_id
    val_docs, train_docs = {}, {}
    for name, docs in wrapped.items():
        val = set(_split_documents(parts.prepared[name]["val"], bos, eos))
        val_docs[name] = [w for w in docs if w in val]
        train_docs[name] = [w for w in docs if w not in val]
    all_train = {w for ws in train_docs.values() for w in ws}
    # 4-grams (of document text, no BOS/EOS) that only validation documents contain; every
    # validation document has some, so any part of one that reaches a batch is caught
    train_grams = set().union(*(_ngrams(w[1:-1]) for w in all_train))
    val_only = {}
    for ws in val_docs.values():
        for w in ws:
            grams = _ngrams(w[1:-1]) - train_grams
            assert grams, f"fixture: validation document {w} has no 4-gram of its own"
            val_only[w] = grams
    forbidden = set().union(*val_only.values())

    def attributable(domains, complete, prefixes, suffixes):
        docs = [w for d in domains for w in train_docs[d]]
        return (all(p in set(docs) for p in complete)
                and all(any(w[:len(p)] == p for w in docs) for p in prefixes)
                and all(any(w[len(w) - len(s):] == s for w in docs) for s in suffixes))

    loader = BatchLoader(parts.sampler, parts.train_sources, parts.mesh)
    order = [t["domain"] for t in config.tasks]
    assert parts.task_names == order and len(parts.steps) == 3
    replayed = 0
    for k, name in enumerate(order):
        seen_complete, seen_prefix, seen_suffix = set(), set(), set()
        new_rows = 0
        for batch in loader.iterate(k, 0, parts.steps[k]):
            tokens = np.asarray(batch.arrays["tokens"])
            segs = np.asarray(batch.arrays["segment_ids"])
            is_replay = batch.is_replay
            assert tokens.shape == (config.global_batch, config.seq_len + 1)
            for r, (complete, prefixes, suffixes) in enumerate(
                    _pieces(tokens, segs, bos, eos)):
                content = [int(t) for t in tokens[r][segs[r] > 0]]
                leaked = _ngrams(content) & forbidden
                assert not leaked, f"task {name}: validation text in a training row"
                # every piece of the row belongs to a training document: of this task's
                # domain for new rows, of an earlier task's for replayed rows
                allowed = order[:k] if is_replay[r] else [name]
                assert allowed, "task 0 replays nothing"
                assert attributable(allowed, complete, prefixes, suffixes), (
                    f"task {name}: a {'replayed' if is_replay[r] else 'new'} row holds text "
                    f"that is not training text of {allowed}")
                if is_replay[r]:
                    replayed += 1
                else:
                    new_rows += 1
                    seen_complete.update(complete)
                    seen_prefix.update(prefixes)
                    seen_suffix.update(suffixes)
        # more than one epoch of this task's training rows
        assert new_rows > len(parts.prepared[name]["train"]), name
        # every training document of the task was seen (whole, or cut across two rows)
        for w in train_docs[name]:
            whole = w in seen_complete
            cut = any(w[:j] in seen_prefix and w[j:] in seen_suffix for j in range(1, len(w)))
            assert whole or cut, f"task {name}: training document never seen"
        # and no validation document was: not whole, not as a two-row cut
        for w in val_docs[name]:
            assert w not in seen_complete
            assert not any(w[:j] in seen_prefix and w[j:] in seen_suffix
                           for j in range(1, len(w)))
    half = config.global_batch // 2
    assert replayed == half * (parts.steps[1] + parts.steps[2])  # replay happened
