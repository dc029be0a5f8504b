"""The llama.cpp peer: convert a bench checkpoint to GGUF, quantize it, say whether the peer can run.

llama-cpp-python (the `llama_cpp` module, compiled on install) runs the GGUF files; its wheel does not
ship the converter, so `converter()` takes `vendor/llama.cpp/convert_hf_to_gguf.py` (with its
`conversion/` package and `gguf-py/`) from the sdist of the *installed* version, fetched once with
pip into bench/cache/ and extracted there. Conversion needs a tokenizer and the bench checkpoints have
none: `gguf_f32` trains a small sentencepiece model (it only names token ids; the bench feeds ids) and
converts a staging folder of links to the checkpoint's files plus that tokenizer, so the checkpoint
itself is never written. Everything is cached beside the checkpoint (`<ckpt>-gguf/`) and rebuilt when
the checkpoint is newer.

    pip install llama-cpp-python sentencepiece      # the one install command (docs/quantization.md)
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import make_checkpoint as mk

log = logging.getLogger(__name__)

#: where the converter is extracted (one folder per llama-cpp-python version); fixed at import so a
#: test that points mk.CACHE_DIR elsewhere still finds the converter fetched before
SRC_CACHE = Path(os.environ.get("MOESHARD_LLAMA_CPP_SRC", mk.CACHE_DIR / "llama.cpp-src"))
#: the quantized types the bench compares, by name: llama_ftype values of llama.h
FTYPES = {"Q8_0": 7, "Q4_0": 2}
_VENDOR = "vendor/llama.cpp"
_NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


class LlamaCppError(RuntimeError):
    pass


def installed_version() -> str | None:
    """The llama-cpp-python version that is installed, None if it is not."""
    try:
        from importlib.metadata import version
        return version("llama_cpp_python")
    except Exception:
        return None


def fetch_command(version: str | None = None) -> str:
    v = version or installed_version() or "<version>"
    return (f"{sys.executable} -m pip download llama-cpp-python=={v} --no-deps --no-binary :all: "
            f"-d {SRC_CACHE}")


def _converter_path(version: str) -> Path:
    return SRC_CACHE / version / "convert_hf_to_gguf.py"


def converter(fetch: bool = False) -> Path:
    """convert_hf_to_gguf.py of the installed llama-cpp-python version (from its sdist, cached in
    bench/cache/); with `fetch`, download the sdist with pip if it is not there yet."""
    version = installed_version()
    if version is None:
        raise LlamaCppError("llama-cpp-python is not installed: pip install llama-cpp-python sentencepiece")
    script = _converter_path(version)
    if script.is_file():
        return script
    SRC_CACHE.mkdir(parents=True, exist_ok=True)
    sdist = SRC_CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        if not fetch:
            raise LlamaCppError(f"the GGUF converter is not in {SRC_CACHE}; fetch it with: {fetch_command(version)}")
        log.info("fetching the llama-cpp-python %s sdist for its GGUF converter", version)
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
               "--no-binary", ":all:", "-d", str(SRC_CACHE)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or not sdist.is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
            raise LlamaCppError(f"could not fetch the GGUF converter ({tail[0]}); run: {fetch_command(version)}")
    _extract(sdist, script.parent)
    return script


def _extract(sdist: Path, dest: Path) -> None:
    """vendor/llama.cpp/{convert_hf_to_gguf.py, conversion/, gguf-py/} of the sdist into `dest`."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[1] if "/" in m.name else ""
                inner = rel[len(_VENDOR) + 1:]
                if (rel.startswith(_VENDOR + "/") and any(inner.startswith(n) for n in _NEEDED)
                        and "/tests/" not in inner):
                    m.name = inner
                    members.append(m)
            if not any(m.name == "convert_hf_to_gguf.py" for m in members):
                raise LlamaCppError(f"{sdist} has no {_VENDOR}/convert_hf_to_gguf.py")
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def available(fetch: bool = False) -> str | None:
    """None when the peer can run here, else why not (the bench's skip note, the tests' capability).
    Never downloads unless `fetch`."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed: pip install llama-cpp-python sentencepiece"
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return "sentencepiece is not installed (the GGUF converter needs a tokenizer): pip install sentencepiece"
    try:
        converter(fetch=fetch)
    except LlamaCppError as e:
        return str(e)
    return None


# ---- conversion and quantization ------------------------------------------------------------------

def out_dir(ckpt: Path) -> Path:
    """Where a checkpoint's GGUF files live: beside it."""
    ckpt = Path(ckpt)
    return ckpt.parent / f"{ckpt.name}-gguf"


def _source_mtime(ckpt: Path) -> float:
    files = [*ckpt.glob("*.safetensors"), ckpt / "config.json"]
    return max(p.stat().st_mtime for p in files if p.is_file())


def _fresh(path: Path, mtime: float) -> bool:
    return path.is_file() and path.stat().st_mtime >= mtime


def _train_tokenizer(dest: Path, vocab_size: int) -> None:
    """A small deterministic sentencepiece model (the converter pads the vocab up to `vocab_size`)."""
    import sentencepiece as spm

    words = [f"{a}{b}{c}" for a in "bcdfglmnprst" for b in "aeiou" for c in "nrstlkm"]
    lines = [" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(12)) for i in range(400)]
    corpus = dest.parent / "tokenizer-corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(dest.with_suffix("")), model_type="bpe",
                                   vocab_size=min(vocab_size, 200), hard_vocab_limit=False, num_threads=1,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    corpus.unlink()


def gguf_f32(ckpt: Path, fetch: bool = False) -> Path:
    """`ckpt` converted to GGUF f32 by llama.cpp's own converter (cached; rebuilt if the source is newer)."""
    import json

    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file():
        raise LlamaCppError(f"{ckpt}: not a checkpoint folder (no config.json)")
    dst_dir = out_dir(ckpt)
    out = dst_dir / "f32.gguf"
    mtime = _source_mtime(ckpt)
    if _fresh(out, mtime):
        return out
    script = converter(fetch=fetch)
    stage = dst_dir / "src"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.suffix in (".json", ".safetensors") and f.name != mk.MANIFEST:
            (stage / f.name).symlink_to(f.resolve())
    vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
    _train_tokenizer(stage / "tokenizer.model", vocab)
    tmp = out.with_suffix(".gguf.tmp")
    cmd = [sys.executable, str(script), str(stage), "--outfile", str(tmp), "--outtype", "f32"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(script.parent / "gguf-py"),
                                                                   os.environ.get("PYTHONPATH")) if p)}
    log.info("converting %s to GGUF f32", ckpt)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not tmp.is_file():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise LlamaCppError(f"convert_hf_to_gguf.py failed on {ckpt} (exit {r.returncode}):\n{tail}")
    os.replace(tmp, out)
    shutil.rmtree(stage, ignore_errors=True)
    return out


def _derived(ckpt: Path, ftype: str, suffix: str, fetch: bool) -> tuple[Path, Path, bool]:
    """(f32 source, the derived file `<ftype><suffix>.gguf` beside it, whether that file is fresh)."""
    if ftype not in FTYPES:
        raise LlamaCppError(f"unknown llama.cpp type {ftype!r}; the bench uses {', '.join(FTYPES)}")
    src = gguf_f32(ckpt, fetch=fetch)
    out = src.with_name(f"{ftype.lower()}{suffix}.gguf")
    return src, out, _fresh(out, src.stat().st_mtime)


def quantized(ckpt: Path, ftype: str, threads: int = 1, fetch: bool = False) -> Path:
    """The GGUF of `ckpt` quantized to `ftype` (Q8_0 or Q4_0) by llama_cpp.llama_model_quantize, with
    llama.cpp's default choices (routers and norms stay f32; cached, rebuilt if the f32 file is newer)."""
    src, out, fresh = _derived(ckpt, ftype, "", fetch)
    if fresh:
        return out
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = max(1, int(threads))
    tmp = out.with_suffix(".gguf.tmp")
    log.info("quantizing %s to %s", src, ftype)
    chatter = logging.getLogger("llama-cpp-python")   # llama-cpp-python's callback prints llama.cpp's log at
    level = chatter.level                             # or above this logger's level: keep its warnings only
    chatter.setLevel(logging.WARNING)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    finally:
        chatter.setLevel(level)
    if rc != 0 or not tmp.is_file():
        raise LlamaCppError(f"llama_model_quantize {src} -> {ftype} failed (return code {rc})")
    os.replace(tmp, out)
    return out


def experts_only(ckpt: Path, ftype: str, fetch: bool = False) -> Path:
    """The GGUF of `ckpt` with only the routed experts quantized to `ftype` (Q8_0 or Q4_0) and every
    other tensor f32, as moeshard's expert_dtype holds them (bench/gguf_experts.py; cached)."""
    src, out, fresh = _derived(ckpt, ftype, "-experts", fetch)
    if fresh:
        return out
    gguf_py = converter(fetch=fetch).parent / "gguf-py"
    tmp = out.with_suffix(".gguf.tmp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(gguf_py), os.environ.get("PYTHONPATH")) if p)}
    log.info("quantizing the experts of %s to %s", src, ftype)
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("gguf_experts.py")), str(src), str(tmp), ftype],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0 or not tmp.is_file():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise LlamaCppError(f"bench/gguf_experts.py {src} -> {ftype} failed (exit {r.returncode}):\n{tail}")
    os.replace(tmp, out)
    return out


def gguf_file(ckpt: Path, kind: str, threads: int = 1, fetch: bool = False) -> Path:
    """One function for every row: kind "f32" (as stored), "Q8_0" or "Q4_0" (llama.cpp's defaults:
    the dense part quantized too) or "Q8_0-experts" / "Q4_0-experts" (routed experts only)."""
    if kind == "f32":
        return gguf_f32(ckpt, fetch=fetch)
    if kind.endswith("-experts"):
        return experts_only(ckpt, kind.removesuffix("-experts"), fetch=fetch)
    return quantized(ckpt, kind, threads=threads, fetch=fetch)
