"""Paged K/V of one full-attention layer: a pool of fixed-size pages and a table of each row's pages.

`PagedAttentionKV` has AttentionKV's API (engine/cache.py), so HybridCache and the network can use
either, but its K and V live in a pool [n_pages, page_size, n_kv, head_dim] and row b's slot s is
slot s % page_size of page page_table[b, s // page_size]. Pages are handed out from a free list kept
on the host as rows grow and go back to it when a row is removed, so:
- growing a row never copies its K/V (only a full pool grows, by doubling, copying the pool once);
- a row takes pages for its own tokens, not for the longest row's (AttentionKV gives every row the
  batch's capacity), and reserved rows take none until they are filled;
- `remove` moves no K/V: the last row's page list takes the freed row's place in the table.

K and V may each be kept as GGUF blocks (-ctk/-ctv q8_0, q4_0, q4_1, q5_0, q5_1): that pool is uint8
[n_pages, page_size, n_kv, head_dim / 32 * block bytes], quantized as engine/quantized_kv.py quantizes (gguf-py's
quantizer, bit for bit), written by `write` or by the decode kernel (kernels/triton_kv_blocks.py). Pages move
as bytes, so a row's K/V are quantized once; `view` reads blocks back as the float pools' dtype.

Page 0 is never handed out: it stands for every page a row lacks (table entries default to it), so
`view` pads short rows with it and a stray write lands there, never in another row's pages.

The host keeps each row's page list; the device table [reserved rows, max pages a row] int32 is
uploaded from it when it changes. Nothing on the host reads a device value except `make_room`,
where AttentionKV reads `int(starts.max())`: it reads the rows' `starts` (one transfer) to give each
row the pages it needs. Under CUDA-graph capture it does nothing: a captured cache is given its pages
by `reserve` first (engine/cuda_graphs.py).
"""

from __future__ import annotations

import torch

from qwen35.engine.cache import _storage_bytes, capturing
from qwen35.engine.quantized_kv import BLOCK, dequantize_rows, quantize_rows, row_nbytes
from qwen35.errors import Qwen35Error

PAGE_SIZE = 64
# The smallest page: the decode kernel's tiles of slots (16 at least, for tl.dot) lie within one page.
MIN_PAGE_SIZE = 16
_PADDING_PAGE = 0


def pages_for(tokens: int, page_size: int) -> int:
    return -(-max(tokens, 0) // page_size)


class PagedAttentionKV:
    """K (after norm and RoPE) and V of one full-attention layer for `rows` sequences, in pages.

    Slots a row's pages hold past its own length hold whatever was there (finite values, masked out)."""

    token_by_token = False  # as AttentionKV's
    # A pool of GGUF blocks (-ctk/-ctv q8_0 ...; engine/quantized_kv.py): its type, else None (a float pool).
    type_k: str | None = None
    type_v: str | None = None

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device,
                 capacity: int = 0, page_size: int = PAGE_SIZE, type_k: str | None = None,
                 type_v: str | None = None):
        """`dtype`: the float pools' dtype, and what `view` gives; `type_k`/`type_v`: a GGUF block type
        whose blocks that pool holds instead (uint8 [n_pages, P, n_kv, row bytes])."""
        if page_size < MIN_PAGE_SIZE or page_size & (page_size - 1):
            raise Qwen35Error(f"a K/V page must hold a power of two slots, at least {MIN_PAGE_SIZE}, not {page_size}")
        self.page_size, self.head_dim, self._read_dtype = page_size, head_dim, dtype
        self.type_k, self.type_v = type_k, type_v
        per_row = pages_for(capacity, page_size)
        pages = 1 + batch_size * per_row
        self._key_pool = _pool(pages, page_size, num_kv_heads, head_dim, dtype, type_k, device)
        self._value_pool = _pool(pages, page_size, num_kv_heads, head_dim, dtype, type_v, device)
        self._free = list(range(pages - 1, 0, -1))  # a stack: the lowest pages are handed out first
        self._row_pages: list[list[int]] = [self._take_pages(per_row) for _ in range(batch_size)]
        self._page_table = torch.zeros((max(batch_size, 1), max(per_row, 1)), dtype=torch.int32, device=device)
        self._shares_pool = False  # a `shared` snapshot reads its owner's pool
        self.rows = batch_size
        self._upload_table()

    @classmethod
    def _assembled(cls, like: PagedAttentionKV, sources: list[tuple[PagedAttentionKV, list[int]]],
                   room: list[int], reserved_rows: int = 1) -> PagedAttentionKV:
        """A new store with a pool of its own whose row i holds copies of the pages `sources[i]`
        (a store and its page ids), then fresh pages up to `room[i]` pages."""
        kv = cls.__new__(cls)
        kv.page_size, kv._shares_pool, kv.rows = like.page_size, False, len(sources)
        kv.type_k, kv.type_v, kv.head_dim, kv._read_dtype = like.type_k, like.type_v, like.head_dim, like._read_dtype
        copied = sum(len(ids) for _, ids in sources)
        extra = [max(0, want - len(ids)) for (_, ids), want in zip(sources, room)]
        pages = 1 + copied + sum(extra)
        kv._key_pool = like._key_pool.new_zeros((pages, *like._key_pool.shape[1:]))
        kv._value_pool = like._value_pool.new_zeros((pages, *like._value_pool.shape[1:]))
        if copied:
            def gathered(pool_of):
                return torch.cat([pool_of(store)[torch.tensor(ids, device=like._key_pool.device)]
                                  for store, ids in sources if ids])

            kv._key_pool[1:1 + copied] = gathered(lambda store: store._key_pool)
            kv._value_pool[1:1 + copied] = gathered(lambda store: store._value_pool)
        kv._row_pages, kv._free = [], []
        next_copied, next_extra = 1, 1 + copied
        for (_, ids), more in zip(sources, extra):
            kv._row_pages.append(list(range(next_copied, next_copied + len(ids)))
                                 + list(range(next_extra, next_extra + more)))
            next_copied, next_extra = next_copied + len(ids), next_extra + more
        width = max([len(pages) for pages in kv._row_pages] + [1])
        kv._page_table = torch.zeros((max(reserved_rows, kv.rows, 1), width), dtype=torch.int32,
                                     device=like._key_pool.device)
        kv._upload_table()
        return kv

    @staticmethod
    def empty_like(kv: PagedAttentionKV, reserve_rows: int = 1) -> PagedAttentionKV:
        """A store of no rows shaped like `kv` (HybridCache.empty_like's), with table rows for `reserve_rows`."""
        return PagedAttentionKV._assembled(kv, [], [], reserved_rows=reserve_rows)

    # --- what the network and the kernels read ------------------------------------------------

    @property
    def capacity(self) -> int:
        """Slots every row has pages for (with no rows, what the table can address): `make_room` gives more."""
        if self.rows:
            return min(len(pages) for pages in self._row_pages) * self.page_size
        return self._page_table.shape[1] * self.page_size

    @property
    def layout(self) -> tuple:
        """What two stores must share for rows to move between them: page size, pools' shapes and types."""
        return (self.page_size, self._key_pool.shape[1:], self._key_pool.dtype, self._value_pool.shape[1:],
                self._value_pool.dtype, self.type_k, self.type_v)

    @property
    def page_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V pools, [n_pages, page_size, n_kv, d]; page 0 is padding."""
        return self._key_pool, self._value_pool

    @property
    def page_table(self) -> torch.Tensor:
        """[reserved rows, max pages a row] int32 on the pool's device: row b's pages in slot order
        (entries past a row's own pages are 0, the padding page)."""
        return self._page_table

    @property
    def storage(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise Qwen35Error("a paged K/V store has no contiguous storage: read page_pool and page_table")

    def view(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the first `length` slots of every row, [rows, length, n_kv, d] (past a
        row's own tokens: padding); blocks dequantized, as the float pools' dtype."""
        count = pages_for(length, self.page_size)
        table = self._page_table[:self.rows, :count].long()
        if count > table.shape[1]:
            table = torch.nn.functional.pad(table, (0, count - table.shape[1]), value=_PADDING_PAGE)

        def gathered(pool, cache_type):
            slots = pool[table].flatten(1, 2)[:, :length]
            if cache_type is None:
                return slots
            return dequantize_rows(slots, cache_type, self.head_dim).to(self._read_dtype)

        return gathered(self._key_pool, self.type_k), gathered(self._value_pool, self.type_v)


    # --- growing ---------------------------------------------------------------------------

    def make_room(self, starts: torch.Tensor, length: int) -> None:
        """Pages for `length` more tokens after each row's `starts`."""
        if capturing():
            return  # a graph's cache is given its pages before capture (engine/cuda_graphs.py)
        self.make_room_for((starts[:self.rows] + length).tolist())  # the one device read, as AttentionKV's

    def make_room_for(self, tokens: list[int]) -> bool:
        """Pages for `tokens[b]` slots in row b, from lengths the host knows (a graph's decoder keeps them):
        whether the pool and the table stayed where they were, so that a captured graph reading them is
        still valid (the table's contents change in place)."""
        self._own_pool()  # a snapshot's writes would land in its owner's pages
        addresses = self._key_pool.data_ptr(), self._page_table.data_ptr()
        if all(pages_for(count, self.page_size) <= len(pages) for count, pages in zip(tokens, self._row_pages)):
            return True
        for pages, count in zip(self._row_pages, tokens):
            pages += self._take_pages(pages_for(count, self.page_size) - len(pages))
        self._upload_table()
        return (self._key_pool.data_ptr(), self._page_table.data_ptr()) == addresses

    def write(self, starts: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put T new tokens of each row at that row's own offset: keys/values [B, T, n_kv, d]."""
        batch, length = keys.shape[:2]
        self.make_room(starts, length)
        slots = starts[:, None] + torch.arange(length, device=keys.device)
        pages = self._page_table[torch.arange(batch, device=keys.device)[:, None], slots // self.page_size].long()
        offsets = slots % self.page_size
        self._key_pool[pages, offsets] = _encoded(keys, self.type_k, self._key_pool.dtype)
        self._value_pool[pages, offsets] = _encoded(values, self.type_v, self._value_pool.dtype)

    def reserve(self, rows: int = 0, tokens: int = 0) -> None:
        """Pages for `tokens` slots in every row, and table rows and free pages enough for `rows` rows of
        that many, so that appends and prefills up to that size allocate nothing (a graph's pin)."""
        self._own_pool()
        count = pages_for(tokens, self.page_size)
        missing = sum(max(0, count - len(pages)) for pages in self._row_pages) + max(0, rows - self.rows) * count
        if missing > len(self._free):
            self._grow_pool(missing - len(self._free), doubling=False)
        for pages in self._row_pages:
            pages += self._take_pages(count - len(pages))
        self._upload_table(min_rows=rows, width=count if tokens else None)

    def _take_pages(self, count: int) -> list[int]:
        if count <= 0:
            return []
        if count > len(self._free):
            self._grow_pool(count - len(self._free))
        taken = self._free[-count:][::-1]
        del self._free[-count:]
        return taken

    def _grow_pool(self, extra: int, doubling: bool = True) -> None:
        """At least `extra` more free pages: a new pool (twice the old, unless `doubling` is off), the
        old pages copied once."""
        old = self._key_pool.shape[0]
        size = max(old + extra, 2 * old if doubling else 0)

        def grown(pool):
            bigger = pool.new_zeros((size, *pool.shape[1:]))
            bigger[:old] = pool
            return bigger

        self._key_pool, self._value_pool = grown(self._key_pool), grown(self._value_pool)
        self._free[:0] = range(size - 1, old - 1, -1)

    def _own_pool(self) -> None:
        """A snapshot about to be written copies its pages into a pool of its own first (copy on write)."""
        if self._shares_pool:
            mine = PagedAttentionKV._assembled(self, [(self, pages) for pages in self._row_pages],
                                               [len(pages) for pages in self._row_pages])
            self.__dict__.update(mine.__dict__)

    def _upload_table(self, min_rows: int = 0, width: int | None = None) -> None:
        """The device table from the host's page lists: in place when it still fits, else a bigger one
        (doubling, as a list grows). `width`: exactly that many pages a row (or the most a row holds), as
        `reserve` pins it: the kernel's split count follows the width, and a graph's warm-up on a scratch
        cache reserved alike must see the same."""
        held_rows, held_width = self._page_table.shape
        widest = max([len(pages) for pages in self._row_pages] + [1])
        rows = held_rows if self.rows <= held_rows else max(self.rows, 2 * held_rows)
        rows = max(rows, min_rows)
        if width is not None:
            width = max(width, widest)
        else:
            width = held_width if widest <= held_width else max(widest, 2 * held_width)
        host = torch.zeros((rows, width), dtype=torch.int32)
        for row, pages in enumerate(self._row_pages):
            host[row, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        if (rows, width) == (held_rows, held_width):
            self._page_table.copy_(host)
        else:
            self._page_table = host.to(self._page_table.device)

    # --- rows in and out -------------------------------------------------------------------

    def select(self, rows: list[int], length: int, capacity: int = 0) -> PagedAttentionKV:
        """Copies of `rows` (their pages within the first `length` slots), each with pages for
        `capacity` tokens at least."""
        count = pages_for(length, self.page_size)
        sources = [(self, self._row_pages[row][:count]) for row in rows]
        return PagedAttentionKV._assembled(self, sources, [pages_for(capacity, self.page_size)] * len(rows))

    @staticmethod
    def merge(parts: list[PagedAttentionKV], length: int) -> PagedAttentionKV:
        """One store of all rows of `parts` in order, each with copies of its pages within `length` slots."""
        first = parts[0]

        for part in parts:
            if not isinstance(part, PagedAttentionKV) or part.layout != first.layout:
                raise Qwen35Error("only paged K/V stores of one page size, shape and type can be merged")
        count = pages_for(length, first.page_size)
        sources = [(part, pages[:count]) for part in parts for pages in part._row_pages[:part.rows]]
        return PagedAttentionKV._assembled(first, sources, [0] * len(sources))

    def append(self, other: PagedAttentionKV, row: int, length: int) -> None:
        """Row `row` of `other` (its pages within the first `length` slots) becomes this batch's last row,
        in free pages: no other row's K/V moves (unless the pool must grow)."""
        if not isinstance(other, PagedAttentionKV) or other.layout != self.layout:
            raise Qwen35Error("only a row of a paged K/V store of the same page size, shape and type can be appended")
        self._own_pool()
        source = other._row_pages[row][:pages_for(length, self.page_size)]
        source_keys, source_values = other._key_pool, other._value_pool  # before this pool may grow
        pages = self._take_pages(len(source))
        if pages:
            to, at = (torch.tensor(ids, device=self._key_pool.device) for ids in (pages, source))
            self._key_pool[to] = source_keys[at]
            self._value_pool[to] = source_values[at]
        self._row_pages.append(pages)
        self.rows += 1
        self._upload_table()

    def install_row(self, row: int, other: PagedAttentionKV, other_row: int, length: int) -> bool:
        """Row `row` takes copies of the pages of `other`'s row `other_row` within its first `length` slots,
        into its own pages (more if it has too few): whether the pool and the table stayed where they were."""
        if not isinstance(other, PagedAttentionKV) or other.layout != self.layout:
            raise Qwen35Error("only a row of a paged K/V store of the same page size, shape and type can be installed")
        self._own_pool()
        addresses = self._key_pool.data_ptr(), self._page_table.data_ptr()
        source = other._row_pages[other_row][:pages_for(length, self.page_size)]
        source_keys, source_values = other._key_pool, other._value_pool  # before this pool may grow
        pages = self._row_pages[row]
        if len(pages) < len(source):
            pages += self._take_pages(len(source) - len(pages))
            self._upload_table()
        if source:
            to, at = (torch.tensor(ids, device=self._key_pool.device) for ids in (pages[:len(source)], source))
            self._key_pool[to] = source_keys[at]
            self._value_pool[to] = source_values[at]
        return (self._key_pool.data_ptr(), self._page_table.data_ptr()) == addresses

    def remove(self, row: int, last_length: int, longest: int) -> None:
        """Row `row`'s pages go back to the free list and the last row's pages take its place (no K/V
        copied; `last_length` is AttentionKV's, not needed here). Pages far past what the remaining rows
        need (`longest` tokens at most) are freed, and a pool mostly free shrinks to twice its use."""
        self._own_pool()
        freed = self._row_pages.pop(row) if row == self.rows - 1 else self._row_pages[row]
        if row != self.rows - 1:
            self._row_pages[row] = self._row_pages.pop()
        self._free += freed
        self.rows -= 1
        keep = pages_for(2 * max(longest, 16), self.page_size)
        for pages in self._row_pages:
            if len(pages) >= 4 * keep:
                self._free += pages[keep:]
                del pages[keep:]
        held = self._key_pool.shape[0] - 1
        used = held - len(self._free)
        if held >= 4 * max(used, 1):
            self._compact(2 * used)
        if self._page_table.shape[0] >= 4 * max(self.rows, 1):
            self._page_table = self._page_table.new_zeros((2 * max(self.rows, 1), self._page_table.shape[1]))
        self._upload_table()

    def _compact(self, pages: int) -> None:
        """A pool of `pages` pages (and the padding page) holding the rows' pages, renumbered in order."""
        live = [page for row_pages in self._row_pages for page in row_pages]
        size = 1 + max(pages, len(live))
        at = torch.tensor(live, dtype=torch.long, device=self._key_pool.device)

        def compacted(pool):
            smaller = pool.new_zeros((size, *pool.shape[1:]))
            smaller[1:1 + len(live)] = pool[at]
            return smaller

        self._key_pool, self._value_pool = compacted(self._key_pool), compacted(self._value_pool)
        renumbered = iter(range(1, 1 + len(live)))
        self._row_pages = [[next(renumbered) for _ in row_pages] for row_pages in self._row_pages]
        self._free = list(range(size - 1, len(live), -1))

    def shared(self, length: int) -> PagedAttentionKV:
        """The first row's pages within `length` slots, not copied: valid while their owner only appends
        (new tokens go past them). Writing into the snapshot copies its pages first."""
        kv = PagedAttentionKV.__new__(PagedAttentionKV)
        kv.page_size, kv.rows, kv._shares_pool = self.page_size, 1, True
        kv.type_k, kv.type_v, kv.head_dim, kv._read_dtype = self.type_k, self.type_v, self.head_dim, self._read_dtype
        kv._key_pool, kv._value_pool = self._key_pool, self._value_pool
        kv._row_pages, kv._free = [self._row_pages[0][:pages_for(length, self.page_size)]], []
        kv._page_table = self._page_table.new_zeros((1, max(len(kv._row_pages[0]), 1)))
        kv._upload_table()
        return kv

    def nbytes(self) -> int:
        """Memory kept alive: the whole pools (a snapshot keeps its owner's) and the table."""
        return _storage_bytes(self._key_pool, self._value_pool, self._page_table)


def _pool(pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, cache_type: str | None,
          device) -> torch.Tensor:
    if cache_type is None:
        return torch.zeros((pages, page_size, num_kv_heads, head_dim), dtype=dtype, device=device)
    if head_dim % BLOCK:
        raise Qwen35Error(f"a {cache_type} K/V cache needs head_dim a multiple of {BLOCK}, not {head_dim}")
    # All-zero blocks are scale 0: padding slots read as zeros.
    return torch.zeros((pages, page_size, num_kv_heads, row_nbytes(cache_type, head_dim)), dtype=torch.uint8,
                       device=device)


def _encoded(x: torch.Tensor, cache_type: str | None, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if cache_type is None else quantize_rows(x, cache_type)
