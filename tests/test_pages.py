"""PagePool: allocation, reference counts, prefix-cache hits, LRU eviction, invariants under random use."""

import random

import pytest

from mani_jax.inference.pages import OutOfPages, PagePool, page_hashes


def test_page_hashes_chain_over_whole_prefix():
    a = page_hashes([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3  # the partial last page has no hash
    b = page_hashes([9, 2, 3, 4, 5, 6], 2)
    assert a[0] != b[0] and a[1] != b[1]  # same page tokens, different prefix -> different hash
    assert page_hashes([1, 2, 3, 4], 2) == a[:2]


def test_allocate_release_and_out_of_pages():
    pool = PagePool(4, 16, prefix_caching=False)
    pages = pool.allocate(3)
    assert pages == [0, 1, 2] and pool.n_available == 1
    with pytest.raises(OutOfPages):
        pool.allocate(2)
    assert pool.n_available == 1  # a failed allocation takes nothing
    pool.release(pages)
    assert pool.n_available == 4 and pool.n_in_use == 0
    with pytest.raises(ValueError, match="released"):
        pool.release([0])
    pool.check()


def test_prefix_hits_reuse_pages_and_eviction_is_lru():
    pool = PagePool(6, 4)
    prompt = list(range(10))  # 2 full pages + 2 tokens
    pages = pool.allocate(3)
    assert pool.register(prompt, pages, payloads=["s0", "s1", None]) == 2
    pool.release(pages)
    assert pool.n_cached == 2 and pool.n_available == 6
    # Same prefix: both full pages hit, with their payloads; at most max_tokens are matched.
    hit, payloads = pool.match_prefix(prompt + [99])
    assert hit == pages[:2] and payloads == ["s0", "s1"]
    assert pool.refcount[pages[0]] == 1
    pool.release(hit)
    assert pool.match_prefix(prompt, max_tokens=7)[0] == pages[:1]
    pool.release(pages[:1])
    # A different first page misses entirely even though page 2's tokens equal.
    assert pool.match_prefix([42] + prompt[1:])[0] == []
    pool.check()
    # Fill the pool: free pages go first, then the least recently used cached page (page 1 was used
    # less recently than page 0, which was matched last).
    fresh = pool.allocate(4)
    assert set(fresh).isdisjoint(pages[:2])
    more = pool.allocate(1)
    assert more == [pages[1]] and pool.stats["evictions"] == 1
    assert pool.match_prefix(prompt)[0] == [pages[0]]  # page 0 still cached, page 1's chain broken
    pool.check()


def test_hit_rate_counts_tokens():
    pool = PagePool(8, 2)
    p = pool.allocate(2)
    pool.register([1, 2, 3, 4], p)
    pool.release(p)
    pool.match_prefix([1, 2, 3, 4, 5, 6])  # 4 of 6 tokens hit
    assert pool.hit_rate == pytest.approx(4 / 6)


def test_duplicate_registration_keeps_the_first_copy():
    pool = PagePool(4, 2)
    a, b = pool.allocate(1), pool.allocate(1)
    assert pool.register([1, 2], a) == 1
    assert pool.register([1, 2], b) == 0  # same prefix computed twice: b stays uncached
    pool.release(a + b)
    assert pool.n_cached == 1 and pool.n_available == 4
    pool.check()


def test_random_workload_never_leaks():
    rng = random.Random(0)
    pool = PagePool(32, 4)
    live = []
    prefixes = [[rng.randrange(50) for _ in range(12)] for _ in range(3)]
    for _ in range(400):
        if live and (rng.random() < 0.45 or pool.n_available < 6):
            pages = live.pop(rng.randrange(len(live)))
            pool.release(pages)
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
            hit, _ = pool.match_prefix(tokens, max_tokens=len(tokens) - 1)
            need = -(-len(tokens) // 4) - len(hit)
            if not pool.can_allocate(need):
                pool.release(hit)
                continue
            pages = hit + pool.allocate(need)
            pool.register(tokens, pages, start=len(hit))
            live.append(pages)
        pool.check()
    for pages in live:
        pool.release(pages)
    pool.check()
    assert pool.n_in_use == 0 and pool.n_available == 32
    assert pool.hit_rate > 0.3
