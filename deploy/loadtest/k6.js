// k6 scenarios mirroring locustfile.py: interactive chat users, RAG users with 8-64 KB of retrieved
// context, and ingest users posting embedding batches (the RAG-burst workload), with the SLO verdicts as
// thresholds: k6 exits 99 when one fails.
//
//   k6 run --no-usage-report deploy/loadtest/k6.js                       # 127.0.0.1:11435, 30 s
//   SOP_HOST=http://proxy:11435 SOP_DURATION=10m SOP_CHAT_VUS=30 SOP_RAG_VUS=10 SOP_INGEST_VUS=10 \
//     SOP_CHAT_KEY=... SOP_RAG_KEY=... SOP_INGEST_KEY=... k6 run --no-usage-report deploy/loadtest/k6.js
//
// Always --no-usage-report (k6 reports usage otherwise). Point it only at hosts you operate.
import http from 'k6/http';
import { sleep } from 'k6';
import { Rate, Trend } from 'k6/metrics';

const HOST = __ENV.SOP_HOST || 'http://127.0.0.1:11435';
const MODEL = __ENV.SOP_MODEL || 'llama3.2';
const EMBED_MODEL = __ENV.SOP_EMBED_MODEL || 'nomic-embed-text';
const DURATION = __ENV.SOP_DURATION || '30s';
const WORDS = ('retrieval chunk index vector passage answer source policy contract invoice incident runbook ' +
  'release customer region quarter revenue support deployment security onboarding').split(' ');

// The SLOs: rejections the proxy answers itself (429/503) < 5 %, timeouts (504, a stream the proxy's
// deadline ended, a 503 queue_timeout, or no answer) < 1 %,
// P95 completion < 45 s (a failure counts as a completion that missed it). TTFT is the time to the first byte of a streamed answer.
const rejected = new Rate('sop_rejected');
const timedOut = new Rate('sop_timed_out');
const completion = new Trend('sop_completion', true);
const ttft = new Trend('sop_ttft', true);

function vus(name, fallback) {
  return parseInt(__ENV[name] || fallback, 10);
}

const scenarios = {};
for (const [name, variable, fallback] of [
  ['chat', 'SOP_CHAT_VUS', '3'], ['rag', 'SOP_RAG_VUS', '1'], ['ingest', 'SOP_INGEST_VUS', '1']]) {
  const count = vus(variable, fallback);
  // A class set to 0 VUs is left out (k6 refuses a constant-vus scenario without VUs).
  if (count > 0) scenarios[name] = { executor: 'constant-vus', exec: name, vus: count, duration: DURATION };
}

export const options = {
  scenarios,
  thresholds: {
    sop_rejected: ['rate<0.05'],
    sop_timed_out: ['rate<0.01'],
    sop_completion: ['p(95)<45000'],
  },
};

function text(sizeBytes) {
  const out = [];
  let size = 0;
  while (size < sizeBytes) {
    const word = WORDS[Math.floor(Math.random() * WORDS.length)];
    out.push(word);
    size += word.length + 1;
  }
  return out.join(' ');
}

function between(low, high) {
  return low + Math.random() * (high - low);
}

function headers(variable) {
  const key = __ENV[variable] || '';
  const result = { 'Content-Type': 'application/json' };
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

// The proxy's last line of a stream its deadline cut (status 200 already sent): a timeout, as the
// proxy's own timeouts SLO counts it, not a completion.
const DEADLINE_LINE = /"code"\s*:\s*"upstream_response_timeout"/;

function cutByDeadline(response) {
  if (response.status !== 200 || typeof response.body !== 'string') return false;
  const lines = response.body.trimEnd().split('\n');
  return DEADLINE_LINE.test(lines[lines.length - 1]);
}

// Any other error line ending a 200 stream (the replica failed mid-way): a failure.
function failedInStream(response) {
  if (typeof response.body !== 'string') return false;
  const lines = response.body.trimEnd().split('\n');
  return /^\s*(data: )?\{"error"/.test(lines[lines.length - 1]);
}

// The proxy's 503 for a request that waited queue_timeout_s for a slot: a rejection and a timeout, as
// its SLO rules count it.
const QUEUE_TIMEOUT = /"code"\s*:\s*"queue_timeout"/;

function send(path, body, variable, stream) {
  const response = http.post(`${HOST}${path}`, JSON.stringify(body),
    { headers: headers(variable), timeout: '120s', tags: { name: path } });
  const isRejected = response.status === 429 || response.status === 503;
  const isCut = cutByDeadline(response);
  rejected.add(isRejected);
  const queueTimeout = response.status === 503 && typeof response.body === 'string'
    && QUEUE_TIMEOUT.test(response.body);
  timedOut.add(response.status === 504 || response.status === 0 || isCut || queueTimeout);
  if (response.status === 200 && !isCut && !failedInStream(response)) {
    completion.add(response.timings.duration, { route: path });
    if (stream) ttft.add(response.timings.waiting, { route: path });
  } else if ((response.status >= 500 && response.status !== 503 && response.status !== 504)
             || (response.status === 200 && !isCut)) {
    // A failure (a 5xx other than the refusal and the timeout, a stream ended by an error line) never
    // completed: a completion slower than 45 s, the client's whole timeout, as loadgen and the rules
    // count it.
    completion.add(120000, { route: path });
  }
  if (isRejected) {
    // Honour Retry-After, as the Ollama SDKs' users should.
    sleep(parseFloat(response.headers['Retry-After'] || '1'));
  }
  return response;
}

export function chat() {
  send('/api/chat', {
    model: MODEL, stream: true, messages: [
      { role: 'system', content: 'Answer briefly.' },
      { role: 'user', content: text(between(60, 400)) }],
  }, 'SOP_CHAT_KEY', true);
  sleep(between(2, 8));
}

export function rag() {
  const context = text(between(8 * 1024, 64 * 1024));
  send('/api/generate', {
    model: MODEL, stream: true, prompt: `Context:\n${context}\n\nQuestion: why?\nAnswer:`,
  }, 'SOP_RAG_KEY', true);
  sleep(between(5, 20));
}

export function ingest() {
  const chunks = [];
  const count = Math.floor(between(16, 65));
  for (let i = 0; i < count; i += 1) chunks.push(text(between(700, 1300)));
  send('/api/embed', { model: EMBED_MODEL, input: chunks }, 'SOP_INGEST_KEY', false);
  sleep(between(0.5, 2));
}
