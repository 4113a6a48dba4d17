# syntax=docker/dockerfile:1
# isrgate container image: build with cargo, run as a non-root user on Debian slim.
#
#   docker build -t isrgate .
#   docker run --rm -p 8080:8080 -p 9091:9091 \
#     -e ISRGATE__UPSTREAM__REPLICAS=http://next-1:3000,http://next-2:3000 isrgate

FROM rust:1-bookworm AS build
WORKDIR /src
# The whole context (minus .dockerignore) rather than a list of paths: cargo refuses a manifest
# whose declared targets ([[bench]], [[test]], ...) have no file, so everything the manifest may
# point at comes along, whatever targets are added later.
COPY . .
# Cache mounts keep the registry and the target dir between builds; the binary is copied out
# because the mounted target dir is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -m 0755 target/release/isrgate /usr/local/bin/isrgate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 isrgate \
    && useradd --system --uid 10001 --gid isrgate --no-create-home --shell /usr/sbin/nologin isrgate
COPY --from=build /usr/local/bin/isrgate /usr/local/bin/isrgate
COPY config/isrgate.toml /etc/isrgate/isrgate.toml
ENV ISRGATE_CONFIG=/etc/isrgate/isrgate.toml
# The admin listener defaults to 127.0.0.1:9091, which nothing outside the container can reach;
# bind it on all interfaces so the orchestrator's /healthz and /readyz probes work. Do not
# publish this port to the internet: it has no authentication. The environment beats the file,
# so to change it set this variable (e.g. `-e ISRGATE__ADMIN__LISTEN=` disables the listener),
# not admin.listen in a mounted config.
ENV ISRGATE__ADMIN__LISTEN=0.0.0.0:9091
USER isrgate:isrgate
EXPOSE 8080 9091
# Exec form: isrgate is PID 1 and receives SIGTERM itself, keeps accepting for
# listen.accept_grace (5 s by default), then drains for listen.shutdown_grace (30 s); give
# `docker stop -t` / the orchestrator more than both (deploy/kubernetes: README "Kubernetes").
ENTRYPOINT ["isrgate"]
CMD ["serve"]
