"""fastdino: fast DINO pretraining. The code lives in `fastdino.engine`, `fastdino.kernels` and `fastdino.pipelines`."""

__version__ = "0.1.0"
