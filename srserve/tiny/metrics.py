"""Video arrays and files, pixel-level video metrics, and the small image operations of the srd-tiny evaluator.

Videos are float arrays (F, H, W, 3) in [0, 1]. PSNR and SSIM compare a video with a reference of the same
shape (in srserve: the large-only video of the same seed) and average over frames.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

PSNR_CAP_DB = 100.0  # per-frame PSNR of identical frames (MSE 0) is reported as this cap, not inf
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def as_video(frames: np.ndarray) -> np.ndarray:
    """float32 (F, H, W, 3) in [0, 1] from float or uint8 frames; ValueError on any other shape."""
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or min(arr.shape) == 0:
        raise ValueError(f"a video must be an (F, H, W, 3) array, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return np.clip(np.nan_to_num(arr.astype(np.float32)), 0.0, 1.0)


def load_video(path: str | Path) -> np.ndarray:
    """Frames of a .npy (float in [0, 1] or uint8) or a video file (.mp4 etc., through imageio)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    if path.suffix == ".npy":
        return as_video(np.load(path))
    import imageio.v3 as iio

    return as_video(iio.imread(path))


def _check_pair(video: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_video(video).astype(np.float64), as_video(reference).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"video shape {a.shape} differs from reference shape {b.shape}")
    return a, b


def gaussian_kernel(sigma: float, radius: int | None = None) -> np.ndarray:
    radius = int(np.ceil(3 * sigma)) if radius is None else radius
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def filter_axis(x: np.ndarray, kernel: np.ndarray, axis: int, mode: str = "same") -> np.ndarray:
    """1-D correlation of `x` with an odd `kernel` along `axis`; "same" pads with zeros, "valid" does not."""
    r = len(kernel) // 2
    if mode == "same":
        pad = [(0, 0)] * x.ndim
        pad[axis] = (r, r)
        x = np.pad(x, pad)
    n = x.shape[axis] - 2 * r
    out = np.zeros(x.shape[:axis] + (n,) + x.shape[axis + 1:], dtype=np.result_type(x, kernel))
    for i, k in enumerate(kernel):
        index = [slice(None)] * x.ndim
        index[axis] = slice(i, i + n)
        out += k * x[tuple(index)]
    return out


def gaussian_blur(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Blur (F, H, W, C) frames spatially (zero padding: the domain's background is black)."""
    if sigma <= 0:
        return frames
    k = gaussian_kernel(sigma).astype(np.float32)
    return filter_axis(filter_axis(frames.astype(np.float32), k, 1), k, 2)


def augment(frames: np.ndarray, rng: np.random.Generator, noise: float = 0.05, blur: float = 0.7) -> np.ndarray:
    """Mimic a generated video: Gaussian blur (sigma in pixels), then Gaussian noise, clipped to [0, 1]."""
    out = gaussian_blur(frames, blur) + rng.normal(0.0, noise, frames.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def psnr_frames(video: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB (data range 1), capped at PSNR_CAP_DB for identical frames."""
    a, b = _check_pair(video, reference)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        db = 10.0 * np.log10(1.0 / mse)
    return np.minimum(db, PSNR_CAP_DB)


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """Mean over frames of the per-frame PSNR (dB, data range 1); identical videos give PSNR_CAP_DB."""
    return float(psnr_frames(video, reference).mean())


def ssim(video: np.ndarray, reference: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1, valid
    region) over frames, pixels and RGB channels. Identical videos give 1.0."""
    a, b = _check_pair(video, reference)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"frames must be at least {SSIM_WINDOW}x{SSIM_WINDOW} for SSIM, got {a.shape[1:3]}")
    k = gaussian_kernel(SSIM_SIGMA, SSIM_WINDOW // 2)

    def blur(x: np.ndarray) -> np.ndarray:
        return filter_axis(filter_axis(x, k, 1, "valid"), k, 2, "valid")

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def pad2d(x: np.ndarray, radius: int, value=0) -> np.ndarray:
    """A 2-D array padded by `radius` on every side with a constant (a lighter np.pad)."""
    out = np.full((x.shape[0] + 2 * radius, x.shape[1] + 2 * radius), value, dtype=x.dtype)
    out[radius:radius + x.shape[0], radius:radius + x.shape[1]] = x
    return out


def quantile(x: np.ndarray, q: float) -> float:
    """The q-quantile of a non-empty array (lower of the two nearest ranks; faster than np.percentile)."""
    flat = x.ravel()
    k = int(q * (flat.size - 1))
    return float(np.partition(flat, k)[k])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2-D boolean mask (all False if the mask is empty).

    Min-label propagation with pointer jumping: each pixel's label is the smallest flat index in its component.
    """
    h, w = mask.shape
    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    big = h * w
    flat = np.arange(big).reshape(h, w)
    lab = np.where(mask, flat, big)
    while True:
        padded = pad2d(lab, 1, big)
        m = lab.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    np.minimum(m, padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w], out=m)
        m = np.where(mask, m, big)
        ext = np.append(m.ravel(), big)
        m = ext[m]  # pointer jumping: take the label of the pixel my label points at
        if np.array_equal(m, lab):
            break
        lab = m
    labels, counts = np.unique(lab[mask], return_counts=True)
    return lab == labels[np.argmax(counts)]


def bbox_window(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """The bounding box of a non-empty 2-D mask grown by `margin` pixels, clamped to the frame."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (slice(max(ys.min() - margin, 0), min(ys.max() + margin + 1, h)),
            slice(max(xs.min() - margin, 0), min(xs.max() + margin + 1, w)))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of a 2-D mask by a (2r+1)x(2r+1) square (separable: rows, then columns)."""
    h, w = mask.shape
    padded = pad2d(mask, radius, False)
    rows = np.zeros((h + 2 * radius, w), dtype=bool)
    for d in range(2 * radius + 1):
        rows |= padded[:, d:d + w]
    out = np.zeros((h, w), dtype=bool)
    for d in range(2 * radius + 1):
        out |= rows[d:d + h]
    return out


def gradient_energy(image: np.ndarray) -> np.ndarray:
    """(H, W) squared forward-difference gradient magnitude of a 2-D image (last row/column: 0)."""
    g = np.zeros(image.shape, dtype=np.float64)
    g[:, :-1] += np.diff(image, axis=1) ** 2
    g[:-1, :] += np.diff(image, axis=0) ** 2
    return g
