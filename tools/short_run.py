"""Shrink a detector config for a short run on demo-shapes data (``tools/make_demo_data.py``).

Used by ``tools/smoke_config.py``, the detector studies in ``tools/analysis`` and the tool tests.
"""

#: proposals per image kept before and after the RPN's NMS (training, and testing with ``evaluate``)
FEW_PROPOSALS = dict(nms_pre=200, max_per_img=50)
#: detections per image kept in testing
FEW_DETECTIONS = 20
#: the loaders a config may have, and the split each reads
LOADERS = (('train_dataloader', 'train'), ('val_dataloader', 'val'), ('test_dataloader', 'val'))


def shrink_config(cfg, data_root: str, *, generate=False, image_size=None, batch_size: int = 2,
                  few_rois: bool = True, rpn_samples=None, rcnn_samples=None):
    """Point ``cfg``'s demo-shapes loaders at ``data_root`` and make the run small, in place.

    Every loader of ``cfg`` that is not None reads ``data_root`` laid out as
    ``make_demo_dataset`` writes it, in the main process; evaluators read its val annotations.

    Args:
        cfg: a loaded mmengine ``Config`` whose loaders read a ``DemoShapesDataset``.
        data_root: the dataset's root directory.
        generate: ``DemoShapesDataset``'s ``generate``: False (data already under ``data_root``) or
            ``make_demo_dataset``'s arguments.
        image_size: side of every ``Resize`` step; None keeps the config's.
        batch_size: images per training iteration.
        few_rois: keep :data:`FEW_PROPOSALS` proposals per image in training and, when ``cfg``
            has a val or test loader, also in testing, with :data:`FEW_DETECTIONS` detections.
        rpn_samples: anchors sampled per image for the RPN loss; None keeps the config's.
        rcnn_samples: RoIs sampled per image for the box head; None keeps the config's.
        (A single-stage detector has neither: ``few_rois`` then keeps few candidates and
        detections in testing.)

    Returns:
        ``cfg``.
    """
    root = data_root.rstrip('/') + '/'
    evaluates = False
    for name, split in LOADERS:
        loader = cfg.get(name)
        if loader is None:
            continue
        evaluates = evaluates or split == 'val'
        loader.num_workers = 0
        loader.persistent_workers = False
        dataset = loader.dataset
        dataset.data_root = root
        dataset.generate = generate
        dataset.ann_file = f'annotations/instances_{split}.json'
        dataset.data_prefix = dict(dataset.get('data_prefix') or {}, img=f'{split}/')
        if image_size is not None:
            for step in dataset.pipeline:
                if step['type'] == 'Resize':
                    step['scale'] = (image_size, image_size)
    for name in ('val_evaluator', 'test_evaluator'):
        if cfg.get(name) is not None:
            cfg[name].ann_file = root + 'annotations/instances_val.json'
    cfg.train_dataloader.batch_size = batch_size

    train_cfg, test_cfg = cfg.model.get('train_cfg'), cfg.model.get('test_cfg')
    if 'rpn' not in (train_cfg or {}):  # a single-stage detector: no proposals, no RoI sampling
        if few_rois and evaluates and test_cfg is not None:
            test_cfg.nms_pre = FEW_PROPOSALS['nms_pre']
            test_cfg.max_per_img = FEW_DETECTIONS
        return cfg
    if rpn_samples is not None:
        train_cfg.rpn.sampler.num = rpn_samples
    if rcnn_samples is not None:
        train_cfg.rcnn.sampler.num = rcnn_samples
    if few_rois:
        train_cfg.rpn_proposal.update(FEW_PROPOSALS)
        if evaluates:
            test_cfg.rpn.update(FEW_PROPOSALS)
            test_cfg.rcnn.max_per_img = FEW_DETECTIONS
    return cfg
