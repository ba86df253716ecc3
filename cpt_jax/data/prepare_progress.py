"""The progress line of a domain's preparation: documents, text read, tokens/s and ETA."""

from __future__ import annotations

import os
import time

from tqdm.auto import tqdm

from cpt_jax.data import sources


class Progress:
    """One line per domain: documents, text read of the total, tokens/s and ETA."""

    def __init__(self, d: dict, enabled: bool):
        self.enabled = enabled
        self.tokens = 0
        self.start = time.time()
        if not enabled:
            return
        total = None
        kind = sources.kind_of(d)
        if d["kind"] in ("text_glob", "jsonl") and not d.get("max_chars") and not \
                d.get("max_docs") and not d.get("max_tokens"):
            try:
                files = kind.files(d)
                if not any(f.endswith((".gz", ".zst", ".zstd")) for f in files):
                    total = sum(os.path.getsize(f) for f in files)
            except (OSError, sources.DomainError):
                total = None
        self.bar = tqdm(desc=f"prepare {d['name']}", total=total, unit="B",
                        unit_scale=True, mininterval=1.0, smoothing=0.1)
        self.docs = 0
        self.last = 0.0

    def update(self, n_chars: int, n_tokens: int, n_docs: int) -> None:
        if not self.enabled:
            return
        self.tokens += n_tokens
        self.docs += n_docs
        self.bar.update(n_chars)
        now = time.time()
        if now - self.last >= 1.0:
            self.last = now
            self._postfix(now, refresh=False)

    def _postfix(self, now: float, refresh: bool) -> None:
        rate = self.tokens / max(now - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.docs} docs, {rate / 1e6:.2f}M tok/s",
                                 refresh=refresh)

    def close(self) -> None:
        if self.enabled:
            self._postfix(time.time(), refresh=True)
            self.bar.close()
