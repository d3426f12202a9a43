"""TFDS views of pneumo data: prepared folders as TFDS datasets, and a TFDS builder.

* :mod:`pneumo_data.tfds.metadata`: the TFDS metadata prepare writes next to its shards
  (derived from ``manifest.json``, checked against it), so
  ``tfds.builder_from_directory(data_dir)`` reads a prepared folder as it is.
* :mod:`pneumo_data.tfds.features`: :class:`RawImage`, the TFDS image feature
  whose stored bytes are pneumo's ``raw`` encoding (no re-encoding of records).
* :mod:`pneumo_data.tfds.chest_xray_pneumonia`: a ``GeneratorBasedBuilder`` for
  the Kaggle chest X-ray folder (manual download), built with pneumo's plan and decode;
  it writes pneumo's ``manifest.json`` too.

This package is named ``tfds`` after what it serves; inside it TensorFlow
Datasets is always imported absolutely (``import tensorflow_datasets as tfds``),
never as a relative or bare ``tfds``. Importing the package, or
:mod:`~pneumo_data.tfds.metadata`, imports neither TensorFlow nor TFDS.
"""
