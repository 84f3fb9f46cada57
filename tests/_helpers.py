"""Shared test helpers: one `assert_close` that says where and by how much two tensors differ."""
import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "tensor"):
    """Like torch.testing.assert_close, but reports the mismatch count, the max errors and the first bad indices.
    Non-finite values must match position by position: NaN where the other has NaN, and the same infinity."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    for what, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        differ = where(a) != where(e)
        assert not differ.any(), (f"{name}: {what} positions differ at {int(differ.sum())} elements, first "
                                  f"{differ.nonzero()[:5].tolist()}")
    finite = torch.isfinite(e)  # equal non-finite positions: compare the rest
    a, e = torch.where(finite, a, 0.0), torch.where(finite, e, 0.0)
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rel = (diff / e.abs().clamp_min(1e-12)).max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatched (atol={atol}, rtol={rtol}); "
            f"max abs err {diff.max().item():.3e}, max rel err {rel:.3e}; first bad indices {idx}: "
            f"actual {[a[tuple(i)].item() for i in idx]}, expected {[e[tuple(i)].item() for i in idx]}"
        )


def without_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """`value`, less the key third of an attention `qkv.bias`. Softmax ignores the key bias, so its gradient is
    rounding noise; Adam scales that noise up to ~lr per step, so it differs between any two reduction orders and
    runs compared element by element leave it out."""
    if not name.endswith("qkv.bias"):
        return value
    d = value.shape[0] // 3
    return torch.cat([value[:d], value[2 * d:]])


def help_without_torch(*argv: str) -> str:
    """The output of `fastdino ARGV` (a --help) in a fresh interpreter; fails unless it left torch unimported."""
    import subprocess
    import sys

    probe = ("import sys; from fastdino.engine.cli import main\n"
             f"try:\n    main({list(argv)!r})\nexcept SystemExit:\n    pass\n"
             "print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("torch not imported"), proc.stdout + proc.stderr
    return proc.stdout
