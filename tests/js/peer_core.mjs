// The peer logic shared by the Node peer (@livekit/rtc-node, node_peer.mjs) and the browser peer
// (livekit-client in Chromium, browser_peer.html). The test (tests/interop/js_peers.py) sends
// commands `{op, args}` and gets `{result}` or `{error}` back; what arrives in the room is
// pushed as events `{event, ...}` through `env.emit`. Binary payloads travel as base64.
//
// `sdk` is the SDK module; `env` gives what differs between the runtimes:
//   kind ('node' | 'browser'), emit(obj), sha256hex(Uint8Array) -> Promise<string>,
//   b64encode(Uint8Array) -> string, b64decode(string) -> Uint8Array, reliableKind.

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function concat(pieces) {
  const size = pieces.reduce((n, p) => n + p.length, 0);
  const out = new Uint8Array(size);
  let at = 0;
  for (const p of pieces) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function makePeer(sdk, env) {
  const room = new sdk.Room();
  const lp = () => room.localParticipant;
  const emit = env.emit;

  room.on('dataReceived', (payload, participant, kind, topic) => {
    emit({
      event: 'data',
      from: participant ? participant.identity : '',
      data: env.b64encode(payload),
      reliable: kind === env.reliableKind,
      topic: topic ?? null,
    });
  });
  room.on('participantAttributesChanged', (changed, participant) => {
    emit({
      event: 'attributes',
      identity: participant.identity,
      changed: { ...changed },
      attributes: { ...participant.attributes },
    });
  });
  // livekit-client passes (previous metadata, participant), @livekit/rtc-node (metadata,
  // participant): read the participant's own field in both.
  room.on('participantMetadataChanged', (_metadata, participant) => {
    if (participant) emit({ event: 'metadata', identity: participant.identity, metadata: participant.metadata });
  });
  room.on('participantConnected', (participant) => {
    emit({ event: 'joined', identity: participant.identity });
  });
  // Data tracks (livekit-client only; @livekit/rtc-node 1.1.0 has none).
  room.on('dataTrackPublished', (track) => {
    emit({
      event: 'data_track_published',
      identity: track.publisherIdentity,
      name: track.info.name,
      sid: track.info.sid,
    });
  });
  const localDataTracks = new Map();
  const dataTrackReaders = new Map();

  // RPC methods the tests call on this peer.
  const rpcMethods = {
    'js.echo': async (data) => `js:${data.payload}`,
    'js.fail': async () => {
      throw new sdk.RpcError(4001, 'js says no', '{"why": "busy"}');
    },
    // A response of `payload` characters (too large for an RPC v1 response over 15 KiB).
    'js.big': async (data) => 'x'.repeat(Number(data.payload)),
    'js.slow': async () => {
      await sleep(12000);
      return 'too late';
    },
  };

  const ops = {
    async connect({ url, token }) {
      await room.connect(url, token);
      return { identity: lp().identity, remotes: [...room.remoteParticipants.keys()] };
    },
    async disconnect() {
      await room.disconnect();
      return null;
    },
    async remotes() {
      return [...room.remoteParticipants.keys()];
    },
    async publish({ data, reliable, topic, destinations }) {
      const dest = destinations ?? [];
      await lp().publishData(env.b64decode(data), {
        reliable,
        topic: topic ?? undefined,
        destinationIdentities: dest, // livekit-client
        destination_identities: dest, // @livekit/rtc-node
      });
      return null;
    },
    async send_text({ text, topic, destinations }) {
      const info = await lp().sendText(text, {
        topic,
        destinationIdentities: destinations ?? [],
      });
      return { id: info.id };
    },
    async stream_text({ chunks, topic, attributes }) {
      const writer = await lp().streamText({ topic, attributes: attributes ?? {} });
      for (const chunk of chunks) {
        await writer.write(chunk);
      }
      await writer.close();
      return { id: writer.info.id };
    },
    async send_bytes({ data, name, topic, piece }) {
      const bytes = env.b64decode(data);
      const writer = await lp().streamBytes({
        name,
        topic,
        totalSize: bytes.length,
        mimeType: 'application/octet-stream',
      });
      const step = piece ?? 65536;
      for (let at = 0; at < bytes.length; at += step) {
        await writer.write(bytes.subarray(at, Math.min(at + step, bytes.length)));
      }
      await writer.close();
      return { id: writer.info.id, sha256: await env.sha256hex(bytes) };
    },
    async handle_text({ topic }) {
      room.registerTextStreamHandler(topic, async (reader, participant) => {
        const chunks = [];
        for await (const chunk of reader) {
          chunks.push(chunk);
        }
        emit({
          event: 'text',
          from: participant.identity,
          topic: reader.info.topic,
          id: reader.info.id,
          text: chunks.join(''),
          chunks: chunks.length,
          attributes: { ...(reader.info.attributes ?? {}) },
        });
      });
      return null;
    },
    async handle_bytes({ topic }) {
      room.registerByteStreamHandler(topic, async (reader, participant) => {
        const pieces = [];
        for await (const piece of reader) {
          pieces.push(piece);
        }
        const data = concat(pieces);
        emit({
          event: 'bytes',
          from: participant.identity,
          topic: reader.info.topic,
          id: reader.info.id,
          name: reader.info.name,
          size: data.length,
          sha256: await env.sha256hex(data),
        });
      });
      return null;
    },
    async set_attributes({ attributes }) {
      await lp().setAttributes(attributes);
      return { ...lp().attributes };
    },
    async set_metadata({ metadata }) {
      // livekit-client: setMetadata; @livekit/rtc-node: updateMetadata.
      if (typeof lp().setMetadata === 'function') await lp().setMetadata(metadata);
      else await lp().updateMetadata(metadata);
      return lp().metadata;
    },
    async metadata_of({ identity }) {
      const p = room.remoteParticipants.get(identity);
      return p ? p.metadata ?? '' : null;
    },
    async attributes_of({ identity }) {
      const p = room.remoteParticipants.get(identity);
      return p ? { ...p.attributes } : null;
    },
    async serve_rpc() {
      // livekit-client 2.x registers on the room; @livekit/rtc-node on the local participant.
      const target = typeof room.registerRpcMethod === 'function' ? room : lp();
      for (const [method, handler] of Object.entries(rpcMethods)) {
        target.registerRpcMethod(method, async (data) => {
          emit({
            event: 'rpc',
            method: data.method ?? method,
            caller: data.callerIdentity,
            payload: data.payload,
            response_timeout: data.responseTimeout,
          });
          return handler(data);
        });
      }
      return null;
    },
    async rpc({ destination, method, payload, timeout_ms }) {
      const started = Date.now();
      const elapsed = () => Date.now() - started; // for failure messages only
      try {
        const answer = await lp().performRpc({
          destinationIdentity: destination,
          method,
          payload,
          responseTimeout: timeout_ms ?? undefined,
        });
        return { ok: answer, elapsed_ms: elapsed() };
      } catch (e) {
        return {
          code: e.code ?? null,
          message: e.message ?? String(e),
          data: e.data ?? null,
          elapsed_ms: elapsed(),
        };
      }
    },
    async publish_data_track({ name }) {
      const track = await lp().publishDataTrack({ name });
      localDataTracks.set(name, track);
      return { sid: track.info.sid, name: track.info.name };
    },
    // Push each frame (base64) in turn, `interval_ms` apart; a frame the SDK refuses (dropped,
    // unpublished) is counted, not thrown. Returns how many were pushed and refused.
    async push_data_track({ name, frames, interval_ms, user_timestamps }) {
      const track = localDataTracks.get(name);
      if (!track) {
        throw new Error(`no local data track ${name}`);
      }
      let pushed = 0;
      const refused = [];
      for (let i = 0; i < frames.length; i++) {
        const frame = { payload: env.b64decode(frames[i]) };
        if (user_timestamps && user_timestamps[i] !== null) {
          frame.userTimestamp = BigInt(user_timestamps[i]);
        }
        try {
          await track.tryPush(frame);
          pushed += 1;
        } catch (e) {
          refused.push(String(e && e.message ? e.message : e));
        }
        if (interval_ms) {
          await sleep(interval_ms);
        }
      }
      return { pushed, refused };
    },
    async unpublish_data_track({ name }) {
      const track = localDataTracks.get(name);
      localDataTracks.delete(name);
      if (track) {
        await track.unpublish();
      }
      return null;
    },
    // Subscribe to `identity`'s track `name` (waiting up to 15 s for it) and emit every frame
    // read from it as a `data_track_frame` event.
    async subscribe_data_track({ identity, name, buffer_size }) {
      const deadline = Date.now() + 15000;
      let track;
      while (!track) {
        track = room.remoteParticipants.get(identity)?.dataTracks.get(name);
        if (!track) {
          if (Date.now() > deadline) {
            throw new Error(`no data track ${name} of ${identity} within 15 s`);
          }
          await sleep(20);
        }
      }
      const abort = new AbortController();
      const stream = track.subscribe({ signal: abort.signal, bufferSize: buffer_size ?? 1024 });
      const key = `${identity}/${name}`;
      dataTrackReaders.set(key, abort);
      (async () => {
        const reader = stream.getReader();
        try {
          for (;;) {
            const { done, value } = await reader.read();
            if (done) break;
            emit({
              event: 'data_track_frame',
              from: identity,
              name,
              sid: track.info.sid,
              data: env.b64encode(value.payload),
              user_timestamp: value.userTimestamp === undefined ? null : value.userTimestamp.toString(),
            });
          }
        } catch (e) {
          emit({ event: 'data_track_error', from: identity, name, error: String(e) });
        }
      })();
      return { sid: track.info.sid };
    },
    async unsubscribe_data_track({ identity, name }) {
      const abort = dataTrackReaders.get(`${identity}/${name}`);
      dataTrackReaders.delete(`${identity}/${name}`);
      abort?.abort();
      return null;
    },
  };

  return {
    room,
    async run(op, args) {
      const fn = ops[op];
      if (!fn) {
        return { error: `unknown op ${op}` };
      }
      try {
        return { result: await fn(args ?? {}) };
      } catch (e) {
        return { error: `${op}: ${e && e.stack ? e.stack : e}` };
      }
    },
  };
}
