"""Turn a training checkpoint into a deployable one: the model weights and ``meta``, nothing else.

    .venv/bin/python tools/model_converters/publish_model.py IN.pth OUT.pth

Like mmdet's ``tools/model_converters/publish_model.py``: of an mmengine runner checkpoint
(``epoch_N.pth`` / ``iter_N.pth``) only ``meta`` and ``state_dict`` are kept, so ``optimizer``,
``message_hub``, ``param_schedulers`` and keys written by hooks (``rng_state``,
``ema_state_dict``) are dropped. ``meta`` is kept whole: it is small, and mmdet's
``init_detector`` reads the class names from its ``dataset_meta``. In addition, the CBN history
(``<layer>.history_*``, the past iterations' statistics a CBN layer keeps for training) is removed
from ``state_dict``: inference does not use it, and without it the file loads with
``strict=True`` into the same architecture built with either BN or CBN (whose window then starts
empty). The file is written as ``OUT`` with the first 8 hex digits of its sha256 before the
extension (``x.pth`` -> ``x-1a2b3c4d.pth``) and the final path is printed; ``OUT`` itself is never
written, so neither an existing ``OUT`` nor ``IN`` is overwritten. The same input and ``OUT``
always give the same bytes, hence the same name.
"""
import argparse
import hashlib
import os
import os.path as osp
import shutil
import sys
import tempfile
import zipfile

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
import cbn_mmdet  # noqa: F401,E402  (torch.load of runner checkpoints: see cbn_mmdet.compat)
from cbn_mmdet.models.cbn import is_history_state_key  # noqa: E402

#: Top-level checkpoint keys that are published; everything else is training state.
KEEP_KEYS = ('meta', 'state_dict')


def parse_args():
    parser = argparse.ArgumentParser(
        description='Keep the weights and meta of a checkpoint, drop the training state and the '
        'CBN history, and save it as OUT-<sha256[:8]>.pth')
    parser.add_argument('in_file', help='input checkpoint (e.g. work_dirs/.../epoch_12.pth)')
    parser.add_argument('out_file', help='output name; the sha256 prefix is added before .pth')
    return parser.parse_args()


def is_history_key(key: str) -> bool:
    """Whether a state-dict key is a CBN history tensor (``<layer path>.history_mean`` etc.)."""
    return is_history_state_key(key)


def is_torch_file(path: str) -> bool:
    """Whether ``path`` has the layout of torch.save's output: a zip archive or, in the legacy
    format, a pickle (protocol 2 or later, so it starts with the PROTO opcode)."""
    with open(path, 'rb') as f:
        legacy = f.read(1) == b'\x80'
    return legacy or zipfile.is_zipfile(path)


def load_checkpoint(path: str) -> dict:
    """The checkpoint dict at ``path``; ValueError/FileNotFoundError with a readable message."""
    if not osp.exists(path):
        raise FileNotFoundError(f'input checkpoint {path} does not exist')
    if not osp.isfile(path):
        raise ValueError(f'input checkpoint {path} is not a file')
    if not is_torch_file(path):
        raise ValueError(f'{path} is not a torch checkpoint: it is neither a zip archive nor a '
                         'pickle, the two formats of torch.save (a truncated file looks like '
                         'this too)')
    try:
        checkpoint = torch.load(path, map_location='cpu')
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f'{path} could not be read as a torch checkpoint '
                         f'({type(err).__name__}: {err})') from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f'{path} holds a {type(checkpoint).__name__}, not a checkpoint dict '
                         "with 'meta' and 'state_dict'")
    state_dict = checkpoint.get('state_dict')
    if not isinstance(state_dict, dict):
        found = ', '.join(map(str, list(checkpoint)[:8])) + (', ...' if len(checkpoint) > 8 else '')
        what = 'no' if state_dict is None else f"a {type(state_dict).__name__} as its"
        raise ValueError(f"{path} has {what} 'state_dict' entry, so it is not an mmengine "
                         f'checkpoint (top-level keys: {found or "none"})')
    return checkpoint


def strip_checkpoint(checkpoint: dict):
    """``(published checkpoint, dropped top-level keys, dropped history keys)``.

    The state dict is filtered in place so that its ``_metadata`` (module versions, which the CBN
    and BN loaders read) is kept.
    """
    dropped_keys = [k for k in checkpoint if k not in KEEP_KEYS]
    state_dict = checkpoint['state_dict']
    history_keys = [k for k in state_dict if is_history_key(k)]
    for key in history_keys:
        del state_dict[key]
    published = {k: checkpoint[k] for k in KEEP_KEYS if k in checkpoint}
    return published, dropped_keys, history_keys


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def save_published(checkpoint: dict, out_file: str) -> str:
    """Save to ``<out stem>-<sha256[:8]>.pth``; returns that path.

    The file is written under its plain name in a temporary folder beside it (torch names the
    archive inside after the file, so the same checkpoint and OUT always give the same bytes).
    """
    out_dir = osp.dirname(osp.abspath(out_file))
    os.makedirs(out_dir, exist_ok=True)
    stem = out_file[:-len('.pth')] if out_file.endswith('.pth') else out_file
    tmp_dir = tempfile.mkdtemp(prefix='.publishing-', dir=out_dir)
    try:
        tmp_file = osp.join(tmp_dir, osp.basename(stem) + '.pth')
        torch.save(checkpoint, tmp_file)
        final_file = f'{stem}-{sha256_of(tmp_file)[:8]}.pth'
        os.replace(tmp_file, final_file)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final_file


def _size(path: str) -> str:
    size = osp.getsize(path)
    return f'{size / 2**20:.1f} MiB' if size >= 2**20 else f'{size / 2**10:.1f} KiB'


def describe_history(history_keys) -> str:
    layers = {k.rsplit('.', 1)[0] for k in history_keys}
    return (f'Removed {len(history_keys)} CBN history tensors of {len(layers)} CBN layers '
            '(not used for inference; a CBN model loading this file starts with an empty window)')


def process_checkpoint(in_file: str, out_file: str) -> str:
    checkpoint = load_checkpoint(in_file)
    published, dropped_keys, history_keys = strip_checkpoint(checkpoint)
    if dropped_keys:
        print(f'Removed top-level keys (training state): {", ".join(map(str, dropped_keys))}')
    print(describe_history(history_keys) if history_keys else 'No CBN history in the state dict')
    final_file = save_published(published, out_file)
    print(f'Kept {", ".join(published)}: {len(published["state_dict"])} state-dict entries, '
          f'{_size(final_file)} (input {_size(in_file)})')
    print(f'The published model is saved at {final_file}.')
    return final_file


def main():
    args = parse_args()
    try:
        process_checkpoint(args.in_file, args.out_file)
    except (OSError, ValueError) as err:  # missing, unreadable or unwritable paths, bad content
        sys.exit(f'publish_model.py: error: {err}')


if __name__ == '__main__':
    main()
