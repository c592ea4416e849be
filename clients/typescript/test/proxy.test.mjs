// ollama-js with retryingFetch against a real shared-ollama-proxy: 429 from a tenant's
// requests_per_minute and 503 from a full backpressure queue, each waited as told; a refusal longer than
// the budget is readable at once. tests/test_client_typescript.py starts the servers and sets:
//   SOC_LIMITED_URL  proxy with tenants at 60 (SOC_BURST_KEY) and 3 (SOC_SLOW_REFILL_KEY) requests a minute
//   SOC_QUEUE_URL    proxy with chain.backpressure.max_queue_size 1 before a slow replica; SOC_ADMIN_KEY
import assert from "node:assert/strict";
import net from "node:net";
import { test } from "node:test";
import { Ollama } from "ollama";
import { retryingFetch } from "shared-ollama-client";
import { assertWaitedAsTold, recorder, toldS } from "./helpers.mjs";

const env = process.env;
const skip = env.SOC_LIMITED_URL ? false : "needs a proxy (run tests/test_client_typescript.py)";
const quiet = { onRetry: () => {} };

function client(url, key, rec, options = {}) {
  return new Ollama({ host: url, headers: { Authorization: `Bearer ${key}` },
    fetch: retryingFetch({ ...quiet, ...options, fetch: rec.fetch }) });
}

test("a tenant's rate limit is waited as told", { skip }, async () => {
  const rec = recorder();
  const ollama = client(env.SOC_LIMITED_URL, env.SOC_BURST_KEY, rec);
  for (let i = 0; i < 300; i++) {  // faster than the bucket refills, until one call meets a 429
    rec.attempts.length = 0;
    const result = await ollama.generate({ model: "llama3.2", prompt: "hello", options: { num_predict: 4 } });
    assert.equal(result.done, true);
    if (rec.attempts.some((a) => a.status === 429)) {
      assert.equal(rec.attempts[0].status, 429);
      assert.equal(rec.attempts.at(-1).status, 200);
      assert.ok(toldS(rec.attempts[0].headers) <= 1);
      assertWaitedAsTold(rec.attempts);
      return;
    }
  }
  assert.fail("never refused");
});

test("a refusal longer than the budget is readable at once", { skip }, async () => {
  const plain = { Authorization: `Bearer ${env.SOC_SLOW_REFILL_KEY}`, "Content-Type": "application/json" };
  for (let i = 0; i < 10; i++) {  // use up 3 a minute
    const response = await fetch(`${env.SOC_LIMITED_URL}/api/embed`, { method: "POST", headers: plain,
      body: JSON.stringify({ model: "nomic-embed-text", input: "x" }) });
    await response.arrayBuffer();
    if (response.status === 429) break;
  }
  const rec = recorder();
  const started = performance.now();
  await assert.rejects(client(env.SOC_LIMITED_URL, env.SOC_SLOW_REFILL_KEY, rec, { maxTotalS: 5 })
    .generate({ model: "llama3.2", prompt: "x" }),
  (error) => error.name === "ResponseError" && error.status_code === 429
    && error.error === "tenant slow-refill is over 3 requests per minute");
  assert.ok(performance.now() - started < 3000);
  assert.equal(rec.attempts.length, 1);
  assert.ok(toldS(rec.attempts[0].headers) > 5);
});

async function queued() {
  const response = await fetch(`${env.SOC_QUEUE_URL}/system/queue`,
    { headers: { Authorization: `Bearer ${env.SOC_ADMIN_KEY}` } });
  const models = (await response.json()).models;
  return Object.values(models).reduce((sum, m) => sum + m.queued, 0);
}

test("a full queue's 503 is waited as told", { skip }, async () => {
  const rec = recorder();
  const ollama = client(env.SOC_QUEUE_URL, "ollama", rec);
  await ollama.generate({ model: "llama3.2", prompt: "warm up" });
  rec.attempts.length = 0;
  // Two generations held on raw sockets: one runs (0.5 s), one waits, so the queue of one is full.
  const body = JSON.stringify({ model: "llama3.2", prompt: "hello" });
  const { hostname, port } = new URL(env.SOC_QUEUE_URL);
  const sockets = [0, 1].map(() => net.connect(Number(port), hostname, function () {
    this.write(`POST /api/generate HTTP/1.1\r\nHost: ${hostname}\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
  }).on("error", () => {}));
  try {
    const deadline = performance.now() + 10_000;
    while (await queued() < 1) {
      assert.ok(performance.now() < deadline, "the queue never filled");
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const result = await ollama.generate({ model: "llama3.2", prompt: "hi" });
    assert.equal(result.done, true);
  } finally {
    for (const socket of sockets) socket.destroy();
  }
  assert.equal(rec.attempts[0].status, 503);
  assert.equal(rec.attempts.at(-1).status, 200);
  assert.ok(rec.attempts.every((a) => a.status === 503 || a.status === 200));
  assertWaitedAsTold(rec.attempts);
});

test("the OpenAI Node SDK through retryingFetch (its own retries off)", { skip }, async () => {
  const { default: OpenAI } = await import("openai");
  const rec = recorder();
  const openai = new OpenAI({ baseURL: `${env.SOC_LIMITED_URL}/v1`, apiKey: env.SOC_BURST_KEY, maxRetries: 0,
    fetch: retryingFetch({ ...quiet, fetch: rec.fetch }) });
  for (let i = 0; i < 300; i++) {
    rec.attempts.length = 0;
    const completion = await openai.chat.completions.create({ model: "llama3.2", max_tokens: 4,
      messages: [{ role: "user", content: "hi" }] });
    assert.ok(completion.choices[0].message.content);
    if (rec.attempts.some((a) => a.status === 429)) {
      assert.equal(rec.attempts[0].status, 429);
      assert.equal(rec.attempts.at(-1).status, 200);
      assertWaitedAsTold(rec.attempts);
      return;
    }
  }
  assert.fail("never refused");
});

test("X-Service-Limits of a proxy answer", { skip }, async () => {
  const { serviceLimits } = await import("shared-ollama-client");
  const response = await retryingFetch(quiet)(`${env.SOC_LIMITED_URL}/api/embed`, { method: "POST",
    headers: { Authorization: `Bearer ${env.SOC_BURST_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify({ model: "nomic-embed-text", input: "x" }) });
  await response.arrayBuffer();
  const limits = serviceLimits(response);
  assert.ok(limits !== null && limits.understood && limits.version === 1);
  assert.equal(limits.requestsPerMinute, 60);
  assert.ok(limits.maxBodyBytes > 0);
});
