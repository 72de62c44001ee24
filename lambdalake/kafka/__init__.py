"""Kafka as every layer reads it: clients with the settings' security, end offsets, refusals
and retry (:mod:`~lambdalake.kafka.clients`), and the columnar record-batch decoder with its
poison-batch and aborted-transaction handling (:mod:`~lambdalake.kafka.columnar`)."""
