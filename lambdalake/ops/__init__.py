"""Running lambdalake: the embedded broker (:mod:`~lambdalake.ops.broker`), ``lambdalake demo``
(:mod:`~lambdalake.ops.demo`), ``lambdalake status`` (:mod:`~lambdalake.ops.status`), the
Airflow environment, DAG commands and ``lambdalake airflow`` (:mod:`~lambdalake.ops.airflow`)
and free loopback ports (:mod:`~lambdalake.ops.net`)."""
