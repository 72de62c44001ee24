"""lambdalake: a Lambda-architecture analytics system for retail data.

This is the small shared package the three layers (``batch``, ``speed``, ``serving``)
import, and never each other:

* :mod:`lambdalake.contract` - events, views, lake tables, the run manifest and watermark,
  the speed protocol: the contract, to be read first;
* :mod:`lambdalake.kafka` - Kafka clients, end offsets, the columnar decoder;
* :mod:`lambdalake.ops` - the embedded broker, the demo, status, Airflow;
* ``cli``, ``settings``, ``errors``, ``logs`` on top, and the shared sentiment model
  artifact (``sentiment``) and calendar (``calendar``).
"""

__version__ = "0.1.0"
