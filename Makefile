# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment from requirements.lock first (scripts/setup.sh, idempotent).
.PHONY: setup demo test test-unit bench clean

setup:
	@bash scripts/setup.sh >/dev/null
	@bash scripts/setup_triton.sh >/dev/null

demo: setup
	.venv/bin/home-mixer demo $(ARGS)

# two workers, a test file each at a time (pytest-xdist --dist loadfile: a module's fixtures stay in one process)
test: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadfile $(ARGS)

test-unit: setup
	.venv/bin/python -m pytest -q -m "not integration" $(ARGS)

bench: setup
	.venv/bin/python bench/hydration.py
	.venv/bin/python bench/mixer_latency.py
	.venv/bin/python bench/serving.py
	.venv/bin/python bench/feature_log.py
	.venv/bin/python bench/metrics.py

clean:
	@if [ -x .venv/bin/home-mixer ]; then .venv/bin/home-mixer clean; else rm -rf .state; fi
