"""MODEL_OR_DIR -> what it is: a preset name, a checkpoint directory, or an exported artifact."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.config import PRESETS, ModelConfig, preset, read_config
from edgekit.errors import EdgekitError
from edgekit.families import family

# English prose for fidelity/perplexity checks of pretrained models (written for edgekit)
FIDELITY_TEXT = Path(__file__).resolve().parent / "data" / "fidelity_en.txt"
# Trained reference checkpoints shipped inside the package (bench/train_reference.py writes them)
REFERENCE = {name: Path(__file__).resolve().parent / "checkpoints" / name for name in ("v3-ref", "r1-ref")}


@dataclass
class Resolved:
    kind: str  # "preset" | "checkpoint" | "hf" | "onnx" | "engine"
    name: str
    cfg: ModelConfig
    path: Path | None = None
    manifest: dict = field(default_factory=dict)
    model: object = None  # an already loaded PyTorch model (edgekit.models.load_model returns it)

    @property
    def default_runtime(self) -> str:
        return {"onnx": "onnxruntime", "engine": "tensorrt"}.get(self.kind, "torch")

    def tokenizer(self):
        """The model's own tokenizer: tokenizer.json for Hugging Face models, else edgekit's byte tokenizer."""
        if family(self.cfg).tokenizer == "tokenizer.json":
            from edgekit.hfconfig import HFTokenizer

            return HFTokenizer(self.path, self.cfg)
        from edgekit.tokenizer import ByteTokenizer

        return ByteTokenizer()

    def fidelity_text(self, data: str | Path | None = None) -> tuple[list[int] | None, str]:
        """In-distribution token ids for int8 fidelity checks, and where they come from: the text file
        `data` (tokenized by the model's tokenizer); else, for a pretrained Hugging Face model, English prose
        shipped with edgekit (edgekit/data/fidelity_en.txt, written for it); for a checkpoint trained on
        edgekit's task suite (its manifest records held-out accuracy), task text; else none (seeded random
        tokens: random weights have no distribution to be in)."""
        if data is not None:
            ids = self.tokenizer().encode(read_text(data, "--fidelity-data"))
            return ids, f"text from {data} ({len(ids)} tokens)"
        if family(self.cfg).source == "huggingface":
            ids = self.tokenizer().encode(FIDELITY_TEXT.read_text(encoding="utf-8"))
            return ids, f"edgekit's English fidelity text ({len(ids)} tokens)"
        if self.manifest.get("heldout") is None:
            return None, "random tokens"
        from edgekit import tasks

        return tasks.text_ids(tasks.sample(tasks.test_split(), per_cell=2)), "task text (the model's training tasks)"


def resolve(target: str | Path) -> Resolved:
    from edgekit.artifact import MANIFEST, read_manifest

    path = Path(target)
    if not path.exists() and str(target) in REFERENCE:
        path = REFERENCE[str(target)]
    if not path.exists():
        if str(target) in PRESETS or "/" not in str(target):
            cfg = preset(str(target))  # raises 'unknown model' with the nearest match
            return Resolved("preset", cfg.name, cfg)
        raise EdgekitError(f"{target} does not exist", "pass a preset name (see 'edgekit models') or a directory")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from edgekit.hfconfig import gguf_cache_dir

        converted = gguf_cache_dir(path)
        if not converted.is_dir():
            raise EdgekitError(f"{path} has not been converted to a Hugging Face directory yet",
                               "the edgekit commands convert it on first use; from Python call "
                               "edgekit.models.gguf.source(path) first")
        path = converted
    if not path.is_dir():
        raise EdgekitError(f"{target} is a file", "pass the artifact or checkpoint directory that contains it")
    from edgekit.hfconfig import is_hf_dir, read_hf_config

    manifest = read_manifest(path) if (path / MANIFEST).is_file() else {}
    if not manifest and any((path / f).is_file() for f in ("model.onnx", "model.engine")):
        raise EdgekitError(f"{path} holds an exported model but no {MANIFEST}",
                           "an artifact needs the manifest its export wrote; export it again with 'edgekit export'")
    hf = is_hf_dir(path)  # a Hugging Face model directory, or an artifact exported from one
    cfg = read_hf_config(path, manifest.get("model")) if hf else read_config(path)
    if hf and not manifest:
        return Resolved("hf", cfg.name, cfg, path)
    kind = manifest.get("format", "checkpoint")
    if kind not in ("checkpoint", "onnx", "engine", "tensorrt"):
        raise EdgekitError(f"{path}: unknown artifact format {kind!r} in {MANIFEST}",
                           "formats: checkpoint, onnx, tensorrt; re-export the artifact with this edgekit")
    if kind == "tensorrt":
        kind = "engine" if (path / "model.engine").is_file() else "onnx"
    return Resolved(kind, manifest.get("model", cfg.name), cfg, path, manifest)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgekitError(f"cannot read {path}: {e}") from None


def read_text(path: str | Path, option: str) -> str:
    """A non-empty UTF-8 text file given on the command line as `option`; one-line errors otherwise."""
    path = Path(path)
    fix = f"pass {option} a plain UTF-8 text file"
    if path.is_dir():
        raise EdgekitError(f"{path} is a directory, not a text file", fix)
    if not path.is_file():
        raise EdgekitError(f"{path} does not exist", fix)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EdgekitError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", fix) from None
    except OSError as e:
        raise EdgekitError(f"cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise EdgekitError(f"{path} is empty", f"pass {option} a file with representative text")
    return text
