"""Public names imported on first use (PEP 562), so that `fastdino --help` and the config code start without
loading torch, timm, Triton or DALI."""
import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """(`__getattr__`, `__all__`) for `package` whose public name N lives in its submodule `exports[N]`."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__, sorted(exports)
