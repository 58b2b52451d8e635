"""The shipped classifier at run time: a LiteRT (TFLite) network and its model card.

The worker never imports TensorFlow: LiteRT starts in milliseconds and keeps a worker
process small. Training writes ``model.tflite`` next to ``model.keras``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.errors import UserError
from worker.imaging.pipeline import PREPROCESSING_VERSION

CLASS_NAMES = ("normal", "covid")  # the sigmoid output is the probability of the second
CARD_FILE = "model_card.json"
TFLITE_FILE = "model.tflite"
KERAS_FILE = "model.keras"


MAX_MODEL_VERSION = 64  # the width of the results tables' model_version column


class ModelError(UserError):
    """The model folder is missing or inconsistent."""


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    input_size: int
    preprocessing_version: str
    threshold: float
    class_names: tuple[str, ...]
    raw: dict[str, Any]

    @property
    def model_version(self) -> str:
        return f"{self.name}-{self.version}"


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise ModelError(f"no model card at {path} (is --model / CXR_MODEL a model folder?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {path} cannot be read: {exc}") from exc
    try:
        card = ModelCard(
            name=str(raw["name"]),
            version=str(raw["version"]),
            input_size=int(raw["input_size"]),
            preprocessing_version=str(raw["preprocessing_version"]),
            threshold=float(raw["threshold"]),
            class_names=tuple(raw["class_names"]),
            raw=raw,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"model card {path} lacks a valid field: {exc}") from exc
    if len(card.model_version) > MAX_MODEL_VERSION:
        # the results' key column: cut, two versions sharing 64 characters would be one
        raise ModelError(
            f"model card {path}: name-version {card.model_version!r} is longer than "
            f"{MAX_MODEL_VERSION} characters"
        )
    check_compatible(card, path)
    return card


def check_compatible(card: ModelCard, path: Path) -> None:
    """A model trained on other inputs or other classes would be run without complaint
    and give confident wrong answers."""
    if card.preprocessing_version != PREPROCESSING_VERSION:
        raise ModelError(
            f"model card {path} is for preprocessing version {card.preprocessing_version}; "
            f"this release computes version {PREPROCESSING_VERSION} (retrain the model, or "
            "run the release it was trained with)"
        )
    if not 0.0 < card.threshold < 1.0:  # NaN too: a card edited by hand
        raise ModelError(
            f"model card {path} has threshold {card.threshold}; it must lie between 0 and 1"
        )
    if card.class_names != CLASS_NAMES:
        raise ModelError(
            f"model card {path} names classes {list(card.class_names)}; this release reads "
            f"the output as the probability of {CLASS_NAMES[1]} against {CLASS_NAMES[0]}"
        )


class Classifier:
    """COVID-19 probability for a batch of model inputs, shape (N, S, S, 1)."""

    def __init__(self, model_dir: Path, threshold: float | None = None, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.card = read_card(model_dir)
        self.threshold = self.card.threshold if threshold is None else threshold
        tflite = Path(model_dir) / TFLITE_FILE
        if not tflite.is_file():
            raise ModelError(f"no {TFLITE_FILE} in {model_dir}")
        try:
            self._interpreter = Interpreter(model_path=str(tflite), num_threads=threads)
        except ValueError as exc:  # a truncated copy, a Git LFS pointer
            raise ModelError(f"{tflite} is not a TFLite model: {exc}") from None
        details = self._interpreter.get_input_details()[0]
        size = self.card.input_size
        shape = [int(n) for n in details["shape"][1:]]
        if shape != [size, size, 1]:
            raise ModelError(
                f"{tflite} takes inputs of shape {shape}, its card "
                f"says {size} px: the folder mixes two trainings (train again into it)"
            )
        self._input = details["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = 0

    @property
    def input_size(self) -> int:
        return self.card.input_size

    @property
    def model_version(self) -> str:
        return self.card.model_version

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities of the positive class, one per input."""
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float32)
        if len(batch) != self._batch:
            self._interpreter.resize_tensor_input(self._input, list(batch.shape))
            self._interpreter.allocate_tensors()
            self._batch = len(batch)
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(batch, dtype=np.float32))
        self._interpreter.invoke()
        return np.asarray(self._interpreter.get_tensor(self._output), dtype=np.float32).reshape(-1)
