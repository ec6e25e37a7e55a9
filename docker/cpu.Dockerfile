# syntax=docker/dockerfile:1
# CPU node image: the Ray head (it runs the sweep driver and takes no trials) and the KubeRay
# submitter. The repository at /app, its environment from requirements.lock (`make setup`:
# tensorflow-cpu, ray[default] for the Jobs API, the fused kernels) and Fashion-MNIST (`make data`:
# Debian's dataset-fashion-mnist). docker/gpu.Dockerfile is the same from requirements-gpu.lock.
# Build (and push) both from the repository root: make images REGISTRY=registry.example.com/you [PUSH=1]
FROM python:3.11-slim-bookworm
ARG DEBIAN_FRONTEND=noninteractive
# What the Makefile's targets need: make and a C++17 compiler for the kernels (no git: the commit
# comes in as STUDY_GIT_COMMIT); and what `ray up`'s launcher needs in a container: rsync (it copies
# its files in with `rsync -e 'docker exec -i'`) and ssh (the head's autoscaler reaches the workers).
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends make g++ openssh-client rsync \
    && rm -rf /var/lib/apt/lists/*
# The commit the image is built from (make images passes it), refused empty before the long steps.
ARG STUDY_GIT_COMMIT
ARG STUDY_GIT_DIRTY=unknown
RUN test -n "$STUDY_GIT_COMMIT" || { echo "error: STUDY_GIT_COMMIT unset: build with make images"; exit 2; }
WORKDIR /app
COPY . .
# The kernels' target: AVX2 without FMA, the Makefile's choice on x86-64, whatever CPU builds the
# image (it runs on others). --build-arg KERNEL_ARCH= for the compiler's default.
ARG KERNEL_ARCH="-mavx2 -mno-fma"
RUN --mount=type=cache,target=/root/.cache/pip make setup data && rm -rf /var/lib/apt/lists/*
# The runs' provenance (no .git inside); the data is in the image, so nothing is downloaded.
ENV STUDY_GIT_COMMIT=$STUDY_GIT_COMMIT STUDY_GIT_DIRTY=$STUDY_GIT_DIRTY STUDY_OFFLINE=1 \
    PATH=/app/.venv/bin:$PATH
