"""The running bridge, one job per module.

* `bridge.runtime.bridge`: the `Bridge` — owns the endpoints and every task, drains on stop.
* `pump`: bus to room — a source's messages, concurrent across keys, in order within one.
* `outbox`: room to bus — a route's buffer (memory or spool) and its publishing window.
* `publisher`: one publish with the retry policy; permanent failures become rejections.
* `dead_letter`: a rejected message's ``on_reject`` decision and its dead-letter copy.
* `room_link`: one room's join and rejoin; `room_events`: its events as messages;
  `stream_fanout`: byte streams as messages or chunks; `room_sink`: deliveries into rooms.

Nothing here imports ``connectors/``: endpoints are handed in by `bridge.app`.
"""
