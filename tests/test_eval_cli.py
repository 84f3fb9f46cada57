"""`fastdino knn|linear|attention|export|plot` end to end on a tiny ViT and tiny image folders, and every bad
input as a one-line error with exit code 2."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from fastdino.engine.backbone_io import RUN_FILE, save_backbone
from fastdino.engine.eval_cli import main
from fastdino.engine.vit import build_backbone

IMAGE = 32  # image side; the tiny ViT has 16-px patches


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir holding a vit_tiny/16 teacher backbone built for 32-px images."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 16, img_size=IMAGE)
    save_backbone(model.state_dict(), run / RUN_FILE, arch="vit_tiny", patch_size=16, img_size=IMAGE)
    return run


def _write_images(folder, classes, per_class, seed):
    """Class c = images of colour c plus noise: a random ViT's features separate them well enough."""
    rng = np.random.default_rng(seed)
    palette = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(palette[name]) + rng.normal(0, 25, (IMAGE, IMAGE, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / name / f"{i}.png")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _write_images(root / "train", ["red", "green", "blue"], per_class=6, seed=0)
    _write_images(root / "val", ["red", "blue"], per_class=3, seed=1)  # a subset of the train classes is fine
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_knn_prints_top1_and_top5_for_each_k(run_dir, dataset, capsys):
    code, out, err = _run(capsys, "knn", "--checkpoint", run_dir, "--data", dataset, "--k", 3, 1,
                          "--image-size", IMAGE, "--batch-size", 4, "--num-workers", 0, "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["k=1", "k=3"]
    for line in lines:
        top1, top5 = float(line.split("top-1")[1].split()[0]), float(line.split("top-5")[1].split()[0])
        assert 0 <= top1 <= top5 <= 100


def test_linear_probe_writes_results_and_resumes(run_dir, dataset, tmp_path, capsys):
    argv = ["linear", "--checkpoint", run_dir, "--data", dataset, "--output", tmp_path / "probe", "--epochs", 3,
            "--lr", 0.1, "--image-size", IMAGE, "--batch-size", 8, "--num-workers", 0, "--device", "cpu"]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    assert "after 3 epochs" in out
    results = json.loads((tmp_path / "probe" / "linear_results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    code, out_again, err = _run(capsys, *argv)  # finished: resumes at the end, same answer
    assert code == 0 and out_again == out, err


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_export_writes_features_labels_and_classes(run_dir, dataset, tmp_path, capsys, suffix):
    output = tmp_path / f"feats{suffix}"
    code, out, err = _run(capsys, "export", "--checkpoint", run_dir, "--data", dataset, "--output", output,
                          "--pooling", "cls4", "--image-size", IMAGE, "--num-workers", 0, "--device", "cpu")
    assert code == 0, err
    if suffix == ".npz":
        arrays = dict(np.load(output))
        classes = arrays.pop("classes").tolist()
    else:
        with safe_open(str(output), framework="np") as f:
            arrays = {k: f.get_tensor(k) for k in f.keys()}
            classes = json.loads(f.metadata()["classes"])
    assert classes == ["blue", "green", "red"]  # ImageFolder order of the train split
    assert arrays["train_features"].shape == (18, 4 * 192) and arrays["val_features"].shape == (6, 4 * 192)
    # val has only blue and red: its labels index the train split's classes.
    assert sorted(set(arrays["val_labels"].tolist())) == [0, 2]
    assert sorted(set(arrays["train_labels"].tolist())) == [0, 1, 2]


def test_attention_writes_the_png(run_dir, tmp_path, capsys):
    Image.fromarray(np.zeros((IMAGE, 2 * IMAGE, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    code, out, err = _run(capsys, "attention", "--checkpoint", run_dir, "--image", tmp_path / "img.png",
                          "--output", tmp_path / "attn.png", "--device", "cpu")
    assert code == 0, err
    # (3 heads + image) x 2 rows of panels enlarged 7 x (32 -> 224 px), plus the title and caption bands
    assert Image.open(tmp_path / "attn.png").size == (4 * 2 * IMAGE * 7, 2 * IMAGE * 7 + 2 * 28)


def test_plot_prints_the_figures(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1.0 / (s + 1)})
                                                      for s in range(5)))
    code, out, err = _run(capsys, "plot", tmp_path)
    assert code == 0, err
    assert out.split() == [str(tmp_path / "plots" / "metrics.png"), str(tmp_path / "plots" / "metrics.svg")]
    code, out, err = _run(capsys, "plot", tmp_path, tmp_path, "--output", tmp_path / "both")
    assert code == 0, err
    assert out.split() == [str(tmp_path / "both.png"), str(tmp_path / "both.svg")]


def test_checkpoint_of_another_architecture(run_dir, dataset, capsys):
    code, _, err = _run(capsys, "knn", "--checkpoint", run_dir, "--data", dataset, "--arch", "vit_small")
    _assert_one_line_error(code, err, "fastdino knn: error:", "holds a vit_tiny/16 backbone, but arch=vit_small")


def test_dataset_with_classes_missing_from_train(run_dir, tmp_path, capsys):
    _write_images(tmp_path / "train", ["red", "blue"], per_class=2, seed=0)
    _write_images(tmp_path / "val", ["red", "green"], per_class=1, seed=1)
    code, _, err = _run(capsys, "knn", "--checkpoint", run_dir, "--data", tmp_path, "--k", 1,
                        "--image-size", IMAGE, "--num-workers", 0, "--device", "cpu")
    _assert_one_line_error(code, err, "class(es) of the val split are missing from the train split: green")


@pytest.mark.parametrize("size, message", [(8, "image 8x8 is smaller than one 16x16 patch"),
                                           (40, "image size 40x40 is not a multiple of the patch size 16")])
def test_image_smaller_than_a_patch_or_not_a_multiple(run_dir, tmp_path, capsys, size, message):
    Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    code, _, err = _run(capsys, "attention", "--checkpoint", run_dir, "--image", tmp_path / "img.png",
                        "--output", tmp_path / "attn.png", "--device", "cpu", "--image-size", 0)  # as it is
    _assert_one_line_error(code, err, "fastdino attention: error:", message)
    assert not (tmp_path / "attn.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["knn", "--checkpoint", "{tmp}/nope", "--data", "{tmp}"], "checkpoint not found"),
    (["knn", "--checkpoint", "{tmp}", "--data", "{tmp}"], f"has no {RUN_FILE}"),
    (["attention", "--checkpoint", "{run}", "--image", "{tmp}/nope.jpg", "--output", "{tmp}/a.png"],
     "image not found"),
    (["plot", "{tmp}"], "no metrics file"),
    (["export", "--checkpoint", "{run}", "--data", "{tmp}", "--output", "{tmp}/f.txt"],
     "export file must end in .safetensors or .npz"),
    (["knn", "--checkpoint", "{run}"], "the following arguments are required: --data"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_missing_files_and_bad_arguments(run_dir, tmp_path, capsys, argv, message):
    code, _, err = _run(capsys, *[a.format(tmp=tmp_path, run=run_dir) for a in argv])
    _assert_one_line_error(code, err, message)


def test_knn_evaluates_at_the_checkpoint_image_size(run_dir, dataset, capsys, caplog, monkeypatch):
    from fastdino.engine import eval as fd_eval

    sizes = []
    real = fd_eval.extract_features

    def recording(backbone, loader, *args, **kwargs):
        sizes.append(loader.dataset.image_size)
        return real(backbone, loader, *args, **kwargs)

    monkeypatch.setattr(fd_eval, "extract_features", recording)
    code, out, err = _run(capsys, "knn", "--checkpoint", run_dir, "--data", dataset, "--k", 1, "--batch-size", 4,
                          "--num-workers", 0, "--device", "cpu")
    assert code == 0, err
    assert sizes == [IMAGE, IMAGE]  # the run's 32 px, not 224


def _no_extraction(*args, **kwargs):
    raise AssertionError("features were extracted before the error")


@pytest.mark.parametrize("case", ["no_val", "unlabeled_val", "unwritable"])
def test_what_can_be_checked_is_checked_before_feature_extraction(run_dir, tmp_path, capsys, monkeypatch, case):
    from fastdino.engine import eval as fd_eval

    monkeypatch.setattr(fd_eval, "extract_features", _no_extraction)
    _write_images(tmp_path / "data" / "train", ["red", "blue"], per_class=2, seed=0)
    common = ["--checkpoint", run_dir, "--data", tmp_path / "data", "--num-workers", 0, "--device", "cpu"]
    if case == "no_val":
        code, _, err = _run(capsys, "knn", *common)
        _assert_one_line_error(code, err, "has no 'val' split")
    elif case == "unlabeled_val":
        _write_images(tmp_path / "flat", ["red"], per_class=2, seed=1)
        (tmp_path / "data" / "val").mkdir()
        for i, png in enumerate((tmp_path / "flat" / "red").iterdir()):
            png.rename(tmp_path / "data" / "val" / f"{i}.png")
        code, _, err = _run(capsys, "linear", *common, "--output", tmp_path / "probe")
        _assert_one_line_error(code, err, "the val split", "has no class labels")
    else:
        _write_images(tmp_path / "data" / "val", ["red"], per_class=1, seed=1)
        (tmp_path / "blocker").write_text("a file where the output folder should go")
        code, _, err = _run(capsys, "export", *common, "--output", tmp_path / "blocker" / "f.npz")
        _assert_one_line_error(code, err, "fastdino export: error:", "blocker")
