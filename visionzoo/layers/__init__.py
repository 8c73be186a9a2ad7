"""Building blocks timm lacks, shared by several families and by the task heads."""
from .feature_pyramid import SimpleFeaturePyramid
from .pos_embed import resample_pos_embed_with_inner_token

__all__ = ["SimpleFeaturePyramid", "resample_pos_embed_with_inner_token"]
