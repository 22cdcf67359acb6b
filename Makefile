.PHONY: demo test setup lint

setup:
	bash scripts/setup.sh

# The main job, end to end, on the built-in default model.
demo: setup
	bash scripts/demo.sh

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check .
