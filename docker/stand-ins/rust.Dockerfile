# Stand-in for the official rust:<version>-bookworm image where no image registry is reachable: the same
# layout (rustup under /usr/local, cargo on PATH, a C toolchain) on a locally made debian:bookworm-slim.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG RUST_VERSION=1.95.0
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       ca-certificates curl gcc g++ libc6-dev make pkg-config \
    && rm -rf /var/lib/apt/lists/*
COPY certs/ /tmp/extra-certs/
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
# The extra CA serves only this download; the image keeps Debian's stock bundle, as the real one does.
RUN set -e; cp /etc/ssl/certs/ca-certificates.crt /tmp/bundle.crt; \
    for c in /tmp/extra-certs/*.crt; do [ -f "$c" ] && cat "$c" >> /tmp/bundle.crt; done; \
    curl --cacert /tmp/bundle.crt -fsSL -o /tmp/rustup-init \
      https://static.rust-lang.org/rustup/dist/x86_64-unknown-linux-gnu/rustup-init; \
    chmod +x /tmp/rustup-init; \
    SSL_CERT_FILE=/tmp/bundle.crt RUSTUP_USE_CURL=1 CURL_CA_BUNDLE=/tmp/bundle.crt \
      /tmp/rustup-init -y --no-modify-path --profile minimal --default-toolchain "$RUST_VERSION"; \
    rm -rf /tmp/rustup-init /tmp/bundle.crt /tmp/extra-certs "$CARGO_HOME/registry"; \
    chmod -R a+w "$RUSTUP_HOME" "$CARGO_HOME"; cargo --version
