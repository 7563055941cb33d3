# The Tidepool image: `docker build -t ghcr.io/tidepool-rs/tidepool:0.1.0 .` (or podman/buildah).
# The StatefulSet in config/k8s/ runs this image as uid 65532 with a read-only root filesystem.

# Build stage: the release binary, with the Cargo.lock versions.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tidepool \
    && install -D -m 0755 target/release/tidepool /out/tidepool

# Runtime stage: glibc and CA roots only, no shell, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tidepool /usr/local/bin/tidepool
COPY config/node.toml /etc/tidepool/node.toml
USER 65532:65532
# QUIC (peers and clients) and admin HTTP (/metrics, /livez, /readyz).
EXPOSE 7400/udp 7401/tcp
ENTRYPOINT ["/usr/local/bin/tidepool"]
CMD ["node", "run", "--config", "/etc/tidepool/node.toml"]
