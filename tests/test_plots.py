import numpy as np
from PIL import Image

from pneumo_eval import plots


def test_every_plot_is_a_valid_png(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    paths = [
        plots.confusion_matrix_png(y, s, 0.5, tmp_path / "cm.png"),
        plots.roc_png(y, s, 0.5, 0.9, tmp_path / "roc.png"),
        plots.pr_png(y, s, 0.8, tmp_path / "pr.png"),
        plots.calibration_png(y, s, 0.1, tmp_path / "cal.png"),
        plots.histogram_png(y, s, 0.5, tmp_path / "hist.png"),
        plots.gradcam_png(rng.integers(0, 255, (2, 16, 16, 1)), rng.random((2, 16, 16)),
                          ["a", "b"], tmp_path / "gc.png"),
    ]
    for path in paths:
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100
    assert not list(tmp_path.glob("*.partial*"))
