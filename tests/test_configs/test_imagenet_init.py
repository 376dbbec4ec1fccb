"""The paper configs initialise the backbone from torchvision's ImageNet ResNet weights without
torchvision: the download is replaced by a file in torchvision's layout in the hub cache."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import cbn_mmdet  # noqa: F401

from conftest import REPO_ROOT as REPO  # noqa: E402


def _torchvision_layout_resnet(depth):
    """Random weights with the keys and shapes of torchvision's resnet<depth> (fc included)."""
    from mmdet.models.backbones import ResNet
    gen = torch.Generator().manual_seed(depth)
    state = {k: torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in ResNet(depth=depth).state_dict().items()}
    state['fc.weight'] = torch.randn(1000, 2048, generator=gen)
    state['fc.bias'] = torch.randn(1000, generator=gen)
    return state


@pytest.mark.parametrize('name', ['faster-rcnn_r50_fpn_cbn-all_1x_coco.py',
                                  'mask-rcnn_r50_fpn_cbn-head_1x_coco.py'])
def test_paper_config_loads_imagenet_weights_from_hub_cache(tmp_path, monkeypatch, name):
    from mmdet.registry import MODELS
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))

    def no_network(url, *args, **kwargs):
        raise AssertionError(f'tried to download {url}')

    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'cbn_paper', name))
    url = cfg.model.backbone.init_cfg.checkpoint  # every config's URL: test_paper_configs.py
    state = _torchvision_layout_resnet(50)
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.save(state, tmp_path / 'hub' / 'checkpoints' / osp.basename(url))

    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    model.init_weights()
    backbone = model.backbone.state_dict()
    for key in ('conv1.weight', 'bn1.running_var', 'layer4.2.conv3.weight',
                'layer2.0.downsample.0.weight', 'layer3.5.bn2.weight'):
        torch.testing.assert_close(backbone[key], state[key], rtol=0, atol=0, msg=key)
