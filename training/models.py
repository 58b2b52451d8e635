"""Architectures by name.

``compact`` (the default) is a small CNN built for one-channel radiographs on a CPU:
[-1,1] centring, a strided 3x3 stem, four stages of 3x3 convolutions (16-32-64-128-192
channels) with batch normalisation and ReLU, max pooling between stages, global average
pooling, dropout and one sigmoid unit (about 0.84 M parameters; at the default 160 px
about 2-3 ms per image at batch 16 on one CPU core with LiteRT). ``alexnet``, ``vgg16``
and ``inceptionv3`` are the seed's comparison models; the Keras applications get the grey
channel repeated to three channels and are built with ``weights=None`` unless a local
weights file is given (there is never a download at run time).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.errors import UserError

ARCHITECTURES = ("compact", "residual", "alexnet", "vgg16", "inceptionv3")
DEFAULT_SIZES = {"compact": 160, "residual": 160, "alexnet": 224, "vgg16": 224, "inceptionv3": 299}
MIN_SIZES = {"compact": 32, "residual": 32, "alexnet": 96, "vgg16": 32, "inceptionv3": 75}
HEAD = "covid"  # the name of every network's sigmoid unit


def build_model(arch: str, image_size: int, weights: str | Path | None = None) -> Any:
    """A Keras model taking (N, S, S, 1) floats in [0, 1], returning (N, 1) P(covid)."""
    builders: dict[str, Callable[[int], Any]] = {
        "compact": compact,
        "residual": residual,
        "alexnet": alexnet,
        "vgg16": lambda s: _application("vgg16", s),
        "inceptionv3": lambda s: _application("inceptionv3", s),
    }
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if image_size < MIN_SIZES[arch]:
        raise ValueError(f"{arch} needs an image size of at least {MIN_SIZES[arch]}")
    model = builders[arch](image_size)
    if weights is not None:
        _load_weights(model, Path(weights))
    return model


def compact(size: int, width: int = 16, dropout: float = 0.3) -> Any:
    import keras
    from keras import layers

    def conv_bn(x: Any, filters: int, stride: int = 1, name: str = "") -> Any:
        x = layers.Conv2D(
            filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
        )(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    inputs = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(2.0, offset=-1.0, name="centre")(inputs)  # [0,1] -> [-1,1]
    x = conv_bn(x, width, stride=2, name="stem")
    x = conv_bn(x, width * 2, name="s1a")
    x = layers.MaxPooling2D(name="s1_pool")(x)
    x = conv_bn(x, width * 4, name="s2a")
    x = conv_bn(x, width * 4, name="s2b")
    x = layers.MaxPooling2D(name="s2_pool")(x)
    x = conv_bn(x, width * 8, name="s3a")
    x = conv_bn(x, width * 8, name="s3b")
    x = layers.MaxPooling2D(name="s3_pool")(x)
    x = conv_bn(x, width * 12, name="s4a")
    x = conv_bn(x, width * 12, name="s4b")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = _probability(x)
    return keras.Model(inputs, outputs, name="cxr_compact")


def residual(
    size: int,
    widths: tuple[int, ...] = (32, 64, 128, 192),
    blocks: tuple[int, ...] = (1, 2, 2, 1),
    dropout: float = 0.3,
) -> Any:
    """A small ResNet for one-channel radiographs: two strided 3x3 convolutions take the
    image to 1/4 resolution at once (full-resolution feature maps are where a CPU's time
    goes), then basic residual blocks, one stage per width, halving resolution between
    stages. At 160 px: about 1.27 M parameters and ~30% less training compute than
    ``compact``."""
    import keras
    from keras import layers

    def conv_bn(x: Any, filters: int, stride: int, name: str, relu: bool = True) -> Any:
        x = layers.Conv2D(
            filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
        )(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    def block(x: Any, filters: int, stride: int, name: str) -> Any:
        y = conv_bn(x, filters, stride, f"{name}a")
        y = conv_bn(y, filters, 1, f"{name}b", relu=False)
        if stride != 1 or x.shape[-1] != filters:
            x = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
            x = layers.BatchNormalization(name=f"{name}_proj_bn")(x)
        return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, y]))

    inputs = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(2.0, offset=-1.0, name="centre")(inputs)
    x = conv_bn(x, 24, 2, "stem1")
    x = conv_bn(x, widths[0], 2, "stem2")
    for stage, (filters, count) in enumerate(zip(widths, blocks, strict=True)):
        for k in range(count):
            stride = 2 if stage > 0 and k == 0 else 1
            x = block(x, filters, stride, f"s{stage + 1}b{k + 1}")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = _probability(x)
    return keras.Model(inputs, outputs, name="cxr_residual")


def alexnet(size: int) -> Any:
    """The seed's AlexNet (Krizhevsky et al. 2012 layout, batch norm instead of LRN)."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1), name="image")
    x = layers.Concatenate(name="to_rgb")([inputs, inputs, inputs])
    x = layers.Conv2D(96, 11, strides=4, activation="relu", name="conv1")(x)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = layers.Conv2D(256, 5, padding="same", activation="relu", name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool2")(x)
    x = layers.Conv2D(384, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.Conv2D(384, 3, padding="same", activation="relu", name="conv4")(x)
    x = layers.Conv2D(256, 3, padding="same", activation="relu", name="conv5")(x)
    x = layers.MaxPooling2D(3, strides=2, name="pool5")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(4096, activation="relu", name="fc6")(x)
    x = layers.Dropout(0.5, name="drop6")(x)
    x = layers.Dense(4096, activation="relu", name="fc7")(x)
    x = layers.Dropout(0.5, name="drop7")(x)
    outputs = _probability(x)
    return keras.Model(inputs, outputs, name="alexnet")


def _application(name: str, size: int) -> Any:
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1), name="image")
    x = layers.Concatenate(name="to_rgb")([inputs, inputs, inputs])
    x = layers.Rescaling(255.0, name="to_255")(x)
    if name == "vgg16":
        x = keras.applications.vgg16.preprocess_input(x)
        base = keras.applications.VGG16(
            include_top=False, weights=None, input_shape=(size, size, 3)
        )
    else:
        x = keras.applications.inception_v3.preprocess_input(x)
        base = keras.applications.InceptionV3(
            include_top=False, weights=None, input_shape=(size, size, 3)
        )
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    outputs = _probability(x)
    return keras.Model(inputs, outputs, name=name)


def _load_weights(model: Any, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found (no downloads at run time)")
    try:
        _load_whole_or_base(model, path)
    except (ValueError, KeyError) as exc:
        raise UserError(
            f"{path} does not match {model.name} (weights of another architecture?)"
        ) from exc


def _load_whole_or_base(model: Any, path: Path) -> None:
    """Whole-model weights (``.weights.h5``) or an ImageNet-style base (no top) file."""
    try:
        model.load_weights(str(path))
    except (ValueError, KeyError):
        base = next((layer for layer in model.layers if hasattr(layer, "layers")), None)
        if base is None:
            raise
        base.load_weights(str(path), skip_mismatch=False)


def _probability(x: Any) -> Any:
    """The sigmoid unit, always computed in float32 (under a mixed bfloat16 policy a bf16
    probability would have 8 bits of mantissa)."""
    from keras import layers

    return layers.Dense(1, activation="sigmoid", dtype="float32", name=HEAD)(x)


def is_classifier(model: Any, size: int) -> bool:
    """A whole network of this module at ``size``: the (S,S,1) image in, the covid unit out.
    (The application base nested in vgg16 / inceptionv3 takes three channels and ends in
    a feature map.)"""
    return tuple(model.inputs[0].shape[1:]) == (size, size, 1) and model.layers[-1].name == HEAD


def feature_map(model: Any) -> Any:
    """The last 4-D feature map of ``model``'s own graph (for Grad-CAM): the input of the
    layer that pools or flattens it into a vector. For vgg16 / inceptionv3 it is the
    nested application's output, whose own layers are not in this graph."""
    for layer in reversed(model.layers):
        if hasattr(layer, "layers") or isinstance(layer.input, list):
            continue  # a nested model's own input, or a merge of several tensors
        if len(layer.input.shape) == 4 and len(layer.output.shape) == 2:
            return layer.input
    raise ValueError(f"{model.name} has no 4-D feature map to explain")
