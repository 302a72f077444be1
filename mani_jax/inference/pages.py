"""Page accounting for a paged KV cache: a free list, reference counts, and a prefix cache over full pages.

The KV cache of every attention layer is one array of ``n_pages`` fixed-size pages
(``[n_pages, page_size, n_kv_heads, head_dim]``, Kwon et al. 2023, "PagedAttention", arXiv 2309.06180);
a sequence owns an ordered list of page ids, its **block table**. :class:`PagePool` hands out and takes
back page ids; it never touches the arrays.

Prefix caching (vLLM's automatic prefix caching): a *full* page of a sequence is identified by a hash
chained over its tokens and its predecessor's hash, ``h_i = H(h_{i-1} || tokens_i)``, so equal hashes mean
equal whole prefixes. Registered pages stay in the cache after their sequences finish (reference count 0),
in least-recently-used order, and are evicted only when a new allocation finds the free list empty. A new
sequence whose prompt starts with cached pages maps them into its block table (reference count + 1) and
skips their prefill. Each cached page can carry a payload (for hybrid models: the Mamba-2 conv and SSM
state at the end of that page, so a cached prefix also restores the recurrent state).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

ROOT_HASH = b""


class OutOfPages(RuntimeError):
    """Raised by :meth:`PagePool.allocate` when neither free nor evictable pages suffice."""


def page_hashes(tokens: Sequence[int], page_size: int, parent: bytes = ROOT_HASH) -> list[bytes]:
    """Chained hashes of the full pages of ``tokens``: ``h_i = blake2b(h_{i-1} || int64 tokens of page i)``.

    A trailing partial page gets no hash. Deterministic across processes (unlike Python's ``hash``).
    """
    out, h = [], parent
    arr = np.asarray(tokens, dtype=np.int64)
    for i in range(len(arr) // page_size):
        h = hashlib.blake2b(h + arr[i * page_size:(i + 1) * page_size].tobytes(), digest_size=16).digest()
        out.append(h)
    return out


class PagePool:
    """Page ids ``0 .. n_pages-1`` with reference counts, a free list and an LRU prefix cache.

    Invariants (checked by :meth:`check`): every page is exactly one of *free* (refcount 0, not cached),
    *in use* (refcount > 0; maybe cached) or *evictable* (refcount 0, cached, in the LRU list).

    Args:
      n_pages: number of pages (>= 1).
      page_size: tokens per page (>= 1).
      prefix_caching: keep full registered pages for reuse; False = pages are freed at refcount 0.

    Raises:
      ValueError: non-positive ``n_pages`` or ``page_size``.
    """

    def __init__(self, n_pages: int, page_size: int, *, prefix_caching: bool = True):
        if n_pages < 1:
            raise ValueError(f"n_pages: expected >= 1, got {n_pages}")
        if page_size < 1:
            raise ValueError(f"page_size: expected >= 1, got {page_size}")
        self.n_pages, self.page_size, self.prefix_caching = n_pages, page_size, prefix_caching
        self.refcount = np.zeros(n_pages, np.int64)
        self._free: list[int] = list(range(n_pages - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._page_of: dict[bytes, int] = {}  # hash -> page
        self._hash_of: dict[int, bytes] = {}  # page -> hash
        self._payload: dict[int, Any] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable pages, oldest first
        self.stats = {"query_tokens": 0, "hit_tokens": 0, "evictions": 0}

    # ------------------------------------------------------------------ allocation
    @property
    def n_available(self) -> int:
        """Pages an allocation can get now: free + evictable."""
        return len(self._free) + len(self._lru)

    @property
    def n_in_use(self) -> int:
        return int(np.sum(self.refcount > 0))

    def can_allocate(self, n: int) -> bool:
        return n <= self.n_available

    def allocate(self, n: int) -> list[int]:
        """``n`` pages with refcount 1: free ones first, then the least recently used cached ones.

        Raises:
          OutOfPages: fewer than ``n`` pages are free or evictable (nothing is allocated then).
        """
        if n > self.n_available:
            raise OutOfPages(f"need {n} pages, {self.n_available} available of {self.n_pages}")
        pages = []
        for _ in range(n):
            if self._free:
                p = self._free.pop()
            else:
                p, _ = self._lru.popitem(last=False)
                self._uncache(p)
                self.stats["evictions"] += 1
            self.refcount[p] = 1
            pages.append(p)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; at refcount 0 a cached page becomes evictable (most recently
        used end of the LRU list), an uncached one free.

        Raises:
          ValueError: a page's refcount is already 0 (double release).
        """
        for p in pages:
            if self.refcount[p] <= 0:
                raise ValueError(f"pages: page {p} released more often than it was acquired")
            self.refcount[p] -= 1
            if self.refcount[p] == 0:
                if p in self._hash_of:
                    self._lru[p] = None
                else:
                    self._free.append(p)

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, tokens: Sequence[int], max_tokens: int | None = None) -> tuple[list[int], list[Any]]:
        """The longest cached run of full pages at the start of ``tokens`` (at most ``max_tokens`` tokens),
        acquired for the caller (refcount + 1 each; release them like allocated pages).

        Returns:
          ``(pages, payloads)``: the page ids in order and their registered payloads. Counts the query in
          :attr:`stats` (``query_tokens`` += len(tokens) or max_tokens, ``hit_tokens`` += matched tokens).
        """
        limit = len(tokens) if max_tokens is None else min(max_tokens, len(tokens))
        self.stats["query_tokens"] += len(tokens)
        if not self.prefix_caching:
            return [], []
        pages: list[int] = []
        for h in page_hashes(tokens[:limit - limit % self.page_size], self.page_size):
            p = self._page_of.get(h)
            if p is None:
                break
            pages.append(p)
        for p in pages:
            if self.refcount[p] == 0:
                self._lru.pop(p)
            self.refcount[p] += 1
        self.stats["hit_tokens"] += len(pages) * self.page_size
        return pages, [self._payload.get(p) for p in pages]

    def register(self, tokens: Sequence[int], pages: Sequence[int], payloads: Sequence[Any] | None = None,
                 start: int = 0) -> int:
        """Make the full pages ``start, start+1, ...`` of a sequence findable by :meth:`match_prefix`.

        Args:
          tokens: the sequence's tokens from its beginning, at least through the last page to register.
          pages: its block table (``pages[i]`` holds tokens ``[i*page_size, (i+1)*page_size)``).
          payloads: optional per-page payloads aligned with ``pages`` (``None`` entries allowed).
          start: first page index to register (earlier ones are registered already).

        Returns:
          the number of pages newly registered. A page whose prefix is already cached under another page
          is skipped (the existing copy stays canonical).
        """
        if not self.prefix_caching:
            return 0
        hashes = page_hashes(tokens, self.page_size)
        n = 0
        for i in range(start, min(len(hashes), len(pages))):
            h, p = hashes[i], pages[i]
            if h in self._page_of or p in self._hash_of:
                continue
            self._page_of[h], self._hash_of[p] = p, h
            if payloads is not None and i < len(payloads) and payloads[i] is not None:
                self._payload[p] = payloads[i]
            n += 1
        return n

    def _uncache(self, p: int) -> None:
        h = self._hash_of.pop(p)
        del self._page_of[h]
        self._payload.pop(p, None)

    @property
    def hit_rate(self) -> float:
        """Fraction of queried prompt tokens served from the prefix cache."""
        q = self.stats["query_tokens"]
        return self.stats["hit_tokens"] / q if q else 0.0

    @property
    def n_cached(self) -> int:
        return len(self._hash_of)

    def check(self) -> None:
        """Assert the invariants (each page exactly one of free / in use / evictable). For tests."""
        free, lru = set(self._free), set(self._lru)
        assert len(free) == len(self._free), "duplicate page in the free list"
        assert not (free & lru), "page both free and evictable"
        for p in range(self.n_pages):
            in_use = self.refcount[p] > 0
            assert self.refcount[p] >= 0
            assert (p in free) + (p in lru) + in_use == 1, f"page {p}: free={p in free} lru={p in lru} in_use={in_use}"
            assert (p in lru) <= (p in self._hash_of)
            assert (p in free) <= (p not in self._hash_of)
