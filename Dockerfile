# One image for every lambdalake process in docker-compose.yml: the speed workers, the
# serving API and Airflow (api-server, scheduler, dag-processor; the scheduler's tasks run
# the Spark batch layer, so the image carries Java 17 for PySpark).
FROM python:3.11-slim-bookworm

# Java 17 for PySpark 4; procps because Spark's launcher scripts call `ps`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")" /usr/lib/jvm/lambdalake-java

ENV JAVA_HOME=/usr/lib/jvm/lambdalake-java \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PYSPARK_PYTHON=/usr/local/bin/python \
    PYSPARK_DRIVER_PYTHON=/usr/local/bin/python \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/lambdalake/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    LAMBDALAKE_LAKE_URI=/lake \
    LAMBDALAKE_HOME=/state

WORKDIR /opt/lambdalake

# Dependencies first, cached while only the code changes: install the project's pins from a
# skeleton (pyproject + an empty package), then the real code on top without dependencies.
# psycopg2 is Airflow's PostgreSQL driver for its metadata database.
COPY pyproject.toml requirements.lock README.md ./
COPY lambdalake/__init__.py lambdalake/__init__.py
RUN pip install -c requirements.lock ".[airflow]" "psycopg2-binary==2.9.13"

COPY lambdalake ./lambdalake
COPY batch ./batch
COPY speed ./speed
COPY serving ./serving
COPY generator ./generator
COPY dags ./dags
RUN pip install --no-deps --force-reinstall . \
    && useradd --uid 50000 --gid 0 --home-dir /state --no-create-home lambdalake \
    && mkdir -p /lake /state /opt/airflow/auth /opt/airflow/logs \
    && chown -R 50000:0 /lake /state /opt/airflow \
    && lambdalake --help > /dev/null \
    && java -version

USER 50000
CMD ["lambdalake", "--help"]
