/**
 * shared-ollama-client: client helpers for a shared Ollama service (shared-ollama-proxy).
 *
 * `retryingFetch()` plugs into ollama-js unchanged: `new Ollama({ host, fetch: retryingFetch() })`.
 */

/** When and how long to wait before sending a request again. */
export interface RetryOptions {
  /** Attempts in all, the first included (1 disables retries). Default 5. */
  maxAttempts?: number;
  /** Budget from the start of the first attempt, in seconds: no wait is started that would end after it.
   * Default 120. */
  maxTotalS?: number;
  /** A server-told wait longer than this (seconds) is a refusal to surface, not a wait. Default 60. Above
   * 60, a 429/503 with `x-should-retry: false` and a Retry-After (the proxy's "longer than 60 s") is
   * retried after that wait: bulk jobs poll every minute within `maxTotalS`. */
  maxRetryAfterS?: number;
  /** First backoff ceiling (seconds) when the server gave no wait. Default 0.5. */
  backoffBaseS?: number;
  /** Largest backoff ceiling (seconds). Default 8. */
  backoffMaxS?: number;
  /** Extra wait of up to this share of a server-told wait, so clients told the same second spread out.
   * Default 0.1. */
  retryAfterJitter?: number;
  /** Statuses retried without `x-should-retry: true`. Default [429, 502, 503, 504]. */
  statuses?: number[];
  /** 504 answers retried per request, whatever `maxAttempts` allows. Default 1: a request that timed out
   * may have kept a replica busy for the whole timeout, and retrying it again and again multiplies the
   * load the timeout was there to shed. */
  maxTimeoutRetries?: number;
  /** The fetch to wrap. Default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** Called before each wait (default: one `console.info` line with method, path, wait and status;
   * never the body or a key). */
  onRetry?: (info: RetryInfo) => void;
  /** A source of uniform numbers in [0, 1) for the jitter. Default `Math.random`. */
  random?: () => number;
}

/** What is about to be retried. */
export interface RetryInfo {
  method: string;
  /** The URL's path only (no query), at most 200 characters. */
  path: string;
  /** The wait before the next attempt, in seconds. */
  delayS: number;
  /** The status that is retried, or null after a refused connection. */
  status: number | null;
  /** The number of the attempt that follows the wait. */
  attempt: number;
  maxAttempts: number;
}

/**
 * A fetch-compatible function with the shared service's retry policy.
 *
 * Retried: 429, 502, 503, 504 (the proxy answers 502/504 only before the first body byte; a 504 is
 * retried once, see `maxTimeoutRetries`) and refused connections. The wait is the server's
 * (`retry-after-ms`, else `Retry-After` seconds or HTTP date) plus up to `retryAfterJitter` of it, else
 * exponential backoff with full jitter. Never retried: an answer with `x-should-retry: false`, any other
 * status (unless an error carries `x-should-retry: true`), a response once it is returned (a stream that
 * started: the response is returned as soon as its headers arrive, the body is never buffered), aborts,
 * header timeouts and other network errors, and a request whose body cannot be sent twice (a
 * ReadableStream, or a `Request` with a body). A server wait longer than `maxRetryAfterS` or past the
 * `maxTotalS` budget is not slept through: the answer is returned at once so the caller sees
 * the refusal (ollama-js throws `ResponseError` with the service's message and `status_code`). Aborting
 * the request's signal during a wait rejects at once.
 */
export function retryingFetch(options?: RetryOptions): typeof fetch;

/** The wait a server asked for, in seconds, or null (see `retryingFetch`). */
export function serverDelayS(headers: Headers, nowMs?: number): number | null;

/** Seconds to wait before attempt `attempt + 1`, or null when `response` must not be retried (`null`
 * response: the connection failed). */
export function retryDelay(
  policy: Required<Omit<RetryOptions, "fetch" | "onRetry" | "random">>,
  attempt: number,
  response: Response | null,
  random?: () => number,
): number | null;

export interface ChunkOptions {
  /** Largest chunk, in tokens. */
  maxTokens: number;
  /** Tokens consecutive chunks may share (whole trailing sentences or paragraphs). Default 0. */
  overlap?: number;
  /** The model's tokenizer; default `estimateTokens`, an over-estimate for prose and code. */
  countTokens?: (text: string) => number;
}

/** Bytes of a word per estimated token (3). */
export const BYTES_PER_TOKEN_ESTIMATE: number;

/** A deterministic over-estimate of a tokenizer's count for prose and code: a word is ceil(UTF-8
 * bytes / 3) tokens, any other visible character one, a run of two or more whitespace characters one.
 * Long runs of random letters and digits (hashes, base64) can be under-counted: pass `countTokens`. */
export function estimateTokens(text: string): number;

/** Split `text` into chunks of at most `maxTokens` tokens, in document order, paragraph- then
 * sentence-aware; deterministic. */
export function chunkText(text: string, options: ChunkOptions): string[];

/**
 * A parsed `X-Service-Limits` header. Versioning rules: within a version keys are only added, never
 * renamed or given a new meaning; a change of meaning is a new `v=`. So `raw` keeps every key (unknown
 * ones included) and the typed fields are set only for versions this package understands.
 */
export interface ServiceLimits {
  version: number;
  /** Every well-formed key, its value as sent. */
  raw: Record<string, string>;
  /** Whether the meanings of the typed fields are known for this version. */
  understood: boolean;
  /** Largest request body accepted, in bytes. */
  maxBodyBytes?: number;
  /** Largest prompt accepted, in the model's tokens. */
  maxPromptTokens?: number;
  /** The request's deadline, in seconds. */
  deadlineS?: number;
  /** The tenant's request rate limit. */
  requestsPerMinute?: number;
}

/** Versions of `X-Service-Limits` whose keys this package understands. */
export const SUPPORTED_LIMITS_VERSIONS: readonly number[];

/** Parse an `X-Service-Limits` value; null without an integer `v=` first. */
export function parseServiceLimits(value: string): ServiceLimits | null;

/** The `X-Service-Limits` of a response (or headers), or null when absent or unparseable. */
export function serviceLimits(response: Response | Headers): ServiceLimits | null;
