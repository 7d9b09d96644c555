// A local app for the consumer test: an InboxConsumer writing every message it is given to a
// file (fsynced before the handler returns). The test kills it with SIGKILL mid-stream.
//   node consumer-app.js SOCKET OUTFILE
'use strict';
const fs = require('node:fs');
const { InboxConsumer } = require('../dist/index.js');

const [socket, out] = process.argv.slice(2);
const fd = fs.openSync(out, 'a');
const consumer = new InboxConsumer(
  socket,
  async (userId, m) => {
    fs.writeSync(fd, JSON.stringify({ user_id: userId, seq: m.seq, id: m.id, body: m.body }) + '\n');
    fs.fsyncSync(fd);
    await new Promise((r) => setTimeout(r, 5)); // some work: widens the window before the ack
  },
  { limit: 10, reconnectForMs: 60_000 },
);
console.log('consuming');
consumer.run().catch((e) => {
  console.error(e);
  process.exit(1);
});
