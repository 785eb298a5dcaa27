"""Memory of good patches: a coreset of training patch features next to the residual.

Why: the residual of a good patch stays noisy where an image's own fine texture cannot be
predicted from the other half of the image; the distance of a patch to its nearest *stored*
good patch (PatchCore's score) has no such noise, but blind spots of its own. The presets
blend the two maps on the grid (:func:`stmae.pipeline.blend`), each first put on the scale of
held-out good images by the statistics stored here (:meth:`PatchMemory.calibrate`), so the
blend needs no defect example. ``infer.distance_weight = 0`` is the paper's pure residual; nothing here
touches the reconstruction, so the transition stays leakage-free (a patch's distance depends
only on the patch itself and the training images). How the blend was chosen:
docs/design.md and docs/research.md.

The bank is PatchCore's greedy k-center coreset (Roth et al. 2022) of the standardised
training patch features.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..device import tf32_products, tracing

#: Dimension of the random projection used only to *select* the coreset (PatchCore uses
#: ~128): k-center greedy is a long sequential loop over all patches, and distances in 128
#: dims are cheaper than in 176 while approximately preserving which patch is farthest.
PROJECTION_DIM = 128
#: Upper bound on elements of one (query patches x bank) distance block on a CPU (16 MB
#: float32: the block stays near the caches).
DISTANCE_BLOCK = 1 << 22
#: The same on a GPU (512 MB): a few large products instead of hundreds of small launches.
DISTANCE_BLOCK_GPU = 1 << 27


def patch_rows(feats: torch.Tensor) -> torch.Tensor:
    """(N, C, G, G) feature grids -> (N * G * G, C) patch rows (image-major, row-major)."""
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


def sparse_random_projection(in_dim: int, out_dim: int, generator: torch.Generator) -> torch.Tensor:
    """A (in_dim, out_dim) very sparse random projection matrix (Li, Hastie & Church 2006).

    Entries are +-sqrt(s / out_dim) with probability 1 / (2 s) each and 0 otherwise, with
    s = sqrt(in_dim): the family scikit-learn's ``SparseRandomProjection`` (and thus
    anomalib's PatchCore) draws from. Squared distances are preserved in expectation. It is
    stored dense because at 176 x 128 a sparse format would only be slower.
    """
    s = math.sqrt(in_dim)
    u = torch.rand(in_dim, out_dim, generator=generator)
    value = math.sqrt(s / out_dim)
    zeros = torch.zeros(in_dim, out_dim)
    return torch.where(u < 1 / (2 * s), value, torch.where(u < 1 / s, -value, zeros))


@torch.no_grad()
def greedy_coreset(
    features: torch.Tensor,
    count: int,
    *,
    seed: int = 42,
    projection_dim: int = PROJECTION_DIM,
    quiet: bool = True,
) -> torch.Tensor:
    """Indices of ``count`` rows of ``features`` (M, C) chosen by greedy k-center selection.

    Start from a random row, then repeatedly add the row farthest from everything chosen so
    far. Unlike a random subset this keeps rare normal patterns (which would otherwise become
    false positives) while dropping near-duplicates of common ones. Distances for the
    selection are computed after a seeded sparse random projection to ``projection_dim``
    dims (skipped when C is already that small). Deterministic for a given ``seed``;
    ``min(count, M)`` distinct indices, in selection order.

    How it stays fast: the textbook loop updates every row's distance to the chosen set
    after each pick, a matrix-vector product per step that is bound by memory bandwidth
    (about an hour for 700k patches on a 2-core CPU). Here only a short list of
    *candidates* (the rows farthest from the chosen set at the last full update) is kept
    exact at every step; the other rows are brought up to date in batches, one
    matrix-matrix product against all centres picked since the last update. A row's
    distance to the chosen set only ever shrinks, so a row left out of the candidates is
    at most as far as the largest value outside the list (``bound``); while the best
    candidate is farther than that, it is the true farthest row, exactly as in the
    textbook loop. When it is not, a batch update runs and the list is rebuilt. Same
    picks in exact arithmetic, and the speed-up grows with the number of rows
    (docs/research.md, "Figures behind the code"). In float32 the order of near-equal picks
    can differ from the row-by-row loop.
    """
    m = features.shape[0]
    if count >= m:
        return torch.arange(m)
    if count < 1:
        raise ValueError(f"coreset size must be >= 1, got {count}")
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if x.shape[1] > projection_dim:
        x = x @ sparse_random_projection(x.shape[1], projection_dim, gen).to(x.device)
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, so every distance is a dot product.
    sq_norms = (x * x).sum(dim=1)
    min_dist = torch.full((m,), math.inf, device=x.device)
    selected = torch.empty(count, dtype=torch.long)
    pending: list[int] = []  # centres picked since the last batch update of min_dist
    cands: _Candidates | None = None
    idx = int(torch.randint(m, (1,), generator=gen))
    for i in tqdm(range(count), desc="coreset", unit="pt", disable=quiet, leave=False, mininterval=1.0):
        if i > 0:
            j = cands.best() if cands is not None else None
            if cands is None or j is None:  # no list yet, or its best may not be the farthest row
                _update_min_dist(x, sq_norms, min_dist, pending)
                pending = []
                cands = _Candidates.farthest(x, sq_norms, min_dist, CORESET_CANDIDATES)
                j = int(torch.argmax(cands.dist))  # now exact for every row: the true farthest
            idx = cands.take(j)
        selected[i] = idx
        # Mark chosen rows explicitly (-inf survives every later minimum): with duplicate
        # patches (flat regions, repeated images) rounding could otherwise make a chosen row
        # the "farthest" again and return repeated indices.
        min_dist[idx] = -math.inf
        pending.append(idx)
        if cands is not None:
            cands.add_centre(x[idx], sq_norms[idx])
    return selected


#: Rows kept exact at every step of :func:`greedy_coreset`. Larger lists need fewer batch
#: updates but cost more per step; 1,024 was fastest from 20k to 200k rows.
CORESET_CANDIDATES = 1024
#: Elements of one (rows x pending centres) block in a batch update: small enough to stay
#: in cache, large enough for an efficient matrix product.
UPDATE_BLOCK = 1 << 18


def _update_min_dist(x: torch.Tensor, sq_norms: torch.Tensor, min_dist: torch.Tensor, centres: list[int]) -> None:
    """min_dist (M,) <- min(min_dist, squared distance of each row of x to any of ``centres``), in place."""
    if not centres:
        return
    c = torch.tensor(centres, device=x.device)
    c_x, c_sq = x[c], sq_norms[c].unsqueeze(0)
    rows = max(1, UPDATE_BLOCK // len(centres))
    for start in range(0, x.shape[0], rows):
        block = slice(start, start + rows)
        # min_c (||x||^2 - 2 x.c + ||c||^2) = ||x||^2 + min_c (||c||^2 - 2 x.c)
        dist = torch.addmm(c_sq, x[block], c_x.T, alpha=-2.0).amin(dim=1) + sq_norms[block]
        torch.minimum(min_dist[block], dist, out=min_dist[block])


@dataclass
class _Candidates:
    """The rows farthest from the chosen set at the last batch update, kept exact per step.

    rows: their indices (on the host, so picking one needs no device sync); dist: their
    squared distance to the chosen set (-inf once picked); x, sq: their projected features
    and squared norms; bound: the largest min_dist of any row *not* in the list at that
    update, an upper bound on every such row's distance from then on.
    """

    rows: list[int]
    dist: torch.Tensor
    x: torch.Tensor
    sq: torch.Tensor
    bound: float

    @classmethod
    def farthest(cls, x: torch.Tensor, sq_norms: torch.Tensor, min_dist: torch.Tensor, size: int) -> "_Candidates":
        """The ``size`` rows with the largest (up-to-date) min_dist."""
        k = min(size + 1, min_dist.shape[0])
        values, order = torch.topk(min_dist, k)
        bound = -math.inf
        if k > size:
            bound, values, order = float(values[size]), values[:size], order[:size]
        return cls(order.tolist(), values.clone(), x[order], sq_norms[order], bound)

    def best(self) -> int | None:
        """Position of the farthest candidate if it is provably the farthest row of all, else None."""
        value, j = torch.max(self.dist, 0)
        return int(j) if float(value) > self.bound else None

    def take(self, j: int) -> int:
        """Mark candidate ``j`` as picked; its row index."""
        self.dist[j] = -math.inf
        return self.rows[j]

    def add_centre(self, centre: torch.Tensor, centre_sq: torch.Tensor) -> None:
        """Lower the candidates' distances by a newly picked centre (C,)."""
        torch.minimum(self.dist, self.sq - 2.0 * (self.x @ centre) + centre_sq, out=self.dist)


#: Bank rows per matrix product in an exported graph (:func:`nearest_distances` under tracing).
EXPORT_BANK_BLOCK = 4096


@torch.no_grad()
def nearest_distances(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None, *, tf32: bool = False
) -> torch.Tensor:
    """L2 distance of each query row (Q, C) to its nearest bank row (B, C) -> (Q,).

    ``tf32``: on CUDA, the products in TF32 (:func:`tf32_products`): faster, with distances
    off by a few parts in 1e4 of their size (docs/research.md, "Figures behind the code").

    Written as matrix products, ``|q|^2 - 2 q.b + |b|^2`` (``bank_sq`` = ``|b|^2`` when the
    caller keeps it), because that is fast on every device and exports to ONNX, where
    ``cdist`` does not. Queries go in blocks so the (block x B) matrix stays around
    ``DISTANCE_BLOCK`` elements whatever the bank size. Under tracing (export) the number of
    queries is symbolic, so the *bank* goes in fixed blocks of :data:`EXPORT_BANK_BLOCK` rows
    instead (unrolled in the graph, with a running minimum): a batch then needs a
    (queries x 4096) matrix at a time, not (queries x bank).
    """
    if bank_sq is None:
        bank_sq = (bank * bank).sum(dim=1)
    if tracing():
        # One product per block gives |b|^2 - 2 q.b directly: queries get a column of ones and
        # the (constant-folded) bank block the column |b|^2, so no (queries x block) subtraction.
        q1 = torch.cat([queries, torch.ones_like(queries[:, :1])], dim=1)
        best = None
        for start in range(0, bank.shape[0], EXPORT_BANK_BLOCK):
            part = slice(start, start + EXPORT_BANK_BLOCK)
            block = torch.cat([-2.0 * bank[part], bank_sq[part].unsqueeze(1)], dim=1)
            m = (q1 @ block.T).amin(dim=1)
            best = m if best is None else torch.minimum(best, m)
        return (best + (queries * queries).sum(dim=1)).clamp_min(0.0).sqrt()
    # |b|^2 - 2 q.b in one fused product (addmm) per block, minimum per row, then + |q|^2: no
    # (block x bank) temporaries besides the product itself, which stays cache-sized
    # (faster than full-size temporaries, same values: docs/research.md, "Figures behind the code").
    # One product buffer serves every block and the minima go straight into the output: a
    # fresh 16 MB block per step made glibc's heap fragment (a long scoring run grew past
    # 20 GB) and cost a page fault per 4 KB of every block.
    budget = DISTANCE_BLOCK if queries.device.type == "cpu" else DISTANCE_BLOCK_GPU
    rows = max(1, min(queries.shape[0], budget // max(1, bank.shape[0])))
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    product = queries.new_empty(rows, bank.shape[0])
    row_sq, bank_t = bank_sq.unsqueeze(0), bank.T
    with tf32_products(tf32 and queries.is_cuda):
        for start in range(0, queries.shape[0], rows):
            q = queries[start : start + rows]
            block = product[: q.shape[0]]
            torch.addmm(row_sq, q, bank_t, alpha=-2.0, out=block)
            torch.amin(block, dim=1, out=out[start : start + q.shape[0]])
    return (out + (queries * queries).sum(dim=1)).clamp_min(0.0).sqrt()


#: Unit roundoff of bfloat16 (8 significant bits, round to nearest): |bf16(x) - x| <= U |x|.
BF16_ROUNDOFF = 2.0**-8
#: Bank rows per chunk of :class:`BankSearch`: each chunk gets one error bound and one minimum.
SEARCH_CHUNK = 256
#: Banks smaller than this are searched in float32 only: the bf16 pass would not pay for itself.
SEARCH_MIN_BANK = 2048
#: Upper bound on elements of the (queries x bank) bf16 product of one block (64 MB).
SEARCH_BLOCK = 1 << 25
#: Past these many (query, chunk) pairs or rows per query left to check, a block is searched
#: in float32 instead: checking them would cost more than the bf16 pass saves. Typical
#: texture banks keep a handful per query; tight clusters in many dimensions keep hundreds.
SEARCH_MAX_CHUNKS = 16
SEARCH_MAX_ROWS = 32
#: Blocks in a row that fall back to float32 before a BankSearch stops trying bf16.
SEARCH_MAX_MISSES = 2


#: Environment variable that overrides :func:`bf16_matmul_is_fast`: ``0`` forces the float32
#: search, ``1`` the bf16 one (exact either way; only the speed differs), unset or ``auto``
#: detects. It lets one machine run the code path of the other CPU kind (docs/design.md).
BF16_SEARCH_ENV = "STMAE_BF16_SEARCH"


def bf16_matmul_is_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX), where
    :class:`BankSearch` is several times faster than a float32 search. Elsewhere bf16 is
    emulated and no faster, so the plain search is kept. :data:`BF16_SEARCH_ENV` overrides."""
    forced = os.environ.get(BF16_SEARCH_ENV, "auto").strip().lower()
    if forced in ("0", "1"):
        return forced == "1"
    if forced not in ("", "auto"):
        raise ValueError(f"{BF16_SEARCH_ENV}={forced!r}: use 0, 1 or auto")
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


class BankSearch:
    """Exact nearest-bank-patch distances, with most of the arithmetic in bfloat16.

    Why: the bank search is the largest cost of predict on a CPU after the backbone, and a
    bf16 matrix product runs several times faster than float32 on CPUs with AMX. A bf16 product
    alone is not exact, so it only *rules bank rows out*; the few rows it cannot rule out
    are measured in float32. The answer is the float32 distance to the true nearest row.

    How: the bank is centred (its mean subtracted from bank and queries: distances do not
    change, the norms that scale the rounding error shrink), sorted by norm, and cut into
    chunks of :data:`SEARCH_CHUNK` rows. One bf16 product per query block gives
    ``a(q, b) ~ |b|^2 - 2 q.b + s(q)``, the squared distance shifted by ``s(q) - |q|^2``
    with ``s(q)`` = ``|q|^2`` rounded to bf16 beforehand (so it enters the product exactly,
    the shift is the same for every row and ``a`` is about a squared distance, never far
    below 0: bf16 values >= 0 order like their int16 bit patterns, which reduce faster).
    With u = :data:`BF16_ROUNDOFF`, rounding the inputs, accumulating in float32 and rounding
    the result to bf16 give ``|a - a_true| <= u (6.03 |q| |b| + 2.003 |b|^2 + 1.003 |q|^2)``
    (plus float32 terms about 1e-5 times as large); :meth:`bound` uses 6.5, 2.5 and 1.5 and
    the largest ``|b|`` of each chunk, so one bound ``E(q, chunk)`` covers every row of it. Then:

    - ``ub(q) = min over chunks of (min a + E)`` is an upper bound on the true minimum;
    - a row with ``a(q, b) > ub(q) + E(q, chunk)`` is farther than the nearest row, so the
      true nearest row is among the rows at or below that line (ties included);
    - those rows (a few per query on texture banks) are measured exactly in float32 as
      ``|q - b|^2``, which is also closer to the float64 truth than the expanded
      ``|q|^2 - 2 q.b + |b|^2`` of :func:`nearest_distances` (2e-6 against 5e-5 there).

    Non-finite queries take the float32 path, and so does a block where too many rows stay
    in (:data:`SEARCH_MAX_CHUNKS`, :data:`SEARCH_MAX_ROWS`): patches in tight clusters, all at
    nearly one distance, which bf16 cannot tell apart; after :data:`SEARCH_MAX_MISSES` such
    blocks in a row the search stays in float32. ``benchmarks/bank_search.py`` times both
    cases.
    """

    def __init__(self, bank: torch.Tensor, chunk: int = SEARCH_CHUNK) -> None:
        bank = bank.detach().float()
        self.source = bank
        self.mean = bank.mean(dim=0)
        order = torch.argsort((bank - self.mean).norm(dim=1))
        rows = bank[order]
        pad = (-rows.shape[0]) % chunk
        if pad:  # copies of the last row: a duplicate never changes a minimum
            rows = torch.cat([rows, rows[-1:].expand(pad, -1)])
        centred = rows - self.mean
        sq = (centred * centred).sum(dim=1)
        self.chunk, self.chunks = chunk, rows.shape[0] // chunk
        self.rows = rows.contiguous()
        # One bf16 product gives |b|^2 - 2 q.b + s(q): queries get the columns (1, s(q)).
        ones = torch.ones_like(sq).unsqueeze(1)
        self.block = torch.cat([-2.0 * centred, sq.unsqueeze(1), ones], dim=1).bfloat16().T.contiguous()
        self.norm_max = centred.norm(dim=1).view(self.chunks, chunk).amax(dim=1) * (1 + 1e-6)
        self.sq_max = sq.view(self.chunks, chunk).amax(dim=1) * (1 + 1e-6)
        self._local = threading.local()  # one product buffer per thread (a fresh one page-faults)
        self._misses = 0
        #: True once :data:`SEARCH_MAX_MISSES` blocks in a row kept too many rows: this bank's
        #: patches are too close together for bf16 to tell apart, so float32 from then on.
        self.gave_up = False

    def __getstate__(self) -> dict:
        # The per-thread product buffer is scratch space; thread-locals cannot be copied or
        # pickled, so a copied detector (or pipeline, or memory) starts with fresh buffers.
        state = self.__dict__.copy()
        del state["_local"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def bound(self, query_norms: torch.Tensor) -> torch.Tensor:
        """E(q, chunk) (Q, chunks): the largest error of ``a`` over the rows of a chunk."""
        u, qn = BF16_ROUNDOFF, query_norms.unsqueeze(1)
        return (6.5 * u) * qn * self.norm_max + (2.5 * u) * self.sq_max + (1.5 * u) * qn * qn + 1e-4

    def __call__(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries (Q, C) -> L2 distance to the nearest bank row (Q,), in float32."""
        queries = queries.float()
        if self.gave_up or not bool(torch.isfinite(queries).all()):
            return nearest_distances(queries, self.source)
        out = torch.empty(queries.shape[0], dtype=torch.float32)
        step = max(64, min(1024, SEARCH_BLOCK // self.rows.shape[0]))
        for start in range(0, queries.shape[0], step):
            q = queries[start : start + step]
            found = self._block(q)
            if found is None:  # bf16 could not rule enough rows out: float32 for this block
                self._misses += 1
                self.gave_up = self._misses >= SEARCH_MAX_MISSES
                found = nearest_distances(q, self.source)
            else:
                self._misses = 0
            out[start : start + step] = found
        return out

    def _block(self, q: torch.Tensor) -> torch.Tensor | None:
        """One block of queries; None when too many rows stay in (then float32 is cheaper)."""
        n = q.shape[0]
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.shape[0] < n:
            buffer = self._local.buffer = torch.empty(n, self.rows.shape[0], dtype=torch.bfloat16)
        centred = q - self.mean
        norms = centred.norm(dim=1)
        shift = (norms * norms).bfloat16().unsqueeze(1)  # s(q): exact in the product
        approx = buffer[:n]
        torch.matmul(torch.cat([centred.bfloat16(), torch.ones_like(shift), shift], dim=1), self.block, out=approx)
        per_chunk = approx.view(n, self.chunks, self.chunk)
        bits = per_chunk.view(torch.int16).amin(dim=2)  # the chunk minima, while no value is < 0
        if bool((bits < 0).any()):  # a rounding just below 0 (a query on a bank row): order as floats
            low = per_chunk.amin(dim=2).float()
        else:
            low = bits.view(torch.bfloat16).float()  # (n, chunks)
        err = self.bound(norms)
        upper = (low + err).amin(dim=1, keepdim=True)
        line = (upper + 1e-4 * (upper.abs() + 1.0) + err).view(-1)  # rows above it cannot be the nearest
        pairs = torch.nonzero(low.view(-1) <= line).squeeze(1)  # (query, chunk) pairs, as query * chunks + chunk
        if pairs.numel() > n * SEARCH_MAX_CHUNKS:
            return None
        values = approx.view(n * self.chunks, self.chunk).index_select(0, pairs).float()
        p, s = torch.nonzero(values <= line.index_select(0, pairs).unsqueeze(1), as_tuple=True)
        if p.numel() > n * SEARCH_MAX_ROWS:
            return None
        pair = pairs.index_select(0, p)
        rows_q = torch.div(pair, self.chunks, rounding_mode="floor")
        rows_b = (pair - rows_q * self.chunks) * self.chunk + s
        sq = (q.index_select(0, rows_q) - self.rows.index_select(0, rows_b)).square_().sum(dim=1)
        best = torch.full((n,), math.inf).scatter_reduce_(0, rows_q, sq, "amin")
        return best.sqrt_()


def bank_search(bank: torch.Tensor) -> "BankSearch | None":
    """A :class:`BankSearch` for ``bank`` where it pays (a CPU bank of at least
    :data:`SEARCH_MIN_BANK` rows on a CPU with fast bf16), else None (the float32 search)."""
    if bank.device.type != "cpu" or bank.shape[0] < SEARCH_MIN_BANK or not bf16_matmul_is_fast():
        return None
    return BankSearch(bank)


def search_bank(
    owner: object, rows: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None, *, tf32: bool = False
) -> torch.Tensor:
    """Nearest-bank-row distances of ``rows`` (Q, C): :class:`BankSearch` where it pays, else
    :func:`nearest_distances`. The search is built once per bank tensor and kept on ``owner``
    (a pipeline, a memory), so scoring chunk after chunk does not sort and convert the bank
    again; a bank moved or replaced (another tensor) gets a new one."""
    # Keyed on the tensor and its version: a bank changed in place gets a new search too.
    cached = getattr(owner, "_bank_search", None)
    if cached is None or cached[0] is not bank or cached[2] != bank._version:
        cached = (bank, bank_search(bank), bank._version)
        object.__setattr__(owner, "_bank_search", cached)
    search = cached[1]
    return search(rows) if search is not None else nearest_distances(rows, bank, bank_sq, tf32=tf32)


#: Quantiles of held-out good images' grid cells that span [0, 1] in the ``quantile`` blend.
BLEND_QUANTILES = (0.90, 0.995)


def _pair(values: torch.Tensor | None, first: int) -> tuple[float, float] | None:
    return None if values is None else (float(values[first]), float(values[first + 1]))


class PatchMemory(nn.Module):
    """A bank of good patch features and the statistics that put residual and distance on one scale.

    Every value is a buffer, so the memory is one part of the fitted scoring module
    (:class:`stmae.pipeline.MapPipeline`): a change here, in place or by assignment, is what
    the next score reads. Its ``state_dict`` is the run folder's ``memory.*`` tensors.

    bank: (B, C) standardised patch features of good training images.
    residual_median, distance_median: medians of the residual map and of the distance map
        over the grid cells of held-out good images (:meth:`calibrate`); 1.0 until then.
    residual_range, distance_range: their 0.90 and 0.995 quantiles over the same cells
        (:data:`BLEND_QUANTILES`), for the ``quantile`` and ``gated`` blends; None until calibrated.
    pixel_residual_median, pixel_residual_range: the same for the residual of the pixel map
        (``infer.pixel_residual``) where it differs from the score's; None otherwise.
    """

    bank: torch.Tensor
    medians: torch.Tensor
    ranges: torch.Tensor | None
    pixel_residual: torch.Tensor | None

    def __init__(
        self,
        bank: torch.Tensor,
        residual_median: float = 1.0,
        distance_median: float = 1.0,
        residual_range: tuple[float, float] | None = None,
        distance_range: tuple[float, float] | None = None,
        pixel_residual_median: float | None = None,
        pixel_residual_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("bank", bank)
        self.register_buffer("medians", torch.tensor([residual_median, distance_median], dtype=torch.float64))
        self.register_buffer("ranges", None)
        self.register_buffer("pixel_residual", None)
        if residual_range is not None and distance_range is not None:
            self.ranges = torch.tensor([*residual_range, *distance_range], dtype=torch.float64)
        if pixel_residual_median is not None and pixel_residual_range is not None:
            self.pixel_residual = torch.tensor([pixel_residual_median, *pixel_residual_range], dtype=torch.float64)

    # The scalar statistics, read from (and written to) the buffers.
    @property
    def residual_median(self) -> float:
        return float(self.medians[0])

    @property
    def distance_median(self) -> float:
        return float(self.medians[1])

    @property
    def residual_range(self) -> tuple[float, float] | None:
        return _pair(self.ranges, 0)

    @property
    def distance_range(self) -> tuple[float, float] | None:
        return _pair(self.ranges, 2)

    @property
    def pixel_residual_median(self) -> float | None:
        return None if self.pixel_residual is None else float(self.pixel_residual[0])

    @pixel_residual_median.setter
    def pixel_residual_median(self, value: float | None) -> None:
        self._set_pixel(value, self.pixel_residual_range)

    @property
    def pixel_residual_range(self) -> tuple[float, float] | None:
        return _pair(self.pixel_residual, 1)

    @pixel_residual_range.setter
    def pixel_residual_range(self, value: tuple[float, float] | None) -> None:
        self._set_pixel(self.pixel_residual_median, value)

    def _set_pixel(self, median: float | None, span: tuple[float, float] | None) -> None:
        """The pixel map's scale is one (median, q90, q995) buffer: setting either half to None
        clears it; a value replaces its half only where the other is there (:meth:`calibrate`
        sets both)."""
        if median is None or span is None:
            self.pixel_residual = None
            return
        self.pixel_residual = torch.tensor([median, *span], dtype=torch.float64, device=self.medians.device)

    @classmethod
    def fit(cls, feats: torch.Tensor, ratio: float, seed: int = 42, quiet: bool = True) -> "PatchMemory":
        """Greedy coreset of ``max(1, int(ratio * patches))`` patches of standardised features (N, C, G, G)."""
        return cls(coreset_bank(feats, ratio, seed=seed, quiet=quiet))

    @torch.no_grad()
    def distances(self, feats: torch.Tensor) -> torch.Tensor:
        """Standardised features (N, C, G, G) -> distance of each position to its nearest bank patch (N, G, G)."""
        n, _, h, w = feats.shape
        return self.search(patch_rows(feats.float()), tf32=False).view(n, h, w)

    def search(self, rows: torch.Tensor, *, tf32: bool = False) -> torch.Tensor:
        """Patch rows (Q, C) -> distance to the nearest bank row (Q,): :func:`search_bank` on this bank."""
        bank = self.bank.to(rows.device, torch.float32)
        if tracing():
            return nearest_distances(rows, bank)
        return search_bank(self, rows, bank, tf32=tf32)

    def calibrate(
        self, residual_maps: torch.Tensor, distance_maps: torch.Tensor, pixel_residual_maps: torch.Tensor | None = None
    ) -> None:
        """Medians and quantile ranges from the grid maps of good images (any shape; all cells count).

        ``pixel_residual_maps``: the pixel map's residual of the same images, where the pixel
        map reads another residual than the image score (``infer.pixel_residual``).
        """
        dev = self.medians.device
        self.medians = torch.tensor(
            [_positive_median(residual_maps), _positive_median(distance_maps)], dtype=torch.float64, device=dev
        )
        self.ranges = torch.tensor(
            [*_quantile_range(residual_maps), *_quantile_range(distance_maps)], dtype=torch.float64, device=dev
        )
        if pixel_residual_maps is None:
            self.pixel_residual = None
        else:
            self.pixel_residual = torch.tensor(
                [_positive_median(pixel_residual_maps), *_quantile_range(pixel_residual_maps)],
                dtype=torch.float64, device=dev,
            )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The run folder's ``memory.*`` tensors (this module's state_dict, prefixed)."""
        return {f"memory.{k}": v.detach().cpu().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "PatchMemory":
        """Inverse of :meth:`to_tensors`; KeyError when the bank or the medians are missing."""
        memory = cls(tensors["memory.bank"])
        memory.medians = tensors["memory.medians"].to(torch.float64)
        memory.ranges = tensors.get("memory.ranges")
        memory.pixel_residual = tensors.get("memory.pixel_residual")
        return memory


def coreset_bank(feats: torch.Tensor, ratio: float, seed: int = 42, quiet: bool = True) -> torch.Tensor:
    """(K, C) greedy coreset rows, ``K = max(1, int(ratio * patches))``, of standardised features (N, C, G, G)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    patches = patch_rows(feats.float())
    count = max(1, int(patches.shape[0] * ratio))
    picked = greedy_coreset(patches, count, seed=seed, quiet=quiet).to(patches.device)
    return patches[picked].contiguous()


def _quantile_range(maps: torch.Tensor) -> tuple[float, float]:
    """(q90, q995) of all cells (a strided subsample above a million), widened to a positive span."""
    values = maps.detach().flatten().float().cpu()
    values = values[:: max(1, values.numel() // 1_000_000)]
    lo, hi = (float(torch.quantile(values, q)) for q in BLEND_QUANTILES)
    return lo, max(hi, lo + max(abs(lo), 1.0) * 1e-6)


def _positive_median(maps: torch.Tensor) -> float:
    """The median, or the mean where the median is 0 (e.g. calibrating on the banked images
    themselves with the whole bank kept), or 1.0 where both are 0."""
    values = maps.float().flatten()
    for value in (float(values.median()), float(values.mean())):
        if math.isfinite(value) and value > 0.0:
            return value
    return 1.0
