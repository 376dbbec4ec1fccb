# The two user commands (see README.md): `make demo` and `make test`; `make docs` builds the
# documentation site into docs/_build/html.
# Both first run tools/setup_env.sh, which creates .venv on the first run (the mmcv ops build takes
# 10-20 minutes on 2 cores, once) and returns in about a second afterwards.
#
#   make demo [DEMO_CONFIG=configs/demo/...py] [DEMO_WORK_DIR=work_dirs/demo] [DEMO_TRAIN_ARGS='--cfg-options ...']
#     (DEMO_CONFIG: a detection or a classification demo config)
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
import importlib, sys, time
import cbn_mmdet
from mmengine.config import Config
cfg = Config.fromfile(sys.argv[1])
# the config's toolbox (mmdet for detection, mmpretrain for classification) owns its datasets
scope = cfg.get('default_scope', 'mmdet')
importlib.import_module(f'{scope}.utils').register_all_modules()
DATASETS = importlib.import_module(f'{scope}.registry').DATASETS
t = time.time()
for split in ('train_dataloader', 'val_dataloader'):
    ds = DATASETS.build(cfg[split].dataset)
    print(f'[demo] {split}: {len(ds)} images under {ds.data_root}')
print(f'[demo] data ready ({time.time() - t:.0f} s)')
with open(sys.argv[2], 'w') as f:
    f.write(scope)
endef
export DEMO_DATA_PY

# What the evaluation prints: COCO's table for a detector, top-1 accuracy for a classifier.
DEMO_RESULT_LINES = Average (Precision|Recall)|Evaluating|bbox_mAP|segm_mAP|accuracy/top1

demo:
	tools/setup_env.sh
	@mkdir -p $(DEMO_WORK_DIR)
	@# Generate the config's demo data if missing, with exactly the config's generation arguments
	@# (building its train and val datasets does that; see DemoShapesDataset and
	@# DemoShapesClassification).
	$(PYTHON) -c "$$DEMO_DATA_PY" $(DEMO_CONFIG) $(DEMO_WORK_DIR)/scope
	$(PYTHON) tools/train.py $(DEMO_CONFIG) --work-dir $(DEMO_WORK_DIR) $(DEMO_TRAIN_ARGS)
	@ckpt=$$(cat $(DEMO_WORK_DIR)/last_checkpoint) && \
	  if [ "$$(cat $(DEMO_WORK_DIR)/scope)" = mmpretrain ]; then what="top-1 accuracy"; \
	  else what="COCO evaluation"; fi && \
	  echo "[demo] $$what of $$ckpt" && \
	  $(PYTHON) tools/test.py $(DEMO_CONFIG) $$ckpt --work-dir $(DEMO_WORK_DIR)/test 2>&1 \
	  | tee $(DEMO_WORK_DIR)/test.log | grep -E '$(DEMO_RESULT_LINES)'; \
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
