"""mmpretrain backbones whose normalizer is a ``norm_cfg``, where mmpretrain's own hard-code BN.

Importing this module registers them in mmpretrain's ``MODELS`` (it imports mmpretrain, so
``import cbn_mmdet`` does not import it; a config that uses them lists it in its
``custom_imports``). The layers are built at construction, so a model built for testing
(``tools/test.py``, which runs no training hooks) holds the same layers as the trained one.
"""
from typing import Optional

from mmcv.cnn import build_norm_layer
from mmpretrain.models.backbones.inception_v3 import BasicConv2d, InceptionV3
from mmpretrain.registry import MODELS

__all__ = ['InceptionV3WithNormCfg']


@MODELS.register_module()
class InceptionV3WithNormCfg(InceptionV3):
    """mmpretrain's ``InceptionV3`` with every ``BasicConv2d``'s norm built from ``norm_cfg``.

    mmpretrain's ``BasicConv2d`` creates ``nn.BatchNorm2d(out_channels, eps=0.001)`` in its code;
    here each of them (the auxiliary head's included) is replaced, right after construction, by
    ``build_norm_layer(norm_cfg, out_channels)``, under the same attribute name ``bn``, so the
    state-dict keys are mmpretrain's. The default ``norm_cfg`` builds that same BN.

    Args:
        norm_cfg (dict): mmcv's norm config, e.g. ``dict(type='GN', num_groups=16)`` (every width
            of Inception-v3 is a multiple of 16, not of 32: 48 and 80 are not).
        *args, **kwargs: ``InceptionV3``'s (``num_classes``, ``aux_logits``, ``dropout``,
            ``init_cfg``).
    """

    def __init__(self, *args, norm_cfg: Optional[dict] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm_cfg = dict(type='BN', eps=0.001) if norm_cfg is None else dict(norm_cfg)
        for block in self.modules():
            if isinstance(block, BasicConv2d):
                channels = block.bn.num_features
                try:
                    block.bn = build_norm_layer(self.norm_cfg, channels)[1]
                except ValueError as e:  # e.g. GroupNorm's groups not dividing the channels
                    raise ValueError(f'norm_cfg {self.norm_cfg} does not fit a layer of '
                                     f'{channels} channels: {e}') from e
