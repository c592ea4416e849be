// The retry policy, precisely, with the real ollama-js client against a local server that answers what
// each test scripts (429/503 with Retry-After or retry-after-ms, x-should-retry: false, long waits, a
// stream cut off mid-way, a refused connection). Run: node --test test/
import assert from "node:assert/strict";
import { once } from "node:events";
import http from "node:http";
import net from "node:net";
import { test } from "node:test";
import { Ollama } from "ollama";
import { chunkText, estimateTokens, retryingFetch, serverDelayS } from "shared-ollama-client";
import { assertWaitedAsTold, recorder } from "./helpers.mjs";

const CHAT_OK = { model: "m", created_at: "2026-01-01T00:00:00Z", message: { role: "assistant", content: "hello" },
  done: true, done_reason: "stop" };

const answer = (status, body, headers = {}) => (req, res) => {
  res.writeHead(status, { "Content-Type": "application/json", ...headers });
  res.end(JSON.stringify(body ?? { error: `status ${status}` }));
};

/** A server playing `actions` in turn (the last repeats); `.requests` counts what it received. */
async function scripted(...actions) {
  const state = { requests: 0, bodies: [] };
  const server = http.createServer(async (req, res) => {
    let body = "";
    for await (const chunk of req) body += chunk;
    state.bodies.push(body);
    const action = actions[Math.min(state.requests, actions.length - 1)];
    state.requests += 1;
    action(req, res);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = /** @type {net.AddressInfo} */ (server.address());
  return Object.assign(state, { url: `http://127.0.0.1:${port}`,
    close: () => { server.closeAllConnections(); server.close(); } });
}

const quiet = { onRetry: () => {} };
const chat = (client) => client.chat({ model: "m", messages: [{ role: "user", content: "a private prompt" }] });

test("waits as told, then succeeds with the same body", async () => {
  const server = await scripted(answer(429, null, { "Retry-After": "1" }), answer(200, CHAT_OK));
  const rec = recorder();
  const lines = [];
  try {
    const client = new Ollama({ host: server.url, fetch: retryingFetch({ fetch: rec.fetch,
      onRetry: (info) => lines.push(info) }) });
    const result = await chat(client);
    assert.equal(result.message.content, "hello");
    assert.equal(server.requests, 2);
    assert.equal(server.bodies[0], server.bodies[1]);
    assert.deepEqual(rec.attempts.map((a) => a.status), [429, 200]);
    assertWaitedAsTold(rec.attempts);
    assert.equal(lines.length, 1);
    assert.deepEqual({ ...lines[0], delayS: 0 }, { method: "POST", path: "/api/chat", delayS: 0, status: 429,
      attempt: 2, maxAttempts: 5 });
  } finally { server.close(); }
});

test("retry-after-ms wins over Retry-After", async () => {
  const server = await scripted(answer(503, null, { "Retry-After": "5", "retry-after-ms": "300" }),
    answer(200, CHAT_OK));
  const rec = recorder();
  try {
    await chat(new Ollama({ host: server.url, fetch: retryingFetch({ ...quiet, fetch: rec.fetch }) }));
    const gap = (rec.attempts[1].sent - rec.attempts[0].received) / 1000;
    assert.ok(gap >= 0.295 && gap < 2, `waited ${gap}`);
  } finally { server.close(); }
});

for (const status of [400, 429, 503]) {
  test(`x-should-retry: false is never retried (${status})`, async () => {
    const server = await scripted(answer(status, { error: "request needs 9000 tokens, more than the quota",
      code: "quota_exceeded" }, { "x-should-retry": "false" }), answer(200, CHAT_OK));
    try {
      const client = new Ollama({ host: server.url, fetch: retryingFetch(quiet) });
      await assert.rejects(chat(client), (error) => error.name === "ResponseError" && error.status_code === status
        && error.error === "request needs 9000 tokens, more than the quota");
      assert.equal(server.requests, 1);
    } finally { server.close(); }
  });
}

test("a bulk policy (maxRetryAfterS > 60) comes back after the proxy's capped wait", async () => {
  // The proxy's "longer than 60 s": x-should-retry false with a wait (scaled down here to 0.2 s).
  const server = await scripted(answer(503, { error: "the queue needs 95 s", code: "overload" },
    { "x-should-retry": "false", "retry-after-ms": "200", "retry-after": "1" }), answer(200, CHAT_OK));
  try {
    const bulk = new Ollama({ host: server.url, fetch: retryingFetch({ ...quiet, maxRetryAfterS: 600 }) });
    assert.equal((await chat(bulk)).message.content, "hello");
    assert.equal(server.requests, 2);
  } finally { server.close(); }
  const again = await scripted(answer(503, { error: "the queue needs 95 s", code: "overload" },
    { "x-should-retry": "false", "retry-after-ms": "200" }), answer(200, CHAT_OK));
  try {
    const interactive = new Ollama({ host: again.url, fetch: retryingFetch(quiet) });
    await assert.rejects(chat(interactive));
    assert.equal(again.requests, 1);
  } finally { again.close(); }
});

test("x-should-retry: false never lets a wait past maxRetryAfterS through", { timeout: 10_000 }, async () => {
  // A bulk policy with time to spare: a wait longer than its own maxRetryAfterS is returned at once,
  // with or without x-should-retry (which may only make the policy stricter).
  for (const headers of [{ "retry-after": "601" }, { "retry-after": "601", "x-should-retry": "false" },
    { "retry-after-ms": "99999000", "x-should-retry": "false" }]) {
    const server = await scripted(answer(429, { error: "come back tomorrow" }, headers), answer(200, CHAT_OK));
    try {
      const bulk = new Ollama({ host: server.url, fetch: retryingFetch({ ...quiet, maxRetryAfterS: 600,
        maxTotalS: 1e6, maxAttempts: 100 }) });
      const started = performance.now();
      await assert.rejects(chat(bulk), (error) => error.status_code === 429 && error.error === "come back tomorrow");
      assert.ok(performance.now() - started < 2000, JSON.stringify(headers));
      assert.equal(server.requests, 1);
    } finally { server.close(); }
  }
});

test("gives up after maxAttempts with the service's message", async () => {
  const server = await scripted(answer(503, { error: "queue for llama3.2 is full", code: "overload" },
    { "retry-after-ms": "100" }));
  const rec = recorder();
  try {
    const client = new Ollama({ host: server.url, fetch: retryingFetch({ ...quiet, fetch: rec.fetch, maxAttempts: 3 }) });
    await assert.rejects(chat(client), (error) => error.status_code === 503 && error.error === "queue for llama3.2 is full");
    assert.equal(server.requests, 3);
    assertWaitedAsTold(rec.attempts);
  } finally { server.close(); }
});

for (const [retryAfter, options] of [["120", {}], ["10", { maxTotalS: 3 }]]) {
  test(`a wait of ${retryAfter} s is returned at once (${JSON.stringify(options)})`, async () => {
    const server = await scripted(answer(429, { error: "tenant t is over 3 requests per minute" },
      { "Retry-After": retryAfter }));
    try {
      const client = new Ollama({ host: server.url, fetch: retryingFetch({ ...quiet, ...options }) });
      const started = performance.now();
      await assert.rejects(chat(client), (error) => error.status_code === 429 && /3 requests per minute/.test(error.error));
      assert.ok(performance.now() - started < 2000);
      assert.equal(server.requests, 1);
    } finally { server.close(); }
  });
}

test("a 504 is retried once, whatever maxAttempts allows", async () => {
  const server = await scripted(answer(504, { error: "no first byte in time" }),
    answer(504, { error: "no first byte in time" }), answer(200, CHAT_OK));
  try {
    const client = new Ollama({ host: server.url, fetch: retryingFetch({ ...quiet, backoffBaseS: 0.05 }) });
    await assert.rejects(chat(client), (error) => error.status_code === 504);
    assert.equal(server.requests, 2);
  } finally { server.close(); }
  const again = await scripted(answer(504, { error: "no first byte in time" }),
    answer(504, { error: "no first byte in time" }), answer(200, CHAT_OK));
  try {
    const client = new Ollama({ host: again.url,
      fetch: retryingFetch({ ...quiet, backoffBaseS: 0.05, maxTimeoutRetries: 2 }) });
    assert.equal((await chat(client)).message.content, CHAT_OK.message.content);
    assert.equal(again.requests, 3);
  } finally { again.close(); }
  assert.throws(() => retryingFetch({ maxTimeoutRetries: -1 }), RangeError);
});

test("other statuses are not retried", async () => {
  const server = await scripted(answer(500, { error: "model runner crashed" }), answer(200, CHAT_OK));
  try {
    await assert.rejects(chat(new Ollama({ host: server.url, fetch: retryingFetch(quiet) })), /model runner crashed/);
    assert.equal(server.requests, 1);
  } finally { server.close(); }
});

test("a started stream is never retried", async () => {
  const server = await scripted((req, res) => {
    res.writeHead(200, { "Content-Type": "application/x-ndjson" });
    res.write(JSON.stringify({ ...CHAT_OK, done: false }) + "\n");
    setTimeout(() => res.socket.destroy(), 100);
  }, answer(200, CHAT_OK));
  try {
    const client = new Ollama({ host: server.url, fetch: retryingFetch(quiet) });
    const stream = await client.chat({ model: "m", messages: [{ role: "user", content: "x" }], stream: true });
    await assert.rejects(async () => { for await (const _ of stream) { /* read until it breaks */ } });
    assert.equal(server.requests, 1);
  } finally { server.close(); }
});

test("a refused connection is retried with backoff, then surfaces", async () => {
  const probe = net.createServer().listen(0, "127.0.0.1");
  await once(probe, "listening");
  const { port } = /** @type {net.AddressInfo} */ (probe.address());
  probe.close();
  const statuses = [];
  const client = new Ollama({ host: `http://127.0.0.1:${port}`, fetch: retryingFetch({ maxAttempts: 3,
    backoffBaseS: 0.05, onRetry: (info) => statuses.push(info.status) }) });
  await assert.rejects(chat(client), (error) => error instanceof TypeError && error.cause?.code === "ECONNREFUSED");
  assert.deepEqual(statuses, [null, null]);
});

test("aborting during a wait rejects at once", async () => {
  const server = await scripted(answer(503, null, { "Retry-After": "30" }));
  try {
    const fetchWithRetry = retryingFetch(quiet);
    const controller = new AbortController();
    const pending = fetchWithRetry(`${server.url}/api/chat`, { method: "POST", body: "{}", signal: controller.signal });
    await new Promise((resolve) => setTimeout(resolve, 300));
    const started = performance.now();
    controller.abort();
    await assert.rejects(pending, (error) => error.name === "AbortError");
    assert.ok(performance.now() - started < 500);
    assert.equal(server.requests, 1);
  } finally { server.close(); }
});

test("a body that cannot be replayed is not retried", async () => {
  const server = await scripted(answer(503, null, { "Retry-After": "1" }));
  try {
    const body = new ReadableStream({ start(c) { c.enqueue(new TextEncoder().encode("{}")); c.close(); } });
    const response = await retryingFetch(quiet)(`${server.url}/api/chat`, { method: "POST", body, duplex: "half" });
    assert.equal(response.status, 503);
    assert.equal(server.requests, 1);
  } finally { server.close(); }
});

test("server delays and chunking", () => {
  assert.equal(serverDelayS(new Headers({ "retry-after-ms": "250", "retry-after": "7" })), 0.25);
  assert.equal(serverDelayS(new Headers({ "retry-after": new Date(Date.now() + 30_000).toUTCString() })) > 28, true);
  assert.equal(serverDelayS(new Headers({ "retry-after": "soon" })), null);
  // Garbage V8's Date.parse would read as a past date (a wait of 0): no wait, as in the Python helper.
  for (const garbage of ["soon 3", "1 2", "Tomorrow 5"]) {
    assert.equal(serverDelayS(new Headers({ "retry-after": garbage })), null, garbage);
  }
  // RFC 9110's three date forms and only those (the Python helper's grammar): no other zone, no 31 Feb.
  const newYear = Date.UTC(2026, 0, 1);
  for (const form of ["Thu, 01 Jan 2026 00:00:30 GMT", "Thursday, 01-Jan-26 00:00:30 GMT", "Thu Jan  1 00:00:30 2026"]) {
    assert.equal(serverDelayS(new Headers({ "retry-after": form }), newYear), 30, form);
  }
  for (const bad of ["Thu, 01 Jan 2026 00:00:30 +0000", "Thu, 01 Jan 2026 00:00:30", "Thu, 31 Feb 2026 00:00:30 GMT",
    "Thu, 01 Jan 2026 00:00:60 GMT", "Sat, 01 Jan 0000 00:00:00 GMT"]) {
    assert.equal(serverDelayS(new Headers({ "retry-after": bad }), newYear), null, bad);
  }
  // The Python helper's number grammar: no hexadecimal, binary or octal, no NBSP padding.
  for (const bad of ["0x10", "0b11", "0o7", "1_000", "3\u00a0", "Infinity"]) {
    assert.equal(serverDelayS(new Headers({ "retry-after": bad })), null, bad);
    assert.equal(serverDelayS(new Headers({ "retry-after-ms": bad, "retry-after": "7" })), 7, bad);
  }
  assert.equal(serverDelayS(new Headers({ "retry-after": "1e1" })), 10);
  const words = (s) => s.split(/\s+/).filter(Boolean).length;
  assert.deepEqual(chunkText("A b. C d. E f. G h.", { maxTokens: 4, overlap: 2, countTokens: words }),
    ["A b. C d.", "C d. E f.", "E f. G h."]);
  assert.deepEqual(chunkText("One two three.\n\nFour five six.\n\nSeven eight nine.", { maxTokens: 6, countTokens: words }),
    ["One two three.\n\nFour five six.", "Seven eight nine."]);
  assert.equal(estimateTokens("hello, world"), 5);
  assert.throws(() => chunkText("x", { maxTokens: 4, overlap: 4 }), RangeError);
});

test("X-Service-Limits parsing is versioned and bounded", async () => {
  const { parseServiceLimits, serviceLimits } = await import("shared-ollama-client");
  const parsed = parseServiceLimits("v=1; max_body_bytes=33554432; max_prompt_tokens=4096; deadline_s=120; " +
    "requests_per_minute=600; future_key=abc");
  assert.deepEqual(parsed, { version: 1, understood: true, maxBodyBytes: 33554432, maxPromptTokens: 4096,
    deadlineS: 120, requestsPerMinute: 600, raw: { max_body_bytes: "33554432", max_prompt_tokens: "4096",
      deadline_s: "120", requests_per_minute: "600", future_key: "abc" } });
  assert.deepEqual(parseServiceLimits("v=2; max_prompt_tokens=4096"),
    { version: 2, understood: false, raw: { max_prompt_tokens: "4096" } });
  assert.equal(parseServiceLimits("max_prompt_tokens=4096"), null);
  assert.equal(parseServiceLimits("v=x"), null);
  const junk = parseServiceLimits("v=1; " + Array.from({ length: 1000 }, (_, i) => `k${i}=1`).join("; "));
  assert.equal(Object.keys(junk.raw).length, 64);
  assert.equal(serviceLimits(new Headers({ "X-Service-Limits": "v=1; deadline_s=5" })).deadlineS, 5);
  assert.equal(serviceLimits(new Response("")), null);
  assert.deepEqual(parseServiceLimits("v=1; max_body_bytes=0x10; max_prompt_tokens=1.9; deadline_s=1.5e1; " +
    "requests_per_minute=+600"), { version: 1, understood: true, deadlineS: 15, requestsPerMinute: 600,
    raw: { max_body_bytes: "0x10", max_prompt_tokens: "1.9", deadline_s: "1.5e1", requests_per_minute: "+600" } });
  // A header over 4096 characters: the part the bound cuts through is dropped, not read as a smaller number.
  const long = `v=1; ${"junk; ".repeat(679)}max_body_bytes=33554432`;
  assert.equal(long.length, 4102);
  assert.equal(parseServiceLimits(long).maxBodyBytes, undefined);
  assert.equal(parseServiceLimits(`v=1; max_body_bytes=7; ${"j".repeat(5000)}`).maxBodyBytes, 7);
  assert.equal(parseServiceLimits(`v=${"1".repeat(5000)}`), null);
  for (const version of ["v=+1", "v= 1", "v=-1", "v=1_0", "v=1234567890123456"]) {
    assert.equal(parseServiceLimits(`${version}; max_body_bytes=1`), null, version);
  }
});
