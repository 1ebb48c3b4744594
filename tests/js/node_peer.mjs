// A LiveKit peer on @livekit/rtc-node, driven over stdin/stdout with line JSON:
//   stdin:  {"id": 1, "op": "connect", "args": {...}}
//   stdout: @rb {"id": 1, "result": ...}  |  @rb {"id": 1, "error": "..."}  |  @rb {"event": ...}
// Only lines starting with "@rb " are the protocol (the SDK may log to stdout too). The peer
// leaves the room and exits when stdin closes.
import { createHash } from 'node:crypto';
import readline from 'node:readline';

import * as sdk from '@livekit/rtc-node';

import { makePeer } from './peer_core.mjs';

const write = (obj) => process.stdout.write(`@rb ${JSON.stringify(obj)}\n`);

const peer = makePeer(sdk, {
  kind: 'node',
  emit: write,
  sha256hex: async (bytes) => createHash('sha256').update(bytes).digest('hex'),
  b64encode: (bytes) => Buffer.from(bytes).toString('base64'),
  b64decode: (text) => new Uint8Array(Buffer.from(text, 'base64')),
  reliableKind: sdk.DataPacketKind.KIND_RELIABLE,
});

const pending = new Set();
const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on('line', (line) => {
  if (!line.trim()) return;
  const { id, op, args } = JSON.parse(line);
  const task = peer.run(op, args).then((reply) => write({ id, ...reply }));
  pending.add(task);
  task.finally(() => pending.delete(task));
});
lines.on('close', async () => {
  try {
    await peer.room.disconnect();
  } catch {
    // already gone
  }
  await sdk.dispose();
  process.exit(0);
});
write({ event: 'ready', sdk: '@livekit/rtc-node' });
