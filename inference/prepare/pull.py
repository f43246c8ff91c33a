"""`npugate pull REPO[:FILE]`: a chat model from the Hugging Face hub, built like `prepare`.

huggingface_hub does the transfer: its own cache (HF_HOME, HF_HUB_CACHE), resumable
downloads, HF_TOKEN and HF_ENDPOINT. Every file the hub lists with a sha256 (its LFS files:
the weights) is checked against it after download; a mismatch deletes the cached copy and
stops the pull. Three kinds of repository are understood:

- a GGUF file (`REPO:FILE.gguf`, or the repository's only .gguf): dequantized to fp32 with
  transformers, then built by onnxruntime-genai's model builder, as the default model is;
- a transformers folder (config.json and *.safetensors): built by the model builder;
- a ready ONNX folder in the Phi-3 layout (genai_config.json; Microsoft's *-onnx repositories,
  `REPO:SUBFOLDER` picks one of several): copied as it is.

The build goes through `recipes.build_model`: a scratch folder, the manifest (source repo,
commit and file digests, licence, toolchain), the fidelity check against the fp32 source,
then an atomic rename into the models directory, where the server finds it on demand.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.prepare.recipes import (
    CHAT_MIN_TOP1,
    Progress,
    Recipe,
    build_model,
    check_build,
    onnx_builder,
    run_step,
)
from inference.prepare.sources import PrepareError, sha256_file

PRECISIONS = ("int8", "int4", "fp32")
ASK_ABOVE_BYTES = 1 << 30  # a download larger than this asks first (unless --yes)
ONNX_FILES = re.compile(r"(genai_config\.json|tokenizer.*\.json|special_tokens_map\.json|"
                        r"chat_template\.jinja|config\.json|generation_config\.json|"
                        r".*\.onnx|.*\.onnx\.data|.*\.onnx_data|LICENSE.*)$")
HF_FILES = re.compile(r"(config\.json|generation_config\.json|tokenizer.*\.json|"
                      r"special_tokens_map\.json|chat_template\.jinja|tokenizer\.model|"
                      r"vocab\.json|merges\.txt|.*\.safetensors|model\.safetensors\.index\.json|"
                      r"LICENSE.*)$")


@dataclass(frozen=True)
class HubFile:
    name: str  # path in the repository
    size: int
    sha256: str | None  # LFS files' digest, as the hub lists it


@dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str  # the commit pulled
    kind: str  # gguf | safetensors | onnx
    files: tuple[HubFile, ...]
    license: str | None
    folder: str = ""  # the ONNX subfolder, or ""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> dict[str, Any]:
        return {"hub": os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                "repo": self.repo, "revision": self.revision, "kind": self.kind,
                "folder": self.folder,
                "files": {f.name: f.sha256 for f in self.files}}


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`owner/name[@revision][:FILE]` -> (repo, revision, file)."""
    repo, _, selector = spec.partition(":")
    repo, _, revision = repo.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise PrepareError(f"{spec!r} is not a hub model: write OWNER/NAME, optionally "
                           "@REVISION and :FILE (a .gguf file or an ONNX subfolder)")
    return repo, revision or None, selector or None


def inspect(repo: str, revision: str | None, selector: str | None) -> HubSource:
    """What `repo` holds and which of its files a build needs."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except HfHubHTTPError as exc:
        raise PrepareError(f"{repo}: the hub answered {exc}") from exc
    except OSError as exc:
        raise PrepareError(f"{repo}: cannot reach the hub ({exc}); set HF_ENDPOINT for a "
                           "mirror") from exc
    listed = {s.rfilename: HubFile(s.rfilename, int(s.size or 0),
                                   s.lfs.sha256 if s.lfs is not None else None)
              for s in info.siblings or []}
    card = info.card_data.to_dict() if info.card_data is not None else {}  # type: ignore[no-untyped-call]
    licence = card.get("license")
    if licence is None and any(n.startswith("LICENSE") for n in listed):
        licence = "see LICENSE"
    commit = str(info.sha)
    ggufs = sorted(n for n in listed if n.endswith(".gguf"))
    if selector is not None and selector.endswith(".gguf") or (
            selector is None and ggufs and "config.json" not in listed
            and not any(n.endswith("genai_config.json") for n in listed)):
        chosen = selector or (ggufs[0] if len(ggufs) == 1 else None)
        if chosen is None:
            raise PrepareError(f"{repo} has {len(ggufs)} GGUF files; name one: "
                               f"npugate pull {repo}:FILE, FILE one of {', '.join(ggufs)}")
        if chosen not in listed:
            raise PrepareError(f"{repo} has no file {chosen!r}; its GGUF files: "
                               f"{', '.join(ggufs) or 'none'}")
        return HubSource(repo, commit, "gguf", (listed[chosen],), licence)
    configs = sorted(n for n in listed if n == "genai_config.json"
                     or n.endswith("/genai_config.json"))
    if configs and (selector is not None or "config.json" not in listed
                    or not any(n.endswith(".safetensors") for n in listed)):
        folders = sorted(n.rpartition("/")[0] for n in configs)
        folder = (selector or "").strip("/")
        if folder not in folders:
            if selector is not None or len(folders) != 1:
                raise PrepareError(f"{repo} has ONNX folders {', '.join(map(repr, folders))}; "
                                   f"name one: npugate pull {repo}:FOLDER")
            folder = folders[0]
        prefix = f"{folder}/" if folder else ""
        files = tuple(f for n, f in sorted(listed.items()) if n.startswith(prefix)
                      and "/" not in n[len(prefix):] and ONNX_FILES.match(n[len(prefix):]))
        return HubSource(repo, commit, "onnx", files, licence, folder)
    if "config.json" in listed and any(n.endswith(".safetensors") for n in listed):
        files = tuple(f for n, f in sorted(listed.items()) if "/" not in n and HF_FILES.match(n))
        return HubSource(repo, commit, "safetensors", files, licence)
    raise PrepareError(f"{repo} holds neither a GGUF file, a transformers folder "
                       "(config.json and .safetensors) nor an ONNX folder (genai_config.json)")


def download(source: HubSource, progress: Progress) -> Path:
    """The files of `source` in huggingface_hub's cache (a download that stopped resumes
    where it stopped), each checked against the sha256 the hub lists. Returns the snapshot
    folder (the cache's view of that commit)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    snapshot: Path | None = None
    for i, f in enumerate(source.files, 1):
        progress(f"  [{i}/{len(source.files)}] {f.name} ({_size(f.size)})")
        try:
            path = Path(hf_hub_download(source.repo, f.name, revision=source.revision))
        except (HfHubHTTPError, OSError) as exc:
            raise PrepareError(f"downloading {source.repo}/{f.name} failed: {exc}; run the "
                               "same pull again to resume") from exc
        snapshot = path.parents[len(Path(f.name).parts) - 1]
        if f.sha256 is not None:
            actual = sha256_file(path)
            if actual != f.sha256:
                blob = path.resolve()
                path.unlink()
                blob.unlink(missing_ok=True)
                raise PrepareError(f"{source.repo}: {f.name} has sha256 {actual}, but the hub "
                                   f"lists {f.sha256}. The download was deleted; nothing was "
                                   "built. Pull again, or check the mirror (HF_ENDPOINT).")
    assert snapshot is not None
    progress("  every file matches the hub's sha256")
    return snapshot


def model_id_for(repo: str, source: HubSource, precision: str) -> str:
    name = repo.rpartition("/")[2].lower()
    if source.kind == "gguf":
        name = Path(source.files[0].name).stem.lower()
    elif source.kind == "onnx" and source.folder:
        name = f"{name}-{source.folder.rpartition('/')[2].lower()}"
    if source.kind != "onnx" and precision != "int8":
        name = f"{name}-{precision}"
    return re.sub(r"[^a-z0-9._-]+", "-", name).strip("-")


def pull(spec: str, models_dir: Path, progress: Progress, *, precision: str = "int8",
         name: str | None = None, ask: Callable[[str], bool] | None = None) -> Path:
    """Pull `spec` and build it into `models_dir`; `ask` confirms a large download (None:
    no question). Returns the model folder."""
    if precision not in PRECISIONS:
        raise PrepareError(f"precision must be one of {', '.join(PRECISIONS)}")
    repo, revision, selector = parse_spec(spec)
    source = inspect(repo, revision, selector)
    model_id = name or model_id_for(repo, source, precision)
    progress(f"[{model_id}] {repo} at {source.revision[:12]}: {source.kind}, "
             f"{len(source.files)} files, {_size(source.size)}, licence: "
             f"{source.license or 'not stated: check the repository before use'}")
    if ask is not None and source.size > ASK_ABOVE_BYTES and not ask(
            f"Download {_size(source.size)} from {repo}?"):
        raise PrepareError("not downloaded")

    def build(scratch: Path, out: Path, step: Progress) -> dict[str, Any]:
        return _build(source, precision, scratch, out, step)

    description = (f"{repo} ({source.kind}" + ("" if source.kind == "onnx"
                                              else f", built {precision}") + ") from the hub")
    recipe = Recipe(model_id, "chat", description, build,
                    identity={"source": source.describe(), "precision": precision})
    return build_model(recipe, models_dir, progress)


def _build(source: HubSource, precision: str, scratch: Path, out: Path,
           progress: Progress) -> dict[str, Any]:
    snapshot = download(source, progress)
    recipe: list[str]
    if source.kind == "onnx":
        for f in source.files:
            _place(snapshot / f.name, out / Path(f.name).relative_to(source.folder or "."))
        from inference.chat.spec import ChatModelSpec
        from inference.errors import ModelLoadError

        try:
            ChatModelSpec.from_folder(out)
        except (OSError, ValueError, KeyError, ModelLoadError) as exc:
            raise PrepareError(f"{source.repo}/{source.folder}: not a chat model in the "
                               f"Phi-3 ONNX layout: {exc}") from exc
        return {"license": source.license, "source": source.describe(),
                "recipe": ["a ready ONNX folder (Phi-3 layout), copied as published"]}
    if source.kind == "gguf":
        hf_dir = scratch / "hf"
        run_step(progress, "  dequantizing GGUF to a transformers folder (fp32)",
                 [sys.executable, "-m", "inference.prepare.convert", "gguf-to-hf",
                  str(snapshot / source.files[0].name), str(hf_dir)], scratch / "build.log")
        recipe = ["gguf -> transformers (fp32) via transformers' GGUF loader"]
    else:
        hf_dir = snapshot
        recipe = ["transformers folder as published"]
    options = ("is_symmetric=false",) if precision == "int8" else ()
    onnx_builder(progress, hf_dir, out, scratch, precision, *options)
    checks = check_build(progress, hf_dir, out, scratch, " ")
    for licence in (p for p in hf_dir.iterdir() if p.name.startswith("LICENSE")):
        _place(licence, out / licence.name)
    recipe += [f"transformers -> ONNX {precision} (cpu) via onnxruntime_genai.models.builder "
               "with prune_lm_head=true",
               f"checked against the fp32 transformers model (top-1 >= {CHAT_MIN_TOP1}) "
               "and by the quality gate"]
    return {"license": source.license, "source": source.describe(), "recipe": recipe,
            **checks}


def _place(src: Path, dest: Path) -> None:
    """A real file in the model folder (never a link into the hub's cache, which the server
    would refuse): a hard link where the file system allows, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    real = src.resolve()
    try:
        os.link(real, dest)
    except OSError:
        shutil.copyfile(real, dest)


def _size(n: int) -> str:
    """Bytes as a person reads them: 812 bytes, 13.4 MB, 1.2 GB."""
    if n < 1000:
        return f"{n} bytes"
    scaled, unit = next((n / 1000 ** p, u) for p, u in ((3, "GB"), (2, "MB"), (1, "KB"))
                        if n >= 1000 ** p)
    return f"{scaled:.1f} {unit}"
