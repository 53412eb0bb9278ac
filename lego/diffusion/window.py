"""Generation beyond the training canvas by a sliding window, with per-region class labels (Zheng et al., App. D.3).

``SlidingWindow(net, window, stride)`` is itself called like a denoiser, D(x; sigma, class_labels, skip): at every
call it cuts the canvas into windows of the training size, moved by ``stride`` and with the last window in each
direction aligned
to the canvas edge, denoises all of them in batched calls of at most ``max_batch`` windows, and gives each pixel the
average over the windows that cover it. The samplers call it like a model, so Heun / DDPM / DDIM, classifier-free
guidance and brick skipping work unchanged.

Class labels are [B] (one class per image) or a label map [B, H, W] of class ids over the canvas. With a label map,
a window that holds pixels of several classes is denoised once per class it holds, and each pixel takes the
prediction made under its own class (region-based MultiDiffusion, Bar-Tal et al., 2023). We chose this over the
window-majority class, which draws a boundary only at window granularity, and over per-patch labels inside the
bricks, which would need per-patch conditioning in every fused kernel (adaLN is per image by design) and cannot
apply to the image-brick (one patch) or an external base denoiser; the cost is one extra evaluation per window
that straddles a region boundary.
"""

from __future__ import annotations

import torch

from lego.diffusion.precond import as_batch_sigma
from lego.errors import LegoError


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Offsets of the windows along one side: 0, stride, 2 stride, ... and the last one flush with the edge."""
    if window > size:
        raise LegoError(f"the window ({window}) is larger than the canvas ({size}); use a window of at most {size}")
    if stride <= 0:
        raise LegoError(f"the stride must be positive, got {stride}")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def coverage(height: int, width: int, window: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """[H, W] number of windows covering each pixel."""
    count = torch.zeros(height, width, dtype=torch.long)
    for top in window_starts(height, window[0], stride[0]):
        for left in window_starts(width, window[1], stride[1]):
            count[top : top + window[0], left : left + window[1]] += 1
    return count


def region_map(height: int, width: int, regions) -> torch.Tensor:
    """[H, W] class ids from a [H, W] tensor, or from rectangles ``(top, left, bottom, right, class)`` (half-open,
    later ones painted over earlier ones), which must cover the canvas."""
    if isinstance(regions, torch.Tensor):
        if regions.shape != (height, width):
            raise LegoError(f"the label map is {tuple(regions.shape)} but the canvas is {height}x{width}")
        return regions.long()
    labels = torch.full((height, width), -1, dtype=torch.long)
    for top, left, bottom, right, cls in regions:
        if not (0 <= top < bottom <= height and 0 <= left < right <= width):
            raise LegoError(
                f"region rows {top}:{bottom}, columns {left}:{right} lies outside the {height}x{width} canvas"
            )
        labels[top:bottom, left:right] = cls
    holes = (labels < 0).nonzero()
    if len(holes):
        r, c = holes[0].tolist()
        raise LegoError(f"the regions leave pixels without a class (e.g. row {r}, column {c}); cover the whole canvas")
    return labels


def parse_regions(text: str, height: int) -> list[tuple[int, int, int, int, int]]:
    """``"0:128=7,128:256=3"``: column ranges (half-open), each with a class, over the full height -> rectangles."""
    rects = []
    for part in text.split(","):
        try:
            span, cls = part.split("=")
            left, right = (int(v) for v in span.split(":"))
            rects.append((0, left, height, right, int(cls)))
        except ValueError:
            raise LegoError(
                f"--regions: cannot read {part!r}; write column ranges with a class each, e.g. '0:64=3,64:128=7'"
            ) from None
    return rects


class SlidingWindow:
    """A denoiser over a canvas larger than ``net``'s training size: see the module docstring.

    Args:
        net: a denoiser ``net(x, sigma, class_labels, skip=...)`` (a LegoModel) that accepts window-sized canvases.
        window: (h, w) window size (default: the model's training canvas), each a multiple of the largest brick.
        stride: (sh, sw) step between windows (default: a quarter of the window; the paper used 7 latent cells
            with 32-cell windows).
        max_batch: windows per network call (the memory bound).
    """

    def __init__(self, net, window=None, stride=None, max_batch: int = 64):
        self.net = net
        self.window = _pair(net.resolution if window is None else window)  # (0 is an error below, not the default)
        self.stride = _pair(tuple(max(1, s // 4) for s in self.window) if stride is None else stride)
        if max_batch <= 0:
            raise LegoError(f"--max-batch must be positive, got {max_batch}")
        self.max_batch = max_batch
        big = net.max_brick
        if min(self.window) <= 0 or self.window[0] % big or self.window[1] % big:
            side = "x".join(map(str, dict.fromkeys(self.window)))  # "20", or "16x20" for a non-square window
            raise LegoError(
                f"--window {side}: the window's height and width must be positive multiples of {big}, the "
                "model's largest brick"
            )
        if any(s <= 0 or s > w for s, w in zip(self.stride, self.window)):
            raise LegoError(
                f"--stride {'x'.join(map(str, dict.fromkeys(self.stride)))}: the step between windows must be at least "
                f"1 and at most the window ({'x'.join(map(str, dict.fromkeys(self.window)))}), or pixels between "
                "windows would get no prediction"
            )
        net.check_canvas(torch.empty(1, net.in_channels, *self.window, device="meta"))

    # What the samplers read of a denoiser: the wrapped one's.
    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def in_channels(self) -> int:
        return self.net.in_channels

    @property
    def sigma_min(self) -> float:
        return self.net.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.net.sigma_max

    def windows(self, height: int, width: int) -> list[tuple[int, int]]:
        """(top, left) of every window on an H x W canvas, row by row."""
        tops = window_starts(height, self.window[0], self.stride[0])
        lefts = window_starts(width, self.window[1], self.stride[1])
        return [(t, left) for t in tops for left in lefts]

    @torch.no_grad()
    def __call__(self, x, sigma, class_labels=None, skip=()):
        """x [B, C, H, W], sigma scalar or [B], class_labels None, [B] or [B, H, W] -> D(x; sigma) [B, C, H, W]."""
        batch, channels, height, width = x.shape
        wh, ww = self.window
        sigma = as_batch_sigma(sigma, batch, x.device)
        corners = torch.tensor(self.windows(height, width), device=x.device)  # (nW, 2)
        n_win = corners.shape[0]
        # One job per (image, window, class present in it): image, corner, class; and the pixels it writes.
        image = torch.arange(batch, device=x.device).repeat_interleave(n_win)  # (B nW,)
        corner = corners.repeat(batch, 1)  # (B nW, 2)
        rows = corner[:, :1] + torch.arange(wh, device=x.device)  # (B nW, wh)
        cols = corner[:, 1:] + torch.arange(ww, device=x.device)  # (B nW, ww)
        label, mask = None, None
        if class_labels is not None and class_labels.dim() == 3:
            if class_labels.shape != (batch, height, width):
                raise LegoError(
                    f"the label map is {tuple(class_labels.shape)} for a canvas batch {(batch, height, width)}"
                )
            maps = class_labels.to(x.device).long()[image[:, None, None], rows[:, :, None], cols[:, None, :]]
            present = torch.zeros(batch * n_win, int(maps.max()) + 1, dtype=torch.bool, device=x.device)
            present.scatter_(1, maps.flatten(1), True)  # (B nW, classes)
            job, label = present.nonzero(as_tuple=True)  # each window once per class it holds
            image, rows, cols = image[job], rows[job], cols[job]
            mask = (maps[job] == label[:, None, None]).to(x.dtype)[:, None]  # (J, 1, wh, ww)
        elif class_labels is not None:
            label = class_labels.to(x.device)[image]  # (B nW,)
        out = torch.zeros(batch, height, width, channels, dtype=x.dtype, device=x.device)  # channels last for index_put
        count = torch.zeros(batch, height, width, 1, dtype=x.dtype, device=x.device)
        for start in range(0, image.shape[0], self.max_batch):
            part = slice(start, start + self.max_batch)
            where = (image[part, None, None], rows[part, :, None], cols[part, None, :])  # a window's pixels
            x_win = x[where[0], :, where[1], where[2]].permute(0, 3, 1, 2).contiguous()  # (J, C, wh, ww)
            d = self.net(x_win, sigma[image[part]], None if label is None else label[part], skip=skip)
            m = torch.ones_like(d[:, :1]) if mask is None else mask[part]  # (J, 1, wh, ww)
            out.index_put_(where, (d * m).permute(0, 2, 3, 1).to(x.dtype), accumulate=True)
            count.index_put_(where, m.permute(0, 2, 3, 1), accumulate=True)
        return (out / count).permute(0, 3, 1, 2)  # (B, C, H, W)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
