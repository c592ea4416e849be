// A burst bigger than the tenant's rate: every job still finishes, because the fetch waits as long as
// each 429/503 says (Retry-After / retry-after-ms) and sends the same request again.
//   OLLAMA_HOST=http://proxy:11435 OLLAMA_API_KEY=sk-... JOBS=70 node retry_after.mjs
import { Ollama } from "ollama";
import { retryingFetch } from "shared-ollama-client";

const JOBS = Number(process.env.JOBS ?? 70);
let waits = 0;
const ollama = new Ollama({
  host: process.env.OLLAMA_HOST ?? "http://127.0.0.1:11435",
  headers: { Authorization: `Bearer ${process.env.OLLAMA_API_KEY ?? "ollama"}` },
  fetch: retryingFetch({
    maxAttempts: 10, maxTotalS: 120,
    onRetry: (info) => { waits += 1; console.error(`waiting ${info.delayS.toFixed(2)} s after ${info.status}`); },
  }),
});

const started = performance.now();
let next = 0;
let done = 0;
async function worker() {
  while (next < JOBS) {
    const i = next++;
    try {
      await ollama.generate({ model: process.env.MODEL ?? "llama3.2", prompt: `Job ${i}: say hello`,
        options: { num_predict: 8 } });
      done += 1;
    } catch (error) { // ResponseError: the service's own message and status
      const e = /** @type {{ status_code?: number, message: string }} */ (error);
      console.error(`job ${i} failed: ${e.status_code} ${e.message}`);
    }
  }
}
await Promise.all(Array.from({ length: 8 }, worker));
console.log(`finished ${done} of ${JOBS} jobs in ${((performance.now() - started) / 1000).toFixed(1)} s; ` +
  `the helper waited ${waits} times as the service asked`);
process.exitCode = done === JOBS ? 0 : 1;
