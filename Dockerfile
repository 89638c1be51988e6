# One image for the operator and its Jobs: postcode-operator, reader-job and
# enricher-job on PATH (see charts/postcode-operator).
#
#   docker build -t postcode-operator:0.1.0 .

FROM rust:1-bookworm AS builder
# aws-lc-sys (rustls' crypto provider) builds with cc and falls back to cmake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cp target/release/postcode-operator target/release/reader-job target/release/enricher-job /out/

# glibc, libgcc and CA certificates, no shell, non-root user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/postcode-operator /out/reader-job /out/enricher-job /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["postcode-operator"]
CMD ["run"]
