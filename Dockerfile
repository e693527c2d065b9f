# Both stages are Debian 13 (trixie): the binary links against the build
# stage's glibc and runs on the final stage's, so the two must be the same
# release (tests/deploy.rs checks). Distroless supports a Debian release's
# images until a year after the next release (its SUPPORT_POLICY.md), so
# cc-debian12 ends in 2026.
#
# Build stage: dependencies first, in a layer of their own, so a code change
# rebuilds only Skywatch itself.
FROM rust:1-slim-trixie AS build
WORKDIR /src
# The workspace's manifests and a stub source for each package: enough for
# cargo to load the workspace and build every dependency of skywatch.
COPY Cargo.toml Cargo.lock ./
COPY pubsub-test-server/Cargo.toml pubsub-test-server/
COPY loadgen/Cargo.toml loadgen/
RUN mkdir -p src pubsub-test-server/src loadgen/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch pubsub-test-server/src/lib.rs \
    && echo 'fn main() {}' > loadgen/src/main.rs \
    && cargo build --release --locked --bin skywatch \
    && rm -rf src
# Skywatch itself. The test and benchmark tools keep their stubs: cargo needs
# them to load the workspace but never builds them for the server. build.rs
# puts the map's outline (a generated file, committed) into the page; the
# stub build above had no build script, so none of this reaches its layer.
COPY src src
COPY build.rs index.html ./
COPY assets/world-map.svg assets/
# touch: the stub main.rs above is newer than the real one's mtime in the image.
RUN touch src/main.rs && cargo build --release --locked --bin skywatch

# Final stage: the binary alone (the page is built into it), glibc, CA
# certificates, and a non-root user. No key file is ever copied in: the key
# arrives as the GOOGLE_SERVICE_ACCOUNT_JSON secret at run time, or there is
# none at all (keyless, through the Fly Machine API's OIDC token).
FROM gcr.io/distroless/cc-debian13:nonroot
COPY --from=build /src/target/release/skywatch /usr/local/bin/skywatch
# The image's `nonroot` user, by number so the runtime need not look it up.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/skywatch"]
