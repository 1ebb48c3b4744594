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
  room.on('participantConnected', (participant) => {
    emit({ event: 'joined', identity: participant.identity });
  });

  // RPC methods the tests call on this peer.
  const rpcMethods = {
    'js.echo': async (data) => `js:${data.payload}`,
    'js.fail': async () => {
      throw new sdk.RpcError(4001, 'js says no', '{"why": "busy"}');
    },
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
