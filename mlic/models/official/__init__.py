"""Importers for published checkpoints, one per release family, each checkpoint filter beside its model.

- :mod:`.query2label`: the official Query2Label releases (SlongLiu/query2labels): ``load_query2label``,
  ``load_release``;
- :mod:`.ml_decoder`: the ML-Decoder releases (Alibaba-MIIL/ML_Decoder): ``load_ml_decoder``;
- :mod:`.tresnet`: the TResNet filter both use (timm's ``checkpoint_filter_fn``);
- :mod:`.release_file`: reading a release without unpickling code, and the strict key/shape check;
- :mod:`.coco`: COCO's class names in the releases' label order.
"""

from mlic.models.official.coco import COCO_CLASSES
from mlic.models.official.ml_decoder import load_ml_decoder
from mlic.models.official.query2label import load_query2label, load_release, read_official_config
from mlic.models.official.release_file import OfficialCheckpointError

__all__ = ["COCO_CLASSES", "OfficialCheckpointError", "load_ml_decoder", "load_query2label", "load_release",
           "read_official_config"]
