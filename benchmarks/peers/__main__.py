"""``python -m benchmarks.peers converter|prepare``: set up llama.cpp's converter; make
every peer's model files for a checkpoint ahead of a bench run."""

from __future__ import annotations

import argparse
import importlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from benchmarks.peers import PLUGINS
from trace_rt.cliutil import Parser, run_command

# What convert_hf_to_gguf.py needs beside it, inside the sdist's vendor/llama.cpp/.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def unpack_converter(sdist: Path, dest: Path) -> Path:
    """Unpack llama.cpp's converter (script, its ``conversion`` package and ``gguf-py``)
    from llama-cpp-python's source distribution *sdist* into *dest*; returns the script."""
    with tarfile.open(sdist) as tar, tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        members = []
        for m in tar.getmembers():
            _, sep, rel = m.name.partition("/vendor/llama.cpp/")
            if sep and (m.isfile() or m.isdir()) and rel.startswith(CONVERTER_PARTS):
                m.name = rel
                members.append(m)
        if not any(m.name == CONVERTER_PARTS[0] for m in members):
            raise ValueError(f"{sdist} has no vendor/llama.cpp/{CONVERTER_PARTS[0]}")
        staged = Path(tmp) / "llama.cpp"
        tar.extractall(staged, members=members, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)  # a complete copy or none
    return dest / CONVERTER_PARTS[0]


def _converter(args: argparse.Namespace) -> None:
    from benchmarks.peers.llamacpp import _llama_cpp, converter_dir

    version = _llama_cpp().__version__
    dest = converter_dir(version)
    if (dest / CONVERTER_PARTS[0]).is_file() and args.sdist is None:
        print(f"llama.cpp converter for llama-cpp-python {version}: {dest}")
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:  # the same release's source distribution, from the package index
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
            cmd += ["--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp]
            subprocess.run(cmd, check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        print(f"wrote {unpack_converter(sdist, dest)}")


def _prepare(args: argparse.Namespace) -> None:
    for name in args.peers.split(","):
        module, _, cls = PLUGINS[name.strip()].partition(":")
        peer = getattr(importlib.import_module(module), cls)
        print(f"{name}: {peer.prepare(args.checkpoint)}")


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.peers", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("converter", help="unpack llama.cpp's convert_hf_to_gguf.py")
    c.add_argument("--sdist", type=Path, help="llama-cpp-python's .tar.gz (default: download)")
    r = sub.add_parser("prepare", help="make the peers' model files for a checkpoint")
    r.add_argument("checkpoint", type=Path)
    r.add_argument("--peers", default=",".join(PLUGINS), help="default: %(default)s")
    args = p.parse_args(argv)
    command = {"converter": _converter, "prepare": _prepare}[args.command]
    return run_command("python -m benchmarks.peers", lambda: command(args))


if __name__ == "__main__":
    sys.exit(main())
