# The two user commands (see README.md): `make demo` and `make test`.
# Both first run tools/setup_env.sh, which creates .venv on the first run (the mmcv ops build takes
# 16-30 minutes on 2 cores, once) and returns in about a second afterwards.
#
#   make demo [DEMO_CONFIG=configs/demo/...py] [DEMO_WORK_DIR=work_dirs/demo]
#   make test [PYTEST_ARGS='-m "not slow"']

SHELL := /bin/bash
PYTHON := .venv/bin/python
DEMO_CONFIG ?= configs/demo/faster-rcnn_r18_fpn_demo-shapes.py
DEMO_WORK_DIR ?= work_dirs/demo
PYTEST_ARGS ?=

.PHONY: demo test

demo:
	tools/setup_env.sh
	$(PYTHON) tools/make_demo_data.py
	$(PYTHON) tools/train.py $(DEMO_CONFIG) --work-dir $(DEMO_WORK_DIR)
	@ckpt=$$(cat $(DEMO_WORK_DIR)/last_checkpoint) && echo "[demo] COCO evaluation of $$ckpt" && \
	  $(PYTHON) tools/test.py $(DEMO_CONFIG) $$ckpt --work-dir $(DEMO_WORK_DIR)/test 2>&1 \
	  | tee $(DEMO_WORK_DIR)/test.log | grep -E 'Average (Precision|Recall)|Evaluating|bbox_mAP|segm_mAP'; \
	  exit $${PIPESTATUS[0]}

test:
	tools/setup_env.sh
	@$(PYTHON) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit code 5): failing" >&2; fi; \
	  exit $$rc
