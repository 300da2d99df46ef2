# gradwatch service image: the wheel built from this checkout, installed with its server and postgres extras into a
# slim Python, run as an unprivileged user. tests/test_packaging.py runs the two RUN lines marked "wheel:" and
# "install:" (the same commands, on its own paths) and then migrates, serves and ingests from the result.
#   docker build -t gradwatch .        docker run -p 127.0.0.1:8000:8000 gradwatch
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY . .
# wheel:
RUN python -m pip wheel --no-deps --no-cache-dir -q -w /dist /src

FROM python:${PYTHON_VERSION}-slim
COPY --from=build /dist /dist
# install:
RUN python -m pip install --no-cache-dir -q "gradwatch[server,postgres] @ file://$(ls /dist/gradwatch-*.whl)" \
    && rm -rf /dist
RUN useradd --system --create-home --home-dir /var/lib/gradwatch --uid 10001 gradwatch
USER gradwatch
WORKDIR /var/lib/gradwatch
# All interfaces inside the container (publish the port on 127.0.0.1 or a private network: there is no auth yet);
# SQLite in the home folder unless GRADWATCH_DATABASE_URL names PostgreSQL. Every GRADWATCH_* setting applies.
ENV GRADWATCH_HOST=0.0.0.0 \
    GRADWATCH_PORT=8000 \
    GRADWATCH_WORKERS=1 \
    GRADWATCH_DATABASE_URL=sqlite:////var/lib/gradwatch/gradwatch.db \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request as r; r.urlopen('http://127.0.0.1:${GRADWATCH_PORT}/readyz', timeout=4)"
ENTRYPOINT ["gradwatch"]
CMD ["serve"]
