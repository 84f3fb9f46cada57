"""The evaluation loader: resize + center crop like DINO's eval transform, labels, sharding, bad files."""
import logging

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from _helpers import assert_close
from fastdino.pipelines import build_eval_loader, open_source
from fastdino.pipelines.config import IMAGENET_MEAN, IMAGENET_STD
from test_sources import make_image_folder, without_quant_tables


def _reference(path, size):
    """DINO's eval_knn transform, built from torchvision."""
    bicubic = transforms.InterpolationMode.BICUBIC
    t = transforms.Compose([transforms.Resize(round(size * 256 / 224), interpolation=bicubic),
                            transforms.CenterCrop(size), transforms.PILToTensor()])
    x = t(Image.open(path).convert("RGB")).float()
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def test_images_labels_and_transform(tmp_path):
    root = make_image_folder(tmp_path / "val", per_class=3)
    loader = build_eval_loader(str(root), image_size=28, batch_size=4, num_workers=0)
    assert loader.classes == ["a", "b", "c"] and loader.num_images == 9 and len(loader) == 3
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 28, 28), (4, 3, 28, 28), (1, 3, 28, 28)]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    src = open_source(str(root))
    assert labels.tolist() == src.labels.tolist()
    for i in (0, 4, 8):
        assert_close(images[i], _reference(root / src.names[i].decode(), 28), atol=1e-5, rtol=0, name=f"image {i}")


def test_ranks_share_the_images_once(tmp_path):
    root = make_image_folder(tmp_path / "val", per_class=5)  # 15 images over 4 ranks: 4, 4, 4, 3
    seen = []
    for rank in range(4):
        loader = build_eval_loader(str(root), image_size=16, batch_size=2, rank=rank, world_size=4, num_workers=0)
        images = torch.cat([b[0] for b in loader])
        assert loader.num_images == 15 and len(images) == (4 if rank < 3 else 3)
        seen += [tuple(x.flatten()[:64].tolist()) for x in images]
    assert len(seen) == len(set(seen)) == 15


def test_an_image_that_fails_to_decode_is_left_out(tmp_path, caplog):
    root = make_image_folder(tmp_path / "val", per_class=3)
    src = open_source(str(root))
    broken = root / src.names[4].decode()
    broken.write_bytes(without_quant_tables(broken.read_bytes()))
    loader = build_eval_loader(src, image_size=16, batch_size=4, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="fastdino.pipelines.eval_loader"):
        labels = torch.cat([b[1] for b in loader])
    assert labels.tolist() == np.delete(src.labels, 4).tolist() and loader.decode_failures == 1
    assert any(broken.name in r.getMessage() for r in caplog.records)


def test_workers_give_the_same_batches(tmp_path):
    root = make_image_folder(tmp_path / "val", per_class=3)
    a = [b[0] for b in build_eval_loader(str(root), image_size=16, batch_size=4, num_workers=0)]
    b = [b[0] for b in build_eval_loader(str(root), image_size=16, batch_size=4, num_workers=2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
