# A CUDA PyTorch image that installs lowbit_amp with its test extras and runs the test suite on the GPU:
#   docker build -t lowbit-amp .
#   docker run --rm --gpus all lowbit-amp                 # the tests (GPU tests run when a GPU with FP8 is visible)
#   docker run --rm --gpus all lowbit-amp lowbit-amp      # the CLI demo (O0 vs O1 on the GPU)
# The base image's torch satisfies `torch>=2.11`, so pip installs no other torch build.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

WORKDIR /workspace/lowbit_amp
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Metadata first so the dependency layer is cached across source edits.
COPY pyproject.toml setup.py README.md ./
COPY lowbit_amp ./lowbit_amp
COPY configs ./configs
RUN python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && pip install -e ".[test]"

# Everything else (tests, examples, docs, tools, bench); the editable install picks up the same tree.
COPY . .

CMD ["python", "-m", "pytest", "-q"]
