// A fast fake upstream for the benchmarks (Node.js, no dependencies).
//
// POST .../chat/completions answers:
//  - a plain request: a ~1 KB chat.completion JSON;
//  - "stream": true: CHUNKS server-sent events, one every 1000/RATE ms, each
//    carrying its send time in ms ("t"), then [DONE];
//  - model "idle": the stream's head and one event, then nothing until the
//    client leaves (memory per idle stream).
// Usage: node sse_upstream.js PORT [CHUNKS] [RATE]
"use strict";
const http = require("http");
const { performance } = require("perf_hooks");

const port = Number(process.argv[2] || 0);
const chunks = Number(process.argv[3] || 20);
const rate = Number(process.argv[4] || 20);
const now = () => performance.timeOrigin + performance.now();
const plain = JSON.stringify({
  id: "chatcmpl-bench", object: "chat.completion", created: 1700000000, model: "gpt-4o-mini",
  choices: [{ index: 0, message: { role: "assistant", content: "x".repeat(800) }, finish_reason: "stop" }],
  usage: { prompt_tokens: 250, completion_tokens: 120, total_tokens: 370 },
});

const server = http.createServer((req, res) => {
  const parts = [];
  req.on("data", (d) => parts.push(d));
  req.on("end", () => {
    let body = {};
    try { body = JSON.parse(Buffer.concat(parts).toString()); } catch (e) { /* plain */ }
    if (!body.stream) {
      res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(plain) });
      res.end(plain);
      return;
    }
    res.writeHead(200, { "content-type": "text/event-stream" });
    res.flushHeaders();
    const event = (i) => `data: {"id":"b","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok${i} "}}],"t":${now()}}\n\n`;
    res.write(event(0));
    if (body.model === "idle") return;
    let sent = 1;
    const timer = setInterval(() => {
      if (sent >= chunks) {
        clearInterval(timer);
        res.end("data: [DONE]\n\n");
        return;
      }
      res.write(event(sent++));
    }, 1000 / rate);
    res.on("close", () => clearInterval(timer));
  });
});
server.keepAliveTimeout = 120000;
server.listen(port, "127.0.0.1", () => {
  console.log(`sse upstream listening on http://127.0.0.1:${server.address().port}/v1`);
});
