# The two user commands (see README.md): `make demo` and `make test`; `make docs` builds the
# documentation site into docs/_build/html.
# Both first run tools/setup_env.sh, which creates .venv on the first run (the mmcv ops build takes
# 10-20 minutes on 2 cores, once) and returns in about a second afterwards.
#
#   make demo [DEMO_CONFIG=configs/demo/...py] [DEMO_WORK_DIR=work_dirs/demo] [DEMO_TRAIN_ARGS='--cfg-options ...']
#   make test [PYTEST_ARGS='-m "not slow"']
#   make docs [DOCS_OUT=docs/_build/html]

SHELL := /bin/bash
PYTHON := .venv/bin/python
DEMO_CONFIG ?= configs/demo/faster-rcnn_r18_fpn_demo-shapes.py
DEMO_WORK_DIR ?= work_dirs/demo
PYTEST_ARGS ?=
DEMO_TRAIN_ARGS ?=
DOCS_OUT ?= docs/_build/html

.PHONY: demo test docs

define DEMO_DATA_PY
import sys, time
import cbn_mmdet, cbn_mmdet_demo
from mmengine.config import Config
from mmdet.registry import DATASETS
from mmdet.utils import register_all_modules
register_all_modules()
cfg = Config.fromfile(sys.argv[1])
t = time.time()
for split in ('train_dataloader', 'val_dataloader'):
    ds = DATASETS.build(cfg[split].dataset)
    print(f'[demo] {split}: {len(ds)} images under {ds.data_root}')
print(f'[demo] data ready ({time.time() - t:.0f} s)')
endef
export DEMO_DATA_PY

demo:
	tools/setup_env.sh
	@# Generate the config's demo data if missing, with exactly the config's generation arguments
	@# (building its train and val datasets does that; see DemoShapesDataset).
	$(PYTHON) -c "$$DEMO_DATA_PY" $(DEMO_CONFIG)
	$(PYTHON) tools/train.py $(DEMO_CONFIG) --work-dir $(DEMO_WORK_DIR) $(DEMO_TRAIN_ARGS)
	@ckpt=$$(cat $(DEMO_WORK_DIR)/last_checkpoint) && echo "[demo] COCO evaluation of $$ckpt" && \
	  $(PYTHON) tools/test.py $(DEMO_CONFIG) $$ckpt --work-dir $(DEMO_WORK_DIR)/test 2>&1 \
	  | tee $(DEMO_WORK_DIR)/test.log | grep -E 'Average (Precision|Recall)|Evaluating|bbox_mAP|segm_mAP'; \
	  exit $${PIPESTATUS[0]}

test:
	tools/setup_env.sh
	@$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit code 5): failing" >&2; fi; \
	  exit $$rc

# The tables generated from their data files first, then the site with warnings as errors (as the
# suite builds it).
docs:
	tools/setup_env.sh
	$(PYTHON) tools/docs_tables.py
	$(PYTHON) -m sphinx -W --keep-going -b html docs $(DOCS_OUT)
	@echo "[docs] open $(DOCS_OUT)/index.html"
