"""Multi-crop view configuration, and the fixed augmentation recipe of the DINO paper.

The recipe (Caron et al. 2021, appendix "Data augmentation", following BYOL) is the same for every run, so it
lives here as constants rather than as options; `MultiCropConfig` holds what runs do change: crop sizes, scales
and the number of local crops.
"""
from dataclasses import dataclass

# ImageNet channel statistics in 0..255 pixel units (the views are normalised with these).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# Random resized crop: aspect ratio range (torchvision's default) and how many tries before the center crop.
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# Colour jitter strengths (brightness, contrast, saturation, hue) and the probability of jittering.
JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)
JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
# Gaussian blur: sigma range, and probability for the first global, the second global and every local view.
# The sigmas are pixels of the paper's 224-px global and 96-px local views; other view sizes scale them, so that
# a 32-px view is blurred as much as a 224-px one rather than 7 times more.
BLUR_SIGMA = (0.1, 2.0)
BLUR_REFERENCE_SIZES = (224, 96)
BLUR_PROB = (1.0, 0.1, 0.5)
# Solarisation (threshold 128) of the second global view only.
SOLARIZE_PROB = 0.2
SOLARIZE_THRESHOLD = 128


@dataclass(frozen=True)
class MultiCropConfig:
    """The 2 global and N local views made from every image."""

    global_crops_size: int = 224
    """Side of the 2 global views in pixels."""
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    """Area range of a global crop, as fractions of the image area."""
    local_crops_number: int = 10
    """Number of local views per image (0 = global views only)."""
    local_crops_size: int = 96
    """Side of the local views in pixels."""
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    """Area range of a local crop, as fractions of the image area."""

    def __post_init__(self):
        object.__setattr__(self, "global_crops_scale", tuple(self.global_crops_scale))
        object.__setattr__(self, "local_crops_scale", tuple(self.local_crops_scale))
        for name in ("global_crops_size", "local_crops_size"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if int(self.local_crops_number) != self.local_crops_number or self.local_crops_number < 0:
            raise ValueError(f"local_crops_number must be an integer >= 0, got {self.local_crops_number!r}")
        for name in ("global_crops_scale", "local_crops_scale"):
            scale = getattr(self, name)
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, got {scale!r}")

    @property
    def num_views(self) -> int:
        """2 global views + the local ones."""
        return 2 + self.local_crops_number

    def view_sizes(self) -> list[int]:
        """Output side of every view, global views first."""
        return [self.global_crops_size] * 2 + [self.local_crops_size] * self.local_crops_number
