# The Stoa server in a container (not used by CI).
#
#   docker build -t stoa .
#   docker run -d -p 8080:8080 -v stoa-data:/var/lib/stoa \
#     --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
#     --cap-add SYS_ADMIN stoa
#
# Python runs are sandboxed with bubblewrap, which needs user namespaces and mounts:
# Docker's default seccomp and AppArmor profiles refuse them, hence the options above
# (without them Python runs fail saying bubblewrap cannot create a sandbox; image runs
# are unaffected). Image and compose runs need an engine: mounting the host's
# /var/run/docker.sock gives the container root on the host.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p stoa --bin stoa

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap util-linux python3 python3-venv ca-certificates iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/stoa /usr/bin/stoa
ENV STOA_LISTEN=0.0.0.0:8080
EXPOSE 8080
VOLUME /var/lib/stoa
ENTRYPOINT ["/usr/bin/stoa", "server", "--data-dir", "/var/lib/stoa"]
