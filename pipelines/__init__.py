"""Data: multi-crop pipelines (DALI on the GPU, torchvision fallback) over ImageFolder and tar sources."""
