"""TFDS builder ``chest_xray_pneumonia``: importing this package registers it with TFDS."""

from pneumo_data.tfds.chest_xray_pneumonia.chest_xray_pneumonia_dataset_builder import (
    Builder,
    ChestXrayConfig,
    ManualDirError,
)

__all__ = ["Builder", "ChestXrayConfig", "ManualDirError"]
