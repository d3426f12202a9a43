"""Where a backbone's ImageNet weights come from, known without TensorFlow.

``--weights=imagenet`` (or ``auto`` for vgg16/resnet50) reads the Keras cache
(``$KERAS_HOME/models``, default ``~/.keras/models``) and downloads only when the host answers;
offline, :func:`imagenet_source` fails at once with where to put the file. The training job
asks it before it writes anything, so a missing file is a one-line error, not a half-started
run.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pneumo_data.common.errors import UserError

BACKBONES = {
    "vgg16": ("VGG16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"),
    "resnet50": ("ResNet50", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"),
}


class WeightsUnavailableError(UserError):
    """ImageNet weights are neither cached nor downloadable here."""


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def _network_reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def imagenet_source(name: str) -> tuple[Path, str]:
    """(the cached file, its download URL) for backbone ``name``. Raises
    WeightsUnavailableError at once (no hanging download) when the file is not cached and
    the host cannot be reached, saying where to put it."""
    _, filename, base_url = BACKBONES[name]
    cached = keras_cache_dir() / filename
    if cached.exists():
        return cached, base_url + filename
    host = base_url.split("/")[2]
    if not _network_reachable(host):
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} are not cached and {host} cannot be reached. "
            f"Offline: download {base_url}{filename} elsewhere and place it at {cached} "
            f"(or set KERAS_HOME), or pass --weights=/path/to/{filename}; "
            f"--weights=none trains from scratch.")
    return cached, base_url + filename
