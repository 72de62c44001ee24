"""Kafka as every layer reads it: clients with the settings' security, end offsets, refusals
and retry (:mod:`~lambdalake.kafka.clients`), and the columnar record-batch decoder with its
poison-batch and aborted-transaction handling (:mod:`~lambdalake.kafka.columnar`).

Importing it mends kafka-python's read loop so that a broker's last answer before it closes
a connection (a refusal of our credentials) is not lost (:mod:`~lambdalake.kafka.read_before_close`)."""

from lambdalake.kafka.read_before_close import install as _install_read_before_close

_install_read_before_close()
