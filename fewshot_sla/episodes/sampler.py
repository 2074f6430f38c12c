"""Random episodes: ``PositionSampler`` draws B episodes at once as canonical positions, ``EpisodeSampler`` the
episodes' images from a split, in memory or on disk (reading the next meta-batch ahead)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from fewshot_sla.episodes.batch import EpisodeBatch
from fewshot_sla.episodes.canonical import CanonicalOrder
from fewshot_sla.episodes.rows import flat_rows, gather_episodes
from fewshot_sla.episodes.spec import EpisodeSpec, whole_number
from fewshot_sla.episodes.split import RowReader, SplitLike


class PositionSampler:
    """Draws B episodes at once as canonical positions ``[B, N, K+Q]`` (label-major), on ``device``.

    Per episode: N classes uniformly without replacement, in random order (the n-th gets label n); per class,
    K+Q distinct images uniformly, in random order, the first K for support. The random stream depends on the
    batch sizes asked.
    """

    def __init__(
        self, order: CanonicalOrder, spec: EpisodeSpec, *, seed: int, device: torch.device | str = "cpu"
    ) -> None:
        order.check(spec)
        self.spec = spec
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(whole_number("seed", seed, 0))
        self._sizes = torch.as_tensor(order.class_sizes, device=self.device)
        self._starts = torch.as_tensor(order.class_starts, device=self.device)
        self._width = int(order.class_sizes.max())
        self._slot = torch.arange(self._width, device=self.device)
        # Draws per class for the fast path: enough to see K+Q distinct images almost always when classes
        # are a few times larger than K+Q (the usual case); other rows take the slower exact path.
        self._draws = 2 * spec.per_class + 8

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Canonical positions of ``batch_size`` new episodes, int64 ``[B, N, K+Q]``, drawn from ``generator``
        (default: the sampler's own)."""
        b = whole_number("batch size", batch_size, 1)
        n, g = self.spec.ways, generator or self.generator
        class_keys = torch.rand(b, len(self._sizes), generator=g, device=self.device)
        classes = class_keys.topk(n, dim=1).indices  # [B, N]: a uniform ordered N-subset
        offsets = self._distinct_offsets(self._sizes.take(classes).view(-1), g).view(b, n, -1)
        return self._starts.take(classes).unsqueeze(-1) + offsets

    def _distinct_offsets(self, sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """K+Q distinct offsets below each of ``sizes`` ``[R]``, a uniform ordered sample for each row.

        Fast path: the first K+Q distinct values of a few i.i.d. uniform draws (sequential sampling that skips
        repeats, i.e. sampling without replacement). Rows whose draws hold too few distinct values are
        redrawn exactly: the K+Q smallest of one uniform key per image of the class.
        """
        kq, draws = self.spec.per_class, self._draws
        values = torch.randint(0, 1 << 62, (len(sizes), draws), generator=generator, device=self.device)
        values %= sizes.unsqueeze(1)
        sorted_values, draw_index = values.sort(dim=1, stable=True)
        # A value equal to its sorted predecessor repeats an earlier draw: rank it last.
        draw_index[:, 1:].masked_fill_(sorted_values[:, 1:] == sorted_values[:, :-1], draws)
        first = draw_index.topk(kq, dim=1, largest=False)  # the first K+Q distinct values, in draw order
        offsets = sorted_values.gather(1, first.indices)
        short = first.values[:, -1] >= draws
        if short.any():
            rows = short.nonzero().squeeze(1)
            keys = torch.rand(len(rows), self._width, generator=generator, device=self.device)
            keys.masked_fill_(self._slot >= sizes[rows].unsqueeze(1), 2.0)  # past the class: never chosen
            offsets[rows] = keys.topk(kq, dim=1, largest=False).indices
        return offsets


@dataclass
class _Ahead:
    """A meta-batch drawn and read in advance: valid while the sampler's generator is still in ``before``."""

    batch_size: int
    before: torch.Tensor
    after: torch.Tensor
    rows: torch.Tensor
    images: Future[torch.Tensor]


class EpisodeSampler:
    """Random N-way K-shot Q-query episodes from a split, B at a time, sampled and gathered on the images' device.

    The same split content, spec and seed (and the same sequence of batch sizes) give the same episodes, whether
    the split is in memory or on disk. On disk, each call also draws the next meta-batch (of the same size) from
    a copy of the generator and reads it in the background; the next call takes it when its size matches and the
    generator was not moved meanwhile (e.g. restored from a checkpoint), and otherwise draws afresh, so that the
    sampler's generator only ever advances by the batches it returned.
    """

    def __init__(self, split: SplitLike, spec: EpisodeSpec, *, seed: int) -> None:
        self.split = split
        self.spec = spec
        self.order = CanonicalOrder.of_split(split)
        device = split.images.device
        self.positions = PositionSampler(self.order, spec, seed=seed, device=device)
        self._rows = torch.as_tensor(self.order.rows, device=device)
        self._ahead: _Ahead | None = None

    def sample(self, batch_size: int) -> EpisodeBatch:
        """``batch_size`` new episodes."""
        images = self.split.images
        if isinstance(images, torch.Tensor):
            return gather_episodes(images, self._rows.take(self.positions.sample(batch_size)), self.spec)
        ahead, self._ahead = self._ahead, None
        generator = self.positions.generator
        if ahead is not None and ahead.batch_size == batch_size and torch.equal(ahead.before, generator.get_state()):
            generator.set_state(ahead.after)
            rows, picked = ahead.rows, ahead.images.result()
        else:
            rows = self._rows.take(self.positions.sample(batch_size))
            picked = images.take(flat_rows(rows, self.spec))
        self._ahead = self._draw_ahead(images, batch_size)
        return gather_episodes(images, rows, self.spec, picked)

    def _draw_ahead(self, images: RowReader, batch_size: int) -> _Ahead:
        generator = self.positions.generator
        before = generator.get_state()
        copy = torch.Generator(device=self.positions.device)
        copy.set_state(before)
        rows = self._rows.take(self.positions.sample(batch_size, copy))
        flat = flat_rows(rows, self.spec)
        return _Ahead(batch_size, before, copy.get_state(), rows, images.submit(lambda: images.take(flat)))

    def batches(self, batch_size: int, count: int) -> Iterator[EpisodeBatch]:
        """``count`` successive batches of ``batch_size`` episodes."""
        for _ in range(whole_number("batch count", count, 1)):
            yield self.sample(batch_size)
