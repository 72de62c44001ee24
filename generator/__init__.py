"""Realistic synthetic retail events for the ``orders`` and ``reviews`` topics.

``lambdalake generate history|live`` call :func:`generator.produce.run_history` and
:func:`generator.produce.run_live`. The parts, from pure to I/O:

- :mod:`generator.model`: catalog, demand per (SKU, store, day), order lines, reviews;
- :mod:`generator.text`: review titles and texts whose sentiment follows the rating;
- :mod:`generator.faults`: bad messages of every kind the contract rejects;
- :mod:`generator.stream`: the message sequence (JSON, late events, duplicates, bad);
- :mod:`generator.produce`: Kafka (partitioning by SKU, producer tuning, pacing).

See ``generator/README.md`` for the model and the rules the generator follows.
"""
