"""Building blocks timm lacks, shared by several families and by the task heads."""
from .dense import DenseBackbone
from .feature_pyramid import SimpleFeaturePyramid, plain_feature_indices
from .patch_embed import PatchEmbed
from .pos_embed import resample_pos_embed_with_inner_token

__all__ = ["DenseBackbone", "PatchEmbed", "SimpleFeaturePyramid", "plain_feature_indices", "resample_pos_embed_with_inner_token"]
