"""The multi-crop augmentations: one sampler of per-view parameters and the plain-PyTorch reference that applies them.

Every random choice is drawn here, in NumPy, before any pixel is touched: for each image a (V, NUM_PARAMS) row
block (V = 2 + N views) holding its crop box, flip, colour-jitter factors, grayscale, blur sigma and solarisation.
Both backends apply the same rows (the DALI graph in `dali.py`, the torch functions below for the fallback), so
they agree sample for sample, and the rates of every choice can be tested on the sampler alone.

The generator of an image is seeded with (seed, epoch, image index), so its views do not depend on the batch
size, the number of ranks or the worker that makes them: a resumed or re-sharded run sees the same augmentations.

Colour model. DALI's `color_twist` is one affine map per image: brightness and contrast about mid-grey (128),
then hue rotation and saturation scaling in YIQ space (see DALI `dali/operators/image/color/color_twist.h`). We
take that as the definition for both backends. torchvision's ColorJitter (used by the official DINO code) differs
slightly: contrast about the image's mean grey, hue shifted in HSV, and the four factors in a random order.
Grayscale is saturation 0 in the same model, i.e. ITU-R 601 luma, which is what torchvision's Grayscale computes.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from fastdino.pipelines.config import (BLUR_PROB, BLUR_REFERENCE_SIZES, BLUR_SIGMA, CROP_ATTEMPTS, CROP_RATIO,
                                       GRAYSCALE_PROB, IMAGENET_MEAN, IMAGENET_STD, JITTER_PROB, JITTER_STRENGTH,
                                       SOLARIZE_PROB, SOLARIZE_THRESHOLD, MultiCropConfig)

# Columns of one view's parameter row. The crop box is relative to the image (0..1), in DALI's (y, x) order.
Y0, X0, Y1, X1 = 0, 1, 2, 3
FLIP = 4
BRIGHTNESS, CONTRAST, SATURATION, HUE = 5, 6, 7, 8  # factors; hue in turns (DALI takes degrees: x360)
JITTER, GRAY = 9, 10  # 0/1: colour jitter applied, grayscale applied (saturation is then multiplied by 0)
BLUR_SIGMA_COL = 11  # 0 = no blur
SOLARIZE = 12  # 0/1
NUM_PARAMS = 13

# DALI's RGB <-> YIQ matrices (the inverse is DALI's rounded one, so the reference matches it to the last bit).
RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
YIQ_TO_RGB = torch.tensor([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.107, 1.705]])


def image_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one image's views in one epoch."""
    return np.random.default_rng((seed, epoch, index))


def crop_boxes(rng: np.random.Generator, height: int, width: int, scales: np.ndarray) -> np.ndarray:
    """Random resized crop boxes, torchvision's algorithm vectorised over views: (V, 4) relative (y0, x0, y1, x1).

    scales: (V, 2) area ranges. Each view draws CROP_ATTEMPTS (area, log-aspect) pairs and keeps the first whose
    box fits; when none fits it falls back to the largest centered box with a ratio inside CROP_RATIO.
    """
    num_views = len(scales)
    area = rng.uniform(scales[:, :1], scales[:, 1:], size=(num_views, CROP_ATTEMPTS)) * (height * width)
    log_ratio = np.log(CROP_RATIO)
    aspect = np.exp(rng.uniform(log_ratio[0], log_ratio[1], size=(num_views, CROP_ATTEMPTS)))
    pos = rng.random((num_views, 2))
    w = np.rint(np.sqrt(area * aspect))
    h = np.rint(np.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(num_views)
    w, h = w[rows, first], h[rows, first]
    top = np.floor(pos[:, 0] * (height - h + 1))
    left = np.floor(pos[:, 1] * (width - w + 1))
    found = fits.any(axis=1)
    if not found.all():
        ratio = width / height
        if ratio < CROP_RATIO[0]:
            cw, ch = width, round(width / CROP_RATIO[0])
        elif ratio > CROP_RATIO[1]:
            cw, ch = round(height * CROP_RATIO[1]), height
        else:
            cw, ch = width, height
        w = np.where(found, w, cw)
        h = np.where(found, h, ch)
        top = np.where(found, top, (height - ch) // 2)
        left = np.where(found, left, (width - cw) // 2)
    return np.stack([top / height, left / width, (top + h) / height, (left + w) / width], axis=1)


def view_params(seed: int, epoch: int, index: int, height: int, width: int, crops: MultiCropConfig) -> np.ndarray:
    """(V, NUM_PARAMS) float32 parameters of the views of image `index` (header size height x width)."""
    rng = image_rng(seed, epoch, index)
    num_views = crops.num_views
    scales = np.array([crops.global_crops_scale] * 2 + [crops.local_crops_scale] * crops.local_crops_number)
    params = np.zeros((num_views, NUM_PARAMS), np.float64)
    params[:, Y0:X1 + 1] = crop_boxes(rng, height, width, scales)
    u = rng.random((num_views, 6))  # one uniform per random choice, so every view draws the same amount
    params[:, FLIP] = u[:, 0] < 0.5
    jitter = u[:, 1] < JITTER_PROB
    b, c, s, h = JITTER_STRENGTH
    factors = rng.uniform([1 - b, 1 - c, 1 - s, -h], [1 + b, 1 + c, 1 + s, h], size=(num_views, 4))
    params[:, BRIGHTNESS:HUE + 1] = np.where(jitter[:, None], factors, [1.0, 1.0, 1.0, 0.0])
    params[:, JITTER] = jitter
    params[:, GRAY] = u[:, 2] < GRAYSCALE_PROB
    blur_prob = np.array([BLUR_PROB[0], BLUR_PROB[1]] + [BLUR_PROB[2]] * crops.local_crops_number)
    reference = np.array(BLUR_REFERENCE_SIZES[:1] * 2 + BLUR_REFERENCE_SIZES[1:] * crops.local_crops_number)
    sigma = (BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 3]) * np.array(crops.view_sizes()) / reference
    params[:, BLUR_SIGMA_COL] = np.where(u[:, 4] < blur_prob, sigma, 0.0)
    params[1, SOLARIZE] = u[1, 5] < SOLARIZE_PROB
    return params.astype(np.float32)


def blur_radius(sigma: float) -> int:
    """Kernel radius for `sigma`: DALI's default, ceil(3 sigma)."""
    return math.ceil(3 * sigma)


# --- the plain-PyTorch reference: applies parameter rows to a batch of crops of one size ----------------------


def color_twist(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, hue, saturation and grayscale as one affine colour map per image, rounded to 0..255.

    x: (B, 3, H, W) float pixels in 0..255; params: (B, NUM_PARAMS). out = b*c*M*x + 128*(1-c)*b per pixel, with
    M = YIQ->RGB . rot(hue) . diag(1, s, s) . RGB->YIQ (DALI ColorTwist).
    """
    b, c = params[:, BRIGHTNESS].double(), params[:, CONTRAST].double()
    sat = params[:, SATURATION].double() * (1 - params[:, GRAY].double())
    angle = params[:, HUE].double() * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    mix = torch.zeros(len(params), 3, 3, dtype=torch.float64)  # (B, 3, 3) = rot(hue) . diag(1, s, s) in YIQ
    mix[:, 0, 0] = 1
    mix[:, 1, 1] = cos * sat
    mix[:, 1, 2] = sin * sat
    mix[:, 2, 1] = -sin * sat
    mix[:, 2, 2] = cos * sat
    matrix = (b * c)[:, None, None] * (YIQ_TO_RGB.double() @ mix @ RGB_TO_YIQ.double())  # (B, 3, 3)
    offset = 128 * (1 - c) * b  # (B,)
    out = torch.einsum("bij,bjhw->bihw", matrix.float(), x) + offset.float()[:, None, None, None]
    return out.round().clamp(0, 255)


def _reflect101(n: int, radius: int) -> torch.Tensor:
    """Source index of every position of a length-n axis padded by `radius` with reflect-101 (DALI's border)."""
    idx = torch.arange(-radius, n + radius)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma (0 = unchanged), rounded to 0..255.

    x: (B, 3, H, W) float; sigma: (B,). Each image's kernel has radius ceil(3 sigma) and is zero beyond it, so one
    padded pass serves the whole batch; reflect-101 borders hold for any radius, as in DALI's gaussian_blur.
    """
    active = sigma > 0
    if not active.all():  # blur only the images that need it
        out = x.clone()
        if active.any():
            out[active] = gaussian_blur(x[active], sigma[active])
        return out
    radius = max(blur_radius(float(s)) for s in sigma)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    sigma = sigma.double()[:, None]
    kernel = torch.exp(-taps**2 / (2 * sigma**2))  # (B, 2R+1)
    kernel = kernel * (taps.abs() <= torch.ceil(3 * sigma))
    kernel = (kernel / kernel.sum(1, keepdim=True)).float().repeat_interleave(3, 0)  # (3B, 2R+1): per channel
    batch, channels, height, width = x.shape
    rows = x[:, :, _reflect101(height, radius)].reshape(1, batch * channels, height + 2 * radius, width)
    out = F.conv2d(rows, kernel[:, None, :, None], groups=batch * channels)  # (1, 3B, H, W)
    cols = out[..., _reflect101(width, radius)]  # (1, 3B, H, W+2R)
    out = F.conv2d(cols, kernel[:, None, None, :], groups=batch * channels)
    return out.reshape(batch, channels, height, width).round().clamp(0, 255)


def solarize(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Invert the pixels >= 128 of the images whose flag is set (PIL ImageOps.solarize)."""
    if not (flags > 0).any():
        return x
    hit = (flags[:, None, None, None] > 0) & (x >= SOLARIZE_THRESHOLD)
    return torch.where(hit, 255 - x, x)


def finish_views(crops_u8: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Colour, blur, solarise, flip and normalise a batch of resized crops of one view.

    crops_u8: (B, H, W, 3) uint8 crops as cut and resized by the decoder; params: (B, NUM_PARAMS) of that view.
    Returns (B, 3, H, W) float32, ImageNet-normalised.
    """
    x = crops_u8.permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    x = color_twist(x, params)
    x = gaussian_blur(x, params[:, BLUR_SIGMA_COL])
    x = solarize(x, params[:, SOLARIZE])
    x = torch.where(params[:, FLIP, None, None, None] > 0, x.flip(-1), x)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std
