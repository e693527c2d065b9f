# Skywatch: the everyday commands. `make run` and `make test` are all a fresh
# machine needs; the rest are for development and deployment.

CARGO ?= cargo
PORT ?= 8080

.PHONY: run test build lint fmt docker deploy

## run: start one instance in local mode on http://localhost:$(PORT)
run:
	PORT=$(PORT) $(CARGO) run --release --locked --bin skywatch

## test: formatting, lints, then every unit and integration test
test:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) nextest run --workspace --locked --no-fail-fast

## build: the release binary, target/release/skywatch
build:
	$(CARGO) build --release --locked --bin skywatch

## lint: clippy with warnings as errors
lint:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## docker: build the container image (needs a Docker engine)
docker:
	docker build -t skywatch .

## deploy: deploy to Fly with fly.toml (needs flyctl and `fly auth login`)
deploy:
	fly deploy
