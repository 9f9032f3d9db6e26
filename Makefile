# Two commands set everything up: `make demo` (install + a real end-to-end prune) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean

$(BIN)/prunec: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,coreml]' 'ruamel.yaml>=0.18' 'tabulate>=0.9' 'flatbuffers>=24' 'pandas>=2,<4'
	# ExecuTorch's wheel declares no torch pin: --no-deps keeps torch 2.14.1 (see pyproject's executorch extra)
	$(BIN)/pip install -q --no-deps executorch==1.5.1 torchao==0.18.0
	# ultralytics declares opencv-python (libGL) and nvidia-ml-py: --no-deps; its headless deps are in the test extra
	$(BIN)/pip install -q --no-deps ultralytics==8.4.190
	$(BIN)/python -c "import torch, executorch.runtime, coremltools, ultralytics, diffusers; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	touch $(BIN)/prunec

install: $(BIN)/prunec

demo: install
	mkdir -p out
	$(BIN)/prunec inspect torchvision:resnet50 --json > out/resnet50_groups.json
	$(BIN)/prunec torchvision:resnet50 --channels 0.5 -o out/resnet50_pruned.pt2 \
		--report out/resnet50_report.json --save-plan out/resnet50_plan.json

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) out
