"""The contract every part of lambdalake builds to: read these to know the system.

* :mod:`~lambdalake.contract.events` - the topics (events: orders, reviews; reference data:
  products, stores): fields, keys and the
  rules that make a message valid or quarantine it with a reason;
  :mod:`~lambdalake.contract.validation` applies them (a plain reference and the
  vectorised validator every consumer runs).
* :mod:`~lambdalake.contract.views` - one definition per aggregate view: dimensions, typed
  measures and how partials merge, grains and their tables, the dedup rule, forecast levels.
* :mod:`~lambdalake.contract.lake` - where every table lives and the lake's Arrow schemas;
  the views every run publishes and their keys.
* :mod:`~lambdalake.contract.manifest` - the ``runs`` table, the offset watermark and its
  one JSON form, ingest positions.
* :mod:`~lambdalake.contract.speed_protocol` - what a speed worker answers the serving
  layer (Arrow Flight), and its error kinds.
"""
