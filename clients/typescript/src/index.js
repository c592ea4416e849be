// shared-ollama-client: a retrying fetch for ollama-js (and any fetch user) in front of a shared Ollama
// service, and paragraph/sentence-aware chunking. Plain ES modules with no dependencies: Node 18+ and
// browsers run this file as it is; the types are in index.d.ts.

/** @typedef {import("./index.d.ts").RetryOptions} RetryOptions */
/** @typedef {import("./index.d.ts").RetryInfo} RetryInfo */

const DEFAULTS = Object.freeze({
  maxAttempts: 5,
  maxTotalS: 120,
  maxRetryAfterS: 60,
  backoffBaseS: 0.5,
  backoffMaxS: 8,
  retryAfterJitter: 0.1,
  statuses: [429, 502, 503, 504],
  maxTimeoutRetries: 1,
});

/** The wait a server asked for, in seconds: `retry-after-ms` first, else `Retry-After` (seconds or an
 * HTTP date; a past date is 0). `null` when neither is present or parseable.
 * @param {Headers} headers @param {number} [nowMs] @returns {number | null} */
export function serverDelayS(headers, nowMs = Date.now()) {
  const ms = headers.get("retry-after-ms");
  if (ms !== null) {
    const value = decimal(ms);
    if (value !== null && value >= 0) return value / 1000;
  }
  const seconds = headers.get("retry-after");
  if (seconds === null) return null;
  const value = decimal(seconds);
  if (value !== null) return value >= 0 ? value : null;
  const when = httpDateMs(seconds, nowMs);
  return when === null ? null : Math.max(0, (when - nowMs) / 1000);
}

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
const MONTH = `(${MONTHS.join("|")})`;
const TIME = "([0-9]{2}):([0-9]{2}):([0-9]{2})";
const IMF_FIXDATE = new RegExp(`^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), ([0-9]{2}) ${MONTH} ([0-9]{4}) ${TIME} GMT$`);
const RFC850_DATE = new RegExp(
  `^(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), ([0-9]{2})-${MONTH}-([0-9]{2}) ${TIME} GMT$`);
const ASCTIME_DATE = new RegExp(`^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) ${MONTH} ([0-9]{2}| [0-9]) ${TIME} ([0-9]{4})$`);

/** `text` as an HTTP date in milliseconds since the epoch, else null: exactly RFC 9110's three forms
 * (IMF-fixdate, the obsolete RFC 850 form, asctime), case-sensitive, a real calendar day and time (no
 * 31 Feb, no second 60; the weekday is not checked); a two-digit year is the one in this century, or the
 * last, if that would be more than 50 years after `nowMs`'s year. The Python helper's `http_date`
 * grammar: V8's Date.parse reads garbage such as "soon 3" as a date in 2001 (a wait of 0: every client
 * back at once), rolls 31 Feb over into March and reads zones and forms Python's parser read otherwise.
 * @param {string} text @param {number} nowMs @returns {number | null} */
function httpDateMs(text, nowMs) {
  const stripped = stripOws(text);
  let match;
  /** @type {string[]} */
  let fields;
  if ((match = IMF_FIXDATE.exec(stripped))) {
    const [, day, month, year, ...time] = match;
    fields = [year, month, day, ...time];
  } else if ((match = RFC850_DATE.exec(stripped))) {
    const [, day, month, short, ...time] = match;
    const thisYear = new Date(nowMs).getUTCFullYear();
    const century = Math.floor(thisYear / 100) * 100;
    const year = century + Number(short) - (century + Number(short) > thisYear + 50 ? 100 : 0);
    fields = [String(year), month, day, ...time];
  } else if ((match = ASCTIME_DATE.exec(stripped))) {
    const [, month, day, hour, minute, second, year] = match;
    fields = [year, month, day, hour, minute, second];
  } else {
    return null;
  }
  const [year, month, day, hour, minute, second] = fields.map((f, i) => (i === 1 ? MONTHS.indexOf(f) : Number(f)));
  const date = new Date(0);
  date.setUTCFullYear(year, month, day);  // not Date.UTC, which reads years 0-99 as 1900-1999
  date.setUTCHours(hour, minute, second, 0);
  // Date rolls 31 Feb over into March and second 60 into the next minute: only an exact round trip is a date.
  const exact = year >= 1 && date.getUTCFullYear() === year && date.getUTCMonth() === month
    && date.getUTCDate() === day && date.getUTCHours() === hour && date.getUTCMinutes() === minute
    && date.getUTCSeconds() === second;
  return exact ? date.getTime() : null;
}

const DECIMAL = /^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$/;

/** HTTP's optional whitespace (spaces, tabs) off both ends; trim() would take other characters than the
 * Python helper's strip. @param {string} text */
const stripOws = (text) => text.replace(/^[ \t]+|[ \t]+$/g, "");

/** `text` as a finite decimal number (ASCII digits, optional sign, fraction and exponent), else null:
 * the Python helper's grammar (Number() alone also reads `0x10`, `0b11`, `0o7` and the empty string).
 * @param {string} text @returns {number | null} */
function decimal(text) {
  const stripped = stripOws(text);
  if (!DECIMAL.test(stripped)) return null;
  const value = Number(stripped);
  return Number.isFinite(value) ? value : null;
}


/** Seconds to wait before attempt `attempt + 1`, or `null` when the answer must not be retried;
 * `response` null means the connection failed. Attempts and budget are checked by the caller.
 * @param {Required<Omit<RetryOptions, "fetch" | "onRetry" | "random">>} policy @param {number} attempt
 * @param {Response | null} response @param {() => number} random @returns {number | null} */
/** The longest Retry-After the proxy sends; a longer wait is `x-should-retry: false` with that header. */
const PROXY_RETRY_AFTER_CAP_S = 60;

export function retryDelay(policy, attempt, response, random = Math.random) {
  let server = null;
  if (response !== null) {
    // Only HTTP's spaces and tabs are padding (trim() would also take NBSP, which Python's helper keeps).
    const should = stripOws(response.headers.get("x-should-retry") ?? "").toLowerCase();
    const forced = should === "true" && response.status >= 400; // the OpenAI SDKs' rule
    if (!policy.statuses.includes(response.status) && !forced) return null;
    server = serverDelayS(response.headers);
    if (should === "false" && (server === null || policy.maxRetryAfterS <= PROXY_RETRY_AFTER_CAP_S)) {
      // With a wait, `false` is the proxy's "longer than its Retry-After may say (60 s)": a policy that
      // accepts longer waits (a bulk job) comes back after the wait it was told, within its
      // `maxRetryAfterS` like any other wait (below).
      return null;
    }
  }
  if (server !== null) {
    if (server > policy.maxRetryAfterS) return null;
    return server + random() * server * policy.retryAfterJitter;
  }
  const ceiling = Math.min(policy.backoffMaxS, policy.backoffBaseS * 2 ** Math.min(attempt - 1, 62));
  return random() * ceiling;
}

/** @param {unknown} body */
function replayable(body) {
  return body === undefined || body === null || typeof body === "string" || body instanceof ArrayBuffer
    || ArrayBuffer.isView(body) || body instanceof URLSearchParams
    || (typeof Blob !== "undefined" && body instanceof Blob);
}

/** @param {unknown} error */
function connectionRefused(error) {
  const cause = /** @type {{ cause?: { code?: string } }} */ (error)?.cause;
  return error instanceof TypeError && cause?.code === "ECONNREFUSED";
}

/** @param {number} seconds @param {AbortSignal | null | undefined} signal @returns {Promise<void>} */
function sleep(seconds, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => { clearTimeout(timer); reject(signal?.reason); };
    const timer = setTimeout(() => { signal?.removeEventListener("abort", onAbort); resolve(); },
      seconds * 1000);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** @param {RequestInfo | URL} input @param {RequestInit | undefined} init */
function describe(input, init) {
  const url = typeof input === "string" ? input : input instanceof URL ? input.href : input.url;
  let path = "(unknown)";
  try { path = new URL(url).pathname.slice(0, 200); } catch { /* relative URL: leave it out */ }
  const method = (init?.method ?? (input instanceof Request ? input.method : "GET")).toUpperCase();
  return { method, path };
}

/** @param {RetryInfo} info */
function logRetry(info) {
  console.info(`shared-ollama-client: retrying ${info.method} ${info.path} in ${info.delayS.toFixed(2)} s ` +
    `after ${info.status === null ? "a connection failure" : `status ${info.status}`} ` +
    `(attempt ${info.attempt} of ${info.maxAttempts})`);
}

/**
 * A fetch-compatible function that retries what a shared service asks to be retried:
 * `new Ollama({ host, fetch: retryingFetch() })`. See index.d.ts for the policy.
 * @param {RetryOptions} [options] @returns {typeof fetch}
 */
export function retryingFetch(options = {}) {
  const policy = { ...DEFAULTS, ...Object.fromEntries(Object.entries(options).filter(
    ([key, value]) => value !== undefined && key in DEFAULTS)) };
  if (!(Number.isInteger(policy.maxAttempts) && policy.maxAttempts >= 1)) {
    throw new RangeError("maxAttempts must be an integer >= 1");
  }
  if (!(Number.isInteger(policy.maxTimeoutRetries) && policy.maxTimeoutRetries >= 0)) {
    throw new RangeError("maxTimeoutRetries must be an integer >= 0");
  }
  for (const key of ["maxTotalS", "maxRetryAfterS", "backoffBaseS", "backoffMaxS"]) {
    const value = /** @type {number} */ (policy[/** @type {keyof typeof policy} */ (key)]);
    if (!(Number.isFinite(value) && value > 0)) throw new RangeError(`${key} must be > 0 seconds`);
  }
  if (!(policy.retryAfterJitter >= 0 && policy.retryAfterJitter <= 1)) {
    throw new RangeError("retryAfterJitter must be between 0 and 1");
  }
  const inner = options.fetch ?? globalThis.fetch;
  const onRetry = options.onRetry ?? logRetry;
  const random = options.random ?? Math.random;

  /** @param {RequestInfo | URL} input @param {RequestInit} [init] @returns {Promise<Response>} */
  return async function fetchWithRetry(input, init) {
    const started = performance.now();
    const canReplay = replayable(init?.body) && !(input instanceof Request && input.body !== null);
    const signal = init?.signal ?? (input instanceof Request ? input.signal : undefined);
    let timeouts = 0;  // 504 answers so far, counted in `plan`
    /** @param {number} attempt @param {Response | null} response */
    const plan = (attempt, response) => {
      if (response?.status === 504) timeouts += 1;
      if (attempt >= policy.maxAttempts || !canReplay || timeouts > policy.maxTimeoutRetries) return null;
      const delay = retryDelay(policy, attempt, response, random);
      if (delay === null || (performance.now() - started) / 1000 + delay > policy.maxTotalS) return null;
      onRetry({ ...describe(input, init), delayS: delay, status: response === null ? null : response.status,
        attempt: attempt + 1, maxAttempts: policy.maxAttempts });
      return delay;
    };
    for (let attempt = 1; ; attempt++) {
      /** @type {Response} */
      let response;
      try {
        response = await inner(input, init);
      } catch (error) {
        const delay = connectionRefused(error) ? plan(attempt, null) : null;
        if (delay === null) throw error;
        await sleep(delay, signal);
        continue;
      }
      const delay = plan(attempt, response);
      if (delay === null) return response;
      await response.body?.cancel().catch(() => undefined);  // frees the connection
      await sleep(delay, signal);
    }
  };
}

export const BYTES_PER_TOKEN_ESTIMATE = 3;
// Whitespace is Unicode's White_Space, as in the Python package (`\s` and trim() would also take a
// byte-order mark, U+FEFF, and Python's own \x1c-\x1f: the two would cut the same text differently).
const PIECE = /([\p{L}\p{N}_]+)|(\p{White_Space}+)|[^\p{L}\p{N}_\p{White_Space}]/gu;
const PARAGRAPH = /\n[ \t\r\f\v]*\n\p{White_Space}*/u;
const SENTENCE = /(?<=[.!?])\p{White_Space}+|(?<=[\u3002\uff01\uff1f])\p{White_Space}*/u;
const SPACES = /\p{White_Space}+/u;
/** @param {string} text */
const stripWs = (text) => text.replace(/^\p{White_Space}+|\p{White_Space}+$/gu, "");
const encoder = new TextEncoder();

/** The same over-estimate as the Python package: a word is ceil(UTF-8 bytes / 3) tokens, any other
 * visible character one, a run of two or more whitespace characters one.
 * @param {string} text @returns {number} */
export function estimateTokens(text) {
  let total = 0;
  for (const match of text.matchAll(PIECE)) {
    if (match[1] !== undefined) total += Math.ceil(encoder.encode(match[1]).length / BYTES_PER_TOKEN_ESTIMATE);
    else if (match[2] !== undefined) total += match[2].length > 1 ? 1 : 0;
    else total += 1;
  }
  return total;
}

/** @typedef {[string, string]} Unit */

/** @param {Unit[]} units */
const join = (units) => units.map(([text, sep], i) => (i ? sep : "") + text).join("");

/** @param {string} word @param {number} max @param {(s: string) => number} count */
function splitLongWord(word, max, count) {
  let chars = Array.from(word);
  const pieces = [];
  while (chars.length) {
    let low = 1;
    let high = chars.length;
    while (low < high) {
      const mid = Math.floor((low + high + 1) / 2);
      if (count(chars.slice(0, mid).join("")) <= max) low = mid; else high = mid - 1;
    }
    pieces.push(chars.slice(0, low).join(""));
    chars = chars.slice(low);
  }
  return pieces;
}

/** @param {string} sentence @param {number} max @param {(s: string) => number} count */
function packWords(sentence, max, count) {
  const words = stripWs(sentence).split(SPACES).filter(Boolean)
    .flatMap((w) => (count(w) <= max ? [w] : splitLongWord(w, max, count)));
  const pieces = [];
  let current = "";
  for (const word of words) {
    const candidate = current ? `${current} ${word}` : word;
    if (current && count(candidate) > max) { pieces.push(current); current = word; } else current = candidate;
  }
  if (current) pieces.push(current);
  return pieces;
}

/**
 * Split `text` into chunks of at most `maxTokens` tokens, in order: paragraphs packed whole while they
 * fit, a longer paragraph split at sentence ends, a longer sentence at spaces, a longer word anywhere.
 * Consecutive chunks share up to `overlap` tokens (whole trailing units). Deterministic; the same
 * algorithm and estimate as the Python package's `chunk_text`.
 * @param {string} text @param {import("./index.d.ts").ChunkOptions} options @returns {string[]}
 */
export function chunkText(text, { maxTokens, overlap = 0, countTokens = estimateTokens }) {
  if (!(Number.isInteger(maxTokens) && maxTokens >= 1)) throw new RangeError("maxTokens must be >= 1");
  if (!(Number.isInteger(overlap) && overlap >= 0 && overlap < maxTokens)) {
    throw new RangeError("overlap must be >= 0 and smaller than maxTokens");
  }
  const count = countTokens;
  /** @type {Unit[]} */
  const units = [];
  for (const rawParagraph of stripWs(text).split(PARAGRAPH)) {
    const paragraph = stripWs(rawParagraph);
    if (!paragraph) continue;
    /** @type {string[]} */
    let pieces = [paragraph];
    if (count(paragraph) > maxTokens) {
      pieces = paragraph.split(SENTENCE).map(stripWs).filter(Boolean)
        .flatMap((s) => (count(s) <= maxTokens ? [s] : packWords(s, maxTokens, count)));
    }
    pieces.forEach((piece, i) => units.push([piece, i === 0 ? "\n\n" : " "]));
  }
  const chunks = [];
  /** @type {Unit[]} */
  let current = [];
  for (const unit of units) {
    const candidate = [...current, unit];
    if (!current.length || count(join(candidate)) <= maxTokens) { current = candidate; continue; }
    chunks.push(join(current));
    /** @type {Unit[]} */
    const tail = [];
    if (overlap) {
      for (let i = current.length - 1; i >= 0; i--) {
        if (count(join([current[i], ...tail])) > overlap) break;
        tail.unshift(current[i]);
      }
    }
    while (tail.length && count(join([...tail, unit])) > maxTokens) tail.shift();
    current = [...tail, unit];
  }
  if (current.length) chunks.push(join(current));
  return chunks;
}

export const SUPPORTED_LIMITS_VERSIONS = Object.freeze([1]);
const LIMIT_KEY = /^[a-z][a-z0-9_]{0,63}$/;
const LIMIT_VALUE = /^[A-Za-z0-9_.:+-]{1,64}$/;
const COUNT_KEYS = Object.freeze(["max_body_bytes", "max_prompt_tokens"]);
const V1_KEYS = Object.freeze({ max_body_bytes: "maxBodyBytes", max_prompt_tokens: "maxPromptTokens",
  deadline_s: "deadlineS", requests_per_minute: "requestsPerMinute" });

/** Parse an `X-Service-Limits` value (`v=1; key=value; ...`); null without an integer `v=` first.
 * Bounded (4096 characters, 64 keys) and malformed parts skipped: the header comes from the network.
 * Past 4096 characters the part the bound cuts through is dropped (`max_body_bytes=33554432` cut to
 * `max_body_bytes=33` would be a wrong limit), as in the Python helper.
 * @param {string} value @returns {import("./index.d.ts").ServiceLimits | null} */
export function parseServiceLimits(value) {
  const parts = value.slice(0, 4096).split(";").map(stripOws);
  if (value.length > 4096) parts.pop();
  if (!parts[0]?.startsWith("v=") || !/^[0-9]{1,15}$/.test(parts[0].slice(2))) return null;
  const version = Number(parts[0].slice(2));
  /** @type {Record<string, string>} */
  const raw = {};
  for (const part of parts.slice(1)) {
    const at = part.indexOf("=");
    if (at < 0) continue;
    const key = stripOws(part.slice(0, at));
    const item = stripOws(part.slice(at + 1));
    if (LIMIT_KEY.test(key) && LIMIT_VALUE.test(item) && !(key in raw)) {
      raw[key] = item;
      if (Object.keys(raw).length >= 64) break;
    }
  }
  const understood = SUPPORTED_LIMITS_VERSIONS.includes(version);
  /** @type {import("./index.d.ts").ServiceLimits} */
  const limits = { version, raw, understood };
  if (understood) {
    for (const [key, name] of Object.entries(V1_KEYS)) {
      const number = key in raw ? decimal(raw[key]) : null;
      // Counts (bytes, tokens) only as whole numbers, as in the Python helper.
      if (number !== null && (!COUNT_KEYS.includes(key) || Number.isInteger(number))) {
        Object.assign(limits, { [name]: number });
      }
    }
  }
  return limits;
}

/** The `X-Service-Limits` of a response (or of its headers), or null.
 * @param {Response | Headers} response @returns {import("./index.d.ts").ServiceLimits | null} */
export function serviceLimits(response) {
  const headers = response instanceof Headers ? response : response.headers;
  const value = headers.get("x-service-limits");
  return value === null ? null : parseServiceLimits(value);
}
