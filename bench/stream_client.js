// Many concurrent streaming requests (Node.js, no dependencies): measures
// the share of chunks delivered, each chunk's delay from its send time
// upstream ("t", ms) to its arrival here, and the time to first chunk.
// Usage: node stream_client.js BASE_URL STREAMS DURATION_S [idle] [KEY]
// Prints one JSON line (steady_*: the delays of the chunks that arrived once
// every stream had its first, without the ramp of opening them).  In idle mode it opens the streams, prints
// {"open": N, "failed": F} once all have their first event (or after 60 s,
// with those that have), and holds them until killed.
"use strict";
const http = require("http");
const { performance } = require("perf_hooks");

const [base, streamsArg, durationArg, mode, key] = process.argv.slice(2);
const streams = Number(streamsArg);
const duration = Number(durationArg) * 1000;
const idle = mode === "idle";
const now = () => performance.timeOrigin + performance.now();
const url = new URL(base + "/chat/completions");
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity });
const body = JSON.stringify({ model: idle ? "idle" : "gpt-4o-mini", stream: true, messages: [{ role: "user", content: "hi" }] });
const RATE = 20; // chunks per second per stream, as sse_upstream.js sends them
const delays = [];
const arrivals = [];
const firsts = [];
const firstAt = [];
let received = 0, opened = 0, failed = 0, started = 0;
const deadline = now() + duration;

function one() {
  if (!idle && now() > deadline) return;
  started++;
  const t0 = now();
  let first = true, pending = "";
  const req = http.request(url, {
    method: "POST", agent,
    headers: { "content-type": "application/json", authorization: `Bearer ${key || "bench"}` },
  }, (res) => {
    if (res.statusCode !== 200) { failed++; res.resume(); return; }
    res.setEncoding("utf8");
    res.on("data", (text) => {
      const at = now();
      pending += text;
      let end;
      while ((end = pending.indexOf("\n\n")) >= 0) {
        const ev = pending.slice(0, end);
        pending = pending.slice(end + 2);
        const m = /"t":([0-9.]+)/.exec(ev);
        if (!m) continue;
        received++;
        delays.push(at - Number(m[1]));
        arrivals.push(at);
        if (first) {
          first = false;
          firsts.push(at - t0);
          firstAt.push(at);
          if (idle && ++opened === streams) report();
        }
      }
    });
    res.on("end", () => { if (!idle) one(); });
  });
  req.on("error", () => { failed++; });
  req.end(body);
}

function pct(values, p) {
  if (!values.length) return null;
  const sorted = Float64Array.from(values).sort();
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))];
}

let reported = false;
function report() {
  if (reported) return;
  reported = true;
  console.log(JSON.stringify({ open: opened, failed }));
}

for (let i = 0; i < streams; i++) one();
if (idle) setTimeout(report, 60000);
if (!idle) {
  setTimeout(() => {
    // What the upstream sent each stream since its first chunk.
    const end = now();
    const expected = firstAt.reduce((sum, t) => sum + 1 + Math.floor(((end - t) * RATE) / 1000), 0);
    // The steady state: chunks that arrived once every stream had its first.
    const allOpen = firstAt.length === streams ? firstAt.reduce((a, b) => Math.max(a, b), 0) : Infinity;
    const steady = delays.filter((_, i) => arrivals[i] > allOpen);
    console.log(JSON.stringify({
      streams, started, received, failed, expected,
      delay_p50_ms: pct(delays, 0.5), delay_p99_ms: pct(delays, 0.99),
      first_p50_ms: pct(firsts, 0.5), first_p99_ms: pct(firsts, 0.99),
      steady_delay_p50_ms: pct(steady, 0.5), steady_delay_p99_ms: pct(steady, 0.99), steady_chunks: steady.length,
    }));
    process.exit(0);
  }, duration + 2000);
}
