// Compile-only: the declarations fit ollama-js's `fetch` option and the documented calls.
import { Ollama } from "ollama";
import { chunkText, estimateTokens, retryingFetch, type RetryInfo } from "shared-ollama-client";

const seen: RetryInfo[] = [];
export const client = new Ollama({
  host: "http://127.0.0.1:11435",
  fetch: retryingFetch({ maxAttempts: 3, maxTotalS: 30, onRetry: (info) => seen.push(info) }),
});
export const chunks: string[] = chunkText("One. Two.", { maxTokens: 8, overlap: 2, countTokens: estimateTokens });
