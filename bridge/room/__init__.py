"""The room side of roombus: a LiveKit participant in pure Python (aiortc + protobuf signalling).

It joins a room over LiveKit's signalling WebSocket, exchanges data on WebRTC data channels, and
offers what the official SDKs offer for data: packets, text and byte streams, RPC, participant
and room state. It knows nothing about buses.
"""
