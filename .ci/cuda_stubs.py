"""Stand-in CUDA libraries for a CUDA build of torch on a machine without a GPU, so that it imports and runs on the CPU.

PyPI's torch wheels (2.11: 530 MB) link against ~15 NVIDIA libraries that their nvidia-* dependencies bring (2.1 GB of
wheels, 2.7 GB installed), none of which a CPU run calls. This writes, for each library torch's own libraries need
and the environment lacks, a small shared object with that library's name (SONAME), the symbol versions torch
binds to and every symbol torch takes from it, each a function returning an error code (100, "no device") if it is
ever called. They go where torch's RPATH looks first ($site/nvidia/cu13/lib), so a system CUDA is never mixed in.
torch then imports and reports no CUDA device, exactly as on a GPU-less machine with the real libraries.

    python .ci/cuda_stubs.py        # with the environment's python; needs readelf (binutils) and a C compiler
"""
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

# Libraries of the system toolchain, found by the loader as always.
SYSTEM = ("libc.so", "libm.so", "libstdc++.so", "libgcc_s.so", "libpthread.so", "libdl.so", "librt.so", "ld-linux",
          "libgomp.so")
# Unversioned symbols torch takes from libraries that do not version theirs, by name prefix.
UNVERSIONED = {"libcuda.so.1": ("cuCtx", "cuDevice", "cuFunc", "cuGetError", "cuLaunch", "cuLink", "cuModule",
                                "cuOccupancy", "cuPointer", "cuTensorMap"),
               "libcufile.so.0": ("cuFile",), "libcusparseLt.so.0": ("cusparseLt",), "libnccl.so.2": ("nccl",),
               "libnvshmem_host.so.3": ("nvshmem",)}
NO_DEVICE = 100  # cudaErrorNoDevice


def readelf(*args: str) -> str:
    return subprocess.run(["readelf", "-W", *args], capture_output=True, text=True, check=True).stdout


def torch_imports(lib_dir: Path) -> tuple[set[str], dict[str, set[str]], set[str], dict[str, str]]:
    """(libraries needed, symbols per symbol version, unversioned symbols, version -> library) of torch's libraries."""
    needed, versioned, unversioned, version_library = set(), {}, set(), {}
    for lib in sorted(lib_dir.glob("*.so*")):
        needed |= set(re.findall(r"Shared library: \[([^\]]+)\]", readelf("-d", str(lib))))
        library = None
        for line in readelf("-V", str(lib)).splitlines():
            if m := re.search(r"File: (\S+)", line):
                library = m.group(1)
            elif (m := re.search(r"Name: (\S+)", line)) and library:
                version_library[m.group(1)] = library
        for line in readelf("--dyn-syms", str(lib)).splitlines():
            fields = line.split()
            if len(fields) >= 8 and fields[6] == "UND" and fields[7]:
                symbol, _, version = fields[7].partition("@")
                versioned.setdefault(version, set()).add(symbol) if version else unversioned.add(symbol)
    return needed, versioned, unversioned, version_library


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    lib_dir = site / "torch" / "lib"
    needed, versioned, unversioned, version_library = torch_imports(lib_dir)
    own = {p.name for p in lib_dir.iterdir()}
    missing = sorted(n for n in needed if n not in own and not n.startswith(SYSTEM))
    out = site / "nvidia" / "cu13" / "lib"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source, version_script = Path(tmp) / "stub.c", Path(tmp) / "versions.map"
        for soname in missing:
            nodes = {v: sorted(s) for v, s in versioned.items() if version_library.get(v) == soname}
            plain = sorted(s for s in unversioned if s.startswith(UNVERSIONED.get(soname, ("\0",))))
            symbols = sorted({s for syms in nodes.values() for s in syms} | set(plain))
            source.write_text("".join(f"int {s}(void) {{ return {NO_DEVICE}; }}\n" for s in symbols))
            command = ["cc", "-shared", "-fPIC", "-o", str(out / soname), str(source), f"-Wl,-soname,{soname}"]
            if nodes:
                version_script.write_text("".join(f"{v} {{ global: {' '.join(s + ';' for s in syms)} }};\n"
                                                  for v, syms in nodes.items()))
                command.append(f"-Wl,--version-script,{version_script}")
            subprocess.run(command, check=True)
    print(f"{out}: {len(missing)} stand-in libraries ({', '.join(missing)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
